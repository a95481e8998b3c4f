"""The ``clada-export`` command line. Each subcommand lives in its own module under
``clada_export/cli`` with an ``add_parsers(sub, add_model_arg)``; this file builds the
parser from them and turns a ``UserError`` into one line and exit code 2, and SIGINT or
SIGTERM into a clean stop (temporary output removed) with exit code 130 or 143."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import signal
import sys
import threading
from collections.abc import Iterator

from clada_export.errors import UserError

# one module per line, in the order `clada-export --help` lists their commands
SUBCOMMAND_MODULES = (
    "clada_export.cli.bench_cmd",
    "clada_export.cli.build_cmd",
    "clada_export.cli.calibrate_cmd",
    "clada_export.cli.eval_cmd",
    "clada_export.cli.export_cmd",
    "clada_export.cli.generate_cmd",
    "clada_export.cli.models_cmd",
    "clada_export.cli.report_cmd",
)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is, so the same cleanup as Ctrl-C runs."""


def _add_model_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None, metavar="MODEL",
                   help="Hugging Face checkpoint directory or a named model (`clada-export models list`; "
                        "default: SmolLM2-135M-Instruct)")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("clada-export")
    except PackageNotFoundError:
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clada-export",
        description="Calibrate CLADA activation-sparsity thresholds for a Hugging Face LLM, export it to ONNX "
                    "(each MLP one clada::SparseMLP op) and TensorRT, and generate with the threshold "
                    "controller in the loop.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).add_parsers(sub, _add_model_arg)
    return parser


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Terminated()

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def _close_progress_bars() -> None:
    """Clear any progress bar still open, so the error line is the last thing printed."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.leave = False
        bar.close()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with _sigterm_as_interrupt():
            args.func(args)
    except UserError as e:
        _close_progress_bars()
        print(f"clada-export {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        _close_progress_bars()
        print("terminated" if isinstance(e, Terminated) else "interrupted", file=sys.stderr)
        return 128 + (signal.SIGTERM if isinstance(e, Terminated) else signal.SIGINT)
    return 0


if __name__ == "__main__":
    sys.exit(main())
