"""The C++ controller behind the kernel library's C ABI (runtime/native_controller.py)
against the Python controller: the same thresholds bit for bit and the same decisions,
step by step, on random profiles, configs, batches, signals (NaN, inf, spikes) and
activity masks. It needs libclada_kernels.so, which the install builds wherever nvcc is
(CI included); no GPU is needed: the controller is host code."""

import dataclasses

import numpy as np
import pytest

from clada_export.profile import SparsityProfile
from clada_export.runtime.controller import ControllerConfig, ThresholdController


@pytest.fixture(scope="module")
def native():
    from clada_export.runtime import native_controller

    why = native_controller.native_controller_available()
    if why is not None:
        pytest.skip(f"the kernel library is not built here: {why}")
    return native_controller


def random_profile(rng: np.random.Generator, L: int, gated: bool = True) -> SparsityProfile:
    levels = np.round(np.arange(0.0, 0.96, 0.05), 10)
    q = -np.log1p(-levels)
    b_in, b_mid = rng.uniform(0.3, 2.0, L), rng.uniform(0.02, 0.3, L)
    return SparsityProfile(
        fingerprint="random", model_type="synthetic", num_layers=L, hidden_size=16, intermediate_size=64,
        levels=levels, t_in=b_in[:, None] * q * rng.uniform(0.9, 1.1, (L, 1)), t_mid=b_mid[:, None] * q,
        calib_mean_abs=np.stack([b_in, b_mid], axis=1), target_sparsity=0.5,
        s_in=rng.uniform(0.3, 0.7, L), s_mid=rng.uniform(0.3, 0.7, L), gated_mlp=gated)


def signals(rng: np.random.Generator, T: int, B: int) -> tuple[np.ndarray, np.ndarray]:
    u = rng.lognormal(0.5, 1.0, (T, B))
    e = 0.6 * u + rng.lognormal(0.3, 0.5, (T, B))
    u[rng.random((T, B)) < 0.03] = np.nan
    e[rng.random((T, B)) < 0.02] = np.inf
    u[rng.random((T, B)) < 0.05] *= 20  # spikes: denser states
    return u, e


def _key(d):
    """A decision as a tuple in which NaN equals NaN (a NaN signal is recorded as given)."""
    if d is None:
        return None
    return tuple("nan" if isinstance(v, float) and v != v else v for v in dataclasses.astuple(d))


@pytest.mark.parametrize("seed", range(12))
def test_native_controller_matches_python_bit_for_bit(native, seed):
    rng = np.random.default_rng(seed)
    L, B, T = int(rng.integers(1, 33)), int(rng.integers(1, 9)), 200
    prof = random_profile(rng, L, gated=seed % 4 != 3)  # seeds 3, 7, 11: a plain-MLP profile
    cfg = ControllerConfig()
    if seed % 3 == 1:
        cfg = dataclasses.replace(cfg, window=8, min_history=4, easy_steps=1, payback_steps=4, target=0.45)
    if seed % 3 == 2:
        cfg = dataclasses.replace(cfg, prefix_strength=0.5, min_sparsity=0.3, max_sparsity=0.7, high=0.9, low=0.3)
    act_stats = prof.calib_mean_abs[:, None, :] * rng.uniform(0.5, 1.8, (L, B, 2)) if seed % 2 else None
    py, cc = ThresholdController(prof, cfg, batch=B), native.NativeController(prof, cfg, batch=B)
    assert (py.target, py.min_sparsity, py.max_sparsity) == (cc.target, cc.min_sparsity, cc.max_sparsity)
    assert np.array_equal(py.begin(act_stats), cc.begin(act_stats))
    u, e = signals(rng, T, B)
    tokens = rng.integers(0, 50000, (T, B))
    for t in range(T):
        active = rng.random(B) > 0.1
        tok = tokens[t] if t % 5 else None  # the step without tokens too
        a, b = py.step(u[t], e[t], tokens=tok, active=active), cc.step(u[t], e[t], tokens=tok, active=active)
        assert a.dtype == b.dtype == np.float32 and np.array_equal(a, b), f"thresholds differ at step {t}"
        # the generator's per-step summary, read off the records before any decision is built
        (ra, da), (rb, db) = py.step_summary(), cc.step_summary()
        assert np.array_equal(ra, rb, equal_nan=True) and np.array_equal(da, db), f"summary differs at step {t}"
        assert np.isnan(rb[~active]).all() and not db[~active].any()
        assert [_key(d) for d in py.last_decisions] == [_key(d) for d in cc.last_decisions], f"step {t}"
    for name in ("mean_sparsity", "steps", "denser_steps", "sparser_steps"):
        assert np.array_equal(np.asarray(getattr(py, name)), getattr(cc, name), equal_nan=True), name
    assert (py.denser_steps.sum() > 0) and (py.sparser_steps.sum() > 0)  # every state was exercised
    cc.close()
    with pytest.raises(RuntimeError, match="closed"):
        cc.step(u[0], e[0])


def test_make_controller_picks_python_for_traces(native, tmp_path):
    rng = np.random.default_rng(0)
    prof = random_profile(rng, 4)
    assert isinstance(native.make_controller(prof, batch=2), native.NativeController)
    traced = native.make_controller(prof, batch=2, trace=tmp_path / "t.jsonl")
    assert isinstance(traced, ThresholdController)
    traced.close()
    with pytest.raises(Exception, match="traces are written by the Python controller"):
        native.make_controller(prof, batch=2, trace=tmp_path / "u.jsonl", native=True)


def test_bad_config_is_refused_like_python(native):
    prof = random_profile(np.random.default_rng(1), 4)
    from clada_export.errors import UserError

    with pytest.raises(UserError):
        native.NativeController(prof, ControllerConfig(target=0.99), batch=1)


def test_realized_sparsity_weighs_the_input_by_the_mlp_form():
    rng = np.random.default_rng(0)
    for gated in (True, False):
        prof = random_profile(rng, 6, gated=gated)
        py = ThresholdController(prof, ControllerConfig(), batch=1)
        ci, cm, realized = py._levels_at(0.0)
        assert realized == pytest.approx(prof.mean_byte_sparsity(), abs=1e-12)
        w = 2.0 if gated else 1.0
        assert realized == pytest.approx(float(np.mean((w * ci + cm) / (w + 1.0))), abs=1e-12)
