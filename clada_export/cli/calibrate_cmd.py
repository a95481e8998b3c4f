"""``clada-export calibrate`` (offline, error-controlled thresholds -> profile.json) and
``clada-export eval`` (perplexity, realized sparsity, greedy agreement; sweep of
uniform against greedy allocation with a table, JSON and a PNG plot)."""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np

from clada_export.errors import UserError

CALIB_WINDOW = 256  # tokens per calibration window (tables)
HELDOUT_WINDOW = 128  # tokens per held-out window (KL)
EVAL_WINDOW = 512
DEFAULT_LEVELS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)


def add_parsers(sub, add_model_arg) -> None:
    p = sub.add_parser("calibrate", help="measure per-layer threshold tables and allocate sparsity -> profile.json",
                       description="Run the dense model over calibration text, record per-layer quantile tables "
                                   "of |x| and |h|, and allocate per-layer sparsity (greedy, least KL against "
                                   "the dense model on held-out calibration windows).")
    add_model_arg(p)
    p.add_argument("--data", nargs="+", metavar="FILE",
                   help="calibration text file(s), UTF-8 (default: the Python-docs HOWTOs shipped with clada-export)")
    p.add_argument("--tokens", type=int, default=4096,
                   help="calibration tokens for the tables (default 4096); held-out KL windows come after them")
    p.add_argument("--heldout-tokens", type=int, default=512,
                   help="held-out calibration tokens on which KL against dense is measured (default 512)")
    goal = p.add_mutually_exclusive_group(required=True)
    goal.add_argument("--target-sparsity", type=float, metavar="S",
                      help="global target: mean over layers of the fraction of MLP weight bytes skipped, in (0, 1)")
    goal.add_argument("--error-budget", type=float, metavar="KL",
                      help="the most sparsity whose KL divergence from the dense model (nats/token) stays under KL")
    p.add_argument("--method", choices=("greedy", "uniform"), default="greedy",
                   help="greedy (least KL, default) or uniform (same s_in = s_mid in every layer)")
    p.add_argument("-o", "--output", required=True, help="profile to write (JSON)")
    p.add_argument("--batch-size", type=int, default=4, help="windows per forward pass (default 4)")
    p.set_defaults(func=run_calibrate)

    p = sub.add_parser("eval", help="perplexity / sparsity / greedy agreement of dense vs sparse, with a plot",
                       description="Teacher-forced perplexity on held-out evaluation text of the dense model, of "
                                   "the profile's static thresholds, and of uniform vs greedy allocations at "
                                   "several sparsity levels; realized sparsity; greedy-generation agreement.")
    add_model_arg(p)
    p.add_argument("--profile", help="sparsity profile from `clada-export calibrate` (evaluated at its thresholds; "
                                     "its tables and KL model also serve the sweep)")
    p.add_argument("--data", nargs="+", metavar="FILE",
                   help="evaluation text file(s) (default: the held-out Python-docs tutorial and FAQ)")
    p.add_argument("--tokens", type=int, default=20480, help="evaluation tokens (default 20480)")
    p.add_argument("--window", type=int, default=EVAL_WINDOW, help=f"tokens per window (default {EVAL_WINDOW})")
    p.add_argument("--levels", type=float, nargs="*", default=list(DEFAULT_LEVELS), metavar="S",
                   help="sparsity levels of the uniform-vs-greedy sweep (default 0.1 .. 0.7; none: no sweep)")
    p.add_argument("--calib-data", nargs="+", metavar="FILE",
                   help="calibration text for the sweep when no --profile is given (default: the shipped HOWTOs)")
    p.add_argument("--calib-tokens", type=int, default=4096, help="calibration tokens for the sweep (default 4096)")
    p.add_argument("--agreement-prompts", type=int, default=16, metavar="K",
                   help="prompts for greedy-generation agreement (default 16; 0: skip)")
    p.add_argument("--new-tokens", type=int, default=64, help="greedy continuation length (default 64)")
    p.add_argument("--dynamic", action="store_true",
                   help="also evaluate the runtime's dynamic controller against static thresholds at the same mean "
                        "sparsity: one teacher-forced pass on --tokens, exact step-by-step decode on "
                        "--dynamic-tokens (needs --profile)")
    p.add_argument("--controller", metavar="JSON", help="controller settings for --dynamic: a JSON object of "
                                                        "ControllerConfig fields to override (docs/controller.md)")
    p.add_argument("--dynamic-tokens", type=int, default=4096,
                   help="tokens of the step-by-step evaluation, the first of --tokens (default 4096; windows of 256, "
                        "prefix 32)")
    p.add_argument("-o", "--output", metavar="DIR", help="directory for eval.json and eval.png")
    p.add_argument("--batch-size", type=int, default=4, help="windows per forward pass (default 4)")
    p.set_defaults(func=run_eval)


# -- shared helpers ---------------------------------------------------------------------
def load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    if not any((model_dir / n).is_file() for n in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise UserError(f"{model_dir} has no tokenizer files (tokenizer.json); calibration and evaluation "
                        "tokenize text, so MODEL must include its tokenizer")
    try:
        return AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load the tokenizer of {model_dir} ({e})") from None


def _positive(name: str, value: int) -> None:
    if value < 1:
        raise UserError(f"{name} must be a positive number of tokens, got {value}")


def read_tokens(tokenizer, paths, role: str) -> tuple[list[int], str]:
    """All token ids of the text files (no special tokens) and a description of them."""
    from clada_export.data import calibration_text_sources, evaluation_text_sources, load_text

    if paths is None:
        paths = calibration_text_sources() if role == "calibration" else evaluation_text_sources()
    paths = [Path(p) for p in paths]
    text = load_text(paths)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids, ", ".join(str(p) for p in paths)


def windows_of(ids: list[int], start: int, n_tokens: int, window: int):
    import torch

    n = n_tokens // window
    return torch.tensor(ids[start:start + n * window], dtype=torch.long).view(n, window)


def calibration_windows(tokenizer, paths, tokens: int, heldout: int):
    """Table windows ``[tokens/256, 256]`` and held-out windows ``[heldout/128, 128]``
    that follow them in the text (disjoint)."""
    _positive("--tokens", tokens)
    _positive("--heldout-tokens", heldout)
    if tokens < CALIB_WINDOW:
        raise UserError(f"--tokens {tokens} is less than one calibration window of {CALIB_WINDOW} tokens; "
                        f"ask for at least {CALIB_WINDOW} (4096 recommended)")
    if heldout < HELDOUT_WINDOW:
        raise UserError(f"--heldout-tokens {heldout} is less than one window of {HELDOUT_WINDOW} tokens; "
                        f"ask for at least {HELDOUT_WINDOW}")
    ids, source = read_tokens(tokenizer, paths, "calibration")
    t_used = tokens // CALIB_WINDOW * CALIB_WINDOW
    h_used = heldout // HELDOUT_WINDOW * HELDOUT_WINDOW
    if len(ids) < t_used + h_used:
        usable = len(ids) - h_used
        hint = (f"pass --tokens {usable // CALIB_WINDOW * CALIB_WINDOW} or less, or a longer file"
                if usable >= CALIB_WINDOW else "pass a longer file")
        raise UserError(f"calibration text {source} is too short: it holds {len(ids)} tokens, and calibration "
                        f"needs {t_used + h_used} ({t_used} for the tables + {h_used} held out for KL); {hint}")
    return windows_of(ids, 0, t_used, CALIB_WINDOW), windows_of(ids, t_used, h_used, HELDOUT_WINDOW), source


def _load(model_arg):
    from clada_export.model.loading import load_decoder, resolve_model_dir

    model_dir = resolve_model_dir(model_arg)
    tokenizer = load_tokenizer(model_dir)
    model, hf_config = load_decoder(model_dir)
    return model_dir, tokenizer, model, hf_config


# -- calibrate ------------------------------------------------------------------------------
def run_calibrate(args: argparse.Namespace) -> None:
    from clada_export.calibrate.allocation import check_target, make_profile, run_calibration

    if args.target_sparsity is not None:
        check_target(args.target_sparsity)
    if args.error_budget is not None and not args.error_budget > 0:
        raise UserError(f"--error-budget must be > 0 (a KL divergence in nats per token, e.g. 0.05), "
                        f"got {args.error_budget:g}")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    start = time.perf_counter()
    model_dir, tokenizer, model, hf_config = _load(args.model)
    table_w, held_w, source = calibration_windows(tokenizer, args.data, args.tokens, args.heldout_tokens)
    cal = run_calibration(model, table_w, held_w, batch_size=args.batch_size)
    profile = make_profile(cal, hf_config, target=args.target_sparsity, error_budget=args.error_budget,
                           method=args.method, extra={"data": source, "model_dir": str(model_dir)})
    profile.calibration["seconds"]["total"] = round(time.perf_counter() - start, 2)
    profile.save(args.output)
    info = profile.calibration
    line = (f"wrote {args.output}: {profile.method} allocation, mean byte sparsity {profile.target_sparsity:.3f}, "
            f"KL vs dense {profile.kl:.4f} nats/token (predicted {info['kl_predicted']:.4f})")
    if info.get("uniform_kl") is not None:
        line += f"; uniform allocation at the same sparsity: KL {info['uniform_kl']:.4f}"
    print(line)
    print(f"calibration took {info['seconds']['total']:.1f} s "
          f"({', '.join(f'{k} {v:.1f} s' for k, v in info['seconds'].items() if k != 'total')})")


# -- eval --------------------------------------------------------------------------------------
def _pct(p: float, dense: float) -> str:
    return f"{100.0 * (p / dense - 1.0):+.1f}%"


def run_eval(args: argparse.Namespace) -> None:
    import torch

    from clada_export.calibrate.allocation import calibration_from_profile, check_target, run_calibration
    from clada_export.calibrate.quality import greedy_agreement, perplexity
    from clada_export.profile import SparsityProfile, model_fingerprint
    from clada_export.runtime.controller import load_controller_config

    for s in args.levels:
        check_target(s)
    _positive("--tokens", args.tokens)
    if args.window < 2:
        raise UserError(f"--window must be at least 2 tokens, got {args.window}")
    if args.tokens < args.window:
        raise UserError(f"--tokens {args.tokens} is less than one window of {args.window} tokens; "
                        f"ask for at least {args.window}")
    if args.dynamic and not args.profile:
        raise UserError("--dynamic needs --profile (the controller runs on a profile's tables and allocation)")
    if args.controller and not args.dynamic:
        raise UserError("--controller sets the dynamic controller: add --dynamic")
    controller_config = load_controller_config(args.controller)
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    out_dir = Path(args.output) if args.output else None
    if out_dir is not None and out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"-o {out_dir} is a file; give a directory for eval.json and eval.png")
    profile = SparsityProfile.load(args.profile) if args.profile else None
    model_dir, tokenizer, model, hf_config = _load(args.model)
    if profile is not None:
        profile.check_matches(hf_config.to_dict(), source=args.profile)

    ids, source = read_tokens(tokenizer, args.data, "evaluation")
    n_windows = args.tokens // args.window
    if len(ids) < n_windows * args.window:
        usable = len(ids) // args.window * args.window
        hint = f"pass --tokens {usable} or less, or a longer file" if usable else "pass a longer file"
        raise UserError(f"evaluation text {source} is too short: it holds {len(ids)} tokens, and "
                        f"{n_windows * args.window} are needed ({n_windows} windows of {args.window}); {hint}")
    windows = windows_of(ids, 0, n_windows * args.window, args.window)
    K = args.agreement_prompts
    prompts = None
    if K > 0:
        # K prompts of 32 tokens at evenly spaced offsets over the evaluated text
        P = min(32, args.window)
        used = n_windows * args.window
        offsets = np.linspace(0, max(0, used - P), K).astype(int)
        prompts = torch.tensor([ids[o:o + P] for o in offsets], dtype=torch.long)

    results = {"model": str(model_dir), "fingerprint": model_fingerprint(hf_config.to_dict()),
               "data": source, "tokens": int(windows.numel()), "window": args.window,
               "perplexity_over": "teacher-forced, all positions but each window's first",
               "agreement": {"prompts": 0 if prompts is None else int(prompts.shape[0]),
                             "new_tokens": args.new_tokens}, "rows": []}
    rows = results["rows"]
    t_start = time.perf_counter()

    dense = perplexity(model, windows, None, batch_size=args.batch_size, measure_sparsity=False,
                       desc="eval: dense")
    dense_cont = None
    if prompts is not None:
        with torch.inference_mode():
            from clada_export.calibrate.quality import greedy_continuations

            dense_cont = greedy_continuations(model, prompts, args.new_tokens, None)
    rows.append({"name": "dense", "method": "dense", "level": 0.0, "perplexity": dense.perplexity,
                 "nll": dense.nll, "byte_sparsity": 0.0, "agreement": 1.0 if prompts is not None else None,
                 "agreement_prefix": 1.0 if prompts is not None else None})

    def evaluate(name: str, method: str, level: float, thr: np.ndarray, extra: dict | None = None) -> dict:
        r = perplexity(model, windows, thr, batch_size=args.batch_size, desc=f"eval: {name}")
        agree = prefix = None
        if prompts is not None:
            a, _ = greedy_agreement(model, prompts, thr, args.new_tokens, dense=dense_cont)
            agree, prefix = a.tokens, a.prefix
        row = {"name": name, "method": method, "level": level, "perplexity": r.perplexity, "nll": r.nll,
               "byte_sparsity": r.byte_sparsity, "agreement": agree, "agreement_prefix": prefix,
               "sparsity_per_layer": np.round(r.sparsity_per_layer, 4).tolist(), **(extra or {})}
        rows.append(row)
        return row

    if profile is not None:
        evaluate("profile", profile.method, profile.target_sparsity, profile.static_thresholds(),
                 {"kl_calibration": profile.kl})

    if args.levels:
        cal = calibration_from_profile(profile) if profile is not None else None
        if cal is None:
            table_w, held_w, csource = calibration_windows(tokenizer, args.calib_data, args.calib_tokens, 512)
            cal = run_calibration(model, table_w, held_w, batch_size=args.batch_size)
            results["calibration"] = {"data": csource, **cal.info}
        else:
            results["calibration"] = {"from_profile": args.profile}
        for level in args.levels:
            for method in ("uniform", "greedy"):
                s_in, s_mid, pred = cal.allocate(level, method)
                evaluate(f"{method}@{level:g}", method, level, cal.thresholds(s_in, s_mid),
                         {"kl_predicted": pred, "s_in": np.round(s_in, 4).tolist(),
                          "s_mid": np.round(s_mid, 4).tolist()})

    if args.dynamic:
        results["dynamic"] = _dynamic_eval(model, profile, ids, args, controller_config)

    results["seconds"] = round(time.perf_counter() - t_start, 1)
    _print_table(results, dense.perplexity)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        _write_json(out_dir / "eval.json", results)
        _plot(results, out_dir / "eval.png")
        print(f"wrote {out_dir / 'eval.json'} and {out_dir / 'eval.png'}")


# allocation shift (byte sparsity) of the extra static runs around the profile's
DYNAMIC_BRACKET = 0.02
DYNAMIC_WINDOW, DYNAMIC_PREFIX = 256, 32


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


def _dynamic_eval(model, profile, ids, args, config) -> dict:
    """The runtime's controller against static thresholds at the same mean sparsity.

    One-pass mode (teacher-forced, per-token thresholds from a dense pass's signals) on
    ``--tokens``; the exact step-by-step mode (KV-cache decode, signals of the sparse run
    itself) on the first ``--dynamic-tokens`` of them. In both, static thresholds run
    through the same loop at the allocation and shifted by +-DYNAMIC_BRACKET, and static
    NLL is interpolated at the sparsity the dynamic run reached."""
    from clada_export.calibrate.quality import (dense_signals, one_pass_dynamic_perplexity, paired_difference,
                                                stepwise_perplexity)
    from clada_export.runtime.controller import ThresholdController

    window, prefix = DYNAMIC_WINDOW, DYNAMIC_PREFIX
    n_one = max(1, args.tokens // window)
    n_step = min(n_one, max(1, args.dynamic_tokens // window))
    if len(ids) < n_one * window:
        raise UserError(f"the evaluation text holds {len(ids)} tokens; the dynamic evaluation needs "
                        f"{n_one * window} (--tokens); pass fewer")
    w = windows_of(ids, 0, n_one * window, window)
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


def _write_json(path: Path, obj) -> None:
    from clada_export.atomic import write_json

    def clean(o):
        if isinstance(o, float) and not math.isfinite(o):
            return None
        if isinstance(o, dict):
            return {k: clean(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [clean(v) for v in o]
        if isinstance(o, np.generic):
            return clean(o.item())
        return o

    write_json(path, clean(obj))


def _print_table(results: dict, dense_ppl: float) -> None:
    rows = results["rows"]
    print(f"perplexity on {results['tokens']} tokens of {results['data']} (windows of {results['window']})")
    a = results["agreement"]
    if a["prompts"]:
        print(f"agree: fraction of identical tokens in greedy {a['new_tokens']}-token continuations of "
              f"{a['prompts']} prompts; prefix: fraction before the first difference")
    print(f"{'row':<16} {'target':>7} {'reached':>8} {'ppl':>9} {'vs dense':>9} {'agree':>7} {'prefix':>7}")
    for r in rows:
        agree = "-" if r.get("agreement") is None else f"{r['agreement']:.3f}"
        prefix = "-" if r.get("agreement_prefix") is None else f"{r['agreement_prefix']:.3f}"
        print(f"{r['name']:<16} {r['level']:>7.3f} {r['byte_sparsity']:>8.3f} {r['perplexity']:>9.3f} "
              f"{_pct(r['perplexity'], dense_ppl):>9} {agree:>7} {prefix:>7}")
    d = results.get("dynamic")
    if d:
        print(f"dynamic vs static at the same mean sparsity (windows of {d['window']}, prefix {d['prefix']} dense; "
              f"dense {d['dense']:.3f}):")
        for key in ("one_pass", "stepwise"):
            m = d[key]
            line = (f"  {key.replace('_', ' '):<9} {m['tokens']:>6} tokens: dynamic {m['dynamic']['perplexity']:.3f} "
                    f"at {m['dynamic']['byte_sparsity']:.4f}, static there {m['static_at_dynamic_sparsity']:.3f}; "
                    f"NLL difference {m['dynamic_minus_static_nll']:+.4f}")
            lo, hi = m["nll_difference_95ci"]
            ci = f"95% CI {lo:+.4f} .. {hi:+.4f}" if math.isfinite(lo) else "one window: no interval"
            print(f"{line} ({ci})")
        c = d["modes_compared"]
        print(f"  modes on the same {c['tokens']} tokens: dynamic step by step {c['dynamic_stepwise']:.3f}, "
              f"one pass {c['dynamic_one_pass']:.3f}")


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"]
    dense = next(r for r in rows if r["method"] == "dense")
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=110)
    for method, style in (("uniform", "o--"), ("greedy", "s-")):
        pts = sorted((r["level"], r["perplexity"]) for r in rows if r["method"] == method and r["name"] != "profile")
        if pts:
            xs, ys = zip(*([(0.0, dense["perplexity"])] + pts))
            ax.plot(xs, ys, style, label=f"{method} allocation")
    prof = [r for r in rows if r["name"] == "profile"]
    for r in prof:
        ax.plot([r["level"]], [r["perplexity"]], "k*", markersize=12, label=f"profile ({r['method']})")
    ax.axhline(dense["perplexity"], color="gray", lw=0.8, ls=":", label=f"dense ({dense['perplexity']:.2f})")
    ax.set_xlabel("target sparsity (fraction of MLP weight bytes skipped)")
    ax.set_ylabel("perplexity")
    ax.set_yscale("log")
    ax.set_title(f"{Path(results['model']).name}: {results['tokens']} held-out tokens", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
