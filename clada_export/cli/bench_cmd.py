"""``clada-export bench``: generation latency, dense vs static vs dynamic (runtime/bench.py)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from clada_export.errors import UserError

SYNTHETIC_NAMES = ("llama3-8b", "mistral-7b", "qwen2-7b", "qwen2.5-1.5b", "smollm2-135m")  # runtime.bench.SYNTHETIC


def add_parsers(sub, _add_model_arg) -> None:
    p = sub.add_parser(
        "bench", help="benchmark generation latency: dense vs static vs dynamic thresholds",
        description="Time generation on an export (its checkpoint and profile) or on a synthetic model shape "
                    "with random weights: time to first token, per-token latency p50/p90/p99, tokens/s, speedup "
                    "over dense, MLP sparsity reached, controller overhead. On a GPU it runs the cuda backend; "
                    "on a CPU the onnxruntime and torch backends. Writes bench.md, bench.json and bench.png.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("export_dir", nargs="?", metavar="OUT", help="directory written by `clada-export export`")
    p.add_argument("--synthetic", choices=SYNTHETIC_NAMES,
                   help="a published model shape with random bf16 weights and a profile recorded on random tokens "
                        "(GPU only), instead of an export")
    p.add_argument("--sparsity", type=float, default=0.5, help="target byte sparsity of the synthetic profile")
    p.add_argument("--backends", nargs="+", choices=("cuda", "tensorrt", "torch", "onnxruntime"), default=None,
                   help="default: cuda on a GPU, else onnxruntime and torch")
    p.add_argument("--batches", nargs="+", type=int, default=[1, 2, 4, 8])
    p.add_argument("--prompt-len", type=int, default=128, help="prompt tokens per sequence")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens generated per sequence")
    p.add_argument("--repeats", type=int, default=3,
                   help="rounds over all cases, each a warm-up and one timed generation per case")
    p.add_argument("--dtype", choices=("bfloat16", "float16"), default="bfloat16", help="cuda backend dtype")
    p.add_argument("--compile", action="store_true", help="cuda: torch.compile the decode step before capture")
    p.add_argument("-o", "--output", default="clada-bench", help="directory for bench.md, bench.json, bench.png")
    p.set_defaults(func=run_bench_cmd)


def _check(args: argparse.Namespace) -> None:
    if (args.export_dir is None) == (args.synthetic is None):
        raise UserError("give an export directory or --synthetic NAME (one of them)")
    if not 0.0 < args.sparsity < 1.0:
        raise UserError(f"--sparsity must be in (0, 1), got {args.sparsity}")
    for flag, value, low in (("--prompt-len", args.prompt_len, 1), ("--new-tokens", args.new_tokens, 2),
                             ("--repeats", args.repeats, 1)):
        if value < low:
            raise UserError(f"{flag} must be at least {low}, got {value}")
    if any(not 1 <= b <= 8 for b in args.batches):
        raise UserError(f"--batches must be between 1 and 8 (the kernels' decode batch), got {args.batches}")


def run_bench_cmd(args: argparse.Namespace) -> None:
    import torch

    from clada_export.runtime import bench

    _check(args)
    cuda = torch.cuda.is_available()
    backends = args.backends or (["cuda"] if cuda else ["onnxruntime", "torch"])
    for gpu_only in ("cuda", "tensorrt"):
        if gpu_only in backends and not cuda:
            raise UserError(f"--backends {gpu_only} needs an NVIDIA GPU (torch.cuda.is_available() is False)")
    if args.synthetic:
        if not cuda:
            raise UserError(f"--synthetic {args.synthetic} builds a GPU-sized model; run it on a GPU, or bench an export")
        if backends != ["cuda"]:
            raise UserError("--synthetic runs the cuda backend only; drop --backends")
        factories, profile, model_name, vocab, dtype = bench.synthetic_backends(args.synthetic, args.sparsity,
                                                                                args.dtype, args.compile)
    else:
        factories, profile, model_name, vocab, dtype = bench.export_backends(Path(args.export_dir), backends,
                                                                             args.dtype, args.compile)
    device = "cuda" if set(backends) <= {"cuda", "tensorrt"} else "cpu"
    result = bench.BenchResult(device=bench.device_name(device), model=model_name, dtype=dtype,
                               prompt_len=args.prompt_len, new_tokens=args.new_tokens, repeats=args.repeats)
    modes = bench.MODES if profile is not None else ("dense",)
    if profile is None:
        print("note: this export has no sparsity profile, so only dense is timed", file=sys.stderr)
    if device == "cpu":
        from clada_export.runtime.cpu_mlp import decode_threads

        threads, note = decode_threads(None)  # what generate would use on this machine now
        torch.set_num_threads(threads)
        result.notes.append(note or f"torch threads: {threads}")
    # cases interleaved round by round: drift of the machine falls on every case alike
    bench.run_bench_interleaved(factories, result, profile, args.batches, vocab, args.repeats, modes,
                                cpu=device == "cpu")
    if "cuda" in factories:
        bench.dense_bandwidth_note(result, factories["cuda"]("dense").model)
    paths = result.write(Path(args.output))
    print(result.markdown())
    print("wrote " + ", ".join(str(p) for p in paths), file=sys.stderr)

