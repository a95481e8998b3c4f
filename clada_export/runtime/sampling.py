"""Picking the next token from ``logits [B, vocab]`` on the logits' own device."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingConfig:
    """``temperature == 0`` is greedy; ``top_k == 0`` and ``top_p == 1`` disable those filters."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


class Sampler:
    def __init__(self, config: SamplingConfig, device: torch.device):
        self.config = config
        self._gen = torch.Generator(device=device)
        self._gen.manual_seed(config.seed)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """Token ids ``[B]`` (int64, same device as ``logits``)."""
        cfg = self.config
        if cfg.temperature == 0:
            return logits.argmax(dim=-1)
        scores = logits.float() / cfg.temperature
        if cfg.top_k:
            kth = torch.topk(scores, min(cfg.top_k, scores.shape[-1]), dim=-1).values[..., -1:]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if cfg.top_p < 1:
            sorted_scores, order = torch.sort(scores, descending=True, dim=-1)
            cum = torch.softmax(sorted_scores, dim=-1).cumsum(-1)
            # drop a token once the mass before it already reaches top_p (the first always stays)
            drop = (cum - torch.softmax(sorted_scores, dim=-1)) >= cfg.top_p
            scores = scores.scatter(-1, order, sorted_scores.masked_fill(drop, float("-inf")))
        probs = torch.softmax(scores, dim=-1)
        return torch.multinomial(probs, 1, generator=self._gen)[:, 0]
