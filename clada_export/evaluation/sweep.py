"""The evidence sweep: every method at every level on the same model, tasks and text.

Resumable: the calibration (profiles per level, TEAL's lookup) is saved under
``OUT/calibration/`` and each (method, level) result under ``OUT/results/<key>.json``,
rewritten atomically after every task, so an interrupted sweep continues where it
stopped (a result whose settings differ from the current ones is recomputed).
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from clada_export.atomic import write_json
from clada_export.errors import UserError
from clada_export.evaluation import tasks as task_mod
from clada_export.evaluation.methods import (METHOD_NAMES, Method, TealLookup, allocation_info, collect_mlp_inputs,
                                             static_method, teal_lookup)
from clada_export.evaluation.scoring import MAX_PASSES, score_continuations

RESULT_FORMAT = "clada-evidence-result"


@dataclass
class SweepSettings:
    """What a sweep runs. ``limit``: documents per task (fixed seeded subset);
    ``ppl_windows`` x ``ppl_window`` tokens of the held-out evaluation text, the first
    ``prefix`` of each window prefilled dense and the rest scored as decode steps."""

    model: str
    tasks: list[str] = field(default_factory=lambda: list(task_mod.TASKS))
    limit: int = 50
    seed: int = task_mod.DEFAULT_SEED
    levels: list[float] = field(default_factory=lambda: [0.4, 0.5])
    methods: list[str] = field(default_factory=lambda: list(METHOD_NAMES))
    ppl_windows: int = 8
    ppl_window: int = 256
    prefix: int = 32
    calib_tokens: int = 4096
    heldout_tokens: int = 512

    def result_settings(self) -> dict:
        """The settings a saved result must share to be reused."""
        return {"tasks_limit": self.limit, "seed": self.seed, "ppl_windows": self.ppl_windows,
                "ppl_window": self.ppl_window, "prefix": self.prefix, "calib_tokens": self.calib_tokens,
                "heldout_tokens": self.heldout_tokens}

    def validate(self) -> None:
        for name in self.methods:
            if name not in METHOD_NAMES:
                raise UserError(f"unknown method {name!r} in --methods; known: {', '.join(METHOD_NAMES)}")
        for lv in self.levels:
            if not 0.0 < lv < 0.9:
                raise UserError(f"--levels takes mean MLP byte sparsities in (0, 0.9), got {lv:g}")
        if self.limit < 1:
            raise UserError(f"--limit must be a positive number of documents per task, got {self.limit}")
        if self.ppl_windows < 0 or self.ppl_window <= self.prefix + 1:
            raise UserError(f"--ppl-windows must be >= 0 and windows longer than the prefix ({self.prefix} + 2)")


# -- calibration shared by the static and dynamic methods -----------------------------------
def _calibration(model, tokenizer, hf_config, settings: SweepSettings, out: Path, progress: bool):
    """Profiles at each level (greedy allocation, with the KL model for uniform) and
    TEAL's lookup; computed once, then read back."""
    from clada_export.calibrate.allocation import calibration_from_profile, make_profile, run_calibration
    from clada_export.data import calibration_windows
    from clada_export.profile import SparsityProfile

    cdir = out / "calibration"
    cdir.mkdir(parents=True, exist_ok=True)
    paths = {lv: cdir / f"profile-{lv:.2f}.json" for lv in settings.levels}
    teal_path = cdir / "teal.json"
    made_with = {"calib_tokens": settings.calib_tokens, "heldout_tokens": settings.heldout_tokens}
    for p in [*paths.values(), teal_path]:  # a calibration made with other settings is redone
        try:
            d = json.loads(p.read_text())
            ok = (d.get("sweep_calibration") or d.get("calibration", {}).get("sweep_calibration")) == made_with
        except (OSError, ValueError, AttributeError):
            ok = False
        if p.exists() and not ok:
            p.unlink()
    if teal_path.is_file():  # a lookup that stops short of a level is extended, never extrapolated
        byte = json.loads(teal_path.read_text())["lookup"]["byte"]
        if byte[-1] + 1e-9 < max(settings.levels):
            teal_path.unlink()
    _derive_missing_levels(paths, made_with)
    need_teal = "teal" in settings.methods and not teal_path.is_file()
    if not all(p.is_file() for p in paths.values()) or need_teal:
        table_w, heldout_w, source = calibration_windows(tokenizer, None, settings.calib_tokens,
                                                         settings.heldout_tokens)
        if not all(p.is_file() for p in paths.values()):
            cal = run_calibration(model, table_w, heldout_w, progress=progress)
            for lv, p in paths.items():
                if not p.is_file():
                    make_profile(cal, hf_config, target=lv, progress=progress,
                                 extra={"calibration_text": source, "sweep_calibration": made_with}).save(p)
        if need_teal:
            cal = calibration_from_profile(SparsityProfile.load(paths[settings.levels[0]]))
            xs = collect_mlp_inputs(model, table_w[:8])

            def thresholds_of(l, a, b, cal=cal):
                L = len(cal.t_in)
                s_in, s_mid = np.zeros(L), np.zeros(L)
                s_in[l], s_mid[l] = a, b
                return cal.thresholds(s_in, s_mid)[l].tolist()

            lookup = teal_lookup(model, xs, thresholds_of, max_byte=max(settings.levels) + 0.05, progress=progress)
            write_json(teal_path, {"lookup": lookup.to_dict(), "mlp_input_rows": int(xs[0].shape[0]),
                                   "calibration_text": source, "sweep_calibration": made_with})
    profiles = {lv: SparsityProfile.load(p) for lv, p in paths.items()}
    teal = TealLookup.from_dict(json.loads(teal_path.read_text())["lookup"]) if teal_path.is_file() else None
    return profiles, teal


def _derive_missing_levels(paths: dict[float, Path], made_with: dict) -> None:
    """A level's profile read off another level's calibration of the same sweep: the
    threshold tables and KL model do not depend on the target, only the allocation does
    (``calibration_from_profile``), so a new level costs an allocation, not a calibration
    (43 min for the 1.5B model on 2 cores). Its KL is the model's prediction, marked as
    such: the held-out windows that measure it are not kept."""
    import dataclasses

    from clada_export.calibrate.allocation import calibration_from_profile
    from clada_export.profile import SparsityProfile, byte_sparsity

    have = [lv for lv, p in paths.items() if p.is_file()]
    if not have:
        return
    base_level = have[0]
    base = SparsityProfile.load(paths[base_level])
    cal = calibration_from_profile(base)
    if cal is None or base.method != "greedy":
        return
    for lv, p in paths.items():
        if p.is_file():
            continue
        s_in, s_mid, _ = cal.allocate(lv, "greedy")
        info = dict(base.calibration, sweep_calibration=made_with, derived_from_level=base_level,
                    kl_predicted=float(cal.km.predict(s_in, s_mid)), uniform_kl=None,
                    kl_note="the KL model's prediction (derived level: no held-out measurement)")
        reached = float(np.mean(byte_sparsity(s_in, s_mid, base.gated_mlp)))
        dataclasses.replace(base, s_in=s_in, s_mid=s_mid, target_sparsity=reached, kl=None, calibration=info).save(p)


def build_methods(model, tokenizer, hf_config, settings: SweepSettings, out: Path, progress: bool = True
                  ) -> list[Method]:
    from clada_export.calibrate.allocation import calibration_from_profile
    from clada_export.runtime.controller import ControllerConfig

    methods: list[Method] = []
    if "dense" in settings.methods:
        methods.append(static_method("dense", None, None))
    needs_cal = any(m in settings.methods for m in ("uniform", "teal", "greedy", "dynamic"))
    profiles, teal = _calibration(model, tokenizer, hf_config, settings, out, progress) if needs_cal else ({}, None)
    for lv in settings.levels:
        for name in settings.methods:
            if name == "dense":
                continue
            if name in ("uniform", "greedy", "teal"):
                cal = calibration_from_profile(profiles[lv])
                if name == "teal":
                    s_in, s_mid = teal.at(lv)
                else:
                    s_in, s_mid, _ = cal.allocate(lv, name)
                methods.append(static_method(name, lv, cal.thresholds(s_in, s_mid),
                                             allocation_info(s_in, s_mid, profiles[lv].gated_mlp)))
            elif name in ("griffin", "clada_ref"):
                info = {"rule": {"window": 10, "percentile": 0.7}} if name == "clada_ref" else {}
                methods.append(Method(name, lv, name, info=info))
            elif name == "dynamic":
                methods.append(Method("dynamic", lv, "dynamic", profile=profiles[lv], config=ControllerConfig(),
                                      info={"controller": ControllerConfig().to_dict()}))
    return methods


# -- running one method ---------------------------------------------------------------------------
def _result_path(out: Path, method: Method) -> Path:
    return out / "results" / f"{method.key}.json"


def load_result(path: Path) -> dict | None:
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return d if isinstance(d, dict) and d.get("format") == RESULT_FORMAT else None


def open_result(path: Path, method: Method, settings: SweepSettings, model_dir: str) -> dict:
    """The saved result of ``method`` when it was made with the same settings, else a
    fresh one."""
    res = load_result(path)
    if res is not None and res.get("settings") == settings.result_settings() and res.get("method") == method.name:
        return res
    return {"format": RESULT_FORMAT, "model": settings.model or "default", "model_dir": model_dir,
            "method": method.name, "level": method.level, "kind": method.kind, "info": method.info,
            "settings": settings.result_settings(), "tasks": {}, "perplexity": None, "complete": False}


def pending_tasks(res: dict, settings: SweepSettings) -> list[str]:
    return [t for t in settings.tasks if t not in res["tasks"]]


def run_task(model, tokenizer, method: Method, items: list, progress: bool = True) -> dict:
    """Accuracy of ``method`` on ``items`` with its standard error, the realized MLP
    sparsity of the scored decode steps, and the cost."""
    from clada_export.calibrate.quality import SparsityMeter

    meter = SparsityMeter(model, h_rows=8)
    correct, tokens, steps, resel, sel_sp = [], 0, 0, 0, None
    passes, fallbacks, contexts = 0, 0, 0
    t0 = time.perf_counter()
    for item in tqdm(items, desc=f"{method.key}: {items[0].task if items else ''}", unit="doc", file=sys.stderr,
                     disable=not progress, leave=False):
        groups: dict[str, list[int]] = {}
        encoded = [task_mod.encode_pair(tokenizer, c, x) for c, x in item.requests]
        for i, (c, _) in enumerate(item.requests):
            groups.setdefault(c, []).append(i)
        lps, greedy = [0.0] * len(encoded), [False] * len(encoded)
        for ctx, idxs in groups.items():
            s = score_continuations(model, method, encoded[idxs[0]][0], [encoded[i][1] for i in idxs], meter=meter)
            for j, i in enumerate(idxs):
                lps[i], greedy[i] = s.logprobs[j], s.greedy[j]
            tokens += len(encoded[idxs[0]][0]) + sum(len(encoded[i][1]) for i in idxs)
            steps += s.steps
            resel += s.reselections
            passes, fallbacks, contexts = passes + s.passes, fallbacks + s.fallbacks, contexts + 1
            sel_sp = s.selection_sparsity if s.selection_sparsity is not None else sel_sp
        picked = task_mod.choose(item.metric, lps, greedy, [x for _, x in item.requests])
        correct.append(bool(picked) if item.metric == "last_word" else picked == item.gold)
    seconds = time.perf_counter() - t0
    acc, se = task_mod.accuracy(correct)
    realized = sel_sp if sel_sp is not None else (meter.byte_sparsity() if meter.count.sum() else None)
    return {"acc": acc, "se": se, "n": len(correct), "metric": items[0].metric if items else None,
            "correct": [int(c) for c in correct], "doc_ids": [it.doc_id for it in items],
            "byte_sparsity": realized, "decode_steps": steps, "tokens": tokens, "reselections": resel,
            "seconds": round(seconds, 2), "seconds_per_doc": round(seconds / max(len(items), 1), 4),
            **_fixed_point_summary(method, passes, fallbacks, contexts)}


def _fixed_point_summary(method: Method, passes: int, fallbacks: int, runs: int) -> dict:
    """How the step-wise methods were run: teacher-forced passes per scored context
    (or window) and how many fell back to the step-by-step decode."""
    if not method.stepwise:
        return {}
    return {"fixed_point": {"runs": runs, "passes": passes, "mean_passes": round(passes / max(runs, 1), 3),
                            "fallbacks": fallbacks, "max_passes": MAX_PASSES}}


def run_perplexity(model, method: Method, windows: torch.Tensor, prefix: int, progress: bool = True) -> dict:
    """Teacher-forced NLL of ``windows [N, T]``: the first ``prefix`` tokens prefilled
    dense, the rest scored as decode steps at the method's sparsity."""
    from clada_export.calibrate.quality import SparsityMeter

    meter = SparsityMeter(model, h_rows=8)
    sums, n_tok, trace, sel_sp, resel = [], 0, [], None, 0
    passes, fallbacks = 0, 0
    t0 = time.perf_counter()
    for w in tqdm(range(windows.shape[0]), desc=f"{method.key}: perplexity", unit="window", file=sys.stderr,
                  disable=not progress, leave=False):
        ids = windows[w].tolist()
        s = score_continuations(model, method, ids[:prefix], [ids[prefix:]], meter=meter, trace=w == 0)
        sums.append(-float(s.token_logprobs[0].astype(np.float64).sum()))
        n_tok += len(ids) - prefix
        if w == 0:
            trace = s.trace
        sel_sp = s.selection_sparsity if s.selection_sparsity is not None else sel_sp
        resel += s.reselections
        passes, fallbacks = passes + s.passes, fallbacks + s.fallbacks
    nll = float(np.sum(sums)) / max(n_tok, 1)
    realized = sel_sp if sel_sp is not None else (meter.byte_sparsity() if meter.count.sum() else None)
    return {"ppl": math.exp(nll), "nll": nll, "tokens": n_tok, "window_nll": sums, "byte_sparsity": realized,
            "reselections": resel, "seconds": round(time.perf_counter() - t0, 2), "trace": _slim_trace(trace),
            **_fixed_point_summary(method, passes, fallbacks, windows.shape[0])}


def _slim_trace(records: list[dict]) -> list[dict]:
    keep = ("step", "load", "state", "realized", "target", "surprisal", "entropy", "sparsity")
    return [{k: r[k] for k in keep if k in r} for r in records if isinstance(r, dict)]


def sweep_device(name: str | None) -> torch.device:
    """The device a sweep scores on: ``cpu`` (default) or ``cuda[:N]``. The model stays
    in float32 and TF32 is kept off, so a GPU scores the same arithmetic as the CPU, up
    to the order of float32 sums."""
    try:
        dev = torch.device(name or "cpu")
    except RuntimeError:
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise UserError(f"--device takes cpu or cuda[:N], got {name!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: this torch sees no CUDA device (torch.cuda.is_available() is False); "
                        "run on a GPU machine with a CUDA build of torch, or use --device cpu")
    return dev


def run_sweep(settings: SweepSettings, out: Path, progress: bool = True, device: str | None = None) -> list[Path]:
    """Run (or resume) the sweep into ``out`` on ``device`` (:func:`sweep_device`);
    returns the result files."""
    dev = sweep_device(device)
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        # Every tensor the scoring makes (caches, positions, thresholds) is created on
        # the model's device through the default-device context.
        with dev:
            return _run_sweep(settings, out, progress, dev)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


def _run_sweep(settings: SweepSettings, out: Path, progress: bool, dev: torch.device) -> list[Path]:
    from clada_export.data import evaluation_windows
    from clada_export.model.config import DecoderConfig
    from clada_export.model.loading import load_decoder, load_hf_config, load_tokenizer
    from clada_export.model.registry import resolve_model

    settings.validate()
    model_dir = resolve_model(settings.model)
    DecoderConfig.from_hf(load_hf_config(model_dir))
    tokenizer = load_tokenizer(model_dir)
    items = {t: task_mod.load_task(t, settings.limit, settings.seed) for t in settings.tasks}
    out.mkdir(parents=True, exist_ok=True)
    (out / "results").mkdir(exist_ok=True)
    t_load = time.perf_counter()
    with torch.device("cpu"):  # the checkpoint is read on the host, then placed on dev
        model, hf_config = load_decoder(model_dir, device=dev)
    load_s = time.perf_counter() - t_load
    # timings are only comparable on one device: each result part records where it ran
    dev_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    windows = None
    if settings.ppl_windows:
        windows, _ = evaluation_windows(tokenizer, None, settings.ppl_windows * settings.ppl_window,
                                        settings.ppl_window)
    methods = build_methods(model, tokenizer, hf_config, settings, out, progress)
    # Perplexity of every method first: it is the cheapest signal, so an interrupted
    # sweep has compared all methods on it before spending hours on the tasks.
    phases = (["perplexity"] if windows is not None else []) + ["tasks"]
    paths = []
    for phase in phases:
        for method in methods:
            path = _result_path(out, method)
            res = open_result(path, method, settings, str(model_dir))
            if phase == "perplexity" and res.get("perplexity") is None:
                res["perplexity"] = dict(run_perplexity(model, method, windows, settings.prefix, progress),
                                         device=dev_name)
            if phase == "tasks":
                for t in pending_tasks(res, settings):
                    res["tasks"][t] = dict(run_task(model, tokenizer, method, items[t], progress), device=dev_name)
                    write_json(path, res)  # saved as each task finishes: an interrupted sweep resumes here
            res["complete"] = all(t in res["tasks"] for t in settings.tasks) and (
                windows is None or res.get("perplexity") is not None)
            res["model_load_seconds"] = round(load_s, 1)
            write_json(path, res)
            if phase == phases[-1]:
                paths.append(path)
            if progress:
                accs = [res["tasks"][t]["acc"] for t in settings.tasks if t in res["tasks"]]
                ppl = res["perplexity"]["ppl"] if res.get("perplexity") else float("nan")
                acc = f"{np.mean(accs):.4f}" if accs else "n/a"
                print(f"{method.key} [{phase}]: mean accuracy {acc}, perplexity {ppl:.3f}", file=sys.stderr)
    return paths


def settings_dict(settings: SweepSettings) -> dict:
    return asdict(settings)
