"""Batch-1 decode speedup at several static sparsities, for the quality report's
accuracy-vs-speedup plot (docs/results.md): one synthetic model per shape, its tables
recorded once, a uniform profile per level, the dense case timed once.

Writes one ``bench.json`` per (shape, level) in ``clada-export bench``'s format
(``<out>/<GPU>_<shape>_s<level>.json``), so the report reads them like any bench result.

    python benchmarks/speed_points.py --shapes smollm2-135m qwen2.5-1.5b --levels 0.3 0.4 0.5 0.6 -o OUT
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import torch

from clada_export.runtime import bench


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["smollm2-135m", "qwen2.5-1.5b"], choices=sorted(bench.SYNTHETIC))
    ap.add_argument("--levels", nargs="+", type=float, default=[0.3, 0.4, 0.5, 0.6])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("-o", "--output", required=True)
    args = ap.parse_args()

    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    gpu = bench.device_name("cuda")
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", gpu).strip("_")
    print(f"| GPU | shape | level | sparsity reached | dense p50 ms | static p50 ms | speedup |")
    print("|---|---|---|---|---|---|---|")
    for shape in args.shapes:
        factories, profile, note, vocab, dtype = bench.synthetic_backends(shape, args.levels[0], "bfloat16",
                                                                          args.compile)
        backend = factories["cuda"]
        dense = bench.run_case(backend("dense"), "cuda", "dense", 1, args.prompt_len, args.new_tokens, args.repeats,
                               None, vocab)
        L = profile.num_layers
        for level in args.levels:
            prof = dataclasses.replace(profile, target_sparsity=level, s_in=np.full(L, level),
                                       s_mid=np.full(L, level))
            static = bench.run_case(backend("static"), "cuda", "static", 1, args.prompt_len, args.new_tokens,
                                    args.repeats, prof, vocab)
            result = bench.BenchResult(device=gpu, model=f"{shape} shape, random weights, uniform profile on random "
                                       f"tokens at {level:.0%}", dtype=dtype, prompt_len=args.prompt_len,
                                       new_tokens=args.new_tokens, repeats=args.repeats,
                                       cases=[dataclasses.replace(dense), static])
            for c in result.cases:
                c.speedup = dense.p50_ms / c.p50_ms
            path = out / f"{slug}_{shape}_s{level:.2f}.json"
            path.write_text(json.dumps(result.to_dict(), indent=1))
            print(f"| {gpu} | {shape} | {level:.2f} | {static.sparsity:.3f} | {dense.p50_ms:.3f} | "
                  f"{static.p50_ms:.3f} | {dense.p50_ms / static.p50_ms:.2f}x |")
        del factories, backend
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
