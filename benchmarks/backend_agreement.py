"""Do the torch and ONNX Runtime backends generate the same greedy text (CPU)?

For each of a fixed set of prompts, greedy generation on both backends from one export,
dense, at the profile's static thresholds, and with the controller. Prints, per mode,
how many tokens agree before the first difference, and writes nothing:

    python benchmarks/backend_agreement.py OUT [--new-tokens 64]

The two backends compute in float32 with different kernels, so their activations differ
in the last bits. Dense, that never changes an argmax here. Sparse, an activation that
close to its threshold is kept by one backend and dropped by the other. Where that
moves the logits enough, the greedy texts part from there on.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from clada_export.export.onnx_export import read_manifest
from clada_export.profile import SparsityProfile
from clada_export.prompts import load_export_tokenizer
from clada_export.runtime.backends import open_backend
from clada_export.runtime.controller import ThresholdController
from clada_export.runtime.generator import Generator

PROMPTS = (
    "The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,",
    "The Python language was created by", "To install a package with pip, run", "Water boils at",
    "A list comprehension in Python", "The quick brown fox", "import numpy as np",
    "The best way to learn programming is", "In 1969, the first", "Dear customer, we regret",
    "SELECT * FROM users WHERE", "The mitochondria is", "Here is a recipe for pancakes:",
    "The theory of relativity states that",
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("export_dir", help="an export made with --profile (clada-export export)")
    ap.add_argument("--new-tokens", type=int, default=64)
    args = ap.parse_args()
    export_dir = Path(args.export_dir)
    manifest = read_manifest(export_dir)
    profile_path = export_dir / "profile.json"
    if not profile_path.is_file():
        sys.exit(f"{export_dir} has no profile.json: export with --profile")
    profile = SparsityProfile.load(profile_path)
    tok = load_export_tokenizer(export_dir, manifest)
    backends = {name: open_backend(name, export_dir, manifest, device="cpu") for name in ("onnxruntime", "torch")}
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    n = args.new_tokens

    def generator(backend, mode: str) -> Generator:
        if mode == "dynamic":
            return Generator(backend, controller_factory=lambda B: ThresholdController(profile, batch=B))
        return Generator(backend, static_thresholds=profile.static_thresholds() if mode == "static" else None)

    print(f"greedy, {n} new tokens, {len(prompts)} prompts, no stop on EOS; profile at "
          f"{profile.target_sparsity:.2f} MLP sparsity")
    print(f"{'mode':<8} {'identical':>9} {'median agreeing':>16}   agreeing tokens per prompt")
    for mode in ("dense", "static", "dynamic"):
        agree = []
        for ids in prompts:
            a, b = (np.asarray(generator(be, mode).generate([ids], n).tokens[0]) for be in backends.values())
            differ = np.flatnonzero(a[:n] != b[:n])
            agree.append(int(differ[0]) if differ.size else n)
        same = sum(x >= n for x in agree)
        print(f"{mode:<8} {same:>5}/{len(agree):<3} {np.median(agree):>16.1f}   {agree}", flush=True)


if __name__ == "__main__":
    main()
