"""Where one decode step's GPU time goes: the captured step of each MLP variant, replayed,
against the sum of its kernels' own durations (the torch profiler, CUPTI), grouped by kernel.

The difference between a replay and the sum of its kernels is the time the GPU sat between
kernels (launch gaps and tails); the groups show which kernels read the bytes.

    python benchmarks/step_profile.py --synthetic llama3-8b --batch 1 --sparsity 0.5
"""

from __future__ import annotations

import argparse
import re
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from clada_export.runtime.bench import SYNTHETIC, copy_bandwidth, synthetic_model, synthetic_profile, weight_bytes
from clada_export.runtime.cuda_graph import CudaGraphDecode, DecodePath

GROUPS = [
    ("sparse_mlp", r"sparse_mlp|stage1|stage2|gateup|down_kernel"),
    ("gemm/gemv", r"gemm|gemv|cutlass|sm90|xmma|splitK|Kernel2"),
    ("attention", r"decode_attention|attn"),
    ("norm/elementwise", r"elementwise|vectorized|reduce|triton|mask|copy|fill|memset|index|gather|cat"),
]


def group_of(name: str) -> str:
    for group, pattern in GROUPS:
        if re.search(pattern, name, re.IGNORECASE):
            return group
    return "other"


def kernel_times(graph: torch.cuda.CUDAGraph, replays: int) -> tuple[dict[str, float], dict[str, int], float]:
    """Per kernel name: microseconds and launches per replay, from the profiler's device events."""
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            graph.replay()
        torch.cuda.synchronize()
    us: dict[str, float] = defaultdict(float)
    n: dict[str, int] = defaultdict(int)
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            us[e.name] += e.device_time / replays
            n[e.name] += 1
    return us, n, sum(us.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--synthetic", default="llama3-8b", choices=sorted(SYNTHETIC))
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--context", type=int, default=128, help="cache slots filled before the profiled step")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--top", type=int, default=8)
    args = ap.parse_args()

    cfg, theta = SYNTHETIC[args.synthetic]
    model = synthetic_model(cfg, theta, torch.bfloat16, "cuda")
    prof = synthetic_profile(model, args.sparsity, progress=False)
    path = DecodePath(model, dense_layout="linear")
    B = args.batch
    thr = torch.from_numpy(prof.static_thresholds()).cuda()[:, None, :].expand(-1, B, -1).contiguous()
    bw = copy_bandwidth()
    nbytes = weight_bytes(model)
    print(f"{torch.cuda.get_device_name()} | {args.synthetic} B={B} sparsity {args.sparsity:.0%} "
          f"{'compiled' if args.compile else 'eager'} | weights {nbytes / 1e9:.2f} GB, copy {bw / 1e12:.2f} TB/s, "
          f"floor {nbytes / bw * 1e3:.3f} ms")
    for variant in ("plain", "kernel"):
        dec = CudaGraphDecode(path, B, max_len=args.context + 8, mlp=variant, compile=args.compile)
        tokens = torch.zeros(B, dtype=torch.long)
        dec.step(tokens, torch.full((B,), args.context, dtype=torch.long),
                 thr if variant == "kernel" else torch.zeros_like(thr))
        torch.cuda.synchronize()
        replay = dec.time_replays(variant, repeats=30)
        graph, _ = dec._graphs[variant]
        us, n, total = kernel_times(graph, 10)
        groups: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
        for name, t in us.items():
            g = groups[group_of(name)]
            g[0] += t
            g[1] += n[name] // 10
        print(f"\n{variant}: replay {replay * 1e3:.3f} ms, kernels {total / 1e3:.3f} ms, "
              f"gaps {replay * 1e3 - total / 1e3:.3f} ms, {sum(n.values()) // 10} kernels")
        for g, (t, k) in sorted(groups.items(), key=lambda kv: -kv[1][0]):
            print(f"  {g:18s} {t / 1e3:8.3f} ms  {k:5d} launches")
        for name, t in sorted(us.items(), key=lambda kv: -kv[1])[: args.top]:
            print(f"    {t:9.1f} us x{n[name] // 10:<4d} {name[:110]}")


if __name__ == "__main__":
    main()
