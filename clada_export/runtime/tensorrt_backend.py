"""The ``tensorrt`` backend: the export's engines (``clada-export build``) in TensorRT 10/11.

Per generation, ``start`` allocates every buffer the engines read or write as torch CUDA
tensors: the token ids, positions and thresholds the engines read, the logits and
signals they write, and two sets of KV caches. A step copies the new tokens and the
controller's thresholds into the bound input buffers, points ``past_*`` at one cache set
and ``present_*`` at the other, and enqueues the engine with ``execute_async_v3`` on the
current torch stream; the next step swaps the two sets (ping-pong), so the cache never
leaves the device and is never copied by us. Engine inputs and outputs must not alias,
hence two sets rather than one updated in place.

What talks to TensorRT is :class:`EngineSession`: one engine and its execution context.
:class:`TrtEngineSession` is the real one; tests drive the backend's step logic through
a stand-in with the same methods (``tests/test_tensorrt_backend.py``).

The ``StepResult`` tensors are the backend's output buffers: valid until the next call.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch

from clada_export import contract as C
from clada_export.errors import UserError
from clada_export.runtime.backends import Backend, StepResult

INSTALL_HINT = ("the tensorrt backend needs NVIDIA TensorRT 10 or newer with a CUDA GPU: `pip install tensorrt` "
                "(matching your CUDA), then `clada-export build OUT`")

# TensorRT DataType names -> torch
TORCH_DTYPES = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT64": torch.int64,
                "INT32": torch.int32, "INT8": torch.int8, "BOOL": torch.bool}


class EngineSession(abc.ABC):
    """One deserialized engine and an execution context on it (optimization profile 0)."""

    input_names: tuple[str, ...]
    output_names: tuple[str, ...]

    @abc.abstractmethod
    def dtype(self, name: str) -> torch.dtype: ...

    @abc.abstractmethod
    def profile(self, name: str) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """(min, opt, max) shape of input ``name`` in profile 0."""

    @abc.abstractmethod
    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> None: ...

    @abc.abstractmethod
    def output_shape(self, name: str) -> tuple[int, ...]:
        """The shape of output ``name`` for the input shapes set."""

    @abc.abstractmethod
    def set_tensor_address(self, name: str, address: int) -> None: ...

    @abc.abstractmethod
    def execute_async(self, stream: int) -> None:
        """Enqueue the engine on CUDA stream ``stream`` (a ``cudaStream_t`` as an int)."""


class TrtEngineSession(EngineSession):
    """:class:`EngineSession` on TensorRT's Python API (10.x names, also in 11.x)."""

    def __init__(self, trt: ModuleType, runtime, path: Path):
        engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            raise UserError(f"TensorRT could not load {path} (built by another TensorRT, for another GPU, or "
                            "needing the SparseMLP plugin; see the log above); rebuild it with "
                            f"`clada-export build {path.parent} --force`")
        self.engine = engine
        self.context = engine.create_execution_context()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        is_input = {n: engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.input_names = tuple(n for n in names if is_input[n])
        self.output_names = tuple(n for n in names if not is_input[n])
        self._path = path

    def dtype(self, name):
        kind = self.engine.get_tensor_dtype(name).name
        if kind not in TORCH_DTYPES:
            raise UserError(f"{self._path}: tensor {name} has type {kind}, which the tensorrt backend does not bind")
        return TORCH_DTYPES[kind]

    def profile(self, name):
        return tuple(tuple(int(d) for d in s) for s in self.engine.get_tensor_profile_shape(name, 0))

    def set_input_shape(self, name, shape):
        if not self.context.set_input_shape(name, tuple(shape)):
            raise RuntimeError(f"{self._path}: TensorRT refused shape {list(shape)} for {name}")

    def output_shape(self, name):
        return tuple(int(d) for d in self.context.get_tensor_shape(name))

    def set_tensor_address(self, name, address):
        if not self.context.set_tensor_address(name, address):
            raise RuntimeError(f"{self._path}: TensorRT refused the address of {name}")

    def execute_async(self, stream):
        if not self.context.execute_async_v3(stream):
            raise RuntimeError(f"{self._path}: execute_async_v3 failed (see the TensorRT log)")


SessionFactory = Callable[[str, Path], EngineSession]  # (graph, engine file) -> session


def import_tensorrt_runtime() -> ModuleType:
    """``tensorrt`` (not TensorRT-RTX: its engines do not run on data-center GPUs) with a CUDA
    device to run on; a one-line UserError saying what to install otherwise."""
    try:
        import tensorrt as trt
    except ImportError:
        raise UserError(INSTALL_HINT) from None
    if not torch.cuda.is_available():
        raise UserError(f"no CUDA device: {INSTALL_HINT}")
    return trt


def tensorrt_sessions(trt: ModuleType, export_dir: Path, engines: dict, plugin: Path | None = None
                      ) -> SessionFactory:
    """The real session factory: loads the plugin library where an engine was built with it,
    and deserializes with one runtime."""
    from clada_export.export.tensorrt import find_plugin_library, load_plugin_library

    logger = trt.Logger(trt.Logger.WARNING)
    runtime = trt.Runtime(logger)
    if any(e.get("plugin") for e in engines["engines"].values()):
        library = plugin or find_plugin_library()
        if library is None:
            raise UserError(f"the decode engine in {export_dir} runs SparseMLP with the plugin, and "
                            "libclada_trt_plugin.so was not found: build plugins/tensorrt or set CLADA_TRT_PLUGIN")
        load_plugin_library(trt, library)  # stays registered: the engines need it while they live
    return lambda graph, path: TrtEngineSession(trt, runtime, path)


class TensorRTBackend(Backend):
    """The export's ``prefill.engine`` and ``decode.engine`` behind the :class:`Backend` interface.

    ``device``: the CUDA device the engines run on. ``plugin``: the plugin library (default:
    found like ``clada-export build`` finds it). ``sessions``: what opens an engine (default:
    TensorRT); tests pass a stand-in.
    """

    def __init__(self, export_dir: str | Path, device: str | torch.device = "cuda", plugin: Path | None = None,
                 sessions: SessionFactory | None = None):
        from clada_export.export.onnx_export import read_manifest
        from clada_export.export.tensorrt import read_engines

        trt = import_tensorrt_runtime() if sessions is None else None  # what to install comes first
        export_dir = Path(export_dir)
        manifest = read_manifest(export_dir)
        engines = read_engines(export_dir)
        cfg = manifest["config"]
        self.num_layers = cfg["num_layers"]
        self.vocab_size = cfg["vocab_size"]
        self.device = torch.device(device)
        self._export_dir = export_dir
        files = {}
        for graph in C.GRAPHS:
            entry = engines["engines"].get(graph)
            path = export_dir / entry["file"] if entry else None
            if path is None or not path.is_file():
                raise UserError(f"{export_dir} has no {graph} engine; build them with "
                                f"`clada-export build {export_dir} --force`")
            if sessions is None and path.name.endswith(".rtx.engine"):
                raise UserError(f"{path.name} is a TensorRT-RTX engine, a build check only; build engines with "
                                f"TensorRT: `clada-export build {export_dir} --force` ({INSTALL_HINT})")
            files[graph] = path
        open_session = sessions or tensorrt_sessions(trt, export_dir, engines, plugin)
        self._sessions = {g: open_session(g, files[g]) for g in C.GRAPHS}
        kv, hd = cfg["num_kv_heads"], cfg["head_dim"]
        for g, s in self._sessions.items():
            want_in = [t.name for t in C.graph_inputs(g, self.num_layers, kv, hd)]
            want_out = [t.name for t in C.graph_outputs(g, self.num_layers, kv, hd, self.vocab_size)]
            if set(s.input_names) != set(want_in) or set(s.output_names) != set(want_out):
                raise UserError(f"{files[g]} does not match the export's graphs (other inputs or outputs); "
                                f"rebuild it with `clada-export build {export_dir} --force`")
        self._cache_dtype = self._sessions[C.DECODE].dtype(C.past_key(0))
        lo, _, hi = self._sessions[C.DECODE].profile(C.past_key(0))
        p_lo, _, p_hi = self._sessions[C.PREFILL].profile(C.past_key(0))
        # both engines must take the cache shapes: the intersection of their profiles
        self._batch_range = (max(lo[0], p_lo[0]), min(hi[0], p_hi[0]))
        self._slots_range = (max(lo[2], p_lo[2]), min(hi[2], p_hi[2]))
        self._seq_max = self._sessions[C.PREFILL].profile("input_ids")[2][1]
        self._cache_shape = (kv, hd)
        self._batch = 0

    # ---------------------------------------------------------------- buffers
    def start(self, batch: int, max_len: int) -> None:
        (b_lo, b_hi), (s_lo, s_hi) = self._batch_range, self._slots_range
        if not (b_lo <= batch <= b_hi) or max_len > s_hi:
            raise UserError(f"the engines in {self._export_dir} take {b_lo}..{b_hi} sequences of up to {s_hi} "
                            f"tokens; this generation needs {batch} of {max_len}: rebuild with `clada-export build "
                            f"{self._export_dir} --max-batch {max(batch, b_hi)} --max-seq {max(max_len, s_hi)} --force`")
        slots = max(max_len, s_lo)  # slots past the last position are never attended to
        L, dev = self.num_layers, self.device
        shape = (batch, self._cache_shape[0], slots, self._cache_shape[1])
        if self._batch and tuple(self._caches[0][0].shape) == shape:
            for t in (*self._caches[0], *self._caches[1]):  # same shape as before: clear, keep the addresses
                t.zero_()
        else:
            self._caches = [[torch.zeros(shape, dtype=self._cache_dtype, device=dev) for _ in range(2 * L)]
                            for _ in range(2)]
        self._parity = 0  # caches[parity] is read (past_*), caches[1 - parity] written (present_*)
        self._thresholds = torch.zeros((L, batch, 2), dtype=torch.float32, device=dev)
        self._tokens = torch.zeros((batch, 1), dtype=torch.int64, device=dev)
        self._position = torch.zeros((batch,), dtype=torch.int64, device=dev)
        self._out = {
            "logits": torch.empty((batch, self.vocab_size), dtype=torch.float32, device=dev),
            "entropy": torch.empty((batch,), dtype=torch.float32, device=dev),
            "logsumexp": torch.empty((batch,), dtype=torch.float32, device=dev),
            "act_stats": torch.empty((L, batch, 2), dtype=torch.float32, device=dev),
        }
        self._batch = batch
        # the decode engine's shapes and its non-cache buffers are fixed for the generation
        self._bind(self._sessions[C.DECODE], {"input_ids": self._tokens, "position": self._position,
                                              "thresholds": self._thresholds})

    def _bind(self, session: EngineSession, inputs: dict[str, torch.Tensor]) -> None:
        """Set the shapes and addresses of ``inputs`` and the caches, and bind the outputs."""
        for name, t in {**inputs, **self._cache_io(session)[0]}.items():
            session.set_input_shape(name, tuple(t.shape))
            session.set_tensor_address(name, t.data_ptr())
        for name in session.output_names:
            t = self._out.get(name)
            if t is None:
                continue  # present_*: bound per step
            if session.output_shape(name) != tuple(t.shape):
                raise RuntimeError(f"engine output {name} has shape {list(session.output_shape(name))}, "
                                   f"expected {list(t.shape)}")
            session.set_tensor_address(name, t.data_ptr())

    def _cache_io(self, session: EngineSession) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        read, write = self._caches[self._parity], self._caches[1 - self._parity]
        past, present = {}, {}
        for i in range(self.num_layers):
            past[C.past_key(i)], past[C.past_value(i)] = read[2 * i], read[2 * i + 1]
            present[C.present_key(i)], present[C.present_value(i)] = write[2 * i], write[2 * i + 1]
        return past, present

    def _run(self, graph: str) -> None:
        session = self._sessions[graph]
        past, present = self._cache_io(session)
        for name, t in (*past.items(), *present.items()):
            session.set_tensor_address(name, t.data_ptr())
        stream = torch.cuda.current_stream(self.device).cuda_stream if self.device.type == "cuda" else 0
        session.execute_async(stream)
        self._parity ^= 1

    def _check_batch(self, n: int) -> None:
        if n != self._batch:
            raise ValueError(f"batch {n} does not match start({self._batch}, ...)")

    # ---------------------------------------------------------------- steps
    @torch.no_grad()
    def prefill(self, input_ids, seq_lens, thresholds):
        B, T = input_ids.shape
        self._check_batch(B)
        if T > self._seq_max:
            raise UserError(f"the prefill engine takes prompts of up to {self._seq_max} tokens, this one has {T}: "
                            f"rebuild with `clada-export build {self._export_dir} --max-seq {T} --force`")
        ids = input_ids.to(self.device, torch.int64)
        lens = seq_lens.to(self.device, torch.int64)
        self._thresholds.copy_(thresholds, non_blocking=True)
        self._bind(self._sessions[C.PREFILL], {"input_ids": ids, "seq_lens": lens, "thresholds": self._thresholds})
        self._prefill_inputs = (ids, lens)  # alive until the engine has read them
        self._run(C.PREFILL)
        o = self._out
        return StepResult(o["logits"], o["entropy"], o["logsumexp"], o["act_stats"])

    @torch.no_grad()
    def decode(self, tokens, position, thresholds):
        self._check_batch(tokens.shape[0])
        self._tokens.copy_(tokens.view(-1, 1), non_blocking=True)
        self._position.copy_(position, non_blocking=True)
        self._thresholds.copy_(thresholds, non_blocking=True)
        self._run(C.DECODE)
        o = self._out
        return StepResult(o["logits"], o["entropy"], o["logsumexp"])
