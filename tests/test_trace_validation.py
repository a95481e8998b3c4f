"""Controller traces and configs are checked before use (issue 12): a malformed trace is
one UserError line naming the file (or "trace") and the line and field, never a
traceback or a hang; `--trace` output is written beside the target and renamed into
place, so a killed run leaves no partial trace."""

from __future__ import annotations

import copy
import json
import math
import os
import random
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from clada_export.errors import UserError
from clada_export.profile import SparsityProfile
from clada_export.runtime.controller import (
    ControllerConfig,
    ThresholdController,
    compare_traces,
    load_controller_config,
    read_trace,
    replay_trace,
)

DATA = Path(__file__).parent / "data" / "controller"
TRACES = sorted(DATA.glob("trace_*.jsonl"))
CASE_TIMEOUT_S = 30.0  # a hang fails the case instead of blocking the suite
N_MUTATIONS = 360


@pytest.fixture(scope="module")
def profile() -> SparsityProfile:
    return SparsityProfile.load(DATA / "profile.json")


def _replay(profile: SparsityProfile, trace) -> object:
    """replay_trace(profile, trace) in a daemon thread: its result or exception, or
    'HANG' when it runs past CASE_TIMEOUT_S."""
    box: dict[str, object] = {}

    def work() -> None:
        try:
            box["result"] = replay_trace(profile, trace)
        except BaseException as e:  # noqa: BLE001 - reported by the caller
            box["error"] = e

    th = threading.Thread(target=work, daemon=True)
    th.start()
    th.join(CASE_TIMEOUT_S)
    if th.is_alive():
        return "HANG"
    return box.get("error", box.get("result"))


def _one_line(err: UserError, name: str) -> bool:
    msg = str(err)
    return "\n" not in msg and bool(msg.strip()) and name in msg


# -- the fuzz -------------------------------------------------------------------------------
BAD_VALUES = [None, True, False, 0, -1, 1, 3, 2**31, 2**63, -2**63 - 1, 10**400, 1.5, -0.5, 1e30, -1e30,
              "NaN", "Infinity", "-Infinity", "x", "", "16", [], [1, 2], [[1.0]], {}, {"a": 1}, 1e-300]


def _mutate(rng: random.Random, lines: list[str]) -> tuple[str, list[str]]:
    """One random mutation of a trace's lines: (what was done, new lines)."""
    lines = list(lines)
    i = rng.randrange(len(lines))
    kind = rng.choice(["value", "value", "value", "value", "delete_field", "add_field", "event", "garbage",
                       "truncate", "drop_line", "dup_line", "swap_lines", "non_object", "step", "seq", "nested"])
    if kind == "garbage":
        lines[i] = rng.choice(["{", "}", "nope", "{\"event\": }", "[1, 2", "\x00", "NaN", "{'event': 'step'}"])
        return f"garbage line {i + 1}", lines
    if kind == "truncate":
        lines[i] = lines[i][: rng.randrange(1, max(2, len(lines[i])))]
        return f"truncated line {i + 1}", lines
    if kind == "drop_line":
        del lines[i]
        return f"dropped line {i + 1}", lines or ["{}"]
    if kind == "dup_line":
        lines.insert(i, lines[i])
        return f"duplicated line {i + 1}", lines
    if kind == "swap_lines":
        j = rng.randrange(len(lines))
        lines[i], lines[j] = lines[j], lines[i]
        return f"swapped lines {i + 1} and {j + 1}", lines
    if kind == "non_object":
        lines[i] = rng.choice(["[]", "3", "\"step\"", "null", "true", "[{\"event\": \"step\"}]"])
        return f"line {i + 1} not an object", lines
    rec = json.loads(lines[i])
    keys = list(rec)
    if kind == "value":
        k = rng.choice(keys)
        if k == "config" and rng.random() < 0.7 and isinstance(rec[k], dict):
            k2 = rng.choice(list(rec[k]))
            rec[k][k2] = rng.choice(BAD_VALUES)
            what = f"line {i + 1} config.{k2}"
        else:
            rec[k] = rng.choice(BAD_VALUES)
            what = f"line {i + 1} {k}"
    elif kind == "delete_field":
        k = rng.choice(keys)
        del rec[k]
        what = f"line {i + 1} without {k}"
    elif kind == "add_field":
        rec[rng.choice(["extra", "Step", "seq2"])] = rng.choice(BAD_VALUES)
        what = f"line {i + 1} extra field"
    elif kind == "event":
        rec["event"] = rng.choice(["config", "begin", "step", "end", "", "STEP", 3, None])
        what = f"line {i + 1} event {rec['event']!r}"
    elif kind == "step":
        rec["step"] = rng.choice(["NaN", "Infinity", "-Infinity", 1e30, 10**30, -1, 10**6, 2.5, 7.0,
                                  rec.get("step", 0) if isinstance(rec.get("step"), int) else 0])
        what = f"line {i + 1} step {rec['step']!r}"
    elif kind == "seq":
        rec["seq"] = rng.choice([-1, 3, 4, 99, 2**40, "0", 0.5, 1.0, None, "NaN"])
        what = f"line {i + 1} seq {rec['seq']!r}"
    else:  # nested: a list or number inside act_stats / thresholds / config
        if "act_stats" in rec and isinstance(rec["act_stats"], list):
            a = rec["act_stats"]
            a[rng.randrange(len(a))] = rng.choice([[], [[1.0, "x"]], "NaN", [[True, 1.0]], [[10**400, 1.0]]])
            what = f"line {i + 1} act_stats element"
        elif "config" in rec:
            rec["config"] = rng.choice([[], "x", None, {"window": 0}, {"max_sparsity": "Infinity"},
                                        {"min_sparsity": "-Infinity"}, {"target": 2.0}])
            what = f"line {i + 1} config {rec['config']!r}"
        else:
            rec["surprisal"] = rng.choice([[1.0], {"x": 1}, "nan", 10**400, True])
            what = f"line {i + 1} surprisal {rec['surprisal']!r}"
    lines[i] = json.dumps(rec)
    return what, lines


def test_fuzzed_traces_are_replayed_or_refused_with_one_line(tmp_path, profile, capsys):
    rng = random.Random(12)
    originals = {p.name: p.read_text().splitlines() for p in TRACES}
    accepted = refused = 0
    failures: list[str] = []
    for n in range(N_MUTATIONS):
        name = rng.choice(sorted(originals))
        lines = originals[name][: rng.choice([20, 60, 200, 10**6])]  # prefixes keep the suite quick
        what, mutated = _mutate(rng, lines)
        path = tmp_path / f"fuzz{n}.jsonl"
        path.write_text("\n".join(mutated) + "\n")
        got = _replay(profile, path)
        if got == "HANG":
            failures.append(f"{name}: {what}: hangs (> {CASE_TIMEOUT_S}s)")
        elif isinstance(got, UserError):
            if _one_line(got, str(path)):
                refused += 1
            else:
                failures.append(f"{name}: {what}: UserError not one line naming the file: {got!s:.300}")
        elif isinstance(got, BaseException):
            failures.append(f"{name}: {what}: {type(got).__name__}: {got!s:.200}")
        else:
            accepted += 1
        path.unlink()
    with capsys.disabled():
        print(f"\nfuzzed controller traces: {N_MUTATIONS} mutations, {refused} refused with one line, "
              f"{accepted} accepted, {len(failures)} failures")
    assert not failures, "\n".join(failures[:30])
    assert refused > N_MUTATIONS // 2 and accepted > 0


def test_fuzzed_record_lists_name_trace(profile):
    """Records passed as a list (not a file): errors name 'trace' and the record."""
    rng = random.Random(7)
    base = read_trace(DATA / "trace_spiky.jsonl")[:40]
    failures = []
    for n in range(60):
        recs = copy.deepcopy(base)
        r = recs[rng.randrange(1, len(recs))]
        k = rng.choice(sorted(r))
        r[k] = rng.choice(BAD_VALUES + [math.nan, math.inf])
        got = _replay(profile, recs)
        if got == "HANG":
            failures.append(f"{k}: hang")
        elif isinstance(got, UserError):
            if not _one_line(got, "trace record"):
                failures.append(f"{k}: {got}")
        elif isinstance(got, BaseException):
            failures.append(f"{k}={r[k]!r}: {type(got).__name__}: {got}")
    assert not failures, "\n".join(failures)
    got = _replay(profile, base + [3])
    assert isinstance(got, UserError) and "trace record 41" in str(got)


# -- explicit cases -------------------------------------------------------------------------
def _write(tmp_path: Path, lines: list[str]) -> Path:
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def _spiky() -> list[str]:
    return (DATA / "trace_spiky.jsonl").read_text().splitlines()


@pytest.mark.parametrize("step", ["\"NaN\"", "\"Infinity\"", "1e30", "NaN", "Infinity", "-1", "1000000000000000000000000000000"])
def test_step_that_used_to_hang_is_refused(tmp_path, profile, step):
    lines = _spiky()
    rec = json.loads(lines[5])
    lines[5] = json.dumps(rec).replace(f"\"step\": {rec['step']}", f"\"step\": {step}")
    path = _write(tmp_path, lines)
    got = _replay(profile, path)
    assert isinstance(got, UserError), got
    assert _one_line(got, f"{path} line 6") and "step" in str(got)


def test_step_going_back_is_refused(tmp_path, profile):
    lines = _spiky()
    lines.append(lines[10])  # an old step after later ones
    got = _replay(profile, _write(tmp_path, lines))
    assert isinstance(got, UserError) and f"line {len(lines)}" in str(got) and "step" in str(got)


def test_bad_json_line_names_file_and_line(tmp_path, profile):
    lines = _spiky()
    lines[7] = lines[7][:50]
    path = _write(tmp_path, lines)
    with pytest.raises(UserError) as e:
        read_trace(path)
    assert _one_line(e.value, f"{path} line 8") and "not valid JSON" in str(e.value)
    with pytest.raises(UserError, match="line 8"):
        replay_trace(profile, path)


def test_missing_trace_file(tmp_path, profile):
    with pytest.raises(UserError, match="does not exist"):
        replay_trace(profile, tmp_path / "none.jsonl")


@pytest.mark.parametrize("seq", [-1, 2, 3, 2**40, "0", 1.5, None])
def test_seq_out_of_range_or_wrong_type(tmp_path, profile, seq):
    lines = _spiky()  # batch 2
    rec = json.loads(lines[4])
    rec["seq"] = seq
    lines[4] = json.dumps(rec)
    path = _write(tmp_path, lines)
    got = _replay(profile, path)
    assert isinstance(got, UserError), got
    assert _one_line(got, f"{path} line 5") and "field seq" in str(got)


def test_unknown_event_and_repeated_seq(tmp_path, profile):
    lines = _spiky()
    rec = json.loads(lines[4])
    rec["event"] = "end"
    path = _write(tmp_path, lines[:4] + [json.dumps(rec)] + lines[5:])
    with pytest.raises(UserError, match=r"line 5: field event must be one of begin, step"):
        replay_trace(profile, path)
    path = _write(tmp_path, lines[:4] + [lines[3]] + lines[4:])
    with pytest.raises(UserError, match=r"line 5: field seq repeats sequence 1 within step 0"):
        replay_trace(profile, path)


def test_nonfinite_signals_and_null_tokens_still_replay(profile):
    # trace_random_batch holds "NaN" signals and act_stats, trace_extremes null tokens
    for name in ("trace_random_batch.jsonl", "trace_extremes.jsonl"):
        recs = read_trace(DATA / name)
        assert compare_traces(recs, json.loads(json.dumps(replay_trace(profile, DATA / name)))) == []


@pytest.mark.parametrize("field,value", [("max_sparsity", "Infinity"), ("min_sparsity", "-Infinity"),
                                         ("max_sparsity", "NaN"), ("min_sparsity", "1.5"), ("target", "Infinity")])
def test_config_nonfinite_bounds_refused_at_load(tmp_path, field, value):
    path = tmp_path / "controller.json"
    path.write_text(f'{{"{field}": {value}}}')
    with pytest.raises(UserError) as e:
        load_controller_config(path)
    assert _one_line(e.value, str(path)) and field in str(e.value)


def test_config_bounds_in_trace_refused(tmp_path, profile):
    lines = _spiky()
    head = json.loads(lines[0])
    head["config"]["max_sparsity"] = "Infinity"
    path = _write(tmp_path, [json.dumps(head)] + lines[1:])
    with pytest.raises(UserError) as e:
        replay_trace(profile, path)
    assert _one_line(e.value, f"{path} line 1") and "max_sparsity" in str(e.value)


def test_config_finite_bounds_still_load(tmp_path):
    path = tmp_path / "controller.json"
    path.write_text('{"min_sparsity": 0.3, "max_sparsity": 0.7}')
    assert load_controller_config(path) == ControllerConfig(min_sparsity=0.3, max_sparsity=0.7)


# -- --trace output: temporary beside the target, renamed on close ---------------------------
def _tmp_names(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if ".clada-tmp-" in p.name)


def test_trace_written_beside_target_and_renamed_on_close(tmp_path, profile):
    path = tmp_path / "t.jsonl"
    ctl = ThresholdController(profile, ControllerConfig(), batch=1, trace=path)
    ctl.step(np.array([1.0]), np.array([2.0]))
    assert not path.exists() and _tmp_names(tmp_path) == [f".t.jsonl.clada-tmp-{os.getpid()}"]
    ctl.close()
    assert path.exists() and _tmp_names(tmp_path) == []
    assert [r["event"] for r in read_trace(path)] == ["config", "begin", "step"]
    ctl.close()  # twice is harmless


def test_trace_removed_on_exception_and_old_trace_kept(tmp_path, profile):
    path = tmp_path / "t.jsonl"
    path.write_text("old\n")
    with pytest.raises(KeyboardInterrupt):
        with ThresholdController(profile, ControllerConfig(), batch=1, trace=path) as ctl:
            ctl.step(np.array([1.0]), np.array([2.0]))
            raise KeyboardInterrupt
    assert path.read_text() == "old\n" and _tmp_names(tmp_path) == []


def test_unclosed_trace_removed_when_collected(tmp_path, profile):
    path = tmp_path / "t.jsonl"
    ctl = ThresholdController(profile, ControllerConfig(), batch=1, trace=path)
    ctl.step(np.array([1.0]), np.array([2.0]))
    del ctl
    import gc

    gc.collect()
    assert not path.exists() and _tmp_names(tmp_path) == []


def test_sigterm_leaves_no_partial_trace(tmp_path):
    """A run killed by SIGTERM (the CLI turns it into an exception that unwinds past
    generate, which never calls close) leaves neither the trace nor its temporary."""
    path = tmp_path / "t.jsonl"
    script = f"""
import os, signal, sys
import numpy as np
from clada_export.cli.main import _sigterm_as_interrupt
from clada_export.profile import SparsityProfile
from clada_export.runtime.controller import ThresholdController, ControllerConfig
p = SparsityProfile.load({str(DATA / 'profile.json')!r})
try:
    with _sigterm_as_interrupt():
        ctls = [ThresholdController(p, ControllerConfig(), batch=1, trace={str(path)!r})]
        ctls[0].step(np.array([1.0]), np.array([2.0]))
        assert os.listdir({str(tmp_path)!r}), "no temporary while writing"
        os.kill(os.getpid(), signal.SIGTERM)
        ctls[0].step(np.array([1.0]), np.array([2.0]))
except KeyboardInterrupt:
    sys.exit(143)
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                       cwd=Path(__file__).parent.parent)
    assert r.returncode == 143, r.stderr
    assert sorted(os.listdir(tmp_path)) == []
