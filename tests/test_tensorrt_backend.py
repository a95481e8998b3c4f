"""The tensorrt backend's step logic (shapes, bindings, KV-cache ping-pong, threshold writes)
against a stand-in for the engine session. Not a substitute for TensorRT: no engine runs.

The stand-in (:class:`OrtSession`) has the engine's interface and its rules: the I/O names,
types and optimization profile come from ``engines.json`` as ``clada-export build`` wrote
it (TensorRT-RTX here), a shape outside the profile is refused, every tensor must be bound
before ``execute_async``, bound buffers must not overlap. It computes by reading the bound
addresses, running the exported ONNX graph in ONNX Runtime and writing the outputs to the
bound addresses: the backend is right only if it bound the right buffer to each name,
set the right shapes, passed the caches from step to step and wrote the thresholds in.
"""

from __future__ import annotations

import ctypes
import shutil

import numpy as np
import pytest
import torch

from clada_export import contract as C
from clada_export.errors import UserError
from clada_export.export.tensorrt import build_engines, import_tensorrt, read_engines
from clada_export.runtime.backends import OnnxRuntimeBackend
from clada_export.runtime.controller import ControllerConfig, ThresholdController
from clada_export.runtime.generator import Generator
from clada_export.runtime.tensorrt_backend import TORCH_DTYPES, EngineSession, TensorRTBackend

MAX_BATCH, MAX_SEQ = 2, 48


def _view(address: int, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """The bound memory at ``address`` as a writable numpy array (CPU tensors in this test)."""
    n = int(np.prod(shape)) * np.dtype(dtype).itemsize
    return np.frombuffer((ctypes.c_char * n).from_address(address), dtype=dtype).reshape(shape)


class OrtSession(EngineSession):
    def __init__(self, export_dir, graph, io):
        import onnxruntime as ort

        self.graph = graph
        self.io = {t["name"]: t for t in io}
        self.input_names = tuple(t["name"] for t in io if t["is_input"])
        self.output_names = tuple(t["name"] for t in io if not t["is_input"])
        self.ort = ort.InferenceSession(str(export_dir / f"{graph}.onnx"), providers=["CPUExecutionProvider"])
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.addresses: dict[str, int] = {}
        self.log: list[dict] = []

    def dtype(self, name):
        return TORCH_DTYPES[self.io[name]["dtype"]]

    def profile(self, name):
        return tuple(tuple(s) for s in self.io[name]["profile"])

    def set_input_shape(self, name, shape):
        lo, _, hi = self.profile(name)
        if len(shape) != len(lo) or not all(a <= d <= b for a, d, b in zip(lo, shape, hi)):
            raise RuntimeError(f"shape {shape} of {name} outside the profile {lo}..{hi}")
        self.shapes[name] = tuple(shape)

    def output_shape(self, name):
        batch, slots = self.shapes["input_ids"][0], self.shapes[C.past_key(0)][2]
        dims = list(self.io[name]["shape"])
        free = [i for i, d in enumerate(dims) if d < 0]  # batch first, cache slots second
        for i, value in zip(free, (batch, slots)):
            dims[i] = value
        return tuple(dims)

    def set_tensor_address(self, name, address):
        assert name in self.io, name
        self.addresses[name] = address

    def _np_dtype(self, name):
        return torch.empty((), dtype=self.dtype(name)).numpy().dtype

    def execute_async(self, stream):
        assert stream == 0  # CPU tensors: no CUDA stream
        missing = set(self.io) - set(self.addresses)
        assert not missing, f"unbound: {sorted(missing)}"
        assert set(self.shapes) == set(self.input_names)
        shapes = {**self.shapes, **{n: self.output_shape(n) for n in self.output_names}}
        spans = sorted((self.addresses[n], self.addresses[n] + int(np.prod(shapes[n])) * self._np_dtype(n).itemsize, n)
                       for n in self.io)
        for (a0, a1, n), (b0, _, m) in zip(spans, spans[1:]):
            assert a1 <= b0, f"{n} and {m} overlap"
        feeds = {n: _view(self.addresses[n], shapes[n], self._np_dtype(n)).copy() for n in self.input_names}
        names = [o.name for o in self.ort.get_outputs()]
        for name, value in zip(names, self.ort.run(None, feeds)):
            _view(self.addresses[name], shapes[name], self._np_dtype(name))[...] = value
        self.log.append({"thresholds": feeds["thresholds"], "past": self.addresses[C.past_key(0)],
                         "present": self.addresses[C.present_key(0)]})


@pytest.fixture(scope="module")
def built_export(tiny_export, tmp_path_factory):
    """The tiny export with engines.json from a real build (TensorRT-RTX in CI)."""
    try:
        trt = import_tensorrt()
    except UserError as e:
        pytest.skip(f"no TensorRT or TensorRT-RTX to build engines.json ({e})")
    out = tmp_path_factory.mktemp("trt") / "export"
    shutil.copytree(tiny_export, out)
    build_engines(out, max_batch=MAX_BATCH, max_seq=MAX_SEQ, trt=trt)
    return out


def _backend(export_dir):
    io = {g: e["io"] for g, e in read_engines(export_dir)["engines"].items()}
    sessions = {}

    def factory(graph, path):
        assert path.is_file() and path.parent == export_dir
        sessions[graph] = OrtSession(export_dir, graph, io[graph])
        return sessions[graph]

    return TensorRTBackend(export_dir, device="cpu", sessions=factory), sessions


def _prompts():
    g = torch.Generator().manual_seed(5)
    return [torch.randint(0, 320, (9,), generator=g).tolist(), torch.randint(0, 320, (4,), generator=g).tolist()]


def test_steps_match_onnxruntime_with_the_controller(built_export, tiny_profile):
    backend, sessions = _backend(built_export)
    fed = []  # the thresholds the generator handed to each decode step
    decode = backend.decode
    backend.decode = lambda tok, pos, thr: (fed.append(thr.clone().numpy()), decode(tok, pos, thr))[1]
    results = []
    for b in (backend, OnnxRuntimeBackend(built_export)):
        factory = lambda batch: ThresholdController(tiny_profile, ControllerConfig(window=6, min_history=3),  # noqa: E731
                                                      batch=batch)
        results.append(Generator(b, controller_factory=factory).generate(_prompts(), 12))
    ours, ref = results
    assert ours.tokens == ref.tokens
    np.testing.assert_array_equal(ours.entropy, ref.entropy)
    np.testing.assert_array_equal(ours.sparsity, ref.sparsity)

    prefill, steps = sessions[C.PREFILL].log, sessions[C.DECODE].log
    assert len(prefill) == 1 and len(steps) == 11 == len(fed)
    # threshold writes: each step's engine read exactly what the controller chose, and the
    # controller moved them (a stale buffer would repeat one step's values)
    for seen, chosen in zip(steps, fed):
        np.testing.assert_array_equal(seen["thresholds"], chosen)
    assert len({s["thresholds"].tobytes() for s in steps}) > 1
    assert not prefill[0]["thresholds"].any()  # prefill runs dense
    # ping-pong: two cache sets, each step reads the one the previous step wrote
    runs = prefill + steps
    assert len({r["past"] for r in runs} | {r["present"] for r in runs}) == 2
    for before, after in zip(runs, runs[1:]):
        assert after["past"] == before["present"] != after["present"]


def test_refuses_shapes_outside_the_engines(built_export):
    backend, _ = _backend(built_export)
    with pytest.raises(UserError, match=f"1..{MAX_BATCH} sequences of up to {MAX_SEQ}.*--max-batch 3"):
        backend.start(MAX_BATCH + 1, 16)
    with pytest.raises(UserError, match="--max-seq 49"):
        backend.start(1, MAX_SEQ + 1)
    backend.start(1, 8)  # fewer slots than the profile's minimum: rounded up, not refused


def test_same_shape_keeps_the_cache_buffers(built_export):
    backend, _ = _backend(built_export)
    backend.start(2, 20)
    first = [t.data_ptr() for t in backend._caches[0]]
    backend._caches[0][0].fill_(1)
    backend.start(2, 20)
    assert [t.data_ptr() for t in backend._caches[0]] == first and not backend._caches[0][0].any()


def test_without_tensorrt_one_line_says_what_to_install(built_export, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` raises ImportError
    with pytest.raises(UserError, match=r"pip install tensorrt") as e:
        TensorRTBackend(built_export)
    assert "\n" not in str(e.value)


def test_rtx_engines_are_not_run(built_export, monkeypatch):
    """TensorRT-RTX engines are a build check; the real session factory refuses them."""
    import types

    monkeypatch.setitem(__import__("sys").modules, "tensorrt", types.ModuleType("tensorrt"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    if not read_engines(built_export)["engines"][C.DECODE]["file"].endswith(".rtx.engine"):
        pytest.skip("engines built with real TensorRT here")
    with pytest.raises(UserError, match="TensorRT-RTX engine, a build check only"):
        TensorRTBackend(built_export)
