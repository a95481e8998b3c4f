"""``clada-export build OUT``: TensorRT engines for an export (logic in export/tensorrt.py)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from clada_export import contract as C
from clada_export.export.tensorrt import DEFAULT_RANGES, ENGINES_FILE, PRECISIONS


def add_parsers(sub, add_model_arg) -> None:
    p = sub.add_parser(
        "build", help="build TensorRT engines for an export",
        description="Build the prefill and decode TensorRT engines of an export (OUT/<graph>.engine and "
                    "OUT/engines.json). The decode engine runs each SparseMLP with the plugin where TensorRT, "
                    "the plugin library and a 16-bit precision come together. Without TensorRT, TensorRT-RTX "
                    "(pip install -e .[trt-check]) builds <graph>.rtx.engine ahead of time as a check.")
    p.add_argument("export_dir", metavar="OUT", help="directory written by `clada-export export`")
    p.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="compute precision (default: the export's dtype; fp16/bf16 from a float32 export "
                        "need TensorRT 10)")
    p.add_argument("--max-batch", type=int, default=DEFAULT_RANGES["batch"][2],
                   help="most sequences per step the engines accept (default: %(default)s)")
    p.add_argument("--max-seq", type=int, default=DEFAULT_RANGES["max_len"][2],
                   help="most tokens (prompt + generated) per sequence: prefill length and KV cache slots "
                        "(default: %(default)s)")
    p.add_argument("--timing-cache", metavar="FILE", default=None,
                   help="TensorRT timing cache, read and updated (default: OUT/timing.cache)")
    p.add_argument("--plugin", metavar="LIB", default=None,
                   help="libclada_trt_plugin.so (default: $CLADA_TRT_PLUGIN, else the installed package's, else "
                        "plugins/build)")
    p.add_argument("--force", action="store_true", help="replace engines OUT already has")
    p.set_defaults(func=run_build)


def run_build(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    from clada_export.errors import UserError
    from clada_export.export.onnx_export import read_manifest
    from clada_export.export.tensorrt import build_engines, import_tensorrt, is_rtx

    if args.max_batch < 1:
        raise UserError(f"--max-batch must be >= 1, got {args.max_batch}")
    if args.max_seq < 2:
        raise UserError(f"--max-seq must be >= 2, got {args.max_seq}")
    out = Path(args.export_dir)
    read_manifest(out)  # a UserError naming the problem if OUT is no export
    if (out / ENGINES_FILE).exists() and not args.force:
        raise UserError(f"{out} already has engines ({ENGINES_FILE}); add --force to rebuild them")
    trt = import_tensorrt()  # fail before the slow part
    cache = Path(args.timing_cache) if args.timing_cache else out / "timing.cache"
    with tqdm(total=len(C.GRAPHS), desc="build", unit="engine", file=sys.stderr) as bar:
        started: list[str] = []

        def on_step(msg: str) -> None:  # called as each engine starts
            if started:
                bar.update()
            started.append(msg)
            bar.set_postfix_str(msg)

        written = build_engines(out, on_step=on_step, precision=args.precision, max_batch=args.max_batch,
                                max_seq=args.max_seq, timing_cache=cache,
                                plugin=Path(args.plugin) if args.plugin else None, trt=trt)
        bar.update(bar.total - bar.n)
    cached = "no timing cache (TensorRT-RTX has none)" if is_rtx(trt) else f"timing cache {cache}"
    print(f"wrote {', '.join(str(p) for p in written)} ({trt.__name__} {trt.__version__}; "
          f"batch <= {args.max_batch}, tokens <= {args.max_seq}; {cached})")
