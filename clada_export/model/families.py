"""Model families as adapters onto the one decoder (``model/llama.py``).

Each family is a short list of differences from the Llama layout: the
:class:`~clada_export.model.config.DecoderConfig` fields it sets (:func:`family_fields`)
and, where its checkpoint fuses matrices that our decoder keeps apart, how to split
them at load (:func:`split_fused`). Nothing here computes anything: the decoder reads
the fields, and every MLP stays the one SparseMLP op.

* Llama 2/3, SmolLM: the default layout.
* Mistral: a sliding window on every layer.
* Qwen2: q/k/v biases, no o bias. Qwen3: q/k RMSNorm per head.
* Gemma 2: GeGLU (gelu_tanh), embeddings times sqrt(hidden), RMSNorm by (1 + weight),
  four norms a block (the attention and MLP outputs normed too), attention scale
  ``query_pre_attn_scalar ** -0.5``, soft-capped attention scores and final logits,
  a sliding window on the layers ``layer_types`` names.
* Gemma 3 (text, ``gemma3_text``): as Gemma 2, plus q/k RMSNorm, and the sliding layers
  have their own RoPE base; no soft-capping (transformers' Gemma 3 applies none).
* Phi-3: fused ``qkv_proj`` and ``gate_up_proj`` split at load, partial rotary, longrope
  (``model/rope.py``), a sliding window on every layer when the config sets one.
"""

from __future__ import annotations

from typing import Any

import torch

from clada_export.errors import UserError


def _gemma_common(hf: Any) -> dict:
    if getattr(hf, "use_bidirectional_attention", False):
        raise UserError(f"{hf.model_type} with use_bidirectional_attention=true is not a causal decoder; "
                        "not supported")
    layer_types = getattr(hf, "layer_types", None) or ["full_attention"] * hf.num_hidden_layers
    return dict(
        norm_offset=1.0,
        # transformers rounds sqrt(hidden) to the weights' dtype; the decoder does the same
        embed_scale=float(hf.hidden_size) ** 0.5,
        sandwich_norms=True,
        attn_scale=float(hf.query_pre_attn_scalar) ** -0.5,
        sliding_window=getattr(hf, "sliding_window", None),
        sliding_layers=tuple(t == "sliding_attention" for t in layer_types),
        final_softcap=getattr(hf, "final_logit_softcapping", None),
    )


def _llama(hf: Any, head_dim: int) -> dict:
    return {}


def _mistral(hf: Any, head_dim: int) -> dict:
    return dict(sliding_window=getattr(hf, "sliding_window", None))


def _qwen(hf: Any, head_dim: int) -> dict:
    if getattr(hf, "use_sliding_window", False):
        raise UserError(f"{hf.model_type} with use_sliding_window=true is not supported")
    if hf.model_type == "qwen2":  # Qwen2 always has q/k/v biases and never an o bias
        return dict(qkv_bias=True, o_bias=False)
    return dict(qk_norm=True)


def _gemma2(hf: Any, head_dim: int) -> dict:
    return dict(_gemma_common(hf), attn_softcap=getattr(hf, "attn_logit_softcapping", None))


def _gemma3(hf: Any, head_dim: int) -> dict:
    # Gemma 3's attention ignores attn_logit_softcapping (transformers passes no softcap)
    return dict(_gemma_common(hf), qk_norm=True, local_rope=True)


def _phi3(hf: Any, head_dim: int) -> dict:
    from clada_export.model.config import rope_parameter_sets

    params = rope_parameter_sets(hf)[None]
    partial = float(params.get("partial_rotary_factor", getattr(hf, "partial_rotary_factor", 1.0)) or 1.0)
    rotary_dim = int(head_dim * partial)
    long_after = None
    if params.get("rope_type", params.get("type")) == "longrope":
        long_after = int(params.get("original_max_position_embeddings")
                         or getattr(hf, "original_max_position_embeddings"))
    return dict(
        sliding_window=getattr(hf, "sliding_window", None),
        rotary_dim=None if rotary_dim == head_dim else rotary_dim,
        rope_long_after=long_after,
    )


_FIELDS = {"llama": _llama, "mistral": _mistral, "qwen2": _qwen, "qwen3": _qwen, "gemma2": _gemma2,
           "gemma3_text": _gemma3, "phi3": _phi3}


def family_fields(model_type: str, hf: Any, head_dim: int) -> dict:
    """The DecoderConfig fields in which ``model_type`` differs from the Llama layout."""
    return _FIELDS[model_type](hf, head_dim)


def split_fused(model_type: str, hf: Any, name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """A checkpoint tensor as our decoder's tensors: Phi-3's ``qkv_proj`` (rows q, k, v)
    and ``gate_up_proj`` (rows gate, up) become the separate projections; any other
    tensor passes through under its own name."""
    if model_type != "phi3":
        return [(name, tensor)]
    prefix, _, leaf = name.rpartition(".")
    owner, _, proj = prefix.rpartition(".")
    if proj == "qkv_proj":
        d = hf.hidden_size // hf.num_attention_heads if getattr(hf, "head_dim", None) is None else hf.head_dim
        kv = (getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads) * d
        q, k, v = tensor.split([hf.num_attention_heads * d, kv, kv], dim=0)
        return [(f"{owner}.q_proj.{leaf}", q), (f"{owner}.k_proj.{leaf}", k), (f"{owner}.v_proj.{leaf}", v)]
    if proj == "gate_up_proj":
        gate, up = tensor.chunk(2, dim=0)
        return [(f"{owner}.gate_proj.{leaf}", gate), (f"{owner}.up_proj.{leaf}", up)]
    return [(name, tensor)]
