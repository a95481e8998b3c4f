"""Threshold controller: token level, sequence level, budget, typed decisions, traces
and replay, the C++ header against the Python implementation (decisions, defaults,
table interpolation), and the docs' parameter table against the code.

All on synthetic profiles and synthetic signal traces; no model is loaded."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import shutil
import subprocess
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from clada_export.errors import UserError
from clada_export.profile import SparsityProfile, interp_rows
from clada_export.runtime import controller as controller_module
from clada_export.runtime.controller import (
    ControllerConfig,
    Decision,
    ThresholdController,
    compare_traces,
    config_table,
    load_controller_config,
    read_trace,
    replay_trace,
)

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data" / "controller"
GOLDEN = REPO / "tests" / "data" / "interp_golden.json"
LEVELS = np.round(np.arange(20) * 0.05, 2)

# most tests read the decisions back from the kept records
Recorded = functools.partial(ThresholdController, keep_records=True)


def tiny_profile(s_in=(0.5, 0.4, 0.6, 0.55), s_mid=(0.5, 0.6, 0.3, 0.45)) -> SparsityProfile:
    """4 layers, levels 0..0.95 step 0.05, tables = quantiles of b_l * |Laplace(0, 1)|
    (monotone), calib_mean_abs = b_l (the mean of that distribution)."""
    b_in = np.array([1.0, 0.7, 1.4, 2.0])
    b_mid = np.array([0.1, 0.05, 0.2, 0.08])
    q = -np.log1p(-LEVELS)
    return SparsityProfile(
        fingerprint="tiny", model_type="synthetic", num_layers=4, hidden_size=16, intermediate_size=64,
        levels=LEVELS, t_in=b_in[:, None] * q, t_mid=b_mid[:, None] * q,
        calib_mean_abs=np.stack([b_in, b_mid], axis=1), target_sparsity=0.5,
        s_in=np.array(s_in), s_mid=np.array(s_mid),
    )


Gen = Callable[[int, int], tuple[np.ndarray, np.ndarray]]


def lognormal_gen(seed: int, B: int, rho: float = 0.6) -> Gen:
    rng = np.random.default_rng(seed)

    def gen(t: int, _b: int) -> tuple[np.ndarray, np.ndarray]:
        z1 = rng.normal(size=B)
        z2 = rho * z1 + np.sqrt(1 - rho**2) * rng.normal(size=B)
        return np.exp(0.8 + 0.9 * z1), np.exp(0.5 + 0.5 * z2)

    return gen


def run(ctl: ThresholdController, T: int, gen: Gen, act_stats=None) -> list[np.ndarray]:
    outs = [ctl.begin(act_stats)]
    for t in range(T):
        u, e = gen(t, ctl.batch)
        outs.append(ctl.step(u, e))
    return outs


def steps_of(ctl: ThresholdController, seq: int = 0) -> list[dict]:
    return [r for r in ctl.step_records() if r["seq"] == seq]


# -- building blocks ------------------------------------------------------------------
def test_interp_rows_is_numpy_interp_per_layer():
    """The one row-wise table interpolation (profile.interp_rows, used by the controller and
    by SparsityProfile.thresholds_at) gives exactly numpy.interp's values, table ends and
    exact levels included."""
    p = tiny_profile()
    rng = np.random.default_rng(0)
    for _ in range(500):
        x = rng.uniform(-0.2, 1.1, size=4)
        if rng.random() < 0.3:
            x = LEVELS[rng.integers(0, 20, size=4)]
        for table in (p.t_in, p.t_mid):
            ref = np.array([np.interp(x[l], p.levels, table[l]) for l in range(len(table))])
            assert np.array_equal(interp_rows(x, p.levels, table), ref)
        both = p.thresholds_at(x, x)
        assert np.array_equal(both[:, 0], interp_rows(x, p.levels, p.t_in))


def test_interp_golden_file():
    """tests/data/interp_golden.json: the exact outputs that interp_rows (here) and
    clada::Profile::interp (CTest interp_golden) must both give."""
    doc = json.loads(GOLDEN.read_text())
    n = 0
    for g in doc["groups"]:
        levels, table = np.array(g["levels"]), np.array(g["table"])
        for x, want in zip(g["x"], g["expected"]):
            got = interp_rows(np.array(x), levels, table)
            assert got.tolist() == want, (g["name"], x)
            n += len(x)
    assert n == 147


def test_static_thresholds_and_target():
    p = tiny_profile()
    ctl = Recorded(p, batch=3)
    st = ctl.static_thresholds()
    assert st.shape == (4, 3, 2) and st.dtype == np.float32
    assert np.array_equal(st, np.repeat(p.static_thresholds()[:, None, :], 3, axis=1).astype(np.float32))
    assert ctl.static_thresholds(5).shape == (4, 5, 2)
    assert np.array_equal(ctl.begin(None), st)  # no prefix shift -> the allocation's thresholds
    assert ctl.target == pytest.approx(p.mean_byte_sparsity(), abs=1e-15)
    assert ctl.min_sparsity == pytest.approx(ctl.target - 0.2)
    assert ctl.max_sparsity == pytest.approx(ctl.target + 0.15)


def test_warmup_stays_at_target():
    cfg = ControllerConfig()
    ctl = Recorded(tiny_profile(), cfg, batch=2)
    run(ctl, cfg.min_history + 5, lognormal_gen(1, 2))
    recs = steps_of(ctl, 1)
    for r in recs[: cfg.min_history]:
        assert r["load"] is None and r["state"] == "normal"
        assert r["target"] == ctl.target and r["realized"] == ctl.target and r["debt"] == 0.0
    assert all(r["load"] is not None for r in recs[cfg.min_history:])


# -- token level ------------------------------------------------------------------------
def test_surprisal_spike_makes_next_step_denser():
    B, spike = 2, 40
    base = lognormal_gen(2, B)

    def gen(t, b):
        u, e = base(t, b)
        if t == spike:
            u = u.copy()
            u[0] = 40.0  # only sequence 0 is surprised
        return u, e

    ctl = Recorded(tiny_profile(), batch=B)
    outs = run(ctl, 60, gen)
    r0, r1 = steps_of(ctl, 0), steps_of(ctl, 1)
    assert r0[spike]["load"] == 1.0
    assert r0[spike]["state"] == "denser"
    assert r0[spike]["target"] < r0[spike - 1]["target"]
    # the thresholds returned by this step (used by the next decode step) are lower on every layer
    after, before = outs[spike + 1], outs[spike]
    assert np.all(after[:, 0, :] < before[:, 0, :])
    assert ctl.denser_steps[0] >= 1
    # denser means target - dense_offset plus the budget's correction
    prev_debt = r0[spike - 1]["debt"]
    corr = np.clip(prev_debt / ctl.config.payback_steps, -ctl.config.max_correction, ctl.config.max_correction)
    assert r0[spike]["target"] == pytest.approx(ctl.target - ctl.config.dense_offset + corr, abs=1e-12)
    # the other sequence is not affected by sequence 0's spike
    solo = Recorded(tiny_profile(), batch=1)
    base2 = lognormal_gen(2, B)
    solo.begin(None)
    for t in range(60):
        u, e = base2(t, B)
        solo.step(u[1:], e[1:])
    assert [r["state"] for r in steps_of(solo, 0)] == [r["state"] for r in r1]
    assert [r["target"] for r in steps_of(solo, 0)] == [r["target"] for r in r1]


def test_entropy_spike_also_makes_denser():
    base = lognormal_gen(3, 1)

    def gen(t, b):
        u, e = base(t, b)
        return (u, e * 0 + 20.0) if t == 30 else (u, e)

    ctl = Recorded(tiny_profile(), batch=1)
    run(ctl, 40, gen)
    assert steps_of(ctl)[30]["state"] == "denser"


def test_run_of_easy_tokens_makes_sparser():
    cfg = ControllerConfig()
    base = lognormal_gen(4, 1)
    start, n = 40, 10

    def gen(t, b):
        u, e = base(t, b)
        if start <= t < start + n:  # ever easier tokens: below everything in the window
            return np.array([1e-3 / (t + 1)]), np.array([1e-4 / (t + 1)])
        if t == start - 1:  # a hard token just before, so the easy run starts at `start`
            return np.array([40.0]), e
        return u, e

    ctl = Recorded(tiny_profile(), cfg, batch=1)
    outs = run(ctl, 60, gen)
    recs = steps_of(ctl)
    assert recs[start - 1]["state"] == "denser"
    assert recs[start]["load"] == 0.0 and recs[start]["state"] == "normal"  # one easy token is not a run
    k = start + cfg.easy_steps - 1
    assert recs[k]["state"] == "sparser"
    assert all(r["state"] == "sparser" for r in recs[k:start + n])
    assert recs[k]["target"] > recs[k - 1]["target"]
    assert np.all(outs[k + 1] >= outs[k]) and np.any(outs[k + 1] > outs[k])
    assert ctl.sparser_steps[0] >= n - cfg.easy_steps + 1


def test_hysteresis():
    cfg = ControllerConfig(window=16, min_history=16, high=0.9, high_margin=0.3)
    ctl = Recorded(tiny_profile(), cfg, batch=1)
    ctl.begin(None)
    vals = list(np.linspace(1.0, 2.0, 16))
    for v in vals:  # warm-up with a known window
        ctl.step(np.array([v]), np.array([0.0]))
    ctl.step(np.array([10.0]), np.array([0.0]))     # load 1.0 -> denser
    assert ctl.states == ["denser"]
    ctl.step(np.array([1.9]), np.array([0.0]))      # rank 13.5/16 ~ 0.84 >= 0.6: stays denser
    assert ctl.states == ["denser"]
    assert steps_of(ctl)[-1]["load"] < cfg.high
    ctl.step(np.array([1.0]), np.array([0.0]))      # low load: leaves
    assert ctl.states == ["normal"]


def test_nan_and_inf_signals():
    ctl = Recorded(tiny_profile(), ControllerConfig(min_history=4, window=4), batch=1)
    ctl.begin(None)
    for v in (1.0, 2.0, 3.0, 4.0):
        ctl.step(np.array([v]), np.array([v]))
    out = ctl.step(np.array([np.inf]), np.array([np.nan]))
    r = steps_of(ctl)[-1]
    assert r["load"] == 1.0 and r["state"] == "denser" and np.all(np.isfinite(out))
    out = ctl.step(np.array([np.nan]), np.array([np.nan]))
    assert steps_of(ctl)[-1]["load"] == 0.5 and np.all(np.isfinite(out))


# -- budget and bounds --------------------------------------------------------------------
def _rising(t, B):
    return np.full(B, 1.0 + t), np.full(B, 0.5 + 0.01 * t)


def _falling(t, B):
    return np.full(B, 300.0 - t), np.full(B, 9.0 - 0.03 * t)


def _periodic(t, B):
    return np.full(B, 9.0 + 0.01 * t if t % 7 == 0 else 1.0 + 0.01 * (t % 5)), np.full(B, 1.0)


def _constant(t, B):
    return np.ones(B), np.ones(B)


def _bursty(seed):
    rng = np.random.default_rng(seed)

    def gen(t, B):
        hard = (t // 20) % 3 == 0  # 20 hard tokens, 40 easy, ...
        u = rng.lognormal(2.0 if hard else -1.0, 0.5, size=B)
        e = rng.lognormal(1.0 if hard else -1.5, 0.3, size=B)
        return u, e

    return gen


BUDGET_GENS = {
    "lognormal-1": lognormal_gen(10, 4),
    "lognormal-2": lognormal_gen(11, 4, rho=0.0),
    "lognormal-3": lognormal_gen(12, 4, rho=0.95),
    "bursty": _bursty(13),
    "rising": _rising,
    "falling": _falling,
    "periodic": _periodic,
    "constant": _constant,
}


@pytest.mark.parametrize("name", sorted(BUDGET_GENS))
@pytest.mark.parametrize("alloc", ["centered", "clipping"])
def test_budget_holds_over_256_steps(name, alloc):
    p = tiny_profile() if alloc == "centered" else tiny_profile(s_in=(0.05, 0.95, 0.9, 0.5), s_mid=(0.0, 0.9, 0.95, 0.3))
    ctl = Recorded(p, ControllerConfig(), batch=4)
    outs = run(ctl, 256, BUDGET_GENS[name])
    assert np.all(np.abs(ctl.mean_sparsity - ctl.target) <= 0.02), (ctl.mean_sparsity, ctl.target)
    assert np.all(ctl.steps == 256)
    for b in range(4):
        recs = steps_of(ctl, b)
        realized = np.array([r["realized"] for r in recs])
        assert ctl.mean_sparsity[b] == pytest.approx(realized.mean(), abs=1e-12)  # the budget counts realized
        assert recs[-1]["debt"] == pytest.approx(256 * ctl.target - realized.sum(), abs=1e-9)
        for r in recs:  # bounds
            assert ctl.min_sparsity <= r["target"] <= ctl.max_sparsity
            assert p.levels[0] <= r["realized"] <= p.levels[-1]
    for o in outs:
        assert o.dtype == np.float32 and o.shape == (4, 4, 2) and np.all(np.isfinite(o)) and np.all(o >= 0)


def test_budget_with_clipping_is_honest():
    # layer allocations at the table's ends: a denser shift clips, so realized != target
    p = tiny_profile(s_in=(0.0, 0.95, 0.9, 0.5), s_mid=(0.0, 0.9, 0.95, 0.3))
    ctl = Recorded(p, ControllerConfig(), batch=1)
    run(ctl, 256, _rising)  # always denser
    recs = steps_of(ctl)
    assert any(abs(r["realized"] - r["target"]) > 1e-6 for r in recs)
    assert abs(ctl.mean_sparsity[0] - ctl.target) <= 0.02


def test_aggressive_config_respects_bounds():
    cfg = ControllerConfig(dense_offset=0.5, sparse_offset=0.5, max_correction=0.5, min_sparsity=0.3,
                           max_sparsity=0.7, window=4, min_history=2, payback_steps=2)
    ctl = Recorded(tiny_profile(), cfg, batch=3)
    run(ctl, 256, _bursty(5))
    for r in ctl.step_records():
        assert 0.3 <= r["target"] <= 0.7


def test_config_validation():
    p = tiny_profile()
    for bad in (dict(window=0), dict(min_history=20), dict(low=0.9, high=0.5), dict(dense_offset=-0.1),
                dict(payback_steps=0), dict(scale_min=1.5), dict(min_sparsity=0.6)):
        with pytest.raises(UserError):
            Recorded(p, ControllerConfig(**bad))
    with pytest.raises(UserError):
        ControllerConfig.from_dict({"windw": 3})
    assert ControllerConfig.from_dict(ControllerConfig().to_dict()) == ControllerConfig()


def test_controller_config_file(tmp_path):
    """``--controller FILE`` (generate, eval): overrides read and validated, errors name the file."""
    assert load_controller_config(None) == ControllerConfig()
    f = tmp_path / "c.json"
    f.write_text('{"dense_offset": 0.05, "prefix_strength": 0}')
    assert load_controller_config(f) == ControllerConfig(dense_offset=0.05, prefix_strength=0)
    cases = [("missing.json", None, "does not exist"), ("bad.json", "{dense", "not readable JSON"),
             ("list.json", "[1, 2]", "JSON object"), ("key.json", '{"windw": 3}', "unknown keys"),
             ("value.json", '{"window": 0}', "window must be a positive integer")]
    for name, text, msg in cases:
        path = tmp_path / name
        if text is not None:
            path.write_text(text)
        with pytest.raises(UserError, match=msg) as e:
            load_controller_config(path)
        assert name in str(e.value)


def test_config_types_name_the_field(tmp_path):
    """Every field is type-checked on load: one line naming the file and the field."""
    assert ControllerConfig.from_dict({"window": 8.0, "prefix_strength": 0}) == ControllerConfig(window=8, prefix_strength=0.0)
    assert type(ControllerConfig.from_dict({"window": 8.0}).window) is int
    cases = {"window": "abc", "high": "x", "target": [0.5], "trace_thresholds": 1, "easy_steps": 2.5,
             "min_sparsity": True, "payback_steps": 2**31, "dense_offset": 10**400}
    for name, value in cases.items():
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({name: value}))
        with pytest.raises(UserError) as e:
            load_controller_config(path)
        msg = str(e.value)
        assert "\n" not in msg and str(path) in msg and f"controller config: {name} must be" in msg, msg
    with pytest.raises(UserError, match="window must be an integer"):
        ThresholdController(tiny_profile(), ControllerConfig(window="16"))  # type: ignore[arg-type]
    for name, text in (("deep", "[" * 100_000), ("huge", '{"window": ' + "9" * 5000 + "}"), ("utf", b"\xff{}")):
        path = tmp_path / f"{name}.json"
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        with pytest.raises(UserError, match="is not readable JSON") as e:
            load_controller_config(path)
        assert "\n" not in str(e.value) and str(path) in str(e.value)


def test_docs_parameter_table_is_generated_from_the_config():
    """docs/controller.md holds config_table() verbatim: defaults and meanings are written
    once, on ControllerConfig's fields."""
    doc = (REPO / "docs" / "controller.md").read_text()
    table = config_table()
    assert table in doc, ("docs/controller.md's parameter table differs from ControllerConfig; paste the output of "
                          "python -c 'from clada_export.runtime.controller import config_table; print(config_table())'")
    assert [f.name for f in dataclasses.fields(ControllerConfig)] == [
        line.split("`")[1] for line in table.splitlines()[2:]]
    assert "| `window` | 16 |" in table and "| `target` | None |" in table


# -- typed decisions, records only when tracing -------------------------------------------------
def test_decisions_are_typed_and_nothing_is_kept_without_a_trace():
    p = tiny_profile()
    gen_a, gen_b = lognormal_gen(40, 2), lognormal_gen(40, 2)
    plain, kept = ThresholdController(p, batch=2), Recorded(p, batch=2)
    plain.begin(None)
    kept.begin(None)
    for t in range(60):
        active = [True, t % 7 != 3]
        ua, ea = gen_a(t, 2)
        ub, eb = gen_b(t, 2)
        out_a = plain.step(ua, ea, tokens=[t, t + 1], active=active)
        out_b = kept.step(ub, eb, tokens=[t, t + 1], active=active)
        assert np.array_equal(out_a, out_b)
        d = plain.last_decisions
        assert len(d) == 2 and isinstance(d[0], Decision) and (d[1] is None) == (not active[1])
        assert d[0].step == t and d[0].seq == 0 and d[0].token == t
        assert [x.record() for x in d if x is not None] == kept.step_records()[-sum(active):]
    assert plain.records == [] and len(kept.records) == 2 + len(kept.step_records())
    with pytest.raises(RuntimeError, match="keep_records=True"):
        plain.step_records()
    with pytest.raises(dataclasses.FrozenInstanceError):
        plain.last_decisions[0].state = "denser"  # type: ignore[misc, union-attr]
    assert not hasattr(plain, "write_trace") and not hasattr(plain, "debt")


def test_trace_file_is_strict_json_with_nonfinite_signals(tmp_path):
    path = tmp_path / "t.jsonl"
    with ThresholdController(tiny_profile(), ControllerConfig(min_history=2, window=2), trace=path) as ctl:
        for u, e in ((1.0, 2.0), (3.0, 1.0), (math.inf, math.nan), (math.nan, -math.inf)):
            ctl.step(np.array([u]), np.array([e]))
        assert ctl.records == []  # written, not kept

    def no_constants(name):
        raise AssertionError(f"{name} in a trace: not strict JSON")

    raw = [json.loads(line, parse_constant=no_constants) for line in path.read_text().splitlines()]
    assert raw[0]["version"] == 2 and raw[4]["surprisal"] == "Infinity" and raw[4]["entropy"] == "NaN"
    recs = read_trace(path)
    assert recs[4]["surprisal"] == math.inf and math.isnan(recs[4]["entropy"]) and recs[5]["entropy"] == -math.inf
    assert [r["state"] for r in recs[2:]] == [d["state"] for d in raw[2:]]
    assert compare_traces(recs, replay_trace(tiny_profile(), path)) == []


# -- determinism, batching, active mask -------------------------------------------------------
def test_determinism():
    a = Recorded(tiny_profile(), ControllerConfig(trace_thresholds=True), batch=3)
    b = Recorded(tiny_profile(), ControllerConfig(trace_thresholds=True), batch=3)
    oa = run(a, 200, lognormal_gen(20, 3))
    ob = run(b, 200, lognormal_gen(20, 3))
    assert all(np.array_equal(x, y) for x, y in zip(oa, ob))
    assert json.dumps(a.records) == json.dumps(b.records)
    # begin() resets: a second generation with the same inputs makes the same decisions
    oc = run(a, 200, lognormal_gen(20, 3))
    assert all(np.array_equal(x, y) for x, y in zip(oa, oc))


def test_active_mask():
    ctl = Recorded(tiny_profile(), batch=2)
    ctl.begin(None)
    gen = lognormal_gen(21, 2)
    last = None
    for t in range(40):
        u, e = gen(t, 2)
        out = ctl.step(u, e, tokens=[t, 100 + t], active=[True, t < 20])
        if t == 19:
            last = out[:, 1, :].copy()
        if t >= 20:
            assert np.array_equal(out[:, 1, :], last)
    assert list(ctl.steps) == [40, 20]
    assert [r["token"] for r in steps_of(ctl, 1)] == [100 + t for t in range(20)]


# -- sequence level ---------------------------------------------------------------------------
def test_prefix_scale_moves_thresholds_the_right_way():
    p = tiny_profile()
    ctl = Recorded(p, batch=4)
    st = ctl.static_thresholds()
    factors = np.array([1.0, 1.5, 0.7, 10.0])
    act = p.calib_mean_abs[:, None, :] * factors[None, :, None]
    thr = ctl.begin(act)
    np.testing.assert_allclose(thr[:, 0], st[:, 0], rtol=1e-7)
    np.testing.assert_allclose(thr[:, 1], 1.5 * st[:, 1], rtol=1e-6)  # louder prompt -> higher thresholds
    np.testing.assert_allclose(thr[:, 2], 0.7 * st[:, 2], rtol=1e-6)  # quieter prompt -> lower
    np.testing.assert_allclose(thr[:, 3], 2.0 * st[:, 3], rtol=1e-6)  # clamped at scale_max
    assert np.all(ctl.scale[:, 3] == 2.0)
    # the scale stays on for the token level's thresholds
    gen = lognormal_gen(22, 4)
    for t in range(30):
        out = ctl.step(*gen(t, 4))
    recs = [steps_of(ctl, b)[-1] for b in range(4)]
    assert recs[1]["t_in_mean"] > recs[0]["t_in_mean"] * 1.2 or recs[1]["target"] < recs[0]["target"] - 0.05
    # prefix_strength 0 disables the shift
    off = Recorded(p, ControllerConfig(prefix_strength=0.0), batch=4)
    assert np.array_equal(off.begin(act), st)


def test_prefix_scale_restores_target_sparsity_on_a_louder_prompt():
    """Magnitudes with a fixed shape times a per-prompt scale: the calibrated thresholds
    under-sparsify a louder prompt; the prefix-scaled ones hit the target again."""
    p = tiny_profile()
    rng = np.random.default_rng(23)
    ctl = Recorded(p, batch=2)
    prompt_scale = np.array([1.6, 0.6])
    samples = [[np.abs(rng.laplace(0.0, p.calib_mean_abs[l, k] * prompt_scale[b], size=200_000))
                for b in range(2)] for l in range(4) for k in range(2)]
    act = np.array([[[samples[l * 2 + k][b].mean() for k in range(2)] for b in range(2)] for l in range(4)])
    st = ctl.static_thresholds()
    thr = ctl.begin(act)
    want = np.stack([p.s_in, p.s_mid], axis=1)
    for l in range(4):
        for k in range(2):
            for b in range(2):
                x = samples[l * 2 + k][b]
                static_s = np.mean(x < st[l, b, k])
                scaled_s = np.mean(x < thr[l, b, k])
                if b == 0:
                    assert static_s < want[l, k] - 0.05  # louder: static thresholds zero too little
                else:
                    assert static_s > want[l, k] + 0.05  # quieter: too much
                assert abs(scaled_s - want[l, k]) < 0.01


# -- traces and replay ------------------------------------------------------------------------
def test_trace_file_and_replay(tmp_path):
    path = tmp_path / "t.jsonl"
    p = tiny_profile()
    with Recorded(p, ControllerConfig(trace_thresholds=True), batch=2, trace=path) as ctl:
        gen = lognormal_gen(24, 2)
        ctl.begin(p.calib_mean_abs[:, None, :] * np.array([1.2, 0.8])[None, :, None])
        for t in range(64):
            u, e = gen(t, 2)
            ctl.step(u, e, tokens=[t, t + 1])
    recs = read_trace(path)
    assert recs == json.loads(json.dumps(ctl.records))
    assert [r["event"] for r in recs[:3]] == ["config", "begin", "step"]
    step = recs[2]
    for key in ("step", "seq", "token", "surprisal", "entropy", "load", "state", "target", "realized",
                "debt", "t_in_mean", "t_mid_mean", "thresholds"):
        assert key in step
    assert compare_traces(recs, replay_trace(p, path)) == []


@pytest.mark.parametrize("trace", sorted(p.name for p in DATA.glob("trace_*.jsonl")))
def test_recorded_traces_replay_identically_in_python(trace):
    p = SparsityProfile.load(DATA / "profile.json")
    recs = read_trace(DATA / trace)
    mine = replay_trace(p, recs)
    assert compare_traces(recs, json.loads(json.dumps(mine))) == []


def _cxx_compiler() -> str | None:
    for c in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if c and shutil.which(c):
            return c
    return None


@pytest.fixture(scope="module")
def cpp_build(tmp_path_factory):
    if shutil.which("cmake") is None or shutil.which("ctest") is None:
        pytest.skip("cmake/ctest not installed")
    if _cxx_compiler() is None:
        pytest.skip("no C++ compiler (c++, g++, clang++ or $CXX)")
    build = tmp_path_factory.mktemp("runtime-build")
    cfg = subprocess.run(["cmake", "-S", str(REPO / "runtime"), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release"],
                         capture_output=True, text=True)
    assert cfg.returncode == 0, cfg.stdout + cfg.stderr
    bld = subprocess.run(["cmake", "--build", str(build), "-j", "4"], capture_output=True, text=True)
    assert bld.returncode == 0, bld.stdout + bld.stderr
    return build


def test_cpp_ctest_passes(cpp_build):
    res = subprocess.run(["ctest", "--output-on-failure"], cwd=cpp_build, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    for name in ("controller_unit", "trace_unit", "interp_golden", "replay_trace_random_batch"):
        assert name in res.stdout


def test_cpp_defaults_equal_python(cpp_build):
    """The C++ ControllerConfig's fields, order, defaults and types, the default bounds and
    the trace format equal Python's: this fails as soon as one side changes alone."""
    res = subprocess.run([str(cpp_build / "test_trace"), "--print-defaults"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    cpp = json.loads(res.stdout)
    py = ControllerConfig().to_dict()
    assert list(cpp["config"]) == list(py)
    for name, value in py.items():
        assert cpp["config"][name] == value and type(cpp["config"][name]) is type(value), name
    assert cpp["default_below"] == controller_module.DEFAULT_BELOW
    assert cpp["default_above"] == controller_module.DEFAULT_ABOVE
    assert cpp["trace_format"] == controller_module.TRACE_FORMAT
    assert cpp["trace_version"] == controller_module.TRACE_VERSION


def _fresh_trace(path: Path, p: SparsityProfile, cfg: ControllerConfig, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    B = 3
    with Recorded(p, cfg, batch=B, trace=path) as ctl:
        ctl.begin(p.calib_mean_abs[:, None, :] * rng.uniform(0.3, 2.5, size=(p.num_layers, B, 2)))
        gen = _bursty(seed)
        for t in range(256):
            u, e = gen(t, B)
            ctl.step(u, e, tokens=rng.integers(0, 1000, size=B), active=[True, True, t < 200])
    return read_trace(path)


@pytest.mark.parametrize("cfg", [
    ControllerConfig(trace_thresholds=True),
    ControllerConfig(window=8, min_history=3, high=0.8, low=0.45, easy_steps=1, dense_offset=0.3,
                     sparse_offset=0.2, payback_steps=5, max_correction=0.3, prefix_strength=0.7,
                     target=0.45, trace_thresholds=True),
], ids=["default", "custom"])
@pytest.mark.parametrize("alloc", ["centered", "clipping"])
def test_cpp_replay_matches_python(cpp_build, tmp_path, cfg, alloc):
    p = tiny_profile() if alloc == "centered" else tiny_profile(s_in=(0.0, 0.95, 0.9, 0.5), s_mid=(0.0, 0.9, 0.95, 0.3))
    p.save(tmp_path / "profile.json")
    py = _fresh_trace(tmp_path / "py.jsonl", p, cfg, seed=31)
    res = subprocess.run([str(cpp_build / "clada_replay"), str(tmp_path / "profile.json"), str(tmp_path / "py.jsonl"),
                          "--out", str(tmp_path / "cpp.jsonl"), "--rtol", "1e-9"], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    cpp = read_trace(tmp_path / "cpp.jsonl")
    assert len(cpp) == len(py)
    assert [r.get("state") for r in cpp] == [r.get("state") for r in py]
    assert compare_traces(py, cpp, rtol=1e-9) == []
    assert sum(r["event"] == "step" and r["state"] == "denser" for r in py) > 0
