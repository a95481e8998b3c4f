"""Building TensorRT engines from the exported graphs.

Real TensorRT (``import tensorrt``, 10.x or 11.x) is the target. Where it is absent,
TensorRT-RTX (``tensorrt_rtx``, from PyPI) parses and builds engines ahead of time on a
CPU-only machine: that proves a graph is TensorRT-ready in CI, though RTX engines don't
run on data-center GPUs. With the SparseMLP plugin library loaded (``plugins/tensorrt``),
the ``.plugin.onnx`` variant binds each SparseMLP node to the plugin; otherwise the
parser inlines the op's ONNX function body.

Precision. Networks are built strongly typed (TensorRT 11 knows nothing else, and
TensorRT 10 deprecates the alternative), so the engine computes in the export's dtype:
``fp32`` from a float32 export, ``fp16`` from a float16 export. The other combinations
(``fp16`` or ``bf16`` from a float32 export) need the weakly typed builder flags that only
TensorRT 10 still has; elsewhere they are a UserError naming the export to make instead.

Each build writes ``<graph>.engine`` (``.rtx.engine`` for TensorRT-RTX) and one
``engines.json`` beside the graphs: what was built, with which ranges, precision and
plugin. The runtime (``runtime/tensorrt_backend.py``) reads it to check shapes before it
binds anything and to know whether the plugin library must be loaded.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType

from clada_export import contract as C
from clada_export.atomic import write_json
from clada_export.errors import UserError

PLUGIN_LIBRARY_ENV = "CLADA_TRT_PLUGIN"
PLUGIN_LIBRARY_NAME = "libclada_trt_plugin.so"

ENGINES_FILE = "engines.json"
ENGINES_FORMAT = "clada-engines"
ENGINES_VERSION = 1
PRECISIONS = ("fp32", "fp16", "bf16")
_EXPORT_PRECISION = {"float32": "fp32", "float16": "fp16"}

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


def engine_file(graph: str, trt: ModuleType) -> str:
    return f"{graph}{'.rtx' if is_rtx(trt) else ''}.engine"


def ranges_for(max_batch: int, max_seq: int) -> dict[str, tuple[int, int, int]]:
    """The profile for up to ``max_batch`` sequences of up to ``max_seq`` tokens (prompt and
    generated): prefill tokens and cache slots both range up to ``max_seq``; the builder
    tunes for one sequence, a 128-token prompt and a full cache."""
    if max_batch < 1:
        raise UserError(f"max_batch must be >= 1, got {max_batch}")
    if max_seq < 2:
        raise UserError(f"max_seq must be >= 2, got {max_seq}")
    return {"batch": (1, 1, max_batch), "seq": (1, min(128, max_seq), max_seq),
            "max_len": (min(16, max_seq), max_seq, max_seq)}


@dataclass(frozen=True)
class NetworkIO:
    """One input or output of a built network: the name, TensorRT's dtype name, its dims
    (-1 where symbolic) and, for inputs, the profile's (min, opt, max) shapes."""

    name: str
    is_input: bool
    dtype: str
    shape: tuple[int, ...]
    profile: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]] | None = None


@dataclass
class BuiltEngine:
    graph: str
    file: str
    precision: str
    plugin: bool
    ranges: dict[str, tuple[int, int, int]]
    io: list[NetworkIO] = field(default_factory=list)


def _concrete(shape, ranges: dict[str, tuple[int, int, int]], which: int, dim_names: list[str]) -> tuple[int, ...]:
    out = []
    for d, name in zip(shape, dim_names):
        out.append(d if d >= 0 else ranges[name][which])
    return tuple(out)


def _network_flags(trt: ModuleType, strongly_typed: bool) -> int:
    flag = getattr(getattr(trt, "NetworkDefinitionCreationFlag", None), "STRONGLY_TYPED", None)
    return (1 << int(flag)) if strongly_typed and flag is not None else 0


def _weak_typing_flag(trt: ModuleType, precision: str):
    """TensorRT 10's FP16/BF16 builder flag for a weakly typed build, or None where it is gone."""
    return getattr(trt.BuilderFlag, {"fp16": "FP16", "bf16": "BF16"}[precision], None)


def check_precision(precision: str, export_dtype: str, trt: ModuleType) -> bool:
    """Whether ``precision`` is built strongly typed (True) or weakly typed with TensorRT 10's
    builder flag (False); UserError where this TensorRT cannot build it from this export."""
    if precision not in PRECISIONS:
        raise UserError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    exported = _EXPORT_PRECISION.get(export_dtype)
    if precision == exported:
        return True
    if exported == "fp16":
        raise UserError(f"this export is float16, so its engines are fp16; for {precision} export again with "
                        "`clada-export export --dtype float32` (TensorRT builds strongly typed networks)")
    if _weak_typing_flag(trt, precision) is None:
        raise UserError(f"{trt.__name__} builds strongly typed networks only, so a float32 export gives fp32 "
                        f"engines; for {precision} use TensorRT 10 (its {precision.upper()} builder flag)"
                        + (", or fp16 from `clada-export export --dtype float16`" if precision == "fp16" else ""))
    return False


def build_engine(
    onnx_path: Path,
    graph: str,
    ranges: dict[str, tuple[int, int, int]] | None = None,
    precision: str | None = None,
    trt: ModuleType | None = None,
    timing_cache: Path | None = None,
    io: list[NetworkIO] | None = None,
) -> bytes:
    """Parse ``onnx_path`` and build a serialized engine. ``precision``: None (the graph's own
    types, strongly typed) or a weakly typed ``fp16``/``bf16`` (see :func:`check_precision`).
    ``timing_cache``: read if it exists and written back after the build (TensorRT only;
    TensorRT-RTX has none). ``io``: filled
    with the network's inputs and outputs as built. Raises UserError with the parser's
    messages if the graph does not parse."""
    trt = trt or import_tensorrt()
    ranges = {**DEFAULT_RANGES, **(ranges or {})}
    logger = trt.Logger(trt.Logger.ERROR)
    builder = trt.Builder(logger)
    flags = _network_flags(trt, strongly_typed=precision is None)
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
    shapes = {}
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        names = _dim_names(tensor.name, graph, len(tensor.shape))
        shapes[tensor.name] = tuple(_concrete(tensor.shape, ranges, w, names) for w in range(3))
        profile.set_shape(tensor.name, *shapes[tensor.name])
    config.add_optimization_profile(profile)
    if precision is not None:
        config.set_flag(_weak_typing_flag(trt, precision))
    cache = None
    if timing_cache is not None and not is_rtx(trt):  # TensorRT-RTX has none (its calls are no-ops)
        cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
    if io is not None:
        io.extend(_network_io(network, shapes))
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise UserError(f"TensorRT parsed {onnx_path.name} but could not build an engine (see the log above)")
    if cache is not None:
        _write_atomic(timing_cache, bytes(memoryview(cache.serialize())))
    return bytes(engine)


def _network_io(network, shapes: dict[str, tuple]) -> list[NetworkIO]:
    out = []
    for i in range(network.num_inputs):
        t = network.get_input(i)
        out.append(NetworkIO(t.name, True, t.dtype.name, tuple(t.shape), shapes[t.name]))
    for i in range(network.num_outputs):
        t = network.get_output(i)
        out.append(NetworkIO(t.name, False, t.dtype.name, tuple(t.shape)))
    return out


def _dim_names(name: str, graph: str, rank: int) -> list[str]:
    """Symbolic dimension names of an input, from the I/O contract."""
    specs = {s.name: s for s in C.graph_inputs(graph, 1, 1, 1)}
    key = name if name in specs else (C.past_key(0) if name.startswith("past_") else name)
    spec = specs[key]
    return [d if isinstance(d, str) else "" for d in spec.shape][:rank]


def find_plugin_library() -> Path | None:
    """libclada_trt_plugin.so, found as the kernel library is (``ops.native.find_library``):
    ``$CLADA_TRT_PLUGIN``, else the installed package's ``clada_export/lib``, else the
    repository's ``plugins/build``; None where there is none."""
    from clada_export.ops.native import find_library

    path = find_library(PLUGIN_LIBRARY_NAME, PLUGIN_LIBRARY_ENV)
    if path is not None and not path.is_file():
        raise UserError(f"{PLUGIN_LIBRARY_ENV}={path} does not exist; build plugins/tensorrt "
                        "(see plugins/tensorrt/README.md) or unset it")
    return path


def load_plugin_library(trt: ModuleType, library: Path):
    """Register the SparseMLP creator from ``library`` in TensorRT's plugin registry; returns
    the handle for ``deregister_library``."""
    if is_rtx(trt):  # TensorRT-RTX has no plugin layers; its parser aborts the process on one
        raise UserError("the SparseMLP plugin needs TensorRT; TensorRT-RTX cannot build or run *.plugin.onnx")
    registry = trt.get_plugin_registry()
    handle = registry.load_library(str(library))
    if handle is None or registry.get_creator(C.OP_NAME, str(C.OP_VERSION), "") is None:
        raise UserError(f"could not load the SparseMLP TensorRT plugin from {library}; rebuild plugins/tensorrt "
                        "against this TensorRT (see plugins/tensorrt/README.md)")
    return handle


@contextlib.contextmanager
def sparse_mlp_plugin(trt: ModuleType, library: Path):
    """The SparseMLP plugin registered for the duration. Parse and build ``*.plugin.onnx``
    inside; parse graphs whose function body should be inlined (prefill) outside: the
    parser prefers a registered plugin over a node's body."""
    handle = load_plugin_library(trt, library)
    try:
        yield
    finally:
        trt.get_plugin_registry().deregister_library(handle)


def build_engines(
    export_dir: Path,
    on_step: Callable[[str], None] | None = None,
    precision: str | None = None,
    max_batch: int | None = None,
    max_seq: int | None = None,
    timing_cache: Path | None = None,
    plugin: Path | None = None,
    trt: ModuleType | None = None,
) -> list[Path]:
    """Build ``<graph>.engine`` for both graphs of an export (RTX engines get the suffix
    ``.rtx.engine``) and ``engines.json``, written beside the ONNX files only once both built
    (nothing is left half-written on failure).

    ``precision``: fp32/fp16/bf16, default the export's dtype. ``max_batch``/``max_seq``:
    the profile's upper bounds (default :data:`DEFAULT_RANGES`). ``plugin``: the plugin
    library, default :func:`find_plugin_library`. The decode engine binds SparseMLP to the
    plugin where real TensorRT, the plugin library and a 16-bit precision come together;
    otherwise (and always for prefill, which is compute-bound) TensorRT inlines the op's
    ONNX function body."""
    from clada_export.export.onnx_export import read_manifest

    export_dir = Path(export_dir)
    trt = trt or import_tensorrt()
    manifest = read_manifest(export_dir)
    precision = precision or _EXPORT_PRECISION.get(manifest["dtype"], "fp32")
    strongly_typed = check_precision(precision, manifest["dtype"], trt)
    ranges = dict(DEFAULT_RANGES)
    if max_batch is not None or max_seq is not None:
        ranges = ranges_for(max_batch or DEFAULT_RANGES["batch"][2], max_seq or DEFAULT_RANGES["max_len"][2])
    library = plugin if plugin is not None else find_plugin_library()
    if plugin is not None and not plugin.is_file():
        raise UserError(f"plugin library {plugin} does not exist; build plugins/tensorrt (plugins/tensorrt/README.md)")
    blobs: dict[str, bytes] = {}
    built: list[BuiltEngine] = []
    for graph in C.GRAPHS:
        use_plugin = graph == C.DECODE and library is not None and not is_rtx(trt) and precision != "fp32"
        if on_step:
            on_step(f"building {graph} engine ({trt.__name__}, {precision}"
                    f"{', SparseMLP plugin' if use_plugin else ''})")
        files = manifest["graphs"][graph]
        io: list[NetworkIO] = []
        kwargs = dict(ranges=ranges, precision=None if strongly_typed else precision, trt=trt,
                      timing_cache=timing_cache, io=io)
        if use_plugin:
            with sparse_mlp_plugin(trt, library):
                blob = build_engine(export_dir / files["plugin_onnx"], graph, **kwargs)
        else:
            blob = build_engine(export_dir / files["onnx"], graph, **kwargs)
        blobs[graph] = blob
        built.append(BuiltEngine(graph, engine_file(graph, trt), precision, use_plugin, ranges, io))
    written = []
    for b in built:
        path = export_dir / b.file
        _write_atomic(path, blobs[b.graph])
        written.append(path)
    write_json(export_dir / ENGINES_FILE, {
        "format": ENGINES_FORMAT, "version": ENGINES_VERSION, "tensorrt": f"{trt.__name__} {trt.__version__}",
        "engines": {b.graph: asdict(b) for b in built},
    })
    return written


def read_engines(export_dir: Path) -> dict:
    """``engines.json`` of an export; UserError saying how to build it when absent."""
    path = Path(export_dir) / ENGINES_FILE
    if not path.is_file():
        raise UserError(f"{export_dir} has no TensorRT engines ({ENGINES_FILE}); build them with "
                        f"`clada-export build {export_dir}`")
    data = json.loads(path.read_text())
    if data.get("format") != ENGINES_FORMAT or data.get("version") != ENGINES_VERSION:
        raise UserError(f"{path} is not a version-{ENGINES_VERSION} {ENGINES_FORMAT} file; rebuild with "
                        f"`clada-export build {export_dir} --force`")
    return data


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
