"""Compare builds of the kernel library (e.g. -DCLADA_KERNEL_DEFINES variants) and launch flags
in one process, interleaved, against cuBLAS measured in the same run: batch 1, sparsity 0 / 50
/ 70 / 90%, us per MLP call (CUDA-graph replays of 16 calls rotating two weight sets).

    cmake -S plugins -B /tmp/kb_a -DCLADA_KERNELS_ONLY=ON -DCMAKE_CUDA_ARCHITECTURES=90-real && cmake --build /tmp/kb_a -j
    cmake -S plugins -B /tmp/kb_b ... -DCLADA_KERNEL_DEFINES="CLADA_F_UNROLL=16" && cmake --build /tmp/kb_b -j
    python benchmarks/compare_builds.py --shape llama3-8b fused=/tmp/kb_a/libclada_kernels.so@2 \\
        deep=/tmp/kb_b/libclada_kernels.so@2 two=/tmp/kb_a/libclada_kernels.so@4

Each variant is NAME=LIBRARY@FLAGS (FLAGS: the clada_sparse_mlp_config flags, 0 = the library's
default launch). Rounds alternate the variants, so that clock and thermal drift fall on all of
them; the median of 3 rounds is printed. kernel_bench.py --sweep compares launch flags of one
build; this compares builds.
"""

from __future__ import annotations

import argparse
import os
import statistics

import torch

from clada_export.ops import native
from kernel_bench import CALLS_PER_GRAPH, SHAPES, make_inputs, mlp_weight_sets, thresholds_and_touched, time_graph


def use_library(path: str) -> None:
    """Load the kernel library at ``path`` in place of the one loaded before."""
    native._lib = None
    os.environ["CLADA_KERNELS_LIB"] = path
    native.load_library()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("variants", nargs="+", help="NAME=LIBRARY@FLAGS")
    ap.add_argument("--shape", default="llama3-8b",
                    help=f"one of {sorted(SHAPES)}, or HIDDENxINTER (e.g. 1536x8960)")
    ap.add_argument("--sparsities", type=float, nargs="+", default=[0.0, 0.5, 0.7, 0.9])
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    variants = []
    for spec in args.variants:
        name, _, rest = spec.partition("=")
        path, _, flags = rest.rpartition("@")
        if not name or not path or not flags.isdigit():
            raise SystemExit(f"bad variant {spec!r}: expected NAME=LIBRARY@FLAGS")
        variants.append((name, path, int(flags)))
    hidden, inter = SHAPES[args.shape] if args.shape in SHAPES else map(int, args.shape.split("x"))
    dtype, k = torch.bfloat16, CALLS_PER_GRAPH
    sets = mlp_weight_sets(hidden, inter, dtype, seed=2)
    xs = make_inputs("1", hidden, k, dtype)
    outs = [torch.empty_like(x) for x in xs]
    print(f"{torch.cuda.get_device_name()}, {args.shape} ({hidden} x {inter}), batch 1, bf16, us per call "
          f"(median of {args.rounds} interleaved rounds); speedup against cuBLAS in the same run")
    print("| sparsity | cuBLAS | " + " | ".join(n for n, _, _ in variants) + " |")
    print("|---|---|" + "---|" * len(variants))
    for s in args.sparsities:
        thrs = [thresholds_and_touched(xs[i], sets[i % 2][0], sets[i % 2][1], s)[0] for i in range(k)]

        def dense():
            for i in range(k):
                wg, wu, wd = sets[i % 2]
                h = torch.nn.functional.silu(xs[i] @ wg) * (xs[i] @ wu)
                outs[i].copy_(h @ wd)

        t_dense = time_graph(dense, k, repeats=10)
        times: dict[str, list[float]] = {n: [] for n, _, _ in variants}
        for _ in range(args.rounds):
            for name, path, flags in variants:
                use_library(path)
                native.set_tuning(0, 0, flags)
                try:
                    def sparse():
                        for i in range(k):
                            wg, wu, wd = sets[i % 2]
                            native.sparse_mlp_cuda_into(outs[i], xs[i], wg, wu, wd, thrs[i])

                    times[name].append(time_graph(sparse, k, repeats=10))
                finally:
                    native.set_tuning(0, 0, 0)
        cells = []
        for name, _, _ in variants:
            t = statistics.median(times[name])
            cells.append(f"{t * 1e6:.1f} ({t_dense / t:.2f}x)")
        print(f"| {100 * s:.0f}% | {t_dense * 1e6:.1f} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
