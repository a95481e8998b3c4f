"""RoPE frequencies, computed by transformers' own rotary-embedding class of each family
(so every rope scaling variant a config declares is honoured), and applied by the decoder.

A decoder has up to three frequency tables, ``[rope_dim / 2]`` float32 each:

* ``inv_freq``: every layer's, or Gemma 3's full-attention layers';
* ``local``: Gemma 3's sliding-window layers' (their own RoPE base);
* ``long``: longrope's long-factor table (Phi-3), used for a step of a sequence longer
  than ``original_max_position_embeddings``, as transformers does when it generates: the
  switch depends only on the sequence's position, so the graph computes it from its
  position input. Keys already in the cache keep the rotation they were written with
  (transformers' cache does the same; only a full recompute would rotate them anew).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

import torch

from clada_export.model.config import SUPPORTED_MODEL_TYPES, rope_parameter_sets


@dataclass
class RopeTables:
    inv_freq: torch.Tensor
    scaling: float = 1.0  # transformers' attention_scaling: cos and sin are multiplied by it
    local: torch.Tensor | None = None
    local_scaling: float = 1.0
    long: torch.Tensor | None = None


def _rotary_class(hf_config: Any):
    name = SUPPORTED_MODEL_TYPES[hf_config.model_type]
    module = importlib.import_module(f"transformers.models.{name}.modeling_{name}")
    return next(getattr(module, n) for n in dir(module) if n.endswith("RotaryEmbedding"))


def rope_tables(hf_config: Any) -> RopeTables:
    """The frequency tables of this checkpoint (see the module docstring); an empty
    ``inv_freq`` for a family with learned positions (GPT-2, OPT)."""
    if SUPPORTED_MODEL_TYPES[hf_config.model_type] is None:
        return RopeTables(torch.zeros(0))
    rotary = _rotary_class(hf_config)(config=hf_config)
    sets = rope_parameter_sets(hf_config)
    if None not in sets:  # one parameter set per layer type (Gemma 3)
        return RopeTables(
            inv_freq=rotary.full_attention_inv_freq.detach().float().clone(),
            scaling=float(rotary.full_attention_attention_scaling),
            local=rotary.sliding_attention_inv_freq.detach().float().clone(),
            local_scaling=float(rotary.sliding_attention_attention_scaling),
        )
    tables = RopeTables(rotary.inv_freq.detach().float().clone(), float(getattr(rotary, "attention_scaling", 1.0)))
    params = sets[None]
    if params.get("rope_type", params.get("type")) == "longrope":
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        after = int(params["original_max_position_embeddings"])
        long, scaling = ROPE_INIT_FUNCTIONS["longrope"](hf_config, None, seq_len=after + 1)
        if float(scaling) != tables.scaling:
            raise ValueError("longrope's short and long tables have different attention scaling")
        tables.long = long.detach().float().clone()
    return tables


def rope_frequencies(hf_config: Any) -> tuple[torch.Tensor, float]:
    """``inv_freq [rope_dim/2]`` and the attention scaling of the (full-attention) layers."""
    t = rope_tables(hf_config)
    return t.inv_freq, t.scaling


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, scaling: float, dtype: torch.dtype
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos``, ``sin`` ``[B, 1, T, rope_dim]`` for ``positions [B, T]`` (``inv_freq``
    ``[rope_dim/2]``, or ``[B, 1, rope_dim/2]`` per sequence), rounded to ``dtype`` as
    transformers does."""
    freqs = positions[..., None].float() * inv_freq  # [B, T, d/2]
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]
    return (emb.cos() * scaling).to(dtype), (emb.sin() * scaling).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on the first ``cos.shape[-1]`` channels of ``x [B, heads, T, head_dim]``; the
    rest pass through (partial rotary)."""
    d = cos.shape[-1]
    if d == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    rot, rest = x[..., :d], x[..., d:]
    return torch.cat((rot * cos + rotate_half(rot) * sin, rest), dim=-1)
