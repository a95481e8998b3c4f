"""Evaluation of sparse thresholds against the dense model (what ``clada-export eval``
reports): teacher-forced perplexity on held-out windows, the sparsity reached per layer,
greedy-continuation agreement, a sweep of uniform against greedy allocation, and the
runtime's dynamic controller against static thresholds at the same mean sparsity.

:func:`evaluate` returns an :class:`EvalResult`; ``report.py`` prints, saves and plots it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from clada_export.errors import UserError

# torch is imported where it is used: the CLI reads this module's defaults to build its parser

EVAL_WINDOW = 512
DEFAULT_LEVELS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
AGREEMENT_PROMPT_TOKENS = 32
# allocation shift (byte sparsity) of the extra static runs around the profile's
DYNAMIC_BRACKET = 0.02
DYNAMIC_WINDOW, DYNAMIC_PREFIX = 256, 32


@dataclass
class EvalResult:
    """What one evaluation measured. ``rows``: one dict per evaluated setting (dense, the
    profile, each sweep level x method) with perplexity, NLL, byte sparsity reached,
    agreement; ``dynamic``: the dynamic-vs-static comparison, if run."""

    model: str
    fingerprint: str
    data: str
    tokens: int
    window: int
    agreement_prompts: int
    new_tokens: int
    rows: list[dict[str, Any]] = field(default_factory=list)
    calibration: dict[str, Any] | None = None
    dynamic: dict[str, Any] | None = None
    seconds: float = 0.0

    @property
    def dense_perplexity(self) -> float:
        return next(r["perplexity"] for r in self.rows if r["method"] == "dense")

    def to_dict(self) -> dict[str, Any]:
        """The eval.json layout."""
        d = {"model": self.model, "fingerprint": self.fingerprint, "data": self.data, "tokens": self.tokens,
             "window": self.window, "perplexity_over": "teacher-forced, all positions but each window's first",
             "agreement": {"prompts": self.agreement_prompts, "new_tokens": self.new_tokens}, "rows": self.rows}
        if self.calibration is not None:
            d["calibration"] = self.calibration
        if self.dynamic is not None:
            d["dynamic"] = self.dynamic
        d["seconds"] = self.seconds
        return d


def agreement_prompts(windows: torch.Tensor, k: int, length: int = AGREEMENT_PROMPT_TOKENS) -> torch.Tensor | None:
    """``k`` prompts of ``length`` tokens at evenly spaced offsets over the windows' text."""
    import torch

    if k <= 0:
        return None
    ids = windows.reshape(-1)
    P = min(length, windows.shape[1])
    offsets = np.linspace(0, max(0, ids.numel() - P), k).astype(int)
    return torch.stack([ids[o:o + P] for o in offsets])


def evaluate(model, windows: torch.Tensor, *, model_name: str, fingerprint: str, data: str, profile=None,
             profile_source: str | None = None, levels: Sequence[float] = DEFAULT_LEVELS,
             calibrate: Callable[[], Any] | None = None, agreement: int = 16, new_tokens: int = 64,
             dynamic_config=None, dynamic_tokens: int = 4096, batch_size: int = 4) -> EvalResult:
    """Evaluate ``model`` on ``windows [N, T]``: dense, ``profile``'s static thresholds,
    and uniform vs greedy at each of ``levels`` (allocations from the profile's KL model,
    or from ``calibrate()`` when it has none); with ``dynamic_config`` (a ControllerConfig)
    also the controller against static thresholds (:func:`dynamic_eval`)."""
    import torch

    from clada_export.calibrate.allocation import calibration_from_profile
    from clada_export.calibrate.quality import greedy_agreement, greedy_continuations, perplexity

    t_start = time.perf_counter()
    prompts = agreement_prompts(windows, agreement)
    res = EvalResult(model=model_name, fingerprint=fingerprint, data=data, tokens=int(windows.numel()),
                     window=int(windows.shape[1]), agreement_prompts=0 if prompts is None else int(prompts.shape[0]),
                     new_tokens=new_tokens)
    dense = perplexity(model, windows, None, batch_size=batch_size, measure_sparsity=False, desc="eval: dense")
    dense_cont = None
    if prompts is not None:
        with torch.inference_mode():
            dense_cont = greedy_continuations(model, prompts, new_tokens, None)
    res.rows.append({"name": "dense", "method": "dense", "level": 0.0, "perplexity": dense.perplexity,
                     "nll": dense.nll, "byte_sparsity": 0.0, "agreement": 1.0 if prompts is not None else None,
                     "agreement_prefix": 1.0 if prompts is not None else None})

    def row(name: str, method: str, level: float, thr: np.ndarray, extra: dict | None = None) -> None:
        r = perplexity(model, windows, thr, batch_size=batch_size, desc=f"eval: {name}")
        agree = prefix = None
        if prompts is not None:
            a, _ = greedy_agreement(model, prompts, thr, new_tokens, dense=dense_cont)
            agree, prefix = a.tokens, a.prefix
        res.rows.append({"name": name, "method": method, "level": level, "perplexity": r.perplexity, "nll": r.nll,
                         "byte_sparsity": r.byte_sparsity, "agreement": agree, "agreement_prefix": prefix,
                         "sparsity_per_layer": np.round(r.sparsity_per_layer, 4).tolist(), **(extra or {})})

    if profile is not None:
        row("profile", profile.method, profile.target_sparsity, profile.static_thresholds(),
            {"kl_calibration": profile.kl})
    if levels:
        cal = calibration_from_profile(profile) if profile is not None else None
        if cal is not None:
            res.calibration = {"from_profile": profile_source}
        else:
            if calibrate is None:
                raise ValueError("levels need a profile with a KL model or a calibrate() to make one")
            cal, source = calibrate()
            res.calibration = {"data": source, **cal.info}
        for level in levels:
            for method in ("uniform", "greedy"):
                s_in, s_mid, pred = cal.allocate(level, method)
                row(f"{method}@{level:g}", method, level, cal.thresholds(s_in, s_mid),
                    {"kl_predicted": pred, "s_in": np.round(s_in, 4).tolist(), "s_mid": np.round(s_mid, 4).tolist()})
    if dynamic_config is not None:
        if profile is None:
            raise ValueError("the dynamic evaluation needs a profile")
        res.dynamic = dynamic_eval(model, profile, windows.reshape(-1), dynamic_tokens, dynamic_config)
    res.seconds = round(time.perf_counter() - t_start, 1)
    return res


def _static_curve(run, profile, bracket: float = DYNAMIC_BRACKET) -> list:
    """Static thresholds at the profile's allocation and shifted by +-bracket, each run
    through ``run(make_source, label)``; sorted by the sparsity they reached."""
    from clada_export.calibrate.quality import StaticThresholds

    out = []
    for shift in (-bracket, 0.0, bracket):
        thr = profile.thresholds_at(profile.s_in + shift, profile.s_mid + shift)
        out.append(run(lambda B, thr=thr: StaticThresholds(thr, B), f"static {shift:+.2f}"))
    return sorted(out, key=lambda r: r.byte_sparsity)


def _at(curve: list, sparsity: float, values) -> np.ndarray:
    """Linear interpolation of per-run ``values(run)`` at ``sparsity`` along a static curve."""
    xs = [r.byte_sparsity for r in curve]
    ys = np.stack([np.asarray(values(r), dtype=np.float64) for r in curve])
    return np.array([np.interp(sparsity, xs, ys[:, i]) for i in range(ys.shape[1])])


def dynamic_eval(model, profile, ids: torch.Tensor, dynamic_tokens: int, config) -> dict:
    """The runtime's controller against static thresholds at the same mean sparsity, on
    the token stream ``ids``.

    One-pass mode (teacher-forced, per-token thresholds from a dense pass's signals) on
    all of it in windows of DYNAMIC_WINDOW; the exact step-by-step mode (KV-cache decode,
    signals of the sparse run itself) on the first ``dynamic_tokens``. In both, static
    thresholds run through the same loop at the allocation and shifted by
    +-DYNAMIC_BRACKET, and static NLL is interpolated at the sparsity the dynamic run reached."""
    from clada_export.calibrate.quality import (dense_signals, one_pass_dynamic_perplexity, paired_difference,
                                                stepwise_perplexity)
    from clada_export.runtime.controller import ThresholdController

    window, prefix = DYNAMIC_WINDOW, DYNAMIC_PREFIX
    n_one = ids.numel() // window
    if n_one < 1:
        raise UserError(f"the dynamic evaluation needs at least {window} evaluation tokens, got {ids.numel()}")
    n_step = min(n_one, max(1, dynamic_tokens // window))
    w = ids[:n_one * window].view(n_one, window)
    controller = lambda B: ThresholdController(profile, config, batch=B)  # noqa: E731
    targets = window - prefix

    # one dense pass serves every one-pass run (the signals) and the dense row
    signals = dense_signals(model, w, prefix, batch_size=8, desc="eval: dense signals")

    def one_pass(make, label):
        return one_pass_dynamic_perplexity(model, w, make, prefix=prefix, batch_size=8, signals=signals,
                                           desc=f"eval: {label} (one pass)")

    def stepwise(make, label):
        return stepwise_perplexity(model, w[:n_step], make, prefix=prefix, batch_size=8,
                                   desc=f"eval: {label} (step by step)")

    dyn1 = one_pass(controller, "dynamic")
    curve1 = _static_curve(one_pass, profile)
    static1 = _at(curve1, dyn1.byte_sparsity, lambda r: r.window_nll)
    diff, lo, hi = paired_difference(dyn1.window_nll, static1, targets)
    dyn_s = stepwise(controller, "dynamic")
    curve_s = _static_curve(stepwise, profile)
    # per-window NLL sums of the exact mode: its surprisals of the true tokens [steps, N]
    static_sw = _at(curve_s, dyn_s.byte_sparsity, lambda r: r.surprisal.sum(0))
    diff_s, lo_s, hi_s = paired_difference(dyn_s.surprisal.sum(0), static_sw, targets)
    static_s = math.exp(float(static_sw.sum()) / dyn_s.tokens)
    # the same windows in one-pass mode, to compare the modes
    one_on_step = math.exp(float(dyn1.window_nll[:n_step].sum()) / (n_step * targets))
    static_ppl1 = math.exp(float(static1.sum()) / dyn1.tokens)
    return {
        "window": window, "prefix": prefix, "dense": math.exp(signals.nll()),
        "controller": config.to_dict(),
        "one_pass": {
            "mode": "teacher-forced, one sparse pass per window; per-token thresholds from the controller fed "
                    "the signals of a dense pass; prefix dense",
            "tokens": dyn1.tokens, "dynamic": dyn1.to_dict(),
            "static_curve": [r.to_dict() for r in curve1],
            "static_at_dynamic_sparsity": static_ppl1,
            "dynamic_minus_static_nll": diff, "nll_difference_95ci": [lo, hi],
        },
        "stepwise": {
            "mode": "exact step-by-step teacher-forced decode (KV cache); signals of the sparse run; prefix dense",
            "tokens": dyn_s.tokens, "dynamic": dyn_s.to_dict(),
            "static_curve": [r.to_dict() for r in curve_s],
            "static_at_dynamic_sparsity": static_s,
            "dynamic_minus_static_nll": diff_s, "nll_difference_95ci": [lo_s, hi_s],
        },
        "modes_compared": {"tokens": dyn_s.tokens, "dynamic_stepwise": dyn_s.perplexity,
                           "dynamic_one_pass": one_on_step},
    }
