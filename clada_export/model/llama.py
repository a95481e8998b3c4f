"""An export-friendly decoder for every supported family: the Llama layout (Llama 2/3,
Mistral, Qwen2, Qwen3, SmolLM) and, through the fields a family sets in
:class:`~clada_export.model.config.DecoderConfig` (``model/families.py``), Gemma 2,
Gemma 3, Phi-3, GPT-2, OPT and GPT-NeoX.

In the spirit of gpt-fast's model.py: RMSNorm (or LayerNorm), RoPE (frequencies from
transformers, so every rope_scaling variant a config declares is honoured;
``model/rope.py``) or learned positions, grouped-query attention over a static,
preallocated KV cache written at given positions, and an MLP that is always the one
SparseMLP op, gated or plain. Every step -- prefill of T tokens or decode of one -- is
the same ``forward``; the graphs in ``clada_export/export`` only fix which inputs vary.

Shapes: ``input_ids [B, T]``, ``positions [B, T]`` (RoPE position and cache slot of each
token), KV cache per layer ``[B, kv_heads, max_len, head_dim]``, ``thresholds [L, B, 2]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from clada_export.model.config import DecoderConfig
from clada_export.model.rope import apply_rope, cos_sin, rope_frequencies, rotate_half  # noqa: F401 (re-exported)
from clada_export.ops.sparse_mlp import (gated_intermediate, keep_above, plain_intermediate, plain_sparse_mlp_op,
                                         sparse_mlp_op)

# How many of a prompt's last tokens measure the intermediate activation |h| for the
# sequence-level statistics: |h| needs the gate/up products, which the SparseMLP op keeps
# to itself, so they are recomputed for a few tokens only (|x| is measured on all tokens).
H_STATS_TOKENS = 8
# RoPE frequency buffers: float32 whatever dtype the weights are moved to
_ROPE_BUFFERS = ("inv_freq", "inv_freq_local", "inv_freq_long")


class RMSNorm(nn.Module):
    """RMSNorm scaled by ``offset + weight``: offset 0 (Llama), or 1 (Gemma, whose
    checkpoints store ``weight - 1`` and which scales in float32 before rounding)."""

    def __init__(self, dim: int, eps: float, offset: float = 0.0):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.offset = offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # computed in float32 whatever the weights' dtype, as transformers does
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:
            return (xf * (self.offset + self.weight.float())).to(x.dtype)
        return self.weight * xf.to(x.dtype)


def make_norm(cfg: DecoderConfig, dim: int) -> nn.Module:
    """The family's norm: LayerNorm with bias (GPT-2, OPT, GPT-NeoX) or RMSNorm."""
    if cfg.layer_norm:
        return nn.LayerNorm(dim, eps=cfg.rms_norm_eps)
    return RMSNorm(dim, cfg.rms_norm_eps, cfg.norm_offset)


def softcap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    """``cap * tanh(x / cap)`` (Gemma 2's soft-capping), or ``x`` when ``cap`` is None."""
    return x if cap is None else torch.tanh(x / cap) * cap


class Attention(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * d, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * d, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * d, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.num_heads * d, cfg.hidden_size, bias=cfg.o_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(d, cfg.rms_norm_eps, cfg.norm_offset)
            self.k_norm = RMSNorm(d, cfg.rms_norm_eps, cfg.norm_offset)
        self.scale = cfg.attn_scale if cfg.attn_scale is not None else d ** -0.5

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, T, _ = x.shape
        cfg, d = self.cfg, self.cfg.head_dim
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(B, T, cfg.num_heads, d)
        k = k.view(B, T, cfg.num_kv_heads, d)
        v = v.view(B, T, cfg.num_kv_heads, d).transpose(1, 2)
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # [B, heads, T, d]
        if cos is not None:  # None: learned positions, added to the embeddings
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

        # Functional cache write (scatter at each token's slot) for export: the graph
        # returns the updated cache, and a runtime may bind input and output to the same
        # buffer. (The GPU decode path, runtime/cuda_graph.py, writes its own cache in place.)
        slots = positions[:, None, :, None].expand(B, cfg.num_kv_heads, T, d)
        k_cache = k_cache.scatter(2, slots, k.to(k_cache.dtype))
        v_cache = v_cache.scatter(2, slots, v.to(v_cache.dtype))

        # Grouped-query attention without copying the cache per query head: the query
        # heads that share a KV head are stacked along the query axis
        # ([B, kv_heads, groups * T, d]), so each KV head is read once.
        groups = cfg.num_heads // cfg.num_kv_heads
        max_len = k_cache.shape[2]
        qg = q.reshape(B, cfg.num_kv_heads, groups * T, d)
        scores = softcap((qg @ k_cache.transpose(-1, -2).to(q.dtype)) * self.scale, cfg.attn_softcap)
        visible = mask[:, None, None].expand(B, 1, groups, T, max_len).reshape(B, 1, groups * T, max_len)
        scores = scores.masked_fill(~visible, torch.finfo(scores.dtype).min)
        out = torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v_cache.to(q.dtype)
        out = out.reshape(B, cfg.num_heads, T, d).transpose(1, 2).reshape(B, T, cfg.num_heads * d)
        return self.o_proj(out), k_cache, v_cache


class SparseMLP(nn.Module):
    """The gated MLP as CLADA's SparseMLP op. Weights in the kernel layout
    (``w_gate_t``/``w_up_t`` ``[hidden, inter]``, ``w_down_t`` ``[inter, hidden]``)."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.act = cfg.act
        self.w_gate_t = nn.Parameter(torch.empty(cfg.hidden_size, cfg.intermediate_size))
        self.w_up_t = nn.Parameter(torch.empty(cfg.hidden_size, cfg.intermediate_size))
        self.w_down_t = nn.Parameter(torch.empty(cfg.intermediate_size, cfg.hidden_size))

    def forward(self, x: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
        return sparse_mlp_op(x, self.w_gate_t, self.w_up_t, self.w_down_t, thresholds, self.act)

    def intermediate(self, x: torch.Tensor) -> torch.Tensor:
        """Dense h = act(x Wg) * (x Wu), for activation statistics only."""
        return gated_intermediate(x, self.w_gate_t, self.w_up_t, self.act)

    def magnitudes(self, x: torch.Tensor, t_in: torch.Tensor | float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        """|x| and |h|, h computed from x thresholded at ``t_in`` (what the op thresholds)."""
        return x.abs(), self.intermediate(keep_above(x, t_in)).abs()

    def output(self, h: torch.Tensor) -> torch.Tensor:
        """y from an intermediate ``h`` (the neuron-selection methods mask h themselves)."""
        return h @ self.w_down_t


class PlainSparseMLP(nn.Module):
    """The plain MLP with biases (GPT-2, OPT, GPT-NeoX) as the SparseMLP op's plain form.
    Weights in the kernel layout: ``w_in_t [hidden, inter]``, ``w_out_t [inter, hidden]``."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.act = cfg.act
        self.w_in_t = nn.Parameter(torch.empty(cfg.hidden_size, cfg.intermediate_size))
        self.b_in = nn.Parameter(torch.empty(cfg.intermediate_size))
        self.w_out_t = nn.Parameter(torch.empty(cfg.intermediate_size, cfg.hidden_size))
        self.b_out = nn.Parameter(torch.empty(cfg.hidden_size))

    def forward(self, x: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
        return plain_sparse_mlp_op(x, self.w_in_t, self.b_in, self.w_out_t, self.b_out, thresholds, self.act)

    def intermediate(self, x: torch.Tensor) -> torch.Tensor:
        """Dense h = act(x W1 + b1), for activation statistics only."""
        return plain_intermediate(x, self.w_in_t, self.b_in, self.act)

    def magnitudes(self, x: torch.Tensor, t_in: torch.Tensor | float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        """|x| and |h|, h computed from x thresholded at ``t_in`` (what the op thresholds)."""
        return x.abs(), self.intermediate(keep_above(x, t_in)).abs()

    def output(self, h: torch.Tensor) -> torch.Tensor:
        """y from an intermediate ``h`` (the neuron-selection methods mask h themselves)."""
        return h @ self.w_out_t + self.b_out


class Block(nn.Module):
    """One layer. Module names mirror transformers' so checkpoints load unrenamed; beware
    that ``post_attention_layernorm`` means two things: in the Llama layout it norms the
    MLP's input, in Gemma's (``sandwich_norms``) the attention's output, and
    ``pre_feedforward_layernorm`` norms the MLP's input (:attr:`mlp_norm` is whichever).
    The plain-MLP families' norms load under these names too (``model/families.py``:
    GPT-2's ``ln_1``/``ln_2``, OPT's ``self_attn_layer_norm``/``final_layer_norm``)."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.input_layernorm = make_norm(cfg, cfg.hidden_size)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = make_norm(cfg, cfg.hidden_size)
        if cfg.sandwich_norms:
            self.pre_feedforward_layernorm = make_norm(cfg, cfg.hidden_size)
            self.post_feedforward_layernorm = make_norm(cfg, cfg.hidden_size)
        self.mlp = SparseMLP(cfg) if cfg.gated_mlp else PlainSparseMLP(cfg)
        self.sandwich_norms = cfg.sandwich_norms

    @property
    def mlp_norm(self) -> RMSNorm:
        """The norm whose output is the MLP's input ``x``."""
        return self.pre_feedforward_layernorm if self.sandwich_norms else self.post_attention_layernorm

    def attention_out(self, a: torch.Tensor) -> torch.Tensor:
        """What the attention adds to the residual stream."""
        return self.post_attention_layernorm(a) if self.sandwich_norms else a

    def mlp_out(self, y: torch.Tensor) -> torch.Tensor:
        """What the MLP adds to the residual stream."""
        return self.post_feedforward_layernorm(y) if self.sandwich_norms else y


@dataclass
class StepOutput:
    """What one forward step returns. ``logits [B, vocab]`` at each sequence's last
    token (``[B, T, vocab]`` with ``all_logits``), updated caches, and (when asked) ``act_stats [L, B, 2]``: mean |x| of the MLP
    input over the valid tokens and mean |h| over the last H_STATS_TOKENS of them."""

    logits: torch.Tensor
    k_caches: list[torch.Tensor]
    v_caches: list[torch.Tensor]
    act_stats: torch.Tensor | None = None


class Decoder(nn.Module):
    """The decoder. ``inv_freq [rope_dim/2]`` and ``rope_scaling``: RoPE of every layer (or
    of Gemma 3's full-attention layers); ``local_inv_freq``/``local_rope_scaling``: Gemma
    3's sliding layers'; ``long_inv_freq``: longrope's long table (``model/rope.py``).
    With learned positions (GPT-2, OPT) ``inv_freq`` is empty and unused, and
    ``embed_positions`` holds the position table."""

    def __init__(self, cfg: DecoderConfig, inv_freq: torch.Tensor, rope_scaling: float = 1.0,
                 local_inv_freq: torch.Tensor | None = None, local_rope_scaling: float = 1.0,
                 long_inv_freq: torch.Tensor | None = None):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        if cfg.learned_positions:
            self.embed_positions = nn.Embedding(cfg.max_position_embeddings + cfg.position_offset, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = make_norm(cfg, cfg.hidden_size)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        if cfg.local_rope != (local_inv_freq is not None):
            raise ValueError("local_inv_freq is given exactly when cfg.local_rope is set")
        if (cfg.rope_long_after is not None) != (long_inv_freq is not None):
            raise ValueError("long_inv_freq is given exactly when cfg.rope_long_after is set")
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)
        self.rope_scaling = rope_scaling
        if local_inv_freq is not None:
            self.register_buffer("inv_freq_local", local_inv_freq.float(), persistent=False)
        self.local_rope_scaling = local_rope_scaling
        if long_inv_freq is not None:
            self.register_buffer("inv_freq_long", long_inv_freq.float(), persistent=False)

    def _apply(self, fn, recurse=True):
        # RoPE frequencies stay float32 when the weights move to 16 bits (rounding them
        # would shift every rotation): keep the float32 values, on the new device.
        before = {n: b for n, b in self._buffers.items() if n in _ROPE_BUFFERS and b is not None}
        super()._apply(fn, recurse)
        for name, old in before.items():
            new = self._buffers[name]
            if new.dtype != torch.float32:
                self._buffers[name] = old.to(device=new.device)
        return self

    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype | None = None,
                  device: torch.device | str | None = None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Zeroed per-layer caches ``[B, kv_heads, max_len, head_dim]``."""
        cfg = self.cfg
        dtype = dtype or self.embed_tokens.weight.dtype
        device = device or self.embed_tokens.weight.device
        shape = (batch, cfg.num_kv_heads, max_len, cfg.head_dim)
        return ([torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)],
                [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)])

    def _rope(self, positions: torch.Tensor, last_index: torch.Tensor, dtype: torch.dtype
              ) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor] | None]:
        """``(cos, sin)`` of the full-attention (or every) layer, and of the local layers;
        ``(None, None)`` with learned positions."""
        if self.cfg.learned_positions:
            return (None, None), None
        inv_freq = self.inv_freq
        if self.cfg.rope_long_after is not None:
            # longrope: a sequence longer than the original context rotates with the long
            # factors; its length is its last real token's position + 1 (each sequence
            # of a batch decides alone)
            length = torch.gather(positions, 1, last_index[:, None]) + 1  # [B, 1]
            inv_freq = torch.where((length > self.cfg.rope_long_after)[..., None], self.inv_freq_long, inv_freq)
        full = cos_sin(positions, inv_freq, self.rope_scaling, dtype)
        local = cos_sin(positions, self.inv_freq_local, self.local_rope_scaling, dtype) if self.cfg.local_rope else None
        return full, local

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        k_caches: list[torch.Tensor],
        v_caches: list[torch.Tensor],
        thresholds: torch.Tensor,
        last_index: torch.Tensor | None = None,
        with_stats: bool = False,
        all_logits: bool = False,
    ) -> StepOutput:
        """One step over ``T`` tokens per sequence. ``last_index [B]``: the index in
        ``0..T-1`` of each sequence's last real token (right padding); default ``T-1``.
        ``all_logits``: return logits of every position ``[B, T, vocab]`` (perplexity,
        calibration) instead of the last token's ``[B, vocab]``."""
        B, T = input_ids.shape
        cfg = self.cfg
        x = self.embed_tokens(input_ids)
        if cfg.embed_scale is not None:  # rounded to the weights' dtype, as transformers does
            x = x * torch.tensor(cfg.embed_scale, dtype=torch.float32).to(x.dtype)
        if cfg.learned_positions:
            x = x + self.embed_positions(positions + cfg.position_offset if cfg.position_offset else positions)
        if last_index is None:
            last_index = torch.full((B,), T - 1, dtype=torch.long, device=input_ids.device)
        rope_full, rope_local = self._rope(positions, last_index, x.dtype)
        max_len = k_caches[0].shape[2]
        slot = torch.arange(max_len, device=input_ids.device)
        mask = slot[None, None, :] <= positions[:, :, None]  # [B, T, max_len]
        window_mask = None
        if cfg.sliding_window is not None:
            window_mask = mask & (slot[None, None, :] > positions[:, :, None] - cfg.sliding_window)

        if with_stats:
            valid = (torch.arange(T, device=input_ids.device)[None, :] <= last_index[:, None]).to(x.dtype)
            tail = (last_index[:, None] - torch.arange(H_STATS_TOKENS, device=input_ids.device)[None, :]).clamp(min=0)
            stats = []

        new_k, new_v = [], []
        for i, layer in enumerate(self.layers):
            sliding = cfg.is_sliding(i)
            cos, sin = rope_local if (rope_local is not None and sliding) else rope_full
            a, kc, vc = layer.self_attn(layer.input_layernorm(x), cos, sin, positions,
                                        window_mask if sliding else mask, k_caches[i], v_caches[i])
            new_k.append(kc)
            new_v.append(vc)
            if cfg.parallel_residual:  # GPT-NeoX: both branches read the block's input
                m_in = layer.mlp_norm(x)
            else:
                x = x + layer.attention_out(a)
                m_in = layer.mlp_norm(x)
            if with_stats:
                mean_x = (m_in.abs().mean(-1) * valid).sum(1) / valid.sum(1)
                x_tail = torch.gather(m_in, 1, tail[:, :, None].expand(B, H_STATS_TOKENS, cfg.hidden_size))
                mean_h = layer.mlp.intermediate(x_tail).abs().mean(dim=(1, 2))
                stats.append(torch.stack((mean_x, mean_h), dim=-1))
            y = layer.mlp_out(layer.mlp(m_in, thresholds[i]))
            x = (y + layer.attention_out(a) + x) if cfg.parallel_residual else (x + y)  # transformers' order of the sum

        if not all_logits:
            x = torch.gather(x, 1, last_index[:, None, None].expand(B, 1, cfg.hidden_size))[:, 0]
        logits = softcap(self.lm_head(self.norm(x)), cfg.final_softcap).float()
        return StepOutput(logits, new_k, new_v, torch.stack(stats).float() if with_stats else None)


def cognitive_signals(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``entropy [B]`` (nats) and ``logsumexp [B]`` of ``logits [B, vocab]``; the surprisal
    of a picked token is ``logsumexp - logits[token]``."""
    logits = logits.float()
    lse = torch.logsumexp(logits, dim=-1)
    p = torch.softmax(logits, dim=-1)
    entropy = lse - (p * logits).sum(-1)
    return entropy, lse
