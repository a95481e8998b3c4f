"""``clada-export calibrate``: offline, error-controlled thresholds -> profile.json
(the work is in ``clada_export.calibrate``)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from clada_export.errors import UserError
from clada_export.profile import METHODS


def add_parsers(sub, add_model_arg) -> None:
    p = sub.add_parser("calibrate", help="measure per-layer threshold tables and allocate sparsity -> profile.json",
                       description="Run the dense model over calibration text, record per-layer quantile tables "
                                   "of |x| and |h|, and allocate per-layer sparsity (greedy, least KL against "
                                   "the dense model on held-out calibration windows).",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_arg(p)
    p.add_argument("--data", nargs="+", metavar="FILE",
                   help="calibration text file(s), UTF-8 (default: the Python-docs HOWTOs shipped with clada-export)")
    p.add_argument("--tokens", type=int, default=4096,
                   help="calibration tokens for the tables; held-out KL windows come after them")
    p.add_argument("--heldout-tokens", type=int, default=512,
                   help="held-out calibration tokens on which KL against dense is measured")
    goal = p.add_mutually_exclusive_group(required=True)
    goal.add_argument("--target-sparsity", type=float, metavar="S",
                      help="global target: mean over layers of the fraction of MLP weight bytes skipped, in (0, 1)")
    goal.add_argument("--error-budget", type=float, metavar="KL",
                      help="the most sparsity whose KL divergence from the dense model (nats/token) stays under KL")
    p.add_argument("--method", choices=METHODS, default="greedy",
                   help="greedy (least KL) or uniform (same s_in = s_mid in every layer)")
    p.add_argument("-o", "--output", required=True, help="profile to write (JSON)")
    p.add_argument("--batch-size", type=int, default=4, help="windows per forward pass")
    p.set_defaults(func=run_calibrate)


def check_tokens(flag: str, value: int, least: int) -> None:
    """A token-count flag must cover at least one window of ``least`` tokens."""
    if value < least:
        raise UserError(f"{flag} {value} is less than one window of {least} tokens; ask for at least {least}")


def load_model_and_tokenizer(model_arg):
    """(checkpoint dir, tokenizer, decoder, transformers config); an unsupported
    architecture is reported before a missing tokenizer."""
    from clada_export.model.config import DecoderConfig
    from clada_export.model.loading import load_decoder, load_hf_config, load_tokenizer, resolve_model_dir

    model_dir = resolve_model_dir(model_arg)
    DecoderConfig.from_hf(load_hf_config(model_dir))
    tokenizer = load_tokenizer(model_dir)
    model, hf_config = load_decoder(model_dir)
    return model_dir, tokenizer, model, hf_config


def run_calibrate(args: argparse.Namespace) -> None:
    from clada_export.calibrate.allocation import check_error_budget, check_target, make_profile, run_calibration
    from clada_export.data import CALIB_WINDOW, HELDOUT_WINDOW, calibration_windows

    if args.target_sparsity is not None:
        check_target(args.target_sparsity, name="--target-sparsity")
    if args.error_budget is not None:
        check_error_budget(args.error_budget, name="--error-budget")
    check_tokens("--tokens", args.tokens, CALIB_WINDOW)
    check_tokens("--heldout-tokens", args.heldout_tokens, HELDOUT_WINDOW)
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    out = Path(args.output)
    if out.is_dir():
        raise UserError(f"-o {out} is a directory; name the profile file to write, e.g. {out / 'profile.json'}")
    start = time.perf_counter()
    model_dir, tokenizer, model, hf_config = load_model_and_tokenizer(args.model)
    table_w, held_w, source = calibration_windows(tokenizer, args.data, args.tokens, args.heldout_tokens)
    cal = run_calibration(model, table_w, held_w, batch_size=args.batch_size)
    profile = make_profile(cal, hf_config, target=args.target_sparsity, error_budget=args.error_budget,
                           method=args.method, extra={"data": source, "model_dir": str(model_dir)})
    profile.calibration["seconds"]["total"] = round(time.perf_counter() - start, 2)
    profile.save(out)
    info = profile.calibration
    line = (f"wrote {out}: {profile.method} allocation, mean byte sparsity {profile.target_sparsity:.3f}, "
            f"KL vs dense {profile.kl:.4f} nats/token (predicted {info['kl_predicted']:.4f})")
    if info.get("uniform_kl") is not None:
        line += f"; uniform allocation at the same sparsity: KL {info['uniform_kl']:.4f}"
    print(line)
    print(f"calibration took {info['seconds']['total']:.1f} s "
          f"({', '.join(f'{k} {v:.1f} s' for k, v in info['seconds'].items() if k != 'total')})")
