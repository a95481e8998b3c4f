"""ONNX Runtime against TensorRT on one export graph, with Polygraphy and the SparseMLP plugin.

    python -m clada_export.export.polygraphy_check OUT [--graph decode] [--batch 1] [--max-len 64] [--run]

writes ``OUT/polygraphy_<graph>_inputs.json`` (one feed: token ids below the vocabulary,
positions inside the cache, the export's default thresholds, a random cache) and prints the
``polygraphy run`` command that compares ``<graph>.onnx`` in ONNX Runtime (the SparseMLP
function body) with TensorRT (the plugin: with it registered, the parser prefers it over the
body) on that feed; ``--run`` runs it and exits with its code. Polygraphy loads plugins with
``ctypes.CDLL``, so it needs the self-registering library, ``libclada_trt_plugin_static.so``.
The plugin takes float16/bfloat16 only: compare a ``--dtype float16`` export. docs/tensorrt.md
walks through it.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np

from clada_export import contract as C
from clada_export.errors import UserError

STATIC_PLUGIN_NAME = "libclada_trt_plugin_static.so"
# float16 graphs: fp16 GEMMs in TensorRT against ORT's CPU kernels, and thresholds that may
# flip an activation at the boundary; the logits' absolute error stays well inside these.
TOLERANCES = {"float16": ("2e-2", "2e-2"), "float32": ("1e-4", "1e-4")}


def feed(export_dir: Path, graph: str, batch: int = 1, max_len: int = 64, seq: int = 8, seed: int = 0
         ) -> dict[str, np.ndarray]:
    """One input of every name in the graph's contract, with the contract's dtypes and shapes."""
    from clada_export.export.onnx_export import read_manifest

    manifest = read_manifest(export_dir)
    cfg, dtype = manifest["config"], manifest["dtype"]
    L = cfg["num_layers"]
    if not 1 <= seq < max_len:
        raise UserError(f"seq must be in [1, max_len={max_len}), got {seq}")
    rng = np.random.default_rng(seed)
    thresholds = np.zeros((L, 2), np.float32)
    default = export_dir / C.DEFAULT_THRESHOLDS_FILE
    if default.is_file():
        thresholds = np.load(default).astype(np.float32).reshape(L, 2)
    values = {
        "input_ids": rng.integers(0, cfg["vocab_size"], (batch, seq if graph == C.PREFILL else 1)),
        "seq_lens": rng.integers(1, seq + 1, (batch,)),
        "position": rng.integers(seq, max_len, (batch,)),
        "thresholds": np.repeat(thresholds[:, None], batch, axis=1),
    }
    out = {}
    for spec in C.graph_inputs(graph, L, cfg["num_kv_heads"], cfg["head_dim"], dtype):
        if spec.name in values:
            out[spec.name] = values[spec.name].astype(spec.dtype)
        else:  # a cache: filled, so attention reads real values
            shape = (batch, cfg["num_kv_heads"], max_len, cfg["head_dim"])
            out[spec.name] = (0.5 * rng.standard_normal(shape)).astype(spec.dtype)
    return out


def command(export_dir: Path, graph: str, inputs: Path, shapes: dict[str, tuple[int, ...]], plugin: Path,
            dtype: str) -> list[str]:
    """The ``polygraphy run`` command comparing ONNX Runtime and TensorRT on ``inputs``."""
    atol, rtol = TOLERANCES[dtype]
    return ["polygraphy", "run", str(export_dir / f"{graph}.onnx"), "--onnxrt", "--trt",
            "--plugins", str(plugin), "--load-inputs", str(inputs),
            "--input-shapes", *[f"{n}:[{','.join(str(d) for d in s)}]" for n, s in shapes.items()],
            "--atol", atol, "--rtol", rtol, "--check-error-stat", "max"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m clada_export.export.polygraphy_check",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("export_dir", metavar="OUT")
    p.add_argument("--graph", choices=C.GRAPHS, default=C.DECODE)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--max-len", type=int, default=64, help="KV cache slots")
    p.add_argument("--seq", type=int, default=8, help="prompt tokens (prefill) / earliest decode position")
    p.add_argument("--plugin", default=None, help=f"{STATIC_PLUGIN_NAME} (default: beside the plugin the build finds)")
    p.add_argument("--run", action="store_true", help="run the comparison and exit with polygraphy's code")
    args = p.parse_args(argv)
    try:
        from polygraphy.json import save_json
    except ImportError:
        print("error: Polygraphy is not installed: pip install polygraphy", file=sys.stderr)
        return 2
    from clada_export.export.onnx_export import read_manifest
    from clada_export.export.tensorrt import find_plugin_library

    export_dir = Path(args.export_dir)
    try:
        dtype = read_manifest(export_dir)["dtype"]
        plugin = Path(args.plugin) if args.plugin else None
        if plugin is None:
            found = find_plugin_library()
            plugin = found.with_name(STATIC_PLUGIN_NAME) if found else None
        if plugin is None or not plugin.is_file():
            raise UserError(f"{STATIC_PLUGIN_NAME} not found; build plugins/tensorrt where libnvinfer is found "
                            "(plugins/tensorrt/README.md) or pass --plugin")
        feeds = feed(export_dir, args.graph, args.batch, args.max_len, args.seq)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    inputs = export_dir / f"polygraphy_{args.graph}_inputs.json"
    save_json([feeds], str(inputs), description="clada export inputs")
    cmd = command(export_dir, args.graph, inputs, {n: v.shape for n, v in feeds.items()}, plugin, dtype)
    print(shlex.join(cmd))
    return subprocess.run(cmd).returncode if args.run else 0


if __name__ == "__main__":
    sys.exit(main())
