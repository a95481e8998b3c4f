"""The evidence sweep's saved results (resumable) and the report rendered from them alone."""

from __future__ import annotations

import json

import numpy as np
import pytest

from clada_export.atomic import write_json
from clada_export.errors import UserError
from clada_export.evaluation import report
from clada_export.evaluation.methods import Method
from clada_export.evaluation.sweep import RESULT_FORMAT, SweepSettings, open_result, pending_tasks


def _task(correct: list[int], sparsity: float | None = None) -> dict:
    acc = float(np.mean(correct))
    return {"acc": acc, "se": float(np.sqrt(acc * (1 - acc) / (len(correct) - 1))), "n": len(correct),
            "metric": "acc_raw", "correct": correct, "doc_ids": list(range(len(correct))),
            "byte_sparsity": sparsity, "decode_steps": 10, "tokens": 100, "reselections": 0, "seconds": 1.0,
            "seconds_per_doc": 1.0 / len(correct)}


def _result(method: str, level, piqa: list[int], boolq: list[int], window_nll: list[float], settings: dict,
            trace=None) -> dict:
    return {"format": RESULT_FORMAT, "model": "toy", "method": method, "level": level, "kind": "static",
            "settings": settings, "info": {}, "complete": True,
            "tasks": {"piqa": _task(piqa, None if level is None else level),
                      "boolq": _task(boolq, None if level is None else level)},
            "perplexity": {"ppl": float(np.exp(np.sum(window_nll) / 40)), "nll": float(np.sum(window_nll) / 40),
                           "tokens": 40, "window_nll": window_nll, "byte_sparsity": level, "reselections": 0,
                           "seconds": 1.0, "trace": trace or []}}


def test_report_renders_from_saved_results_alone(tmp_path):
    st = SweepSettings(model="toy", tasks=["piqa", "boolq"], limit=4).result_settings()
    (tmp_path / "results").mkdir()
    trace = [{"load": 0.2 * (i % 5), "realized": 0.4, "target": 0.4} for i in range(20)]
    rows = [
        _result("dense", None, [1, 1, 0, 1], [1, 0, 1, 1], [10.0, 10.0, 10.0, 10.0], st),
        _result("greedy", 0.4, [1, 0, 0, 1], [1, 0, 1, 1], [11.0, 10.5, 10.2, 10.9], st),
        _result("dynamic", 0.4, [1, 1, 0, 1], [1, 0, 1, 0], [10.8, 10.6, 10.1, 10.8], st, trace),
    ]
    for r in rows:
        key = r["method"] if r["level"] is None else f"{r['method']}-{r['level']:.2f}"
        write_json(tmp_path / "results" / f"{key}.json", r)
    # two bench files of the same shape at two sparsities, as `bench --synthetic` writes them
    bench = []
    for s, su in ((0.3, 1.2), (0.5, 1.5)):
        b = tmp_path / f"GPU_toy_s{s}.json"
        b.write_text(json.dumps({"device": "GPU", "model": f"toy shape, random weights, at {s:.0%}", "cases": [
            {"backend": "cuda", "mode": m, "batch": n, "sparsity": sp, "speedup": sp_up}
            for n in (1, 4) for m, sp, sp_up in (("dense", 0.0, 1.0), ("static", s, su if n == 1 else 9.0),
                                                  ("dynamic", s, 0.1))]}))
        bench.append(b)
    md_path = report.render(tmp_path, bench=bench, bench_shape="toy")
    md = md_path.read_text()
    # reached 0.4: halfway between the two static batch-1 points
    assert "| greedy | 0.40 | 0.6250 ± 0.1909 | +16.67% | 2.901 | +6.72% | 0.400 / 0.400 | 1.350 |" in md
    assert "| dense | - | 0.7500 ± 0.1768 | +0.00% | 2.718 | +0.00% | - / - | 1.000 |" in md
    assert "interpolated" in md and "GPU" in md
    assert "| dense | - | 0.7500 ± " in md
    assert "| greedy | 0.40 | 0.6250 ± " in md and "+16.67%" in md  # (0.75 - 0.625) / 0.75
    assert "| dynamic-0.40 | greedy-0.40 | +0.0000 |" in md
    for png in ("perplexity_vs_sparsity.png", "dynamic_trace.png", "accuracy_vs_speedup.png",
                "perplexity_vs_speedup.png"):
        assert (tmp_path / png).stat().st_size > 1000
    meta = json.loads((tmp_path / "report.json").read_text())
    assert meta["versions"]["torch"] and meta["machine"]["cpus"] and meta["settings"]["tasks_limit"] == 4
    cmp = meta["comparisons"][0]
    assert cmp["nll_diff"] == pytest.approx((42.3 - 42.6) / 4 / 10)  # per token, windows of 10 tokens


def test_an_unfinished_result_is_left_out_and_named(tmp_path):
    st = SweepSettings(model="toy", tasks=["piqa", "boolq"], limit=4).result_settings()
    (tmp_path / "results").mkdir()
    write_json(tmp_path / "results" / "dense.json", _result("dense", None, [1, 1, 0, 1], [1, 0, 1, 1], [1.0, 1.0], st))
    part = _result("teal", 0.4, [1, 0, 0, 1], [1, 0, 1, 1], [1.0, 1.0], st)
    del part["tasks"]["boolq"]  # interrupted after its first task
    write_json(tmp_path / "results" / "teal-0.40.json", part)
    md = report.render(tmp_path).read_text()
    assert "Not yet complete (left out): teal-0.40" in md and "| teal |" not in md
    assert "| dense | - | 0.7500" in md  # the other results keep every task


def test_render_without_results_is_one_line(tmp_path):
    (tmp_path / "results").mkdir()
    with pytest.raises(UserError, match="holds no sweep results"):
        report.render(tmp_path)


def test_a_saved_result_resumes_only_under_the_same_settings(tmp_path):
    settings = SweepSettings(model="toy", tasks=["piqa", "boolq", "sciq"], limit=4)
    method = Method("greedy", 0.4, "static")
    path = tmp_path / "greedy-0.40.json"
    res = open_result(path, method, settings, "/m")
    assert pending_tasks(res, settings) == ["piqa", "boolq", "sciq"]
    res["tasks"]["piqa"] = _task([1, 0, 1, 1])
    write_json(path, res)  # as the sweep saves after each task
    again = open_result(path, method, settings, "/m")
    assert pending_tasks(again, settings) == ["boolq", "sciq"] and again["tasks"]["piqa"]["acc"] == 0.75
    other = SweepSettings(model="toy", tasks=["piqa", "boolq", "sciq"], limit=8)
    assert pending_tasks(open_result(path, method, other, "/m"), other) == ["piqa", "boolq", "sciq"]
    path.write_text("{not json")  # a damaged file is recomputed, not trusted
    assert pending_tasks(open_result(path, method, settings, "/m"), settings) == ["piqa", "boolq", "sciq"]


def test_paired_accuracy_uses_the_common_documents():
    st = SweepSettings(model="toy").result_settings()
    a = _result("dynamic", 0.4, [1, 1, 1, 1], [1, 1, 1, 1], [1.0, 1.0], st)
    b = _result("greedy", 0.4, [0, 1, 1, 1], [1, 1, 1, 0], [1.0, 1.0], st)
    m, lo, hi, n = report.paired_accuracy(a, b, ["piqa", "boolq"])
    assert m == pytest.approx(0.25) and n == 8 and lo <= m <= hi


def test_speed_curve_interpolates_within_the_measured_range_only():
    curve = {"points": [[0.0, 1.0], [0.3, 1.2], [0.5, 1.5]]}
    assert report.interpolate_speedup(curve, 0.15) == pytest.approx(1.1)
    assert report.interpolate_speedup(curve, 0.5) == pytest.approx(1.5)
    assert report.interpolate_speedup(curve, 0.55) is None and report.interpolate_speedup(None, 0.4) is None


def test_report_reads_a_bench_json_written_by_clada_export_bench(tiny_chat_export, tmp_path, capsys):
    from conftest import run_cli

    code, _, err = run_cli(capsys, "bench", tiny_chat_export, "--batches", "1", "--prompt-len", "6",
                           "--new-tokens", "4", "--repeats", "1", "-o", tmp_path / "bench", "--backends", "torch")
    assert code == 0, err
    curve = report.load_bench([tmp_path / "bench" / "bench.json"])
    data = json.loads((tmp_path / "bench" / "bench.json").read_text())
    static = next(c for c in data["cases"] if c["mode"] == "static" and c["batch"] == 1)
    assert curve["points"] == [[0.0, 1.0], [static["sparsity"], static["speedup"]]]
    assert curve["backend"] == "torch" and curve["files"] == ["bench.json"]
    assert report.load_bench([tmp_path / "bench" / "bench.json"], shape="no-such-shape") is None
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(UserError, match="not a `clada-export bench` result"):
        report.load_bench([tmp_path / "bad.json"])


def test_a_missing_level_is_read_off_another_levels_calibration(tmp_path):
    """The 1.5B sweep's saved 40% profile: re-deriving 40% gives its saved allocation
    exactly, and 50% is derived at 50% mean byte sparsity, marked as derived."""
    import json
    import shutil
    from pathlib import Path

    import numpy as np

    from clada_export.evaluation.sweep import _derive_missing_levels
    from clada_export.profile import SparsityProfile

    src = Path(__file__).parent.parent / "docs/results/qwen2.5-coder-1.5b/calibration/profile-0.40.json"
    shutil.copy(src, tmp_path / "base.json")
    made_with = json.loads(src.read_text())["calibration"]["sweep_calibration"]
    paths = {0.4: tmp_path / "base.json", 0.5: tmp_path / "p50.json"}
    _derive_missing_levels(paths, made_with)
    p50 = SparsityProfile.load(paths[0.5])
    assert p50.mean_byte_sparsity() == pytest.approx(0.5, abs=1e-6)
    assert p50.calibration["derived_from_level"] == 0.4 and p50.kl is None
    assert p50.calibration["sweep_calibration"] == made_with
    again = {0.4: tmp_path / "p40.json", 0.5: paths[0.5]}  # 40% re-derived from the 50% file
    _derive_missing_levels(again, made_with)
    base, p40 = SparsityProfile.load(paths[0.4]), SparsityProfile.load(again[0.4])
    np.testing.assert_allclose(p40.s_in, base.s_in, atol=1e-9)
    np.testing.assert_allclose(p40.s_mid, base.s_mid, atol=1e-9)
