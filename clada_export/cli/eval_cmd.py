"""``clada-export eval``: perplexity, sparsity reached and greedy agreement of dense vs
sparse, a uniform-vs-greedy sweep, the dynamic controller vs static thresholds (the work
is in ``clada_export.calibrate.evaluate``; ``report`` prints and plots it)."""

from __future__ import annotations

import argparse
from pathlib import Path

from clada_export.calibrate.evaluate import DEFAULT_LEVELS, EVAL_WINDOW
from clada_export.errors import UserError


def add_parsers(sub, add_model_arg) -> None:
    p = sub.add_parser("eval", help="perplexity / sparsity / greedy agreement of dense vs sparse, with a plot",
                       description="Teacher-forced perplexity on held-out evaluation text of the dense model, of "
                                   "the profile's static thresholds, and of uniform vs greedy allocations at "
                                   "several sparsity levels; realized sparsity; greedy-generation agreement.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_arg(p)
    p.add_argument("--profile", help="sparsity profile from `clada-export calibrate` (evaluated at its thresholds; "
                                     "its tables and KL model also serve the sweep)")
    p.add_argument("--data", nargs="+", metavar="FILE",
                   help="evaluation text file(s) (default: the held-out Python-docs tutorial and FAQ)")
    p.add_argument("--tokens", type=int, default=20480, help="evaluation tokens")
    p.add_argument("--window", type=int, default=EVAL_WINDOW, help="tokens per window")
    p.add_argument("--levels", type=float, nargs="*", default=list(DEFAULT_LEVELS), metavar="S",
                   help="sparsity levels in (0, 1) of the uniform-vs-greedy sweep; `--levels` with no value: no sweep")
    p.add_argument("--calib-data", nargs="+", metavar="FILE",
                   help="calibration text for the sweep when no --profile is given (default: the shipped HOWTOs)")
    p.add_argument("--calib-tokens", type=int, default=4096, help="calibration tokens for the sweep")
    p.add_argument("--agreement-prompts", type=int, default=16, metavar="K",
                   help="prompts for greedy-generation agreement (0: skip)")
    p.add_argument("--new-tokens", type=int, default=64, help="greedy continuation length")
    p.add_argument("--dynamic", action="store_true",
                   help="also evaluate the runtime's dynamic controller against static thresholds at the same mean "
                        "sparsity: one teacher-forced pass on --tokens, exact step-by-step decode on "
                        "--dynamic-tokens (needs --profile)")
    p.add_argument("--controller", metavar="JSON", help="controller settings for --dynamic: a JSON object of "
                                                        "ControllerConfig fields to override (docs/controller.md)")
    p.add_argument("--dynamic-tokens", type=int, default=4096,
                   help="tokens of the step-by-step evaluation, the first of --tokens (windows of 256, prefix 32)")
    p.add_argument("-o", "--output", metavar="DIR", help="directory for eval.json and eval.png")
    p.add_argument("--batch-size", type=int, default=4, help="windows per forward pass")
    p.set_defaults(func=run_eval)


def run_eval(args: argparse.Namespace) -> None:
    from clada_export.calibrate import report
    from clada_export.calibrate.allocation import check_target, run_calibration
    from clada_export.calibrate.evaluate import evaluate
    from clada_export.cli.calibrate_cmd import check_tokens, load_model_and_tokenizer
    from clada_export.data import CALIB_WINDOW, calibration_windows, evaluation_windows
    from clada_export.profile import SparsityProfile, model_fingerprint
    from clada_export.runtime.controller import load_controller_config

    for s in args.levels:
        check_target(s, name="--levels")
    if args.window < 2:
        raise UserError(f"--window must be at least 2 tokens, got {args.window}")
    check_tokens("--tokens", args.tokens, args.window)
    if args.levels and not args.profile:
        check_tokens("--calib-tokens", args.calib_tokens, CALIB_WINDOW)
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
    model_dir, tokenizer, model, hf_config = load_model_and_tokenizer(args.model)
    if profile is not None:
        profile.check_matches(hf_config.to_dict(), source=args.profile)
    windows, source = evaluation_windows(tokenizer, args.data, args.tokens, args.window)

    def calibrate():
        table_w, held_w, csource = calibration_windows(tokenizer, args.calib_data, args.calib_tokens, 512)
        return run_calibration(model, table_w, held_w, batch_size=args.batch_size), csource

    res = evaluate(model, windows, model_name=str(model_dir), fingerprint=model_fingerprint(hf_config.to_dict()),
                   data=source, profile=profile, profile_source=args.profile, levels=args.levels,
                   calibrate=calibrate, agreement=args.agreement_prompts, new_tokens=args.new_tokens,
                   dynamic_config=controller_config if args.dynamic else None,
                   dynamic_tokens=args.dynamic_tokens, batch_size=args.batch_size)
    print("\n".join(report.table(res)))
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)  # eval.json and eval.png each appear whole
        report.save_json(res, out_dir / "eval.json")
        report.plot(res, out_dir / "eval.png")
        print(f"wrote {out_dir / 'eval.json'} and {out_dir / 'eval.png'}")
