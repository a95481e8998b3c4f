"""Error-controlled allocation of per-layer sparsity (CLADA's offline level).

Goal: per-layer input and intermediate sparsity ``s_in[l]``, ``s_mid[l]`` whose mean
byte sparsity ``mean_l (2 s_in + s_mid) / 3`` (a plain MLP's: ``(s_in + s_mid) / 2``,
``profile.byte_sparsity``) meets a global target with the least
KL divergence of the final next-token distribution against the dense model, measured
on held-out calibration windows (disjoint from the windows the tables come from).

Measuring that KL for every candidate step of a greedy search (60 candidates per step,
hundreds of steps, each a full forward pass) is far beyond a CPU budget of minutes, so
the search runs on a measured model of the KL instead (each layer's KL sensitivity
estimated with one probe, its shape interpolated from exact per-layer errors):

1. Error surfaces (cheap, exact for one layer): on 128 cached MLP inputs of layer l,
   the relative squared error of the SparseMLP output against dense (per token, then
   averaged) with ``t_in`` at level i and ``t_mid`` at level j together, for i, j on a
   0.1 grid: ``err[l, i, j]``. One batched call of the layer's own op per layer. The
   two thresholds interact (input sparsity shrinks h, so the same t_mid skips more),
   which a sum of one-threshold curves misses.
2. Sensitivity probes (one forward pass per layer): the KL against dense on the held-out
   windows when only layer l is sparsified at (0.5, 0.5), divided by the layer's error
   there: ``sens[l]``, KL per unit of relative squared output error (KL is quadratic in
   a small perturbation, so linear in the squared error).
3. Predicted KL of an allocation: ``sum_l sens[l] * err[l](s_in[l], s_mid[l])``
   (bilinear on the grid; additive over layers).
4. Greedy, in the spirit of TEAL's block-wise greedy: start dense; repeatedly take the
   move of least predicted KL increase per unit of byte sparsity gained, until the
   target is met. A move raises one layer's byte sparsity by 0.05 (or jumps up to 0.15,
   so that a flat stretch behind a steep one is not missed) and sets that layer's two
   thresholds to the split (s_in, s_mid) of least error at that byte level (searched in
   steps of 0.025 along the layer's error surface). The last move is taken partly so
   that the mean byte sparsity equals the target exactly. The greedy path (every
   intermediate allocation) is kept: allocations for any target, and the most sparsity
   under an error budget, are read off it.
5. The chosen allocation's KL is then measured for real (one forward pass) and
   reported; with an error budget, the path point is corrected by the ratio of measured
   to predicted KL until the measured KL is under the budget.

Cost on the default model (30 layers, 2 CPU cores): one dense pass over 4096 tokens
(tables), 30 batched layer calls (surfaces), 31 passes over 512 held-out tokens
(reference and probes), 2-6 passes to measure the result: 1-3 minutes.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from clada_export.errors import UserError
from clada_export.profile import byte_sparsity, input_byte_weight, table_thresholds

PROBE_LEVEL = 0.5
MAX_JUMP = 3  # grid steps a greedy move may take at once


# -- measured KL against the dense model ----------------------------------------------------
class KLReference:
    """Dense next-token log-probabilities of held-out windows ``[N, T]`` (all positions),
    kept so that any thresholds' KL(dense || sparse) costs one sparse pass."""

    def __init__(self, model, windows: torch.Tensor, batch_size: int = 4):
        self.model = model
        self.windows = windows
        self.batch_size = batch_size
        L = model.cfg.num_layers
        self._logp: list[torch.Tensor] = []
        with torch.inference_mode():
            for ids in self._batches():
                self._logp.append(F.log_softmax(self._logits(ids, torch.zeros(L, ids.shape[0], 2)), dim=-1))

    def _batches(self):
        for s in range(0, self.windows.shape[0], self.batch_size):
            yield self.windows[s:s + self.batch_size]

    def _logits(self, ids: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
        B, T = ids.shape
        dev = self.model.embed_tokens.weight.device
        pos = torch.arange(T, device=dev)[None].expand(B, T)
        k, v = self.model.new_cache(B, T)
        return self.model(ids.to(dev), pos, k, v, thresholds.to(dev), all_logits=True).logits.float().cpu()

    @property
    def n_tokens(self) -> int:
        return int(self.windows.numel())

    def kl(self, thresholds: np.ndarray | torch.Tensor) -> float:
        """Mean over all positions of KL(dense || sparse), nats; ``thresholds [L, 2]``."""
        thr = torch.as_tensor(np.asarray(thresholds), dtype=torch.float32)
        total, n = 0.0, 0
        with torch.inference_mode():
            for ids, ref in zip(self._batches(), self._logp):
                B = ids.shape[0]
                logq = F.log_softmax(self._logits(ids, thr[:, None, :].expand(-1, B, -1).contiguous()), dim=-1)
                total += float((ref.exp() * (ref - logq)).sum(dtype=torch.float64))
                n += ref.shape[0] * ref.shape[1]
        return max(total / n, 0.0)


# -- per-layer output error surfaces -------------------------------------------------------
SURFACE_GRID = np.round(np.arange(0.0, 0.9 + 1e-9, 0.1), 4)  # s_in and s_mid levels of the surfaces
BYTE_GRID = np.round(np.arange(0.0, 0.9 + 1e-9, 0.05), 4)  # per-layer byte-sparsity steps of the greedy


def layer_error_surfaces(model, x_cache: list[torch.Tensor], levels: np.ndarray, t_in: np.ndarray,
                         t_mid: np.ndarray, grid: np.ndarray = SURFACE_GRID, progress: bool = True) -> np.ndarray:
    """``err [L, G, G]``: mean squared SparseMLP output error against dense on the cached
    inputs with t_in at level ``grid[i]`` and t_mid at ``grid[j]`` together (the two
    interact: input sparsity shrinks h, so a fixed t_mid skips more). One batched call of
    the layer's own op per layer."""
    L = len(model.layers)
    G = len(grid)
    err = np.zeros((L, G, G))
    dev = model.embed_tokens.weight.device
    with torch.inference_mode():
        for l in tqdm(range(L), desc="calibrate: layer errors", unit="layer", file=sys.stderr, disable=not progress):
            x = x_cache[l].to(dev)
            if x.numel() == 0:
                continue
            ti = np.interp(grid, levels, t_in[l])
            tm = np.interp(grid, levels, t_mid[l])
            thr = np.stack(np.meshgrid(ti, tm, indexing="ij"), axis=-1).reshape(G * G, 2)
            xs = x[None].expand(G * G, *x.shape).contiguous()
            y = model.layers[l].mlp(xs, torch.tensor(thr, dtype=x.dtype, device=dev)).double()
            # relative error per token, averaged: a few tokens with massive activations
            # (a window's first) would otherwise outweigh all others
            ref_norm = (y[0] ** 2).sum(-1).clamp_min(1e-30)
            e = (((y - y[0]) ** 2).sum(-1) / ref_norm).mean(-1).cpu().numpy().reshape(G, G)
            # more sparsity never errs less (sampling noise aside): keep the surface monotone
            e = np.maximum.accumulate(np.maximum.accumulate(e, axis=0), axis=1)
            err[l] = e
    return err


def _bilinear(surface: np.ndarray, grid: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``surface [G, G]`` at points (a, b) (arrays), bilinear on ``grid``."""
    G = len(grid)
    step = grid[1] - grid[0]
    fa = np.clip(a / step, 0, G - 1)
    fb = np.clip(b / step, 0, G - 1)
    i0 = np.minimum(np.floor(fa).astype(int), G - 2)
    j0 = np.minimum(np.floor(fb).astype(int), G - 2)
    u, v = fa - i0, fb - j0
    return ((1 - u) * (1 - v) * surface[i0, j0] + u * (1 - v) * surface[i0 + 1, j0]
            + (1 - u) * v * surface[i0, j0 + 1] + u * v * surface[i0 + 1, j0 + 1])


def best_splits(err: np.ndarray, grid: np.ndarray = SURFACE_GRID, byte_grid: np.ndarray = BYTE_GRID,
                fine: float = 0.025, gated: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per layer and byte level b: the (s_in, s_mid) with byte sparsity b ((2 s_in + s_mid)
    / 3 gated, (s_in + s_mid) / 2 plain) and the least output error. Returns ``s_in [L, B]``,
    ``s_mid [L, B]``, ``err [L, B]`` (error made non-decreasing in b)."""
    w = input_byte_weight(gated)
    L = err.shape[0]
    top = float(grid[-1])
    cand = np.round(np.arange(0.0, top + 1e-9, fine), 4)
    s_in = np.zeros((L, len(byte_grid)))
    s_mid = np.zeros_like(s_in)
    e = np.zeros_like(s_in)
    for l in range(L):
        for k, b in enumerate(byte_grid):
            mids = (w + 1.0) * b - w * cand
            ok = (mids >= -1e-9) & (mids <= top + 1e-9)
            a, m = cand[ok], np.clip(mids[ok], 0.0, top)
            vals = _bilinear(err[l], grid, a, m)
            i = int(np.argmin(vals))
            s_in[l, k], s_mid[l, k], e[l, k] = a[i], m[i], vals[i]
        e[l] = np.maximum.accumulate(e[l])
    return s_in, s_mid, e


def layer_sensitivities(ref: KLReference, levels: np.ndarray, t_in: np.ndarray, t_mid: np.ndarray,
                        err_probe: np.ndarray, probe: float = PROBE_LEVEL,
                        progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """``sens [L]``: measured KL per unit of squared output error when only layer l is
    sparsified at (probe, probe); also the probes' KL ``[L]``."""
    L = t_in.shape[0]
    kls = np.zeros(L)
    for l in tqdm(range(L), desc="calibrate: sensitivity probes", unit="layer", file=sys.stderr,
                  disable=not progress):
        thr = np.zeros((L, 2))
        thr[l] = [np.interp(probe, levels, t_in[l]), np.interp(probe, levels, t_mid[l])]
        kls[l] = ref.kl(thr)
    tiny = 1e-30
    sens = np.where(err_probe > tiny, kls / np.maximum(err_probe, tiny), 0.0)
    # a layer whose probe moved nothing measurable: give it the smallest sensitivity seen
    positive = sens[sens > 0]
    if positive.size:
        sens = np.where(sens > 0, sens, positive.min())
    else:
        sens = np.ones(L)
    return sens, kls


# -- the KL model and the greedy search ----------------------------------------------------
@dataclass
class KLModel:
    """Predicted KL of an allocation: ``sum_l sens[l] * err[l](s_in[l], s_mid[l])``, with
    ``err [L, G, G]`` the layer's output-error surface on ``grid``."""

    grid: np.ndarray
    err: np.ndarray
    sens: np.ndarray
    gated: bool = True  # the MLP's form: how s_in and s_mid weigh in byte sparsity

    def layer_kl(self, s_in: np.ndarray, s_mid: np.ndarray) -> np.ndarray:
        L = len(self.sens)
        return np.array([self.sens[l] * float(_bilinear(self.err[l], self.grid, np.asarray([s_in[l]]),
                                                         np.asarray([s_mid[l]]))[0]) for l in range(L)])

    def predict(self, s_in: np.ndarray, s_mid: np.ndarray) -> float:
        return float(self.layer_kl(s_in, s_mid).sum())

    def to_dict(self) -> dict:
        return {"grid": self.grid.tolist(), "err": self.err.tolist(), "sens": self.sens.tolist(),
                "gated": self.gated}

    @classmethod
    def from_dict(cls, d: dict) -> "KLModel":
        return cls(np.asarray(d["grid"]), np.asarray(d["err"]), np.asarray(d["sens"]), bool(d.get("gated", True)))


@dataclass
class GreedyPath:
    """Allocations visited by the greedy search, dense first: ``s_in``/``s_mid``
    ``[P, L]``, ``sparsity [P]`` (mean byte sparsity), ``kl [P]`` (predicted)."""

    s_in: np.ndarray
    s_mid: np.ndarray
    sparsity: np.ndarray
    kl: np.ndarray

    def at_sparsity(self, target: float) -> tuple[np.ndarray, np.ndarray, float]:
        """The allocation whose mean byte sparsity is exactly ``target`` (the last move
        taken partly) and its predicted KL."""
        if target > self.sparsity[-1] + 1e-12:
            raise UserError(f"target sparsity {target:g} is beyond the most the tables allow "
                            f"({self.sparsity[-1]:.3f}); choose a lower target")
        i = int(np.searchsorted(self.sparsity, target, side="left"))
        if i == 0:
            return self.s_in[0].copy(), self.s_mid[0].copy(), float(self.kl[0])
        a = (target - self.sparsity[i - 1]) / max(self.sparsity[i] - self.sparsity[i - 1], 1e-30)
        s_in = self.s_in[i - 1] + a * (self.s_in[i] - self.s_in[i - 1])
        s_mid = self.s_mid[i - 1] + a * (self.s_mid[i] - self.s_mid[i - 1])
        return s_in, s_mid, float(self.kl[i - 1] + a * (self.kl[i] - self.kl[i - 1]))

    def at_kl(self, budget: float) -> float:
        """The largest sparsity along the path whose predicted KL is within ``budget``."""
        i = int(np.searchsorted(self.kl, budget, side="right"))
        if i >= len(self.kl):
            return float(self.sparsity[-1])
        if i == 0:
            return 0.0
        a = (budget - self.kl[i - 1]) / max(self.kl[i] - self.kl[i - 1], 1e-30)
        return float(self.sparsity[i - 1] + a * (self.sparsity[i] - self.sparsity[i - 1]))


def greedy_path(km: KLModel, byte_grid: np.ndarray = BYTE_GRID, max_jump: int = MAX_JUMP) -> GreedyPath:
    """Greedy allocation from dense to every layer at the last byte level, one move at a
    time: a move raises one layer's byte sparsity by one step of ``byte_grid`` (0.05) or a
    jump of up to ``max_jump`` steps, choosing both thresholds of that layer together (the
    split of least output error for that byte level, :func:`best_splits`); the move taken
    is the one of least predicted KL increase per unit of byte sparsity gained."""
    split_in, split_mid, err = best_splits(km.err, km.grid, byte_grid, gated=km.gated)
    curves = km.sens[:, None] * err  # [L, B] predicted KL of each layer at each byte level
    L, nb = curves.shape
    top = nb - 1
    idx = np.zeros(L, dtype=np.int64)
    rows = np.arange(L)
    s_in, s_mid, sp, kl = [np.zeros(L)], [np.zeros(L)], [0.0], [0.0]
    cur_kl = 0.0
    while True:
        best = None
        for j in range(1, max_jump + 1):
            nxt = idx + j
            ok = nxt <= top
            if not ok.any():
                break
            nxt_c = np.minimum(nxt, top)
            gain = (byte_grid[nxt_c] - byte_grid[idx]) / L
            dkl = curves[rows, nxt_c] - curves[rows, idx]
            ratio = np.where(ok, np.maximum(dkl, 0.0) / np.maximum(gain, 1e-30), np.inf)
            l = int(np.argmin(ratio))
            if best is None or ratio[l] < best[0] - 1e-18:
                best = (ratio[l], l, j)
        if best is None or not np.isfinite(best[0]):
            break
        _, l, j = best
        cur_kl += max(float(curves[l, idx[l] + j] - curves[l, idx[l]]), 0.0)
        idx[l] += j
        s_in.append(split_in[rows, idx].copy())
        s_mid.append(split_mid[rows, idx].copy())
        sp.append(float(np.mean(byte_sparsity(s_in[-1], s_mid[-1], km.gated))))
        kl.append(cur_kl)
    return GreedyPath(np.array(s_in), np.array(s_mid), np.array(sp), np.array(kl))


def uniform_allocation(num_layers: int, target: float) -> tuple[np.ndarray, np.ndarray]:
    """Every layer at ``s_in = s_mid = target`` (byte sparsity = target)."""
    return np.full(num_layers, float(target)), np.full(num_layers, float(target))


# -- the whole offline calibration -------------------------------------------------------
@dataclass
class Calibration:
    """What calibrate measured once; allocations for any target are read off it."""

    levels: np.ndarray
    t_in: np.ndarray
    t_mid: np.ndarray
    calib_mean_abs: np.ndarray
    km: KLModel
    path: GreedyPath
    ref: KLReference | None
    probe_kl: np.ndarray
    info: dict = field(default_factory=dict)

    def thresholds(self, s_in: np.ndarray, s_mid: np.ndarray) -> np.ndarray:
        """``[L, 2]`` thresholds reaching ``s_in``/``s_mid`` per layer on calibration text."""
        return table_thresholds(self.levels, self.t_in, self.t_mid, s_in, s_mid)

    def allocate(self, target: float, method: str = "greedy") -> tuple[np.ndarray, np.ndarray, float]:
        """``s_in [L]``, ``s_mid [L]`` and the predicted KL for a target byte sparsity."""
        if method == "uniform":
            s_in, s_mid = uniform_allocation(len(self.km.sens), target)
            return s_in, s_mid, self.km.predict(s_in, s_mid)
        check_method(method)
        return self.path.at_sparsity(target)

    def measured_kl(self, s_in: np.ndarray, s_mid: np.ndarray) -> float:
        if self.ref is None:
            raise RuntimeError("this calibration kept no held-out reference")
        return self.ref.kl(self.thresholds(s_in, s_mid))

    def allocate_budget(self, budget: float, method: str = "greedy", max_iter: int = 5,
                        progress: bool = True) -> tuple[np.ndarray, np.ndarray, float, float]:
        """The most sparsity whose measured KL stays within ``budget``:
        ``s_in``, ``s_mid``, the target reached, the measured KL."""
        check_error_budget(budget, "budget")
        check_method(method)
        best = (np.zeros_like(self.km.sens), np.zeros_like(self.km.sens), 0.0, 0.0)
        if method == "uniform":
            lo, hi = 0.0, float(self.levels[-1])
            for _ in tqdm(range(8), desc="calibrate: budget search", unit="pass", file=sys.stderr,
                          disable=not progress):
                mid = 0.5 * (lo + hi)
                s_in, s_mid = uniform_allocation(len(self.km.sens), mid)
                kl = self.measured_kl(s_in, s_mid)
                if kl <= budget:
                    lo, best = mid, (s_in, s_mid, mid, kl)
                else:
                    hi = mid
            return best
        scale = 1.0  # measured / predicted KL, learned as the search goes
        fail = float(self.path.sparsity[-1]) + 1.0
        for _ in tqdm(range(max_iter), desc="calibrate: budget search", unit="pass", file=sys.stderr,
                      disable=not progress):
            target = min(self.path.at_kl(budget / scale), fail - 1e-3)
            if target <= best[2] + 1e-4:
                break
            s_in, s_mid, pred = self.path.at_sparsity(target)
            kl = self.measured_kl(s_in, s_mid)
            if kl <= budget:
                best = (s_in, s_mid, target, kl)
                if kl >= 0.95 * budget:
                    break
            else:
                fail = min(fail, target)
            if pred > 0 and kl > 0:
                scale = kl / pred
            else:
                break
            if fail <= best[2] + 1e-3:
                break
        return best


def run_calibration(model, table_windows: torch.Tensor, heldout_windows: torch.Tensor,
                    batch_size: int = 4, progress: bool = True, x_cache_rows: int = 128) -> Calibration:
    """Tables, error curves, sensitivity probes and the greedy path (see module docstring)."""
    from clada_export.calibrate.tables import record_tables

    t0 = time.perf_counter()
    tables = record_tables(model, table_windows, batch_size=batch_size, progress=progress,
                           x_cache_rows=x_cache_rows)
    t1 = time.perf_counter()
    err = layer_error_surfaces(model, tables.x_cache, tables.levels, tables.t_in, tables.t_mid,
                               progress=progress)
    probe_i = int(np.argmin(np.abs(SURFACE_GRID - PROBE_LEVEL)))
    err_probe = err[:, probe_i, probe_i]
    t2 = time.perf_counter()
    ref = KLReference(model, heldout_windows, batch_size=batch_size)
    sens, probe_kl = layer_sensitivities(ref, tables.levels, tables.t_in, tables.t_mid, err_probe,
                                         progress=progress)
    t3 = time.perf_counter()
    km = KLModel(SURFACE_GRID.copy(), err, sens, gated=model.cfg.gated_mlp)
    path = greedy_path(km)
    t4 = time.perf_counter()
    info = {
        "table_tokens": int(tables.n_tokens),
        "heldout_tokens": int(heldout_windows.numel()),
        "x_cache_rows": int(x_cache_rows),
        "probe_level": PROBE_LEVEL,
        "seconds": {"tables": round(t1 - t0, 2), "layer_errors": round(t2 - t1, 2),
                    "probes": round(t3 - t2, 2), "greedy": round(t4 - t3, 2)},
    }
    return Calibration(tables.levels, tables.t_in, tables.t_mid, tables.calib_mean_abs, km, path, ref,
                       probe_kl, info)


def make_profile(cal: Calibration, hf_config, target: float | None = None, error_budget: float | None = None,
                 method: str = "greedy", progress: bool = True, extra: dict | None = None):
    """The :class:`~clada_export.profile.SparsityProfile` of an allocation: for a target
    byte sparsity (``target`` in (0, 1)) or the most sparsity under ``error_budget``
    (KL, nats). The allocation's KL is measured on the held-out windows, and so is the
    uniform allocation's at the same sparsity (for comparison)."""
    from clada_export.model.config import hf_dict_value
    from clada_export.profile import SparsityProfile, model_fingerprint

    if (target is None) == (error_budget is None):
        raise UserError("give exactly one of target and error_budget")
    check_method(method)
    t0 = time.perf_counter()
    if target is not None:
        check_target(target, float(cal.path.sparsity[-1]))
        s_in, s_mid, _ = cal.allocate(target, method)
        kl = cal.measured_kl(s_in, s_mid)
    else:
        s_in, s_mid, target, kl = cal.allocate_budget(error_budget, method, progress=progress)
    predicted = cal.km.predict(s_in, s_mid)
    reached = float(np.mean(byte_sparsity(s_in, s_mid, cal.km.gated)))
    uniform_kl = None
    if method == "greedy" and reached > 0:
        u_in, u_mid = uniform_allocation(len(s_in), reached)
        uniform_kl = cal.measured_kl(u_in, u_mid)
    cfg = hf_config.to_dict()
    info = dict(cal.info)
    info["seconds"] = dict(info.get("seconds", {}), allocation=round(time.perf_counter() - t0, 2))
    info.update({
        "kl_measured_on": f"{cal.ref.n_tokens} held-out calibration tokens, all positions, KL(dense || sparse)",
        "kl_predicted": predicted,
        "uniform_kl": uniform_kl,
        "error_budget": error_budget,
        "kl_model": cal.km.to_dict(),
        "probe_kl": cal.probe_kl.tolist(),
    })
    if extra:
        info.update(extra)
    return SparsityProfile(
        fingerprint=model_fingerprint(cfg), model_type=cfg.get("model_type"),
        num_layers=int(hf_dict_value(cfg, "num_hidden_layers")), hidden_size=int(hf_dict_value(cfg, "hidden_size")),
        intermediate_size=int(hf_dict_value(cfg, "intermediate_size")), levels=cal.levels, t_in=cal.t_in,
        t_mid=cal.t_mid, calib_mean_abs=cal.calib_mean_abs, target_sparsity=float(reached), s_in=s_in, s_mid=s_mid,
        kl=float(kl), method=method, calibration=info, gated_mlp=cal.km.gated)


# Each check names what it was given as ``name``: the parameter for library callers, the
# flag when the CLI checks a flag before the slow work.
def check_target(target: float, most: float = 0.95, name: str = "target") -> None:
    if not (0.0 < target < 1.0):
        raise UserError(f"{name} must be in (0, 1) (a fraction of MLP weight bytes skipped, "
                        f"e.g. 0.5), got {target:g}")
    if target > most + 1e-9:
        raise UserError(f"{name} {target:g} is beyond the most the tables allow ({most:.2f}); "
                        "choose a lower target")


def check_error_budget(budget: float, name: str = "error_budget") -> None:
    if not budget > 0 or not np.isfinite(budget):
        raise UserError(f"{name} must be > 0 (a KL divergence in nats per token, e.g. 0.05), got {budget:g}")


def check_method(method: str, name: str = "method") -> None:
    from clada_export.profile import METHODS

    if method not in METHODS:
        raise UserError(f"unknown allocation {name} {method!r}; use {' or '.join(METHODS)}")


def calibration_from_profile(profile) -> Calibration | None:
    """The Calibration a profile was made from (tables and KL model, no held-out
    reference), so that allocations for other targets can be read off it; None if the
    profile holds no KL model."""
    d = profile.calibration.get("kl_model") if profile.calibration else None
    if not d:
        return None
    km = KLModel.from_dict(d)
    return Calibration(profile.levels, profile.t_in, profile.t_mid, profile.calib_mean_abs, km, greedy_path(km),
                       None, np.asarray(profile.calibration.get("probe_kl", [])), dict(profile.calibration))
