"""Kernel benchmark: the CUDA SparseMLP vs the dense torch/cuBLAS MLP, same shapes, same run.

For each MLP shape and sparsity level (0, 25, 40, 50, 60, 70, 80, 90%: the fraction of
each row's |x| and |h| below its threshold), batch 1 and 4:
- median time per MLP call (CUDA events around replays of a CUDA graph of K calls; the
  calls rotate over several weight sets and input/threshold buffers, more bytes than L2);
- the dense MLP (torch matmuls, cuBLAS) in two weight layouts, the faster one is the
  baseline; speedup = dense / sparse;
- touched bytes (weight rows any batch row needs: the union over the batch) and the
  bandwidth achieved on them, against a device-to-device copy measured in this run.

Batch "4c" uses correlated rows (one sequence's activations plus 10% noise per row), so
the batch shares most of its sparsity pattern; plain "4" has independent random rows,
whose union touches 1 - s^4 of the rows.

Prints a table last; writes it to $OUT/kernel_bench.md if OUT is set and to
benchmarks/results/<gpu-name>.md.
"""

from __future__ import annotations

import argparse
import math
import os
import re
from pathlib import Path

import torch
import torch.nn.functional as F

from clada_export.ops import native
from clada_export.runtime.cuda_graph import median_replay_seconds

RESULTS = Path(__file__).resolve().parent / "results"

SHAPES = {  # hidden, intermediate (Mistral-7B's MLP is Llama-3-8B's shape)
    "llama3-8b": (4096, 14336),
    "qwen2-7b": (3584, 18944),
    "smollm-135m": (576, 1536),
}
SPARSITIES = (0.0, 0.25, 0.40, 0.50, 0.60, 0.70, 0.80, 0.90)
BATCHES = ("1", "4", "4c")
CALLS_PER_GRAPH = 16
REPEATS = 25


def time_graph(fn, calls: int, repeats: int = REPEATS) -> float:
    """Median seconds per call of `fn()` (which issues `calls` ops) replayed as a CUDA graph."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    for _ in range(3):
        g.replay()
    torch.cuda.synchronize()
    seconds = median_replay_seconds(g, repeats) / calls
    del g
    return seconds


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus written (the
    best of a few sizes, all far over L2)."""
    best = 0.0
    for n in (256 << 20, 1 << 30):
        src = torch.empty(n, dtype=torch.uint8, device="cuda").random_(0, 255)
        dst = torch.empty_like(src)
        t = time_graph(lambda: [dst.copy_(src) for _ in range(4)], 4, repeats=15)
        best = max(best, 2 * n / t)
        del src, dst
    return best


def read_bandwidth() -> float:
    """Read-only bandwidth (a sum over 1 GiB of bf16), bytes/s: a second reference."""
    n = 1 << 29
    src = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    t = time_graph(lambda: [src.sum() for _ in range(4)], 4, repeats=15)
    del src
    return 2 * n / t


def make_inputs(batch: str, hidden: int, k: int, dtype) -> list[torch.Tensor]:
    rows = int(batch.rstrip("c"))
    xs = []
    for _ in range(k):
        if batch.endswith("c"):
            base = torch.randn(1, hidden, device="cuda")
            x = base + 0.1 * torch.randn(rows, hidden, device="cuda")
        else:
            x = torch.randn(rows, hidden, device="cuda")
        xs.append(x.to(dtype))
    return xs


def mlp_weight_sets(hidden: int, inter: int, dtype, seed: int, count: int = 2) -> list[tuple[torch.Tensor, ...]]:
    """``count`` sets of (W_gate_t, W_up_t, W_down_t), N(0, 0.02) on the GPU, from ``seed``: the
    launch comparisons rotate two, so that the calls read more than L2 holds."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return [tuple((torch.randn(*s, device="cuda", generator=gen) * 0.02).to(dtype)
                  for s in ((hidden, inter), (hidden, inter), (inter, hidden))) for _ in range(count)]


def thresholds_and_touched(x, wg, wu, sparsity: float) -> tuple[torch.Tensor, float, float]:
    """Per-row quantile thresholds, and the fractions of input/intermediate rows that any
    row of the batch needs (what the kernel must read)."""
    rows = x.shape[0]
    xf = x.float()
    if sparsity == 0.0:
        thr = torch.zeros(rows, 2, device="cuda")
        return thr, float((xf != 0).any(0).float().mean()), 1.0
    t_in = torch.quantile(xf.abs(), sparsity, dim=1)
    xs = torch.where(xf.abs() > t_in[:, None], x, torch.zeros_like(x))
    h = (F.silu((xs @ wg).float()) * (xs @ wu).float()).abs()
    t_mid = torch.quantile(h, sparsity, dim=1)
    keep_in = (xf.abs() > t_in[:, None]).any(0).float().mean().item()
    keep_mid = (h > t_mid[:, None]).any(0).float().mean().item()
    return torch.stack([t_in, t_mid], 1).contiguous(), keep_in, keep_mid


def bench_shape(name, hidden, inter, dtype, copy_bw, l2_bytes, sparsities, batches, rows_out):
    wbytes = 3 * hidden * inter * 2
    nsets = max(2, min(32, math.ceil(3 * l2_bytes / wbytes)))
    k = max(CALLS_PER_GRAPH, nsets)
    gen = torch.Generator(device="cuda").manual_seed(1)
    sets = []
    for _ in range(nsets):
        wg = (torch.randn(hidden, inter, device="cuda", generator=gen) / hidden**0.5).to(dtype)
        wu = (torch.randn(hidden, inter, device="cuda", generator=gen) / hidden**0.5).to(dtype)
        wd = (torch.randn(inter, hidden, device="cuda", generator=gen) / inter**0.5).to(dtype)
        sets.append((wg, wu, wd))
    # nn.Linear layout copies ([out, in]) for the second dense baseline
    sets_hf = [(wg.t().contiguous(), wu.t().contiguous(), wd.t().contiguous()) for wg, wu, wd in sets]

    for batch in batches:
        xs = make_inputs(batch, hidden, k, dtype)
        outs = [torch.empty_like(x) for x in xs]
        dense_outs: list = [None] * k

        def dense_t():
            for i in range(k):
                wg, wu, wd = sets[i % nsets]
                x = xs[i]
                dense_outs[i] = (F.silu(x @ wg) * (x @ wu)) @ wd

        def dense_hf():
            for i in range(k):
                wg, wu, wd = sets_hf[i % nsets]
                x = xs[i]
                dense_outs[i] = F.linear(F.silu(F.linear(x, wg)) * F.linear(x, wu), wd)

        t_dense_t = time_graph(dense_t, k)
        t_dense_hf = time_graph(dense_hf, k)
        t_dense = min(t_dense_t, t_dense_hf)
        # whether the dense fallback could read the kernel's own layout (no second copy of the weights)
        print(f"dense forms {name} B={batch}: x @ W_t (the kernel's layout) {t_dense_t * 1e6:.1f} us, "
              f"F.linear (nn.Linear layout) {t_dense_hf * 1e6:.1f} us", flush=True)
        for sparsity in sparsities:
            thrs, fin, fmid = [], 0.0, 0.0
            for i in range(k):
                wg, wu, _ = sets[i % nsets]
                thr, a, b = thresholds_and_touched(xs[i], wg, wu, sparsity)
                thrs.append(thr)
                fin += a / k
                fmid += b / k

            def sparse():
                for i in range(k):
                    wg, wu, wd = sets[i % nsets]
                    native.sparse_mlp_cuda_into(outs[i], xs[i], wg, wu, wd, thrs[i])

            t = time_graph(sparse, k)
            touched = fin * 2 * hidden * inter * 2 + fmid * inter * hidden * 2
            bw = touched / t
            rows_out.append(dict(
                shape=name, batch=batch, sparsity=sparsity, keep_in=fin, keep_mid=fmid,
                dense_us=t_dense * 1e6, dense_t_us=t_dense_t * 1e6, dense_hf_us=t_dense_hf * 1e6,
                sparse_us=t * 1e6, speedup=t_dense / t, touched_mb=touched / 1e6, bw_tbs=bw / 1e12,
                bw_frac=bw / copy_bw,
            ))
            r = rows_out[-1]
            print(f"{name:12s} B={batch:3s} s={sparsity:.2f} keep(x,h)=({fin:.2f},{fmid:.2f}) "
                  f"dense {t_dense*1e6:7.1f} us (t {t_dense_t*1e6:.1f} / hf {t_dense_hf*1e6:.1f}) "
                  f"sparse {t*1e6:7.1f} us  x{r['speedup']:.2f}  {bw/1e12:.2f} TB/s ({r['bw_frac']*100:.0f}% of copy)",
                  flush=True)
    del sets, sets_hf
    torch.cuda.empty_cache()


VARIANTS = {  # name: (gateup_splits, down_rows_per_block, flags)
    "2-kernel": (0, 0, native.FLAG_TWO_KERNEL),
    "2-kernel/s2x4": (0, 32, native.FLAG_TWO_KERNEL),  # 4x the stage-2 blocks
    "2-kernel/s16": (16, 0, native.FLAG_TWO_KERNEL),
    "fused": (0, 0, native.FLAG_FUSED),  # one launch, column tiles end to end (batch 1-2 only)
    "fused/no-cluster": (0, 0, native.FLAG_FUSED | native.FLAG_NO_CLUSTER),  # as before sm_90
}


def sweep(dtype, copy_bw):
    """Variants of the launch (see VARIANTS) on the Llama-3-8B shape (prints; changes no defaults)."""
    hidden, inter = SHAPES["llama3-8b"]
    sets = mlp_weight_sets(hidden, inter, dtype, seed=2)
    k = CALLS_PER_GRAPH
    for batch in ("1", "2", "4c"):
        xs = make_inputs(batch, hidden, k, dtype)
        outs = [torch.empty_like(x) for x in xs]
        for sparsity in (0.0, 0.5, 0.7, 0.9):
            thrs = [thresholds_and_touched(xs[i], sets[i % 2][0], sets[i % 2][1], sparsity)[0] for i in range(k)]
            results = []
            for name, (splits, rows, flags) in VARIANTS.items():
                if flags & native.FLAG_FUSED and xs[0].shape[0] > 2:
                    continue
                native.set_tuning(splits, rows, flags)

                def sparse():
                    for i in range(k):
                        wg, wu, wd = sets[i % 2]
                        native.sparse_mlp_cuda_into(outs[i], xs[i], wg, wu, wd, thrs[i])

                results.append((name, time_graph(sparse, k, repeats=10) * 1e6))
            native.set_tuning(0, 0, 0)
            print(f"variants llama3-8b B={batch} s={sparsity}: " +
                  "  ".join(f"{n} {t:.1f}" for n, t in results), flush=True)
            # where the time goes (the library's default launch): every kept row, no W_down_t
            # row read (t_mid = inf), no row read at all (t_in = inf: the fixed cost only)
            parts = []
            for label, col in (("default", None), ("no down rows", 1), ("no rows", 0)):
                thr_x = [t.clone() for t in thrs]
                for t in thr_x:
                    if col is not None:
                        t[:, col] = float("inf")

                def sparse_x():
                    for i in range(k):
                        wg, wu, wd = sets[i % 2]
                        native.sparse_mlp_cuda_into(outs[i], xs[i], wg, wu, wd, thr_x[i])

                parts.append(f"{label} {time_graph(sparse_x, k, repeats=10) * 1e6:.1f}")
            print(f"breakdown llama3-8b B={batch} s={sparsity}: " + "  ".join(parts), flush=True)
    del sets


def table(rows, gpu, copy_bw, read_bw) -> str:
    lines = [
        f"# SparseMLP kernel benchmark on {gpu}",
        "",
        f"copy bandwidth (read+write) {copy_bw/1e12:.2f} TB/s, read-only {read_bw/1e12:.2f} TB/s; bf16; times are medians per MLP call "
        f"over CUDA-graph replays, {CALLS_PER_GRAPH}+ calls rotating weight sets and inputs.",
        "dense = faster of torch `x @ W_t` and `F.linear` (cuBLAS); keep = fraction of rows read (union over batch).",
        "",
        "| shape | B | sparsity | keep x | keep h | dense us | sparse us | speedup | touched MB | TB/s | % copy |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['shape']} | {r['batch']} | {r['sparsity']*100:.0f}% | {r['keep_in']:.2f} | {r['keep_mid']:.2f} | "
            f"{r['dense_us']:.1f} | {r['sparse_us']:.1f} | {r['speedup']:.2f} | {r['touched_mb']:.0f} | "
            f"{r['bw_tbs']:.2f} | {r['bw_frac']*100:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="*", default=list(SHAPES))
    ap.add_argument("--batches", nargs="*", default=list(BATCHES))
    ap.add_argument("--sparsities", nargs="*", type=float, default=list(SPARSITIES))
    ap.add_argument("--sweep", action="store_true", help="also time launch variants (llama3-8b, B=1 and 4c)")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    args = ap.parse_args()
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    native.load_library()
    props = torch.cuda.get_device_properties(0)
    gpu = props.name
    l2 = getattr(props, "L2_cache_size", 50 << 20)
    copy_bw = copy_bandwidth()
    read_bw = read_bandwidth()
    print(f"# {gpu}: {props.multi_processor_count} SMs, L2 {l2/2**20:.0f} MiB, copy {copy_bw/1e12:.2f} TB/s, "
          f"read-only (sum) {read_bw/1e12:.2f} TB/s", flush=True)
    if args.sweep:
        sweep(dtype, copy_bw)
    rows: list[dict] = []
    for name in args.shapes:
        hidden, inter = SHAPES[name]
        bench_shape(name, hidden, inter, dtype, copy_bw, l2, args.sparsities, args.batches, rows)
    text = table(rows, gpu, copy_bw, read_bw)
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", gpu).strip("_")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{slug}.md").write_text(text)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "kernel_bench.md").write_text(text)
    print()
    print(text)


if __name__ == "__main__":
    main()
