"""Building TensorRT engines from the exported graphs.

Real TensorRT (``import tensorrt``) is the target. Where it is absent, TensorRT-RTX
(``tensorrt_rtx``, from PyPI) parses and builds engines ahead of time on a CPU-only
machine: that proves a graph is TensorRT-ready in CI, though RTX engines don't run on
data-center GPUs. With the SparseMLP plugin library loaded (``plugins/tensorrt``),
the ``.plugin.onnx`` variant binds each SparseMLP node to the plugin; otherwise the
parser inlines the op's ONNX function body.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

from clada_export import contract as C
from clada_export.errors import UserError

PLUGIN_LIBRARY_ENV = "CLADA_TRT_PLUGIN"
_BUILT_PLUGIN = Path(__file__).resolve().parents[2] / "plugins" / "build" / "libclada_trt_plugin.so"

# (min, opt, max) of each symbolic dimension in the engines' optimization profile
DEFAULT_RANGES = {"batch": (1, 1, 8), "seq": (1, 128, 2048), "max_len": (16, 2048, 4096)}


def import_tensorrt() -> ModuleType:
    """``tensorrt`` if installed, else TensorRT-RTX; UserError naming both otherwise."""
    for name in ("tensorrt", "tensorrt_rtx", "tensorrt_rtx_bindings"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise UserError("TensorRT is not installed: install TensorRT (`import tensorrt`) to build engines, or "
                    "`pip install -e .[trt-check]` (TensorRT-RTX) to check graphs ahead of time")


def is_rtx(trt: ModuleType) -> bool:
    return trt.__name__.startswith("tensorrt_rtx")


def _concrete(shape, ranges: dict[str, tuple[int, int, int]], which: int, dim_names: list[str]) -> tuple[int, ...]:
    out = []
    for d, name in zip(shape, dim_names):
        out.append(d if d >= 0 else ranges[name][which])
    return tuple(out)


def build_engine(
    onnx_path: Path,
    graph: str,
    ranges: dict[str, tuple[int, int, int]] | None = None,
    fp16: bool = False,
    trt: ModuleType | None = None,
) -> bytes:
    """Parse ``onnx_path`` and build a serialized engine. Raises UserError with the
    parser's messages if the graph does not parse."""
    trt = trt or import_tensorrt()
    ranges = {**DEFAULT_RANGES, **(ranges or {})}
    logger = trt.Logger(trt.Logger.ERROR)
    builder = trt.Builder(logger)
    flags = 0
    if hasattr(trt, "NetworkDefinitionCreationFlag") and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    cwd = os.getcwd()
    try:  # external weights are resolved relative to the model file
        os.chdir(onnx_path.parent)
        ok = parser.parse_from_file(str(onnx_path.name))
    finally:
        os.chdir(cwd)
    if not ok:
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise UserError(f"TensorRT could not parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        names = _dim_names(tensor.name, graph, len(tensor.shape))
        profile.set_shape(tensor.name, *(_concrete(tensor.shape, ranges, w, names) for w in range(3)))
    config.add_optimization_profile(profile)
    if fp16 and not flags and hasattr(trt.BuilderFlag, "FP16"):
        config.set_flag(trt.BuilderFlag.FP16)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise UserError(f"TensorRT parsed {onnx_path.name} but could not build an engine (see the log above)")
    return bytes(engine)


def _dim_names(name: str, graph: str, rank: int) -> list[str]:
    """Symbolic dimension names of an input, from the I/O contract."""
    specs = {s.name: s for s in C.graph_inputs(graph, 1, 1, 1)}
    key = name if name in specs else (C.past_key(0) if name.startswith("past_") else name)
    spec = specs[key]
    return [d if isinstance(d, str) else "" for d in spec.shape][:rank]


def find_plugin_library() -> Path | None:
    """libclada_trt_plugin.so: ``$CLADA_TRT_PLUGIN``, else the CMake build in plugins/build, else None."""
    path = os.environ.get(PLUGIN_LIBRARY_ENV)
    if path:
        if not Path(path).is_file():
            raise UserError(f"{PLUGIN_LIBRARY_ENV}={path} does not exist; build plugins/tensorrt "
                            "(see plugins/tensorrt/README.md) or unset it")
        return Path(path)
    return _BUILT_PLUGIN if _BUILT_PLUGIN.is_file() else None


@contextlib.contextmanager
def sparse_mlp_plugin(trt: ModuleType, library: Path):
    """The SparseMLP plugin registered for the duration. Parse and build ``*.plugin.onnx``
    inside; parse graphs whose function body should be inlined (prefill) outside: the
    parser prefers a registered plugin over a node's body."""
    if is_rtx(trt):  # TensorRT-RTX has no plugin layers; its parser aborts the process on one
        raise UserError("the SparseMLP plugin needs TensorRT; TensorRT-RTX cannot build *.plugin.onnx")
    registry = trt.get_plugin_registry()
    handle = registry.load_library(str(library))
    if handle is None or registry.get_creator(C.OP_NAME, str(C.OP_VERSION), "") is None:
        raise UserError(f"could not load the SparseMLP TensorRT plugin from {library}")
    try:
        yield
    finally:
        registry.deregister_library(handle)


def build_engines(export_dir: Path, on_step: Callable[[str], None] | None = None, fp16: bool = False) -> list[Path]:
    """Build ``<graph>.engine`` for both graphs of an export (RTX engines get the suffix
    ``.rtx.engine``), written beside the ONNX files, temp-then-rename. The decode engine
    binds SparseMLP to the plugin where real TensorRT, the plugin library and a float16
    export come together; otherwise (and always for prefill, which is compute-bound)
    TensorRT inlines the op's ONNX function body."""
    from clada_export.export.onnx_export import read_manifest

    trt = import_tensorrt()
    manifest = read_manifest(export_dir)
    library = find_plugin_library()
    written = []
    for graph in C.GRAPHS:
        use_plugin = (graph == C.DECODE and library is not None and not is_rtx(trt)
                      and manifest["dtype"] == "float16")
        if on_step:
            on_step(f"building {graph} engine ({trt.__name__}{', SparseMLP plugin' if use_plugin else ''})")
        if use_plugin:
            with sparse_mlp_plugin(trt, library):
                blob = build_engine(Path(export_dir) / manifest["graphs"][graph]["plugin_onnx"], graph,
                                    fp16=fp16, trt=trt)
        else:
            blob = build_engine(Path(export_dir) / manifest["graphs"][graph]["onnx"], graph, fp16=fp16, trt=trt)
        path = Path(export_dir) / f"{graph}{'.rtx' if is_rtx(trt) else ''}.engine"
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(blob)
        os.replace(tmp, path)
        written.append(path)
    return written
