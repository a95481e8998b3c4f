"""The ``clada-export`` command line. Each subcommand lives in its own module under
``clada_export/cli``; this file only parses arguments and turns ``UserError`` into a
one-line message and exit code 2."""

from __future__ import annotations

import argparse
import sys

from clada_export.errors import UserError


def _add_model_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None, metavar="MODEL",
                   help="Hugging Face checkpoint directory (default: the bundled SmolLM2-135M-Instruct)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clada-export",
        description="Export CLADA activation-sparse LLMs to ONNX/TensorRT with cognitive-load-aware thresholds.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("export", help="trace a checkpoint into prefill/decode ONNX graphs (+ engine with TensorRT)")
    _add_model_arg(p)
    p.add_argument("-o", "--output", required=True, help="output directory (must not exist unless --force)")
    p.add_argument("--profile", help="sparsity profile from `clada-export calibrate` (embedded in the graphs)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16"], help="weights and activations")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
    p.add_argument("--engine", action="store_true",
                   help="also build TensorRT engines (needs tensorrt, or tensorrt_rtx for an ahead-of-time build)")

    p = sub.add_parser("info", help="print what an export directory holds")
    p.add_argument("export_dir", metavar="OUT")

    for add in _extra_parsers():
        add(sub, _add_model_arg)
    return parser


def _extra_parsers():
    import importlib

    adders = []
    for name in ("bench_cmd", "calibrate_cmd", "generate_cmd"):
        try:
            module = importlib.import_module(f"clada_export.cli.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"clada_export.cli.{name}":
                raise
            continue
        adders.append(module.add_parsers)
    return adders


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "export":
            from clada_export.cli.export_cmd import run_export

            run_export(args)
        elif args.command == "info":
            from clada_export.cli.export_cmd import run_info

            run_info(args)
        else:
            args.func(args)
    except UserError as e:
        print(f"clada-export {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
