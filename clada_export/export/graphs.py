"""The two exported graphs as torch modules with flat, contract-ordered signatures."""

from __future__ import annotations

import torch
import torch.nn as nn

from clada_export.model.llama import Decoder, cognitive_signals


def _split(caches: tuple[torch.Tensor, ...]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    return list(caches[0::2]), list(caches[1::2])


def _interleave(k: list[torch.Tensor], v: list[torch.Tensor]) -> list[torch.Tensor]:
    return [t for pair in zip(k, v) for t in pair]


class PrefillGraph(nn.Module):
    """``(input_ids, seq_lens, thresholds, past_key.0, past_value.0, ...) ->
    (logits, entropy, logsumexp, act_stats, present_key.0, present_value.0, ...)``."""

    def __init__(self, model: Decoder):
        super().__init__()
        self.model = model

    def forward(self, input_ids, seq_lens, thresholds, *caches):
        B, T = input_ids.shape
        positions = torch.arange(T, device=input_ids.device)[None, :].expand(B, T)
        k, v = _split(caches)
        out = self.model(input_ids, positions, k, v, thresholds, last_index=seq_lens - 1, with_stats=True)
        entropy, lse = cognitive_signals(out.logits)
        return (out.logits, entropy, lse, out.act_stats, *_interleave(out.k_caches, out.v_caches))


class DecodeGraph(nn.Module):
    """``(input_ids [B,1], position [B], thresholds, past...) ->
    (logits, entropy, logsumexp, present...)``."""

    def __init__(self, model: Decoder):
        super().__init__()
        self.model = model

    def forward(self, input_ids, position, thresholds, *caches):
        k, v = _split(caches)
        out = self.model(input_ids, position[:, None], k, v, thresholds)
        entropy, lse = cognitive_signals(out.logits)
        return (out.logits, entropy, lse, *_interleave(out.k_caches, out.v_caches))
