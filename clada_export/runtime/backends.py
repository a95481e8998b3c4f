"""Backends: what runs a prefill or a decode step. The Generator talks only to this
interface: the torch backend runs our Decoder eagerly, the onnxruntime backend the
exported graphs, the cuda backend our Decoder's weights through the CUDA kernels with
each decode step replayed from a captured CUDA graph (runtime/cuda_graph.py).

Outputs are torch tensors on ``backend.device``: the sampler runs there, and only token
ids and a few scalars per sequence go to the host. Inputs may be on the host or on
``backend.device``; each backend copies them in its own way.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from clada_export import contract as C
from clada_export.runtime import BACKENDS
from clada_export.export.graphs import DecodeGraph, PrefillGraph
from clada_export.model.llama import Decoder


@dataclass
class StepResult:
    """``logits [B, vocab]`` float32 (each sequence's last real token), ``entropy [B]``
    and ``logsumexp [B]`` in nats, ``act_stats [L, B, 2]`` after prefill only.
    ``greedy``: where the backend computes the greedy pick inside the step (the cuda
    backend's graphs), a call that waits for it and returns ``float64 [B, 4]``: token id,
    entropy, logsumexp and the picked logit (the Generator's one read per greedy step)."""

    logits: torch.Tensor
    entropy: torch.Tensor
    logsumexp: torch.Tensor
    act_stats: torch.Tensor | None = None
    greedy: Callable[[], np.ndarray] | None = None


class Backend(abc.ABC):
    num_layers: int
    vocab_size: int
    device: torch.device

    @abc.abstractmethod
    def start(self, batch: int, max_len: int) -> None:
        """Allocate (or clear) the KV cache for ``batch`` sequences of ``max_len`` slots."""

    @abc.abstractmethod
    def prefill(self, input_ids: torch.Tensor, seq_lens: torch.Tensor, thresholds: torch.Tensor) -> StepResult:
        """``input_ids [B, T]`` right-padded, ``seq_lens [B]``, ``thresholds [L, B, 2]``."""

    @abc.abstractmethod
    def decode(self, tokens: torch.Tensor, position: torch.Tensor, thresholds: torch.Tensor) -> StepResult:
        """``tokens [B]`` written at cache slot ``position [B]``."""


class TorchBackend(Backend):
    """Our Decoder in PyTorch, eager, through the same wrappers the exporter traces.

    ``mlp``: what runs the MLPs of decode steps. ``"cpu-kernel"``: the CPU SparseMLP kernel
    (plugins/cpu), which reads only the weight rows the thresholds keep; ``"reference"``: the
    reference op (dense products, then masks); ``"auto"``: the kernel for a float32 model on
    the CPU when its library loads, else the reference, with the reason in ``mlp_note``.
    Prefill always runs the reference op (dense thresholds, many token rows: GEMMs)."""

    def __init__(self, model: Decoder, device: str | torch.device = "cpu", mlp: str = "auto"):
        self.model = model.to(device).eval()
        self.device = torch.device(device)
        self.num_layers = model.cfg.num_layers
        self.vocab_size = model.cfg.vocab_size
        self._prefill = PrefillGraph(self.model)
        self.mlp, self.mlp_note = self._choose_mlp(mlp)
        self.mlp_rows_read = torch.zeros(2, dtype=torch.int64)
        """Weight rows the CPU kernel read, summed over layers and steps: [gate/up rows, down rows]."""
        if self.mlp == "cpu-kernel":
            from clada_export.runtime.cpu_mlp import with_cpu_mlp

            self._decode = DecodeGraph(with_cpu_mlp(self.model, self.mlp_rows_read))
        else:
            self._decode = DecodeGraph(self.model)
        self._caches: list[torch.Tensor] = []

    def _choose_mlp(self, mlp: str) -> tuple[str, str | None]:
        from clada_export.ops.cpu_kernel import CpuKernelUnavailable, load_library

        if mlp not in ("auto", "cpu-kernel", "reference"):
            raise ValueError(f"mlp must be auto, cpu-kernel or reference, got {mlp!r}")
        if not self.model.cfg.gated_mlp:
            # the CPU kernel computes the gated form only: a plain-MLP model runs the reference op
            if mlp == "cpu-kernel":
                raise ValueError(f"the CPU SparseMLP kernel runs gated MLPs; this {self.model.cfg.model_type} model's "
                                 "MLP is plain (act(x W1 + b1) W2 + b2): use mlp='reference'")
            return "reference", (None if mlp == "reference" else
                                 "the CPU SparseMLP kernel runs gated MLPs; this model's MLP is plain")
        if mlp != "auto":
            return mlp, None
        dtype = self.model.layers[0].mlp.w_gate_t.dtype
        if self.device.type != "cpu" or dtype != torch.float32:
            return "reference", f"the CPU SparseMLP kernel runs float32 on the CPU, not {dtype} on {self.device}"
        try:
            load_library()
        except CpuKernelUnavailable as e:
            return "reference", str(e)
        return "cpu-kernel", None

    def start(self, batch: int, max_len: int) -> None:
        k, v = self.model.new_cache(batch, max_len, device=self.device)
        self._caches = [t for pair in zip(k, v) for t in pair]

    @torch.no_grad()
    def prefill(self, input_ids, seq_lens, thresholds):
        out = self._prefill(input_ids.to(self.device), seq_lens.to(self.device), thresholds.to(self.device),
                            *self._caches)
        self._caches = list(out[4:])
        return StepResult(out[0], out[1], out[2], out[3])

    @torch.no_grad()
    def decode(self, tokens, position, thresholds):
        out = self._decode(tokens.to(self.device)[:, None], position.to(self.device), thresholds.to(self.device),
                           *self._caches)
        self._caches = list(out[3:])
        return StepResult(out[0], out[1], out[2])


class CudaBackend(Backend):
    """The GPU fast path: prefill is the model's own forward (eager); each decode step
    replays one captured CUDA graph of :class:`~clada_export.runtime.cuda_graph.DecodePath`
    (SparseMLP and decode-attention kernels, or dense GEMMs where they are faster). One
    graph set is captured per (batch, max_len) and kept; the model is not modified.

    ``mlp``: ``"auto"`` (the never-slower-than-dense rule), ``"kernel"``, ``"dense"`` or
    ``"plain"`` (dense, thresholds ignored: a benchmark baseline)."""

    def __init__(self, model: Decoder, mlp: str = "auto", compile: bool = False, path=None,
                 dense_layout: str = "auto"):
        """``path``: a :class:`~clada_export.runtime.cuda_graph.DecodePath` of ``model`` to
        share (its converted weights) with another backend, e.g. a benchmark's dense one;
        ``dense_layout``: the dense GEMMs' weights (``DecodePath``: auto, linear or kernel)."""
        from clada_export.runtime.cuda_graph import DecodePath

        self.model = model.eval()
        self.path = path if path is not None else DecodePath(self.model, dense_fallback=mlp != "kernel",
                                                              dense_layout=dense_layout)
        self.device = self.path.device
        self.mlp, self.compile = mlp, compile
        self.num_layers = model.cfg.num_layers
        self.vocab_size = model.cfg.vocab_size
        self._prefill = PrefillGraph(self.model)
        self._graphs: dict[tuple[int, int], object] = {}
        self.graph = None
        """The :class:`~clada_export.runtime.cuda_graph.CudaGraphDecode` of the current
        generation (its ``variants`` and ``fractions`` say what each step ran and read)."""

    def start(self, batch: int, max_len: int) -> None:
        from clada_export.runtime.cuda_graph import CudaGraphDecode

        key = (batch, max_len)
        if key not in self._graphs:  # capture once per shape; the caches belong to the graphs
            self._graphs[key] = CudaGraphDecode(self.path, batch, max_len, mlp=self.mlp, compile=self.compile)
        self.graph = self._graphs[key]
        self.graph.reset()

    @torch.no_grad()
    def prefill(self, input_ids, seq_lens, thresholds):
        g = self.graph
        caches = [t for pair in zip(g.k, g.v) for t in pair]
        out = self._prefill(input_ids.to(self.device), seq_lens.to(self.device), thresholds.to(self.device), *caches)
        for static, new in zip(caches, out[4:]):
            static.copy_(new)
        return StepResult(out[0], out[1], out[2], out[3])

    @torch.no_grad()
    def decode(self, tokens, position, thresholds):
        logits, entropy, lse = self.graph.step(tokens, position, thresholds)  # copied straight into its buffers
        return StepResult(logits, entropy, lse, greedy=self.graph.greedy)


class OnnxRuntimeBackend(Backend):
    """The exported graphs (with SparseMLP function bodies) in ONNX Runtime."""

    def __init__(self, export_dir: str | Path, providers: list[str] | None = None, threads: int | None = None):
        import onnxruntime as ort

        from clada_export.export.onnx_export import read_manifest

        export_dir = Path(export_dir)
        manifest = read_manifest(export_dir)
        cfg = manifest["config"]
        self.num_layers = cfg["num_layers"]
        self.vocab_size = cfg["vocab_size"]
        self._cache_shape = (cfg["num_kv_heads"], cfg["head_dim"])
        self._cache_dtype = np.dtype(manifest["dtype"])
        self.device = torch.device("cpu")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        providers = providers or ["CPUExecutionProvider"]
        self._sessions = {
            g: ort.InferenceSession(str(export_dir / manifest["graphs"][g]["onnx"]), options, providers=providers)
            for g in C.GRAPHS
        }
        self._caches: dict[str, np.ndarray] = {}

    def start(self, batch: int, max_len: int) -> None:
        shape = (batch, self._cache_shape[0], max_len, self._cache_shape[1])
        self._caches = {}
        for i in range(self.num_layers):
            self._caches[C.past_key(i)] = np.zeros(shape, self._cache_dtype)
            self._caches[C.past_value(i)] = np.zeros(shape, self._cache_dtype)

    def _run(self, graph: str, feeds: dict[str, np.ndarray]) -> StepResult:
        session = self._sessions[graph]
        names = [o.name for o in session.get_outputs()]
        outputs = dict(zip(names, session.run(None, {**feeds, **self._caches})))
        for i in range(self.num_layers):
            self._caches[C.past_key(i)] = outputs[C.present_key(i)]
            self._caches[C.past_value(i)] = outputs[C.present_value(i)]
        stats = outputs.get("act_stats")
        return StepResult(
            torch.from_numpy(outputs["logits"]), torch.from_numpy(outputs["entropy"]),
            torch.from_numpy(outputs["logsumexp"]), None if stats is None else torch.from_numpy(stats),
        )

    def prefill(self, input_ids, seq_lens, thresholds):
        return self._run(C.PREFILL, {
            "input_ids": input_ids.cpu().numpy().astype(np.int64),
            "seq_lens": seq_lens.cpu().numpy().astype(np.int64),
            "thresholds": thresholds.cpu().numpy().astype(np.float32),
        })

    def decode(self, tokens, position, thresholds):
        return self._run(C.DECODE, {
            "input_ids": tokens.cpu().numpy().astype(np.int64)[:, None],
            "position": position.cpu().numpy().astype(np.int64),
            "thresholds": thresholds.cpu().numpy().astype(np.float32),
        })


def default_backend(manifest: dict, device: str | None = None) -> tuple[str, str | None]:
    """The backend ``generate`` runs when none is named, and a note when a faster one was
    passed over: cuda on an NVIDIA GPU with the kernel library (the export's checkpoint
    is needed), else torch (on a CPU it decodes through the CPU SparseMLP kernel), and
    onnxruntime when the checkpoint is gone. On a CPU, ``generate`` then times torch against
    onnxruntime over a few decode steps and runs the faster
    (:func:`clada_export.runtime.choose_backend.choose_faster`)."""
    source = manifest.get("source")
    if not source or not Path(source).is_dir():
        return "onnxruntime", None
    if device not in (None, "cuda") and not str(device).startswith("cuda"):
        return "torch", None
    if not torch.cuda.is_available():
        return "torch", None
    from clada_export.ops.native import NativeKernelsUnavailable, load_library

    try:
        load_library()
    except NativeKernelsUnavailable as e:
        return "torch", f"the GPU runs the torch backend (reference op, no sparse kernels): {e}"
    return "cuda", None


def open_backend(name: str, export_dir: str | Path, manifest: dict, *, device: str | None = None,
                 dtype: str | None = None) -> Backend:
    """The backend ``name`` for the export in ``export_dir`` (its manifest already read).

    ``device`` and ``dtype`` apply to backends that load the checkpoint (torch, cuda);
    ``None`` means the backend's default (torch: cuda if available, else cpu, in the
    checkpoint's float32; cuda: bfloat16). Raises :class:`UserError` with what to do when
    the backend cannot run here.
    """
    from clada_export.errors import UserError

    if name not in BACKENDS:
        raise UserError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if name == "onnxruntime":
        return OnnxRuntimeBackend(export_dir)
    if name == "tensorrt":
        from clada_export.runtime.tensorrt_backend import TensorRTBackend

        return TensorRTBackend(export_dir, device=device or "cuda")
    source = manifest.get("source")
    if not source or not Path(source).is_dir():
        raise UserError(f"the {name} backend loads the checkpoint this export came from ({source}), which is "
                        "not there any more; use --backend onnxruntime or re-export")
    if name == "cuda":
        return open_cuda_backend(Path(source), device=device, dtype=dtype)
    from clada_export.model.loading import load_decoder

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, _ = load_decoder(Path(source), device=device)
    if dtype is not None:
        model = model.to(getattr(torch, dtype))
    return TorchBackend(model, device)


def open_cuda_backend(checkpoint: Path, *, device: str | None = None, dtype: str | None = None,
                      mlp: str = "auto", compile: bool = False, dense_layout: str = "auto") -> CudaBackend:
    """The cuda backend on a checkpoint directory, with one-line errors (UserError) for a
    missing GPU, a missing kernel library, or a dtype or model shape it does not run."""
    from clada_export.errors import UserError
    from clada_export.model.loading import load_decoder
    from clada_export.ops.native import NativeKernelsUnavailable, load_library
    from clada_export.runtime.cuda_graph import DTYPES, DecodePathUnsupported

    if not torch.cuda.is_available():
        raise UserError("the cuda backend needs an NVIDIA GPU and a CUDA build of torch (torch.cuda.is_available() "
                        "is False here); use --backend torch or onnxruntime")
    dtype = dtype or "bfloat16"
    if dtype not in DTYPES:
        raise UserError(f"the cuda backend runs {' or '.join(DTYPES)} weights, not {dtype!r}; pass --dtype bfloat16")
    device = device or "cuda"
    if torch.device(device).type != "cuda":
        raise UserError(f"the cuda backend runs on a CUDA device, not {device!r}; use --backend torch for the CPU")
    try:
        load_library()
    except NativeKernelsUnavailable as e:
        raise UserError(str(e)) from None
    model, _ = load_decoder(checkpoint, dtype=DTYPES[dtype], device=device)
    try:
        return CudaBackend(model, mlp=mlp, compile=compile, dense_layout=dense_layout)
    except DecodePathUnsupported as e:
        raise UserError(f"{e}; use --backend torch") from None
