"""Model families as adapters onto the one decoder (``model/llama.py``).

Each family is a short list of differences from the Llama layout: the
:class:`~clada_export.model.config.DecoderConfig` fields it sets (:func:`family_fields`)
and, where its checkpoint names, stores or fuses tensors otherwise than our decoder, how
to rename, transpose and split them at load (:func:`checkpoint_tensors`). Nothing here
computes anything: the decoder reads the fields, and every MLP stays the one SparseMLP
op (its gated form, or its plain form with biases).

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
* GPT-2: LayerNorm, the plain MLP (gelu_new = gelu_tanh) with biases, learned positions
  (``wpe``), q/k/v/o biases, tied lm_head; ``Conv1D`` weights are stored ``[in, out]``:
  the attention's are transposed to ``nn.Linear``'s layout, the MLP's already are our
  input-major layout; the fused ``c_attn`` (columns q, k, v) is split at load.
* OPT: LayerNorm, the plain ReLU MLP with biases, learned positions whose table starts
  at row 2 (``position_offset``), biases everywhere, tied lm_head. Pre-norm only.
* GPT-NeoX / Pythia: LayerNorm, the plain gelu MLP with biases, parallel residual (or
  not: ``use_parallel_residual``), partial rotary, q/k/v/o biases, untied ``embed_out``;
  the fused ``query_key_value`` is per head ``(q, k, v)`` rows, split at load.
"""

from __future__ import annotations

import re
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


def _partial_rotary(hf: Any, head_dim: int) -> int | None:
    """``rotary_dim`` of a config that may rotate fewer channels than a head has (None: all)."""
    from clada_export.model.config import rope_parameter_sets

    params = rope_parameter_sets(hf)[None]
    partial = params.get("partial_rotary_factor", getattr(hf, "partial_rotary_factor", None))
    if partial is None:
        partial = getattr(hf, "rotary_pct", None)  # GPT-NeoX's name
    rotary_dim = int(head_dim * float(partial or 1.0))
    return None if rotary_dim == head_dim else rotary_dim


def _phi3(hf: Any, head_dim: int) -> dict:
    from clada_export.model.config import rope_parameter_sets

    params = rope_parameter_sets(hf)[None]
    long_after = None
    if params.get("rope_type", params.get("type")) == "longrope":
        long_after = int(params.get("original_max_position_embeddings")
                         or getattr(hf, "original_max_position_embeddings"))
    return dict(
        sliding_window=getattr(hf, "sliding_window", None),
        rotary_dim=_partial_rotary(hf, head_dim),
        rope_long_after=long_after,
    )


def _refuse(hf: Any, what: str) -> UserError:
    return UserError(f"{hf.model_type} checkpoints with {what} are not supported")


def _plain_common(hf: Any, eps: float, intermediate: int) -> dict:
    """LayerNorm and the plain MLP with biases (every plain-MLP family)."""
    return dict(layer_norm=True, gated_mlp=False, rms_norm_eps=float(eps), intermediate_size=int(intermediate),
                qkv_bias=True, o_bias=True)


def _gpt2(hf: Any, head_dim: int) -> dict:
    if getattr(hf, "scale_attn_by_inverse_layer_idx", False):
        raise _refuse(hf, "scale_attn_by_inverse_layer_idx=true")
    if getattr(hf, "add_cross_attention", False):
        raise _refuse(hf, "add_cross_attention=true (an encoder-decoder)")
    # reorder_and_upcast_attn changes only where the scores are rounded (float32): the same model
    return dict(
        _plain_common(hf, hf.layer_norm_epsilon, getattr(hf, "n_inner", None) or 4 * hf.hidden_size),
        learned_positions=True,
        attn_scale=None if getattr(hf, "scale_attn_weights", True) else 1.0,
    )


def _opt(hf: Any, head_dim: int) -> dict:
    if not getattr(hf, "do_layer_norm_before", True):
        raise _refuse(hf, "do_layer_norm_before=false (post-norm, e.g. opt-350m)")
    if getattr(hf, "word_embed_proj_dim", hf.hidden_size) != hf.hidden_size:
        raise _refuse(hf, "word_embed_proj_dim != hidden_size (project_in/project_out, e.g. opt-350m)")
    if getattr(hf, "_remove_final_layer_norm", False):
        raise _refuse(hf, "_remove_final_layer_norm=true")
    if not getattr(hf, "enable_bias", True):
        raise _refuse(hf, "enable_bias=false")
    if not getattr(hf, "layer_norm_elementwise_affine", True):
        raise _refuse(hf, "layer_norm_elementwise_affine=false")
    # OPT's LayerNorms use nn.LayerNorm's default eps
    return dict(_plain_common(hf, 1e-5, hf.ffn_dim), learned_positions=True, position_offset=2)


def _gpt_neox(hf: Any, head_dim: int) -> dict:
    fields = dict(
        _plain_common(hf, hf.layer_norm_eps, hf.intermediate_size),
        parallel_residual=bool(getattr(hf, "use_parallel_residual", True)),
        rotary_dim=_partial_rotary(hf, head_dim),
    )
    bias = bool(getattr(hf, "attention_bias", True))
    fields.update(qkv_bias=bias, o_bias=bias)
    return fields


_FIELDS = {"llama": _llama, "mistral": _mistral, "qwen2": _qwen, "qwen3": _qwen, "gemma2": _gemma2,
           "gemma3_text": _gemma3, "phi3": _phi3, "gpt2": _gpt2, "opt": _opt, "gpt_neox": _gpt_neox}


def family_fields(model_type: str, hf: Any, head_dim: int) -> dict:
    """The DecoderConfig fields in which ``model_type`` differs from the Llama layout."""
    return _FIELDS[model_type](hf, head_dim)


def checkpoint_tensors(model_type: str, hf: Any, name: str, tensor: torch.Tensor
                       ) -> list[tuple[str, torch.Tensor]]:
    """A checkpoint tensor as our decoder's tensors: Phi-3's ``qkv_proj`` (rows q, k, v)
    and ``gate_up_proj`` (rows gate, up) become the separate projections; a plain-MLP
    family's tensors are renamed (and split, transposed) onto our names (:data:`_PLAIN`);
    any other tensor passes through under its own name."""
    if model_type in _PLAIN:
        return _plain_tensors(model_type, hf, name, tensor)
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


# The plain-MLP families' checkpoint names -> ours: the prefixes of the model's tensors
# (the first that a name starts with; the original GPT-2 and OPT files were saved from the
# base model, without ``transformer.``/``model.``), of its layers, its top-level and per-layer modules, its fused q/k/v, the buffers some
# checkpoints carry that are not weights; ``conv1d``: weights stored [in, out] (GPT-2).
_PLAIN = {
    "gpt2": dict(
        prefixes=("transformer.", ""), layers="h.", conv1d=True, fused="attn.c_attn", ignore=("attn.bias", "attn.masked_bias"),
        top={"wte": "embed_tokens", "wpe": "embed_positions", "ln_f": "norm"},
        layer={"ln_1": "input_layernorm", "ln_2": "post_attention_layernorm", "attn.c_proj": "self_attn.o_proj",
               "mlp.c_fc": "mlp.in", "mlp.c_proj": "mlp.out"}),
    "opt": dict(
        prefixes=("model.decoder.", "decoder."), layers="layers.", conv1d=False, fused=None, ignore=(),
        top={"embed_tokens": "embed_tokens", "embed_positions": "embed_positions", "final_layer_norm": "norm"},
        layer={"self_attn_layer_norm": "input_layernorm", "final_layer_norm": "post_attention_layernorm",
               "self_attn.q_proj": "self_attn.q_proj", "self_attn.k_proj": "self_attn.k_proj",
               "self_attn.v_proj": "self_attn.v_proj", "self_attn.out_proj": "self_attn.o_proj",
               "fc1": "mlp.in", "fc2": "mlp.out"}),
    "gpt_neox": dict(
        prefixes=("gpt_neox.",), layers="layers.", conv1d=False, fused="attention.query_key_value",
        ignore=("attention.bias", "attention.masked_bias", "attention.rotary_emb.inv_freq"),
        top={"embed_in": "embed_tokens", "final_layer_norm": "norm"},
        layer={"input_layernorm": "input_layernorm", "post_attention_layernorm": "post_attention_layernorm",
               "attention.dense": "self_attn.o_proj", "mlp.dense_h_to_4h": "mlp.in", "mlp.dense_4h_to_h": "mlp.out"}),
}
_HEADS = {"lm_head.weight", "embed_out.weight"}  # the output projection, outside the prefix
_MLP_LEAVES = {("mlp.in", "weight"): "w_in_t", ("mlp.in", "bias"): "b_in",
               ("mlp.out", "weight"): "w_out_t", ("mlp.out", "bias"): "b_out"}


def _plain_tensors(model_type: str, hf: Any, name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    spec = _PLAIN[model_type]
    if name in _HEADS:
        return [("lm_head.weight", tensor)]
    prefix = next((p for p in spec["prefixes"] if name.startswith(p)), None)
    if prefix is None:
        return [(name, tensor)]  # not ours: loading reports it as unexpected
    rest = name[len(prefix):]
    module, _, leaf = rest.rpartition(".")
    if module in spec["top"]:
        return [(f"{spec['top'][module]}.{leaf}", tensor)]
    m = re.fullmatch(re.escape(spec["layers"]) + r"(\d+)\.(.+)", module)
    if m is None:
        return [(name, tensor)]
    layer, module = f"layers.{m.group(1)}", m.group(2)
    if f"{module}.{leaf}" in spec["ignore"]:
        return []
    if module == spec["fused"]:
        return [(f"{layer}.self_attn.{p}_proj.{leaf}", t) for p, t in zip("qkv", _split_qkv(model_type, hf, tensor))]
    ours = spec["layer"].get(module)
    if ours is None:
        return [(name, tensor)]
    if (ours, leaf) in _MLP_LEAVES:
        # our MLP layout is input-major: nn.Linear's weights transposed; GPT-2's Conv1D already is
        if leaf == "weight" and not spec["conv1d"]:
            tensor = tensor.t()
        return [(f"{layer}.mlp.{_MLP_LEAVES[ours, leaf]}", tensor)]
    if leaf == "weight" and spec["conv1d"] and tensor.dim() == 2:
        tensor = tensor.t()  # Conv1D [in, out] -> nn.Linear [out, in]
    return [(f"{layer}.{ours}.{leaf}", tensor)]


def _split_qkv(model_type: str, hf: Any, tensor: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The fused q/k/v as three ``nn.Linear`` weights ``[H*d, hidden]`` (or biases ``[H*d]``)."""
    hidden = hf.hidden_size
    if model_type == "gpt2":  # Conv1D [hidden, 3 hidden], columns q | k | v
        return tuple(t.t() if t.dim() == 2 else t for t in tensor.split(hidden, dim=-1))
    # GPT-NeoX: rows per head, (q, k, v) of head_dim rows each
    heads = hf.num_attention_heads
    d = hidden // heads
    per_head = tensor.reshape(heads, 3, d, *tensor.shape[1:])
    return tuple(per_head[:, i].reshape(heads * d, *tensor.shape[1:]) for i in range(3))
