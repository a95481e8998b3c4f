"""Regenerate the controller's recorded traces (run from the repository root):

    python tests/data/controller/make_traces.py

Writes ``profile.json`` (a small synthetic sparsity profile: 6 layers, levels 0..0.95
step 0.05, quantile tables of Laplace-shaped magnitudes, an allocation that clips at
both ends of the table when shifted) and ``trace_*.jsonl`` (traces written by the
Python controller with full thresholds). Both the Python tests and the C++ CTest
replay these traces and require the same decisions. Rerun this script (and commit
its outputs) only when the controller's algorithm changes on purpose.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2]))

from clada_export.profile import SparsityProfile  # noqa: E402
from clada_export.runtime.controller import ControllerConfig, ThresholdController  # noqa: E402

LEVELS = np.round(np.arange(20) * 0.05, 2)


def make_profile() -> SparsityProfile:
    L = 6
    q = LEVELS
    # |x| ~ b * |Laplace(0, 1)|: the q-quantile is -b * ln(1 - q), the mean is b
    b_in = np.array([0.8, 1.0, 1.3, 0.6, 2.0, 1.1])
    b_mid = np.array([0.05, 0.08, 0.04, 0.12, 0.1, 0.07])
    t_in = -b_in[:, None] * np.log1p(-q)[None, :]
    # the intermediate is heavier tailed: quantile of b * |Laplace|^1.5
    t_mid = b_mid[:, None] * (-np.log1p(-q)[None, :]) ** 1.5
    calib = np.stack([b_in, b_mid * 1.329340388], axis=1)  # E|Laplace|^1.5 = Gamma(2.5)
    s_in = np.array([0.45, 0.05, 0.6, 0.9, 0.5, 0.95])
    s_mid = np.array([0.5, 0.6, 0.3, 0.92, 0.0, 0.7])
    return SparsityProfile(
        fingerprint="synthetic-6l", model_type="synthetic", num_layers=L, hidden_size=64,
        intermediate_size=256, levels=LEVELS, t_in=t_in, t_mid=t_mid, calib_mean_abs=calib,
        target_sparsity=0.55, s_in=s_in, s_mid=s_mid, method="synthetic",
        calibration={"note": "tests/data/controller/make_traces.py"},
    )


def signals(rng: np.random.Generator, T: int, B: int) -> tuple[np.ndarray, np.ndarray]:
    """Correlated lognormal surprisal/entropy (nats), [T, B]."""
    z1 = rng.normal(size=(T, B))
    z2 = 0.6 * z1 + 0.8 * rng.normal(size=(T, B))
    return np.exp(0.8 + 0.9 * z1), np.exp(0.5 + 0.5 * z2)


def trace_spiky(p: SparsityProfile, path: Path) -> None:
    rng = np.random.default_rng(11)
    T, B = 128, 2
    u, e = signals(rng, T, B)
    u[20::17, 0] += 9.0
    u[25::13, 1] += 7.0
    e[30::29, 1] += 3.0
    act = p.calib_mean_abs[:, None, :] * np.array([[1.3, 0.9], [0.4, 2.5]]).T[None, :, :]  # [L, B, 2]
    tokens = rng.integers(0, 32000, size=(T, B))
    with ThresholdController(p, ControllerConfig(trace_thresholds=True), batch=B, trace=path) as ctl:
        ctl.begin(act)
        for t in range(T):
            ctl.step(u[t], e[t], tokens=tokens[t])


def trace_easy_runs(p: SparsityProfile, path: Path) -> None:
    rng = np.random.default_rng(12)
    T, B = 200, 1
    u, e = signals(rng, T, B)
    for start in (30, 80, 140):
        n = 12
        u[start:start + n, 0] = np.linspace(0.05, 0.001, n)
        e[start:start + n, 0] = np.linspace(0.02, 0.0005, n)
    with ThresholdController(p, ControllerConfig(trace_thresholds=True), batch=B, trace=path) as ctl:
        ctl.begin(None)
        for t in range(T):
            ctl.step(u[t], e[t])


def trace_random_batch(p: SparsityProfile, path: Path) -> None:
    """Non-default config, early stops and gaps, NaN/inf signals, odd act_stats, two generations."""
    rng = np.random.default_rng(13)
    B = 3
    cfg = ControllerConfig(
        window=8, min_history=4, high=0.9, high_margin=0.2, low=0.3, easy_steps=3, low_margin=0.1,
        dense_offset=0.25, sparse_offset=0.1, min_sparsity=0.1, max_sparsity=0.9, payback_steps=8,
        max_correction=0.2, prefix_strength=0.5, scale_min=0.6, scale_max=1.8, trace_thresholds=True,
    )
    with ThresholdController(p, cfg, batch=B, trace=path) as ctl:
        act = p.calib_mean_abs[:, None, :] * rng.uniform(0.2, 3.0, size=(p.num_layers, B, 2))
        act[0, 0, 0] = 0.0
        act[1, 1, 1] = np.nan
        act[2, 2, 0] = -1.0
        ctl.begin(act)
        T = 256
        u, e = signals(rng, T, B)
        u[77, 0] = np.inf
        e[90, 1] = np.nan
        u[91, 2] = np.nan
        tokens = rng.integers(0, 50000, size=(T, B))
        for t in range(T):
            active = np.array([True, not (50 <= t < 60), t < 180])
            if t in (100, 101):
                active[:] = False
            ctl.step(u[t], e[t], tokens=tokens[t], active=active)
        # a second generation on the same controller
        ctl.begin(p.calib_mean_abs[:, None, :] * rng.uniform(0.5, 2.0, size=(p.num_layers, B, 2)))
        u, e = signals(rng, 40, B)
        for t in range(40):
            ctl.step(u[t], e[t], tokens=np.arange(B) + t)


def trace_extremes(p: SparsityProfile, path: Path) -> None:
    """Always rising (always denser) and always falling (always sparser), explicit target."""
    T, B = 256, 2
    t = np.arange(T, dtype=np.float64)
    u = np.stack([1.0 + 0.1 * t, 60.0 - 0.2 * t], axis=1)
    e = np.stack([0.5 + 0.01 * t, 9.0 - 0.03 * t], axis=1)
    cfg = ControllerConfig(target=0.6, trace_thresholds=True)
    with ThresholdController(p, cfg, batch=B, trace=path) as ctl:
        ctl.begin(None)
        for k in range(T):
            ctl.step(u[k], e[k])


def main() -> None:
    p = make_profile()
    p.save(HERE / "profile.json")
    trace_spiky(p, HERE / "trace_spiky.jsonl")
    trace_easy_runs(p, HERE / "trace_easy_runs.jsonl")
    trace_random_batch(p, HERE / "trace_random_batch.jsonl")
    trace_extremes(p, HERE / "trace_extremes.jsonl")
    for f in sorted(HERE.glob("*.json*")):
        print(f"{f.relative_to(HERE.parents[2])}: {f.stat().st_size} bytes")


if __name__ == "__main__":
    main()
