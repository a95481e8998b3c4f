"""Per-layer threshold tables: quantiles of the MLP input magnitude |x| and of the
intermediate magnitude |h| on calibration text, recorded from dense passes.

``t_in[l, k]`` is the threshold that zeroes a fraction ``levels[k]`` of layer l's |x|
(``|x| <= t``, what the SparseMLP op skips); ``t_mid[l, k]`` the same for |h| of the
dense model. Forward pre-hooks on each layer's ``mlp`` only read its input ``x``;
``h`` comes from ``SparseMLP.intermediate`` (the model's own code), so the model's math
is untouched and exists once.

Memory stays bounded whatever ``--tokens`` is: per layer a uniform random sample of at
most ``max_samples`` magnitudes of each kind is kept (a reservoir of fixed size per
batch), and quantiles are taken on it. A few rows of ``x`` per layer are also kept
(``x_cache``): the allocation measures each layer's output error on them.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

# Sparsity levels of the tables: 0 to 0.95 in steps of 0.025 (finer than the
# allocation's 0.05 steps, so interpolation between levels stays accurate).
LEVELS = np.round(np.arange(0.0, 0.95 + 1e-9, 0.025), 4)


@dataclass
class ActivationTables:
    """Shapes: ``levels [S]``; ``t_in``/``t_mid`` ``[L, S]`` (activation units);
    ``calib_mean_abs [L, 2]`` (mean |x|, mean |h|); ``x_cache``: per layer ``[N, hidden]``
    rows of the MLP input, sampled over the calibration tokens."""

    levels: np.ndarray
    t_in: np.ndarray
    t_mid: np.ndarray
    calib_mean_abs: np.ndarray
    x_cache: list[torch.Tensor]
    n_tokens: int


def _quantiles(samples: torch.Tensor, levels: np.ndarray) -> np.ndarray:
    q = torch.tensor(levels, dtype=torch.float64)
    s = samples.double().cpu().sort().values
    # torch.quantile caps its input at 16M elements: interpolate on the sorted sample
    pos = q * (s.numel() - 1)
    lo = pos.floor().long()
    hi = pos.ceil().long()
    frac = pos - lo.double()
    out = s[lo] * (1 - frac) + s[hi] * frac
    out[q == 0] = 0.0  # level 0 is dense exactly: threshold 0 keeps every nonzero value
    return out.numpy()


class _Recorder:
    """Forward pre-hooks that sample |x| and |h| of every layer's MLP (read only)."""

    def __init__(self, model, per_batch_x: int, per_batch_h: int, h_rows: int, cache_rows: int,
                 generator: torch.Generator):
        self.model = model
        self.per_batch_x = per_batch_x
        self.per_batch_h = per_batch_h
        self.h_rows = h_rows
        self.cache_rows = cache_rows
        self.gen = generator
        L = len(model.layers)
        self.x_samples: list[list[torch.Tensor]] = [[] for _ in range(L)]
        self.h_samples: list[list[torch.Tensor]] = [[] for _ in range(L)]
        self.x_rows: list[list[torch.Tensor]] = [[] for _ in range(L)]
        self.sum_abs = np.zeros((L, 2))
        self.count = np.zeros((L, 2))
        self.handles = []

    def __enter__(self):
        for i, layer in enumerate(self.model.layers):
            self.handles.append(layer.mlp.register_forward_pre_hook(self._hook(i)))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def _sample(self, flat: torch.Tensor, k: int) -> torch.Tensor:
        if flat.numel() <= k:
            return flat.clone()
        idx = torch.randint(0, flat.numel(), (k,), generator=self.gen)
        return flat[idx].clone()

    def _hook(self, i: int):
        def hook(module, args):
            x = args[0].detach()
            rows = x.reshape(-1, x.shape[-1])
            ax = rows.abs().float()
            self.sum_abs[i, 0] += float(ax.sum(dtype=torch.float64))
            self.count[i, 0] += ax.numel()
            self.x_samples[i].append(self._sample(ax.reshape(-1), self.per_batch_x))
            # |h| needs the gate/up products: measure it on a random subset of the rows
            pick = torch.randperm(rows.shape[0], generator=self.gen)[: self.h_rows]
            ah = module.intermediate(rows[pick]).abs().float()
            self.sum_abs[i, 1] += float(ah.sum(dtype=torch.float64))
            self.count[i, 1] += ah.numel()
            self.h_samples[i].append(self._sample(ah.reshape(-1), self.per_batch_h))
            if self.cache_rows:
                self.x_rows[i].append(rows[pick[: self.cache_rows]].clone())
        return hook


def record_tables(model, windows: torch.Tensor, batch_size: int = 4, levels: np.ndarray = LEVELS,
                  max_samples: int = 1 << 20, x_cache_rows: int = 256, seed: int = 0,
                  progress: bool = True) -> ActivationTables:
    """Dense passes over ``windows [N, T]`` (token ids) recording each layer's tables.

    ``max_samples``: magnitudes kept per layer and kind (memory bound);
    ``x_cache_rows``: MLP-input rows kept per layer for the allocation's error curves."""
    n_windows, T = windows.shape
    n_batches = (n_windows + batch_size - 1) // batch_size
    gen = torch.Generator().manual_seed(seed)
    H = model.cfg.hidden_size
    tokens_per_batch = batch_size * T
    h_rows = min(tokens_per_batch, max(32, tokens_per_batch // 4))
    per_batch_x = max(1, max_samples // n_batches)
    per_batch_h = max(1, max_samples // n_batches)
    cache_rows = min(h_rows, -(-x_cache_rows // n_batches)) if x_cache_rows else 0
    L = model.cfg.num_layers
    device = model.embed_tokens.weight.device
    zeros = None
    rec = _Recorder(model, per_batch_x, per_batch_h, h_rows, cache_rows, gen)
    with rec, torch.inference_mode():
        for start in tqdm(range(0, n_windows, batch_size), total=n_batches, desc="calibrate: tables",
                          unit="batch", file=sys.stderr, disable=not progress):
            ids = windows[start:start + batch_size].to(device)
            B = ids.shape[0]
            pos = torch.arange(T, device=device)[None].expand(B, T)
            k, v = model.new_cache(B, T)
            if zeros is None or zeros.shape[1] != B:
                zeros = torch.zeros(L, B, 2, device=device)
            model(ids, pos, k, v, zeros)
    t_in = np.stack([_quantiles(torch.cat(rec.x_samples[i]), levels) for i in range(L)])
    t_mid = np.stack([_quantiles(torch.cat(rec.h_samples[i]), levels) for i in range(L)])
    # ties (e.g. exact zeros) can make neighbouring quantiles equal; keep tables monotone
    t_in = np.maximum.accumulate(t_in, axis=1)
    t_mid = np.maximum.accumulate(t_mid, axis=1)
    mean_abs = rec.sum_abs / np.maximum(rec.count, 1)
    x_cache = [torch.cat(r)[:x_cache_rows] if r else torch.zeros(0, H) for r in rec.x_rows]
    return ActivationTables(levels=np.asarray(levels, dtype=np.float64), t_in=t_in, t_mid=t_mid,
                            calib_mean_abs=mean_abs, x_cache=x_cache, n_tokens=n_windows * T)
