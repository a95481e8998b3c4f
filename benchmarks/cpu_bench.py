"""CPU decode benchmark that needs no model download: the default model's shape
(SmolLM2-135M: 30 layers, hidden 576, MLP 1536) with random float32 weights and a uniform
50% profile recorded on random tokens (bench.synthetic_model / synthetic_profile).

Two tables, cases interleaved round by round (bench.run_bench_interleaved):
  1. MLP alone, 30 layers, batch 1: torch dense (the reference op's GEMMs) against the CPU
     kernel at 0% and at 50% input + 50% intermediate sparsity;
  2. generation through the torch backend: dense (torch GEMMs) vs static vs dynamic (kernel).

    taskset -c 0,1 python benchmarks/cpu_bench.py --threads 2      # a 2-core budget
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch
import torch.nn.functional as F


def mlp_table(model, rounds: int) -> str:
    from clada_export.ops.cpu_kernel import best_isa, sparse_mlp_cpu_op

    mlps = [layer.mlp for layer in model.layers]
    hidden = mlps[0].w_gate_t.shape[0]
    x = torch.randn(1, hidden, generator=torch.Generator().manual_seed(0))
    torch.set_grad_enabled(False)
    h0 = (F.silu(x @ mlps[0].w_gate_t) * (x @ mlps[0].w_up_t)).abs()
    sparse = torch.tensor([[float(x.abs().quantile(0.5)), float(h0.quantile(0.5))]])
    counts = torch.zeros(2, dtype=torch.int64)

    def dense():
        for m in mlps:
            (F.silu(x @ m.w_gate_t) * (x @ m.w_up_t)) @ m.w_down_t

    def kernel(thr):
        for m in mlps:
            sparse_mlp_cpu_op(x, m.w_gate_t, m.w_up_t, m.w_down_t, thr, "silu", counts)

    cases = {"torch dense": dense, "kernel 0%": lambda: kernel(torch.zeros(1, 2)),
             "kernel 50% (in and mid)": lambda: kernel(sparse)}
    times: dict[str, list[float]] = {k: [] for k in cases}
    with torch.no_grad():
        for f in cases.values():
            f()
        for _ in range(rounds):
            for name, f in cases.items():
                t0 = time.perf_counter()
                for _ in range(5):
                    f()
                times[name].append((time.perf_counter() - t0) / 5)
    nbytes = sum(3 * m.w_gate_t.numel() * 4 for m in mlps)
    base = np.median(times["torch dense"])
    lines = [f"MLP only, {len(mlps)} layers, batch 1, {nbytes / 1e6:.0f} MB of dense MLP weights; kernel isa "
             f"{best_isa()}; median of {rounds} interleaved rounds of 5", "",
             "| case | ms | GB/s of dense bytes | vs torch dense |", "|---|---|---|---|"]
    for name, ts in times.items():
        t = float(np.median(ts))
        lines.append(f"| {name} | {t * 1e3:.2f} | {nbytes / t / 1e9:.1f} | {base / t:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    from clada_export.runtime import bench
    from clada_export.runtime.backends import TorchBackend

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--mlp-only", action="store_true", help="the first table only")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg, theta = bench.SYNTHETIC["smollm2-135m"]
    model = bench.synthetic_model(cfg, theta, torch.float32, "cpu")
    print(f"# CPU: {bench.device_name('cpu')}, {args.threads} threads, affinity {sorted(os.sched_getaffinity(0))}, "
          f"load average {os.getloadavg()[0]:.2f}\n")
    print(mlp_table(model, args.rounds) + "\n")
    if args.mlp_only:
        return
    profile = bench.synthetic_profile(model, 0.5, progress=False)
    fast, dense = TorchBackend(model, "cpu"), TorchBackend(model, "cpu", mlp="reference")
    assert fast.mlp == "cpu-kernel", fast.mlp_note
    result = bench.BenchResult(device=bench.device_name("cpu"), model="smollm2-135m shape, random weights, uniform "
                               "50% profile on random tokens", dtype="float32 (cpu)", prompt_len=args.prompt_len,
                               new_tokens=args.new_tokens, repeats=args.rounds)
    bench.run_bench_interleaved({"torch": lambda mode: dense if mode == "dense" else fast}, result, profile, [1],
                                cfg.vocab_size, args.rounds, progress=False)
    print(result.markdown())


if __name__ == "__main__":
    main()
