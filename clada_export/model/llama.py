"""An export-friendly decoder for the Llama family (Llama 2/3, Mistral, Qwen2, Qwen3, SmolLM).

In the spirit of gpt-fast's model.py: RMSNorm, RoPE (frequencies from transformers, so
every rope_scaling variant a config declares is honoured), grouped-query attention over
a static, preallocated KV cache written at given positions, and a gated MLP that is
always the one SparseMLP op. Every step -- prefill of T tokens or decode of one -- is
the same ``forward``; the graphs in ``clada_export/export`` only fix which inputs vary.

Shapes: ``input_ids [B, T]``, ``positions [B, T]`` (RoPE position and cache slot of each
token), KV cache per layer ``[B, kv_heads, max_len, head_dim]``, ``thresholds [L, B, 2]``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch
import torch.nn as nn

from clada_export.model.config import SUPPORTED_MODEL_TYPES, DecoderConfig
from clada_export.ops.sparse_mlp import gated_intermediate, sparse_mlp_op

# How many of a prompt's last tokens measure the intermediate activation |h| for the
# sequence-level statistics: |h| needs the gate/up products, which the SparseMLP op keeps
# to itself, so they are recomputed for a few tokens only (|x| is measured on all tokens).
H_STATS_TOKENS = 8


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # computed in float32 whatever the weights' dtype, as transformers does
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_frequencies(hf_config) -> tuple[torch.Tensor, float]:
    """``inv_freq [head_dim/2]`` and the attention scaling, computed by transformers' own
    rotary-embedding class for this model family."""
    module = importlib.import_module(f"transformers.models.{SUPPORTED_MODEL_TYPES[hf_config.model_type]}."
                                     f"modeling_{SUPPORTED_MODEL_TYPES[hf_config.model_type]}")
    cls = next(getattr(module, n) for n in dir(module) if n.endswith("RotaryEmbedding"))
    rotary = cls(config=hf_config)
    return rotary.inv_freq.detach().float().clone(), float(getattr(rotary, "attention_scaling", 1.0))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


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
            self.q_norm = RMSNorm(d, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(d, cfg.rms_norm_eps)

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
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin

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
        scores = (qg @ k_cache.transpose(-1, -2).to(q.dtype)) * (d ** -0.5)
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


class Block(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = SparseMLP(cfg)


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
    def __init__(self, cfg: DecoderConfig, inv_freq: torch.Tensor, rope_scaling: float = 1.0):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)
        self.rope_scaling = rope_scaling

    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype | None = None,
                  device: torch.device | str | None = None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Zeroed per-layer caches ``[B, kv_heads, max_len, head_dim]``."""
        cfg = self.cfg
        dtype = dtype or self.embed_tokens.weight.dtype
        device = device or self.embed_tokens.weight.device
        shape = (batch, cfg.num_kv_heads, max_len, cfg.head_dim)
        return ([torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)],
                [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)])

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
        freqs = positions[..., None].float() * self.inv_freq  # [B, T, d/2]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # [B, 1, T, d]
        cos = (emb.cos() * self.rope_scaling).to(x.dtype)
        sin = (emb.sin() * self.rope_scaling).to(x.dtype)
        max_len = k_caches[0].shape[2]
        slot = torch.arange(max_len, device=input_ids.device)
        mask = slot[None, None, :] <= positions[:, :, None]  # [B, T, max_len]
        if cfg.sliding_window is not None:
            mask = mask & (slot[None, None, :] > positions[:, :, None] - cfg.sliding_window)

        if last_index is None:
            last_index = torch.full((B,), T - 1, dtype=torch.long, device=input_ids.device)
        if with_stats:
            valid = (torch.arange(T, device=input_ids.device)[None, :] <= last_index[:, None]).to(x.dtype)
            tail = (last_index[:, None] - torch.arange(H_STATS_TOKENS, device=input_ids.device)[None, :]).clamp(min=0)
            stats = []

        new_k, new_v = [], []
        for i, layer in enumerate(self.layers):
            a, kc, vc = layer.self_attn(layer.input_layernorm(x), cos, sin, positions, mask, k_caches[i], v_caches[i])
            new_k.append(kc)
            new_v.append(vc)
            x = x + a
            m_in = layer.post_attention_layernorm(x)
            if with_stats:
                mean_x = (m_in.abs().mean(-1) * valid).sum(1) / valid.sum(1)
                x_tail = torch.gather(m_in, 1, tail[:, :, None].expand(B, H_STATS_TOKENS, cfg.hidden_size))
                mean_h = layer.mlp.intermediate(x_tail).abs().mean(dim=(1, 2))
                stats.append(torch.stack((mean_x, mean_h), dim=-1))
            x = x + layer.mlp(m_in, thresholds[i])

        if all_logits:
            logits = self.lm_head(self.norm(x)).float()
        else:
            x_last = torch.gather(x, 1, last_index[:, None, None].expand(B, 1, cfg.hidden_size))[:, 0]
            logits = self.lm_head(self.norm(x_last)).float()
        return StepOutput(logits, new_k, new_v, torch.stack(stats).float() if with_stats else None)


def cognitive_signals(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``entropy [B]`` (nats) and ``logsumexp [B]`` of ``logits [B, vocab]``; the surprisal
    of a picked token is ``logsumexp - logits[token]``."""
    logits = logits.float()
    lse = torch.logsumexp(logits, dim=-1)
    p = torch.softmax(logits, dim=-1)
    entropy = lse - (p * logits).sum(-1)
    return entropy, lse
