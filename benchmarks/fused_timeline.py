"""Where the fused SparseMLP launch spends its time: a per-block timeline of one CUDA graph of
calls (Llama-3-8B's MLP by default, batch 1), from a kernel library built with
-DCLADA_FUSED_TRACE:

    cmake -S plugins -B /tmp/kt -DCLADA_KERNELS_ONLY=ON -DCMAKE_CUDA_ARCHITECTURES=90-real \\
          -DCLADA_KERNEL_DEFINES=CLADA_FUSED_TRACE && cmake --build /tmp/kt -j
    CLADA_KERNELS_LIB=/tmp/kt/libclada_kernels.so python benchmarks/fused_timeline.py

Each block records %globaltimer at its start, after compacting x (A), after its gate/up rows
(B), after h and its compaction (C), after its W_down_t rows and partial-y atomics (D) and
after the end-of-call counter (the last block: after writing y). Prints, per sparsity, the
median and the slowest block of each phase, the spread of block starts and ends and the gap
between consecutive calls (in microseconds).
"""

from __future__ import annotations

import argparse
import ctypes
import statistics

import numpy as np
import torch

from clada_export.ops import native
from kernel_bench import SHAPES, make_inputs, mlp_weight_sets, thresholds_and_touched

LAUNCHES, BLOCKS, FIELDS = 4, 1024, 8


def read_trace(lib, launches: int) -> np.ndarray:
    buf = np.zeros((launches, BLOCKS, FIELDS), np.uint64)
    rc = lib.clada_fused_trace_read(buf.ctypes.data_as(ctypes.POINTER(ctypes.c_ulonglong)), launches)
    if rc != 0:
        raise RuntimeError(f"clada_fused_trace_read failed: {rc}")
    return buf


def summarize(tr: np.ndarray) -> dict[str, float]:
    """Phase times of the launches in ``tr`` (blocks that ran have a nonzero start)."""
    nblocks = int((tr[0, :, 0] > 0).sum())
    t = tr[:, :nblocks, :].astype(np.float64) / 1e3  # ns -> us
    start, end = t[:, :, 0], t[:, :, 5]
    rows = {"blocks": float(nblocks)}
    for name, i in (("A x", 0), ("B gate/up", 1), ("C h", 2), ("D down+atomics", 3), ("end counter", 4)):
        d = t[:, :, i + 1] - t[:, :, i]
        rows[f"{name} med"] = float(np.median(d))
        rows[f"{name} max"] = float(np.median(d.max(1)))
    rows["start spread"] = float(np.median(start.max(1) - start.min(1)))
    rows["call (first start to last end)"] = float(np.median(end.max(1) - start.min(1)))
    rows["D end spread"] = float(np.median(t[:, :, 4].max(1) - t[:, :, 4].min(1)))
    gaps = [start[k + 1].min() - end[k].max() for k in range(t.shape[0] - 1)]
    rows["gap to next call"] = float(statistics.median(gaps)) if gaps else float("nan")
    n2 = tr[:, :nblocks, 6].astype(np.float64)
    rows["kept h columns/tile mean"] = float(n2.mean())
    rows["kept h columns/tile max"] = float(np.median(n2.max(1)))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    ap.add_argument("--sparsities", type=float, nargs="+", default=[0.0, 0.5, 0.7, 0.9])
    ap.add_argument("--flags", type=int, default=0,
                    help="launch flags besides FUSED (sparse_mlp.h), e.g. 8 (NO_CLUSTER)")
    args = ap.parse_args()
    lib = native.load_library()
    if not hasattr(lib, "clada_fused_trace_read"):
        raise SystemExit(f"{native.library_path()} was not built with -DCLADA_FUSED_TRACE (see --help)")
    lib.clada_fused_trace_read.restype = ctypes.c_int
    lib.clada_fused_trace_read.argtypes = [ctypes.POINTER(ctypes.c_ulonglong), ctypes.c_int]
    hidden, inter = SHAPES[args.shape]
    dtype = torch.bfloat16
    sets = mlp_weight_sets(hidden, inter, dtype, seed=3)
    xs = make_inputs("1", hidden, LAUNCHES, dtype)
    outs = [torch.empty_like(x) for x in xs]
    native.set_tuning(0, 0, native.FLAG_FUSED | args.flags)
    table = {}
    for s in args.sparsities:
        thrs = [thresholds_and_touched(xs[i], sets[i % 2][0], sets[i % 2][1], s)[0] for i in range(LAUNCHES)]

        def calls():
            for i in range(LAUNCHES):
                wg, wu, wd = sets[i % 2]
                native.sparse_mlp_cuda_into(outs[i], xs[i], wg, wu, wd, thrs[i])

        calls()
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            calls()
        runs = []
        for _ in range(5):
            read_trace(lib, LAUNCHES)  # restarts the launch counter
            g.replay()
            torch.cuda.synchronize()
            runs.append(read_trace(lib, LAUNCHES))
        per = [summarize(r) for r in runs]
        table[s] = {k: statistics.median(p[k] for p in per) for k in per[0]}
        del g
    native.set_tuning(0, 0, 0)
    print(f"\nfused launch timeline, {args.shape} B=1 bf16, flags {native.FLAG_FUSED | args.flags}, "
          f"{torch.cuda.get_device_name()}, us "
          f"(median of 5 graph replays of {LAUNCHES} calls)")
    print("| | " + " | ".join(f"{100 * s:.0f}%" for s in table) + " |")
    print("|---|" + "---|" * len(table))
    for k in next(iter(table.values())):
        print(f"| {k} | " + " | ".join(f"{table[s][k]:.1f}" for s in table) + " |")


if __name__ == "__main__":
    main()
