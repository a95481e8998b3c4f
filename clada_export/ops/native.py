"""ctypes binding of ``libclada_kernels.so`` (plugins/kernels): the CUDA SparseMLP and the
fused decode attention.

``sparse_mlp_cuda(x, w_gate_t, w_up_t, w_down_t, thresholds, act)`` computes exactly the op
of :func:`clada_export.ops.sparse_mlp.sparse_mlp_reference` (same weight layout:
``w_gate_t``/``w_up_t`` ``[hidden, inter]``, ``w_down_t`` ``[inter, hidden]``; thresholds
``[B, 2]`` float32 on the device) for decode batches of up to 8 rows, bf16 or fp16, with
fp32 accumulation. It launches on ``torch.cuda.current_stream()`` and is registered as the
torch custom op ``clada::sparse_mlp_cuda``, so it can be captured in a CUDA graph (the
thresholds are read from device memory: update them in place between replays) and seen by
``torch.compile``.

``sparse_mlp_plain_cuda(x, w_in_t, b_in, w_out_t, b_out, thresholds, act)`` is the op's plain
(non-gated) form of GPT-2, OPT, GPT-NeoX style MLPs, ``act(x_s @ w_in_t + b_in)`` thresholded
by t_mid, then ``@ w_out_t + b_out`` (``clada_export.ops.sparse_mlp``'s plain reference),
custom op ``clada::sparse_mlp_plain_cuda``; ``act`` may also be ``"relu"`` (OPT), in both forms.

``decode_attention_cuda(q, k, v, position, k_cache, v_cache, inv_freq, ...)`` is one decode
step's attention for one new token per sequence (RoPE of q and k, k and v written into the
static cache at ``position``, grouped-query attention over the visible slots), custom op
``clada::decode_attention_cuda`` (it mutates the caches in place).

The library is found by :func:`find_library` (the environment variable, then the installed
package's ``clada_export/lib``, where ``pip install`` builds it when nvcc is present, then a
repository build in ``plugins/build``). There is no silent fallback: if it is missing,
calls raise :class:`NativeKernelsUnavailable` saying how to build it.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Callable
from pathlib import Path

import torch

from clada_export.ops.sparse_mlp import ACTIVATIONS, check_thresholds

PACKAGE_LIB_DIR = Path(__file__).resolve().parents[1] / "lib"
REPO_BUILD_DIR = Path(__file__).resolve().parents[2] / "plugins" / "build"
KERNELS_LIB = "libclada_kernels.so"
BUILD_COMMAND = (
    "pip install -e . (with nvcc and cmake on PATH: the install builds it into clada_export/lib), or from the "
    "repository root: cmake -S plugins -B plugins/build && cmake --build plugins/build -j"
)
ABI_VERSION = 9  # CLADA_KERNELS_ABI_VERSION (plugins/kernels/sparse_mlp.h)
FLAG_FUSED = 2  # CLADA_SPARSE_MLP_FLAG_FUSED: force the one-launch kernel (gated, batch 1-2)
FLAG_TWO_KERNEL = 4  # CLADA_SPARSE_MLP_FLAG_TWO_KERNEL: force the two split-K kernels
FLAG_NO_CLUSTER = 8  # CLADA_SPARSE_MLP_FLAG_NO_CLUSTER: the fused launch without clusters (as before sm_90)
MAX_BATCH = 8
MAX_HIDDEN = 8192

_DTYPES = {torch.float16: 0, torch.bfloat16: 1}
# clada_act_t of both libraries' C ABIs (plugins/kernels/sparse_mlp.h, plugins/cpu/sparse_mlp_cpu.h).
# relu (3) is the CUDA kernels' alone (ABI 6); the CPU library refuses it (ops/cpu_kernel.py).
ACT_CODES = {"silu": 0, "gelu_tanh": 1, "gelu": 2, "relu": 3}
assert set(ACTIVATIONS) <= set(ACT_CODES), "an activation of the reference op has no kernel code"


class NativeKernelsUnavailable(RuntimeError):
    """libclada_kernels.so could not be found or loaded."""


class _Config(ctypes.Structure):
    _fields_ = [
        ("gateup_splits", ctypes.c_int),
        ("down_rows_per_block", ctypes.c_int),
        ("flags", ctypes.c_int),
        ("reserved", ctypes.c_int * 5),
    ]


_lib: ctypes.CDLL | None = None
_lib_lock = threading.Lock()


def find_library(name: str, env_var: str) -> Path | None:
    """Where the shared library ``name`` is: ``$env_var`` if set (returned even if missing,
    so the error names it), else the installed package's ``clada_export/lib/name``, else a
    repository build ``plugins/build/name``; None when neither exists. The kernel library
    and the TensorRT plugin are both found this way."""
    env = os.environ.get(env_var)
    if env:
        return Path(env)
    for folder in (PACKAGE_LIB_DIR, REPO_BUILD_DIR):
        if (folder / name).is_file():
            return folder / name
    return None


def library_path() -> Path | None:
    return find_library(KERNELS_LIB, "CLADA_KERNELS_LIB")


def open_library(path: Path | None, what: str, where: str, env_var: str, abi_symbol: str, abi_version: int,
                 build_command: str, error: type[Exception]) -> ctypes.CDLL:
    """Load the library at ``path`` and check its ABI version (``abi_symbol()``), or raise
    ``error`` saying what is missing and how to build it. Both kernel libraries (CUDA, CPU)
    open this way."""
    if path is None or not path.is_file():
        raise error(f"{what} not found in {path or where} ({env_var} overrides). Build it with: {build_command}")
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as exc:
        raise error(f"cannot load {path}: {exc}. Rebuild with: {build_command}") from exc
    abi = getattr(lib, abi_symbol)
    abi.restype = ctypes.c_int
    abi.argtypes = []
    version = abi()
    if version != abi_version:
        raise error(f"{path} has ABI version {version}, this binding expects {abi_version}; "
                    f"rebuild with: {build_command}")
    return lib


def load_library() -> ctypes.CDLL:
    """Load (once) and return the kernel library; raise NativeKernelsUnavailable if absent."""
    global _lib
    if _lib is not None:
        return _lib
    with _lib_lock:
        if _lib is not None:
            return _lib
        lib = open_library(library_path(), f"CUDA kernel library {KERNELS_LIB}", f"{PACKAGE_LIB_DIR} or {REPO_BUILD_DIR}",
                           "CLADA_KERNELS_LIB", "clada_kernels_abi_version", ABI_VERSION, BUILD_COMMAND,
                           NativeKernelsUnavailable)
        lib.clada_sparse_mlp_workspace_size.restype = ctypes.c_size_t
        lib.clada_sparse_mlp_workspace_size.argtypes = [ctypes.c_int] * 3
        sparse_mlp_args = [ctypes.c_void_p] * 6 + [ctypes.c_int] * 5 + [
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_int,
            ctypes.c_void_p,
            ctypes.c_void_p,
        ]
        lib.clada_sparse_mlp.restype = ctypes.c_int
        lib.clada_sparse_mlp.argtypes = sparse_mlp_args
        lib.clada_sparse_mlp_counted.restype = ctypes.c_int
        # one more pointer, row_counts, before config and stream: the same types, one longer
        lib.clada_sparse_mlp_counted.argtypes = sparse_mlp_args + [ctypes.c_void_p]
        _declare_plain(lib)
        for name in ("clada_mask_input", "clada_gate_mask"):
            getattr(lib, name).restype = ctypes.c_int
        lib.clada_mask_input.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int] * 3 + [ctypes.c_void_p]
        lib.clada_gate_mask.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int] * 4 + [ctypes.c_void_p]
        lib.clada_decode_attention_supported.restype = ctypes.c_int
        lib.clada_decode_attention_supported.argtypes = [ctypes.c_int] * 3
        lib.clada_decode_attention_workspace_size.restype = ctypes.c_size_t
        lib.clada_decode_attention_workspace_size.argtypes = [ctypes.c_int] * 5
        lib.clada_decode_attention.restype = ctypes.c_int
        lib.clada_decode_attention.argtypes = (
            [ctypes.c_void_p] * 3 + [ctypes.c_longlong] * 3 + [ctypes.c_void_p, ctypes.c_float]
            + [ctypes.c_void_p] * 4 + [ctypes.c_int] * 6
            + [ctypes.c_float, ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
        )
        lib.clada_error_string.restype = ctypes.c_char_p
        lib.clada_error_string.argtypes = [ctypes.c_int]
        _lib = lib
        return lib


# clada_sparse_mlp_plain(x, w_in_t, b_in, w_out_t, b_out, thresholds, y, batch, hidden, inter, dtype, act,
#                        workspace, workspace_bytes, workspace_is_zeroed, row_counts, config, stream)
PLAIN_ARGTYPES = [ctypes.c_void_p] * 7 + [ctypes.c_int] * 5 + [
    ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
# clada_bias_act_mask(pre, b_in, thresholds, h, batch, inter, dtype, act, stream)
BIAS_ACT_MASK_ARGTYPES = [ctypes.c_void_p] * 4 + [ctypes.c_int] * 4 + [ctypes.c_void_p]


def _declare_plain(lib: ctypes.CDLL) -> None:
    """Signatures of the plain form's entry points (ABI 6; sparse_mlp.h)."""
    lib.clada_sparse_mlp_plain.restype = ctypes.c_int
    lib.clada_sparse_mlp_plain.argtypes = PLAIN_ARGTYPES
    lib.clada_bias_act_mask.restype = ctypes.c_int
    lib.clada_bias_act_mask.argtypes = BIAS_ACT_MASK_ARGTYPES


def is_available() -> bool:
    """True when the kernel library loads and a CUDA device is present."""
    if not torch.cuda.is_available():
        return False
    try:
        load_library()
    except NativeKernelsUnavailable:
        return False
    return True


# ------------------------------------------------------------------ workspace
# One persistent workspace per device and shape (each kernel's own key), sized by the
# library. It is zero-filled once; every call leaves it zeroed, so no memset is launched
# per call. Workspaces are never freed: a captured CUDA graph keeps pointing at them.
# Calls sharing a workspace must be ordered (one stream, as in a decode loop).
_workspaces: dict[tuple, tuple[torch.Tensor, bool]] = {}


def _workspace(device: torch.device, key: tuple, nbytes: Callable[[], int]) -> tuple[torch.Tensor, bool]:
    key = (device.index if device.index is not None else torch.cuda.current_device(), *key)
    entry = _workspaces.get(key)
    if entry is None:
        buf = torch.zeros(nbytes(), dtype=torch.uint8, device=device)
        # Allocated during stream capture, the zero-fill is only recorded, not run: such a
        # workspace is zero-filled by every call instead (correct everywhere, one memset).
        zeroed = not torch.cuda.is_current_stream_capturing()
        entry = (buf, zeroed)
        _workspaces[key] = entry
    return entry


_tuning = _Config()


def set_tuning(gateup_splits: int = 0, down_rows_per_block: int = 0, flags: int = 0) -> None:
    """Override the launch shapes (0 = automatic); for benchmarks and tuning. ``flags``: 0 (the
    library chooses), :data:`FLAG_FUSED` or :data:`FLAG_TWO_KERNEL`, and :data:`FLAG_NO_CLUSTER`
    (sparse_mlp.h); other bits and combinations are refused (tests pass them to check).
    Applies to later launches (a captured graph keeps the shapes it was captured with)."""
    _tuning.gateup_splits = int(gateup_splits)
    _tuning.down_rows_per_block = int(down_rows_per_block)
    _tuning.flags = int(flags)


def _check_act(act: str) -> None:
    if act not in ACT_CODES:
        raise ValueError(f"unsupported activation {act!r}; supported: {', '.join(ACT_CODES)}")


def _check(x, w_gate_t, w_up_t, w_down_t, thresholds, act) -> None:
    _check_act(act)
    if x.dtype not in _DTYPES:
        raise TypeError(f"sparse_mlp_cuda supports bfloat16 and float16, got {x.dtype}")
    for name, t in (("w_gate_t", w_gate_t), ("w_up_t", w_up_t), ("w_down_t", w_down_t)):
        if t.dtype != x.dtype:
            raise TypeError(f"{name} has dtype {t.dtype}, x has {x.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device}, x on {x.device}")
        if t.dim() != 2 or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous 2-D tensor, got shape {list(t.shape)}")
    if x.device.type != "cuda":
        raise ValueError(f"sparse_mlp_cuda needs CUDA tensors, got {x.device}")
    hidden = x.shape[-1]
    inter = w_gate_t.shape[1]
    if tuple(w_gate_t.shape) != (hidden, inter) or tuple(w_up_t.shape) != (hidden, inter):
        raise ValueError(
            f"w_gate_t/w_up_t must be [hidden={hidden}, inter], got {list(w_gate_t.shape)}, {list(w_up_t.shape)}"
        )
    if tuple(w_down_t.shape) != (inter, hidden):
        raise ValueError(f"w_down_t must be [inter={inter}, hidden={hidden}], got {list(w_down_t.shape)}")
    if hidden % 8 or inter % 8 or hidden > MAX_HIDDEN:
        raise ValueError(f"hidden and inter must be multiples of 8 and hidden <= {MAX_HIDDEN}; got {hidden}, {inter}")
    check_thresholds(thresholds, x.shape[0])
    if thresholds.device != x.device:
        raise ValueError(f"thresholds are on {thresholds.device}, x on {x.device}")


def _launch_args(lib, name: str, out: torch.Tensor, x: torch.Tensor, inter: int, thresholds: torch.Tensor,
                 row_counts: torch.Tensor | None) -> tuple[int, int, torch.Tensor, torch.Tensor, bool]:
    """What both forms' ``*_into`` check and prepare before a launch: the row count, ``out``,
    ``row_counts``, float32 thresholds and the shared workspace. Returns ``(rows, hidden,
    thresholds, workspace, workspace_is_zeroed)``."""
    rows, hidden = x.shape
    if not 1 <= rows <= MAX_BATCH:
        raise ValueError(f"{name} handles 1..{MAX_BATCH} rows per call, got {rows}")
    if out.shape != x.shape or out.dtype != x.dtype or not out.is_contiguous():
        raise ValueError("out must be a contiguous tensor shaped and typed like x")
    if row_counts is not None and (row_counts.dtype != torch.int32 or row_counts.numel() != 2
                                   or not row_counts.is_contiguous() or row_counts.device != x.device):
        raise ValueError(f"row_counts must be a contiguous int32 [2] tensor on {x.device}")
    thr = thresholds if thresholds.dtype == torch.float32 and thresholds.is_contiguous() else thresholds.float().contiguous()
    # one workspace layout serves both forms (calls on one stream are ordered)
    ws, zeroed = _workspace(x.device, ("sparse_mlp", hidden, inter),
                            lambda: lib.clada_sparse_mlp_workspace_size(MAX_BATCH, hidden, inter))
    return rows, hidden, thr, ws, zeroed


def _as_token_rows(x: torch.Tensor, thresholds: torch.Tensor, into: Callable) -> torch.Tensor:
    """Run ``into(out, rows, thresholds)`` on ``x [B, ..., hidden]`` as ``B * tokens`` rows
    (each row with its sequence's thresholds) and return the result shaped like ``x``."""
    batch, hidden = x.shape[0], x.shape[-1]
    tokens = x.numel() // (batch * hidden)
    x2 = x.reshape(batch * tokens, hidden).contiguous()
    thr = thresholds if tokens == 1 else thresholds.repeat_interleave(tokens, dim=0)
    out = torch.empty_like(x2)
    into(out, x2, thr)
    return out.reshape(x.shape)


def sparse_mlp_cuda_into(
    out: torch.Tensor,
    x: torch.Tensor,
    w_gate_t: torch.Tensor,
    w_up_t: torch.Tensor,
    w_down_t: torch.Tensor,
    thresholds: torch.Tensor,
    act: str = "silu",
    row_counts: torch.Tensor | None = None,
) -> torch.Tensor:
    """Write the op's result for 2-D ``x`` ``[B, hidden]`` (B <= 8) into ``out`` ``[B, hidden]``.
    ``row_counts``: int32 ``[2]`` on the device, or None; the call adds the rows of
    ``w_gate_t``/``w_up_t`` and of ``w_down_t`` it read (the union over the batch)."""
    lib = load_library()
    inter = w_gate_t.shape[1]
    rows, hidden, thr, ws, zeroed = _launch_args(lib, "sparse_mlp_cuda", out, x, inter, thresholds, row_counts)
    stream = torch.cuda.current_stream(x.device).cuda_stream
    status = lib.clada_sparse_mlp_counted(
        x.data_ptr(),
        w_gate_t.data_ptr(),
        w_up_t.data_ptr(),
        w_down_t.data_ptr(),
        thr.data_ptr(),
        out.data_ptr(),
        rows,
        hidden,
        inter,
        _DTYPES[x.dtype],
        ACT_CODES[act],
        ws.data_ptr(),
        ws.numel(),
        1 if zeroed else 0,
        None if row_counts is None else row_counts.data_ptr(),
        ctypes.addressof(_tuning),
        stream,
    )
    _check_status("clada_sparse_mlp", status)
    return out


@torch.library.custom_op("clada::sparse_mlp_cuda", mutates_args=(), device_types="cuda")
def sparse_mlp_cuda_op(
    x: torch.Tensor,
    w_gate_t: torch.Tensor,
    w_up_t: torch.Tensor,
    w_down_t: torch.Tensor,
    thresholds: torch.Tensor,
    act: str,
) -> torch.Tensor:
    _check(x, w_gate_t, w_up_t, w_down_t, thresholds, act)
    return _as_token_rows(x, thresholds, lambda out, x2, thr: sparse_mlp_cuda_into(out, x2, w_gate_t, w_up_t,
                                                                                   w_down_t, thr, act))


@sparse_mlp_cuda_op.register_fake
def _(x, w_gate_t, w_up_t, w_down_t, thresholds, act):
    return x.new_empty((*x.shape[:-1], w_down_t.shape[-1]))


@torch.library.custom_op("clada::sparse_mlp_cuda_counted", mutates_args=("row_counts",), device_types="cuda")
def sparse_mlp_cuda_counted(
    x: torch.Tensor,
    w_gate_t: torch.Tensor,
    w_up_t: torch.Tensor,
    w_down_t: torch.Tensor,
    thresholds: torch.Tensor,
    act: str,
    row_counts: torch.Tensor,
) -> torch.Tensor:
    """The op for ``x [B, hidden]`` (one token per row, B <= 8) that also adds the weight rows
    it read to ``row_counts`` (int32 ``[2]``: gate/up rows, down rows; see
    :func:`sparse_mlp_cuda_into`). The GPU decode path's MLP (runtime/cuda_graph.py)."""
    _check(x, w_gate_t, w_up_t, w_down_t, thresholds, act)
    out = torch.empty_like(x)
    sparse_mlp_cuda_into(out, x.contiguous(), w_gate_t, w_up_t, w_down_t, thresholds, act, row_counts)
    return out


@sparse_mlp_cuda_counted.register_fake
def _(x, w_gate_t, w_up_t, w_down_t, thresholds, act, row_counts):
    return torch.empty_like(x)


def sparse_mlp_cuda(
    x: torch.Tensor,
    w_gate_t: torch.Tensor,
    w_up_t: torch.Tensor,
    w_down_t: torch.Tensor,
    thresholds: torch.Tensor,
    act: str = "silu",
) -> torch.Tensor:
    """The SparseMLP op on the GPU. ``x``: ``[B, ..., hidden]`` with B * (tokens per row) <= 8;
    ``thresholds``: ``[B, 2]`` float32 (t_in, t_mid). Returns ``[B, ..., hidden]`` in x's dtype.
    Raises NativeKernelsUnavailable when the library is missing."""
    load_library()  # raise the clear error before touching the dispatcher
    return sparse_mlp_cuda_op(x, w_gate_t, w_up_t, w_down_t, thresholds, act)


# ------------------------------------------------------------------ the plain (non-gated) form
def check_plain(x, w_in_t, b_in, w_out_t, b_out, thresholds, act) -> None:
    """Raise ValueError/TypeError naming the argument that the plain kernel cannot take (shapes
    and dtypes first, then the device, so every message can be seen without a GPU)."""
    _check_act(act)
    if x.dim() < 2:
        raise ValueError(f"x must be [batch, ..., hidden], got shape {list(x.shape)}")
    if x.dtype not in _DTYPES:
        raise TypeError(f"sparse_mlp_plain_cuda supports bfloat16 and float16, got x {x.dtype}")
    hidden = x.shape[-1]
    if w_in_t.dim() != 2 or w_in_t.shape[0] != hidden:
        raise ValueError(f"w_in_t must be [hidden={hidden}, inter], got {list(w_in_t.shape)}")
    inter = w_in_t.shape[1]
    for name, t, shape in (("w_in_t", w_in_t, (hidden, inter)), ("b_in", b_in, (inter,)),
                           ("w_out_t", w_out_t, (inter, hidden)), ("b_out", b_out, (hidden,))):
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must be {list(shape)} (x has hidden={hidden}, w_in_t inter={inter}), "
                             f"got {list(t.shape)}")
        if t.dtype != x.dtype:
            raise TypeError(f"{name} has dtype {t.dtype}, x has {x.dtype}")
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    if hidden % 8 or inter % 8 or hidden > MAX_HIDDEN:
        raise ValueError(f"hidden and inter must be multiples of 8 and hidden <= {MAX_HIDDEN}; got {hidden}, {inter}")
    check_thresholds(thresholds, x.shape[0])
    if x.device.type != "cuda":
        raise ValueError(f"sparse_mlp_plain_cuda needs CUDA tensors, got x on {x.device}")
    for name, t in (("w_in_t", w_in_t), ("b_in", b_in), ("w_out_t", w_out_t), ("b_out", b_out),
                    ("thresholds", thresholds)):
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device}, x on {x.device}")


def sparse_mlp_plain_cuda_into(
    out: torch.Tensor,
    x: torch.Tensor,
    w_in_t: torch.Tensor,
    b_in: torch.Tensor,
    w_out_t: torch.Tensor,
    b_out: torch.Tensor,
    thresholds: torch.Tensor,
    act: str = "gelu_tanh",
    row_counts: torch.Tensor | None = None,
) -> torch.Tensor:
    """Write the plain op's result for 2-D ``x`` ``[B, hidden]`` (B <= 8) into ``out``
    ``[B, hidden]``. ``row_counts``: int32 ``[2]`` on the device, or None; the call adds the
    rows of ``w_in_t`` and of ``w_out_t`` it read (the union over the batch). Arguments are
    checked by :func:`check_plain` (call it first; this function checks only ``out``, the
    row count and ``row_counts``)."""
    lib = load_library()
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [B, hidden] here, got shape {list(x.shape)}")
    x = x.contiguous()
    for name, t in (("x", x), ("w_in_t", w_in_t), ("b_in", b_in), ("w_out_t", w_out_t), ("b_out", b_out), ("out", out)):
        if t.data_ptr() % 16:
            raise ValueError(f"{name} must start 16-byte aligned (the kernels' 16-byte loads); it is a view at "
                             f"offset {t.storage_offset()}: pass a copy (.clone())")
    inter = w_in_t.shape[1]
    rows, hidden, thr, ws, zeroed = _launch_args(lib, "sparse_mlp_plain_cuda", out, x, inter, thresholds, row_counts)
    status = lib.clada_sparse_mlp_plain(
        x.data_ptr(), w_in_t.data_ptr(), b_in.data_ptr(), w_out_t.data_ptr(), b_out.data_ptr(), thr.data_ptr(),
        out.data_ptr(), rows, hidden, inter, _DTYPES[x.dtype], ACT_CODES[act], ws.data_ptr(), ws.numel(),
        1 if zeroed else 0, None if row_counts is None else row_counts.data_ptr(), ctypes.addressof(_tuning),
        torch.cuda.current_stream(x.device).cuda_stream,
    )
    _check_status("clada_sparse_mlp_plain", status)
    return out


@torch.library.custom_op("clada::sparse_mlp_plain_cuda", mutates_args=(), device_types="cuda")
def sparse_mlp_plain_cuda_op(
    x: torch.Tensor,
    w_in_t: torch.Tensor,
    b_in: torch.Tensor,
    w_out_t: torch.Tensor,
    b_out: torch.Tensor,
    thresholds: torch.Tensor,
    act: str,
) -> torch.Tensor:
    check_plain(x, w_in_t, b_in, w_out_t, b_out, thresholds, act)
    return _as_token_rows(x, thresholds, lambda out, x2, thr: sparse_mlp_plain_cuda_into(out, x2, w_in_t, b_in,
                                                                                         w_out_t, b_out, thr, act))


@sparse_mlp_plain_cuda_op.register_fake
def _(x, w_in_t, b_in, w_out_t, b_out, thresholds, act):
    return x.new_empty((*x.shape[:-1], w_out_t.shape[-1]))


@torch.library.custom_op("clada::sparse_mlp_plain_cuda_counted", mutates_args=("row_counts",), device_types="cuda")
def sparse_mlp_plain_cuda_counted(
    x: torch.Tensor,
    w_in_t: torch.Tensor,
    b_in: torch.Tensor,
    w_out_t: torch.Tensor,
    b_out: torch.Tensor,
    thresholds: torch.Tensor,
    act: str,
    row_counts: torch.Tensor,
) -> torch.Tensor:
    """The plain op for ``x [B, hidden]`` (one token per row, B <= 8) that also adds the weight
    rows it read to ``row_counts`` (int32 ``[2]``: w_in_t rows, w_out_t rows)."""
    check_plain(x, w_in_t, b_in, w_out_t, b_out, thresholds, act)
    out = torch.empty_like(x)
    sparse_mlp_plain_cuda_into(out, x.contiguous(), w_in_t, b_in, w_out_t, b_out, thresholds, act, row_counts)
    return out


@sparse_mlp_plain_cuda_counted.register_fake
def _(x, w_in_t, b_in, w_out_t, b_out, thresholds, act, row_counts):
    return torch.empty_like(x)


def sparse_mlp_plain_cuda(
    x: torch.Tensor,
    w_in_t: torch.Tensor,
    b_in: torch.Tensor,
    w_out_t: torch.Tensor,
    b_out: torch.Tensor,
    thresholds: torch.Tensor,
    act: str = "gelu_tanh",
) -> torch.Tensor:
    """The plain SparseMLP op on the GPU: ``y = act(x_s @ w_in_t + b_in)_s @ w_out_t + b_out``.
    ``x``: ``[B, ..., hidden]`` with B * (tokens per row) <= 8; ``w_in_t [hidden, inter]``,
    ``b_in [inter]``, ``w_out_t [inter, hidden]``, ``b_out [hidden]`` in x's dtype (bf16/fp16);
    ``thresholds``: ``[B, 2]`` float32 (t_in, t_mid); ``act``: silu, gelu_tanh, gelu or relu.
    Returns ``[B, ..., hidden]`` in x's dtype. Raises NativeKernelsUnavailable when the
    library is missing, ValueError/TypeError naming a bad argument."""
    check_plain(x, w_in_t, b_in, w_out_t, b_out, thresholds, act)
    load_library()  # raise the clear error before touching the dispatcher
    return sparse_mlp_plain_cuda_op(x, w_in_t, b_in, w_out_t, b_out, thresholds, act)


# ------------------------------------------------------------------ the op around dense GEMMs
def _check_status(name: str, status: int) -> None:
    if status != 0:
        raise RuntimeError(f"{name} failed: {load_library().clada_error_string(status).decode()} (status {status})")


def _check_rows(name: str, t: torch.Tensor, thresholds: torch.Tensor) -> None:
    if t.dim() != 2 or not t.is_contiguous() or t.dtype not in _DTYPES or t.device.type != "cuda" or t.shape[1] % 8:
        raise ValueError(f"{name} must be a contiguous CUDA bf16/fp16 [batch, n] tensor with n a multiple of 8, "
                         f"got {t.dtype} {list(t.shape)} on {t.device}")
    check_thresholds(thresholds, t.shape[0])
    if thresholds.dtype != torch.float32 or not thresholds.is_contiguous() or thresholds.device != t.device:
        raise ValueError(f"thresholds must be contiguous float32 on {t.device}")


@torch.library.custom_op("clada::mask_input", mutates_args=(), device_types="cuda")
def mask_input(x: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """``x * (|x| > t_in)`` per row for ``x [B, n]``, ``thresholds [B, 2]`` float32: the op's
    input threshold before a dense gate/up GEMM (one launch)."""
    _check_rows("x", x, thresholds)
    out = torch.empty_like(x)
    _check_status("clada_mask_input", load_library().clada_mask_input(
        x.data_ptr(), thresholds.data_ptr(), out.data_ptr(), x.shape[0], x.shape[1], _DTYPES[x.dtype],
        torch.cuda.current_stream(x.device).cuda_stream))
    return out


@mask_input.register_fake
def _(x, thresholds):
    return torch.empty_like(x)


@torch.library.custom_op("clada::gate_mask", mutates_args=(), device_types="cuda")
def gate_mask(gate_up: torch.Tensor, thresholds: torch.Tensor, act: str) -> torch.Tensor:
    """``h = act(g) * u``, kept where ``|h| > t_mid``, for ``gate_up [B, 2 * inter]`` (gate
    then up, one GEMM's output): the op's middle between dense GEMMs (one launch)."""
    _check_rows("gate_up", gate_up, thresholds)
    _check_act(act)
    inter = gate_up.shape[1] // 2
    if inter % 8:
        raise ValueError(f"gate_up must hold 2 x inter columns with inter a multiple of 8, got {gate_up.shape[1]}")
    out = gate_up.new_empty((gate_up.shape[0], inter))
    _check_status("clada_gate_mask", load_library().clada_gate_mask(
        gate_up.data_ptr(), thresholds.data_ptr(), out.data_ptr(), gate_up.shape[0], inter, _DTYPES[gate_up.dtype],
        ACT_CODES[act], torch.cuda.current_stream(gate_up.device).cuda_stream))
    return out


@gate_mask.register_fake
def _(gate_up, thresholds, act):
    return gate_up.new_empty((gate_up.shape[0], gate_up.shape[1] // 2))


@torch.library.custom_op("clada::bias_act_mask", mutates_args=(), device_types="cuda")
def bias_act_mask(pre: torch.Tensor, b_in: torch.Tensor | None, thresholds: torch.Tensor, act: str) -> torch.Tensor:
    """``h = act(pre + b_in)``, kept where ``|h| > t_mid``, for ``pre [B, inter]`` (the
    ``x_s @ w_in_t`` GEMM's output) and ``b_in [inter]`` or None (the GEMM added it): the
    plain op's middle between dense GEMMs (one launch)."""
    _check_rows("pre", pre, thresholds)
    _check_act(act)
    if b_in is not None and (tuple(b_in.shape) != (pre.shape[1],) or b_in.dtype != pre.dtype
                             or b_in.device != pre.device or not b_in.is_contiguous()):
        raise ValueError(f"b_in must be a contiguous {pre.dtype} [{pre.shape[1]}] tensor on {pre.device}, "
                         f"got {b_in.dtype} {list(b_in.shape)} on {b_in.device}")
    out = torch.empty_like(pre)
    _check_status("clada_bias_act_mask", load_library().clada_bias_act_mask(
        pre.data_ptr(), None if b_in is None else b_in.data_ptr(), thresholds.data_ptr(), out.data_ptr(),
        pre.shape[0], pre.shape[1], _DTYPES[pre.dtype], ACT_CODES[act], torch.cuda.current_stream(pre.device).cuda_stream))
    return out


@bias_act_mask.register_fake
def _(pre, b_in, thresholds, act):
    return torch.empty_like(pre)


# ------------------------------------------------------------------ decode attention
def decode_attention_supported(heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> bool:
    """True when the decode attention kernel handles this attention shape and dtype
    (head_dim 16/32/64/128/256, heads a multiple of kv_heads, bf16/fp16)."""
    return dtype in _DTYPES and bool(load_library().clada_decode_attention_supported(heads, kv_heads, head_dim))


def _check_attention(q, k, v, position, k_cache, v_cache, inv_freq) -> None:
    if k_cache.dim() != 4 or not k_cache.is_contiguous() or v_cache.shape != k_cache.shape or not v_cache.is_contiguous():
        raise ValueError("k_cache and v_cache must be contiguous [batch, kv_heads, max_len, head_dim] tensors")
    batch, kv_heads, _, head_dim = k_cache.shape
    for name, t, width in (("q", q, None), ("k", k, kv_heads * head_dim), ("v", v, kv_heads * head_dim)):
        if t.device != k_cache.device or t.dtype != k_cache.dtype:
            raise ValueError(f"{name} is {t.dtype} on {t.device}, the caches {k_cache.dtype} on {k_cache.device}")
        if t.dim() != 2 or t.shape[0] != batch or (width is not None and t.shape[1] != width) or t.stride(1) != 1:
            raise ValueError(f"{name} must be [batch={batch}, {width or 'heads * head_dim'}] with unit column "
                             f"stride, got shape {list(t.shape)}, strides {list(t.stride())}")
    if q.shape[1] % head_dim or not decode_attention_supported(q.shape[1] // head_dim, kv_heads, head_dim, q.dtype):
        raise ValueError(f"decode attention does not support {q.shape[1]} query columns, {kv_heads} KV heads of "
                         f"{head_dim} in {q.dtype}")
    if position.dtype != torch.long or tuple(position.shape) != (batch,) or position.device != k_cache.device:
        raise ValueError(f"position must be int64 [batch={batch}] on {k_cache.device}")
    if inv_freq.dtype != torch.float32 or tuple(inv_freq.shape) != (head_dim // 2,) or inv_freq.device != k_cache.device:
        raise ValueError(f"inv_freq must be float32 [head_dim / 2 = {head_dim // 2}] on {k_cache.device}")


@torch.library.custom_op("clada::decode_attention_cuda", mutates_args=("k_cache", "v_cache"), device_types="cuda")
def decode_attention_cuda_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    position: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    inv_freq: torch.Tensor,
    rope_scale: float,
    window: int,
    scale: float,
) -> torch.Tensor:
    _check_attention(q, k, v, position, k_cache, v_cache, inv_freq)
    lib = load_library()
    batch, kv_heads, max_len, head_dim = k_cache.shape
    heads = q.shape[1] // head_dim
    # 16-byte loads: every row must start 16-byte aligned
    q, k, v = (t if t.stride(0) % 8 == 0 and t.data_ptr() % 16 == 0 else t.contiguous() for t in (q, k, v))
    position, inv_freq = position.contiguous(), inv_freq.contiguous()
    out = q.new_empty((batch, heads * head_dim))
    ws, zeroed = _workspace(
        q.device, ("decode_attention", batch, heads, kv_heads, head_dim, max_len),
        lambda: lib.clada_decode_attention_workspace_size(batch, heads, kv_heads, head_dim, max_len))
    status = lib.clada_decode_attention(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), q.stride(0), k.stride(0), v.stride(0),
        inv_freq.data_ptr(), rope_scale, position.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
        out.data_ptr(), batch, heads, kv_heads, head_dim, max_len, window, scale, _DTYPES[q.dtype],
        ws.data_ptr(), ws.numel(), 1 if zeroed else 0, torch.cuda.current_stream(q.device).cuda_stream,
    )
    _check_status("clada_decode_attention", status)
    return out


@decode_attention_cuda_op.register_fake
def _(q, k, v, position, k_cache, v_cache, inv_freq, rope_scale, window, scale):
    return q.new_empty((q.shape[0], q.shape[1]))


def decode_attention_cuda(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    position: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    inv_freq: torch.Tensor,
    rope_scale: float = 1.0,
    window: int = 0,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention of one new token per sequence over a static KV cache, fused (RoPE,
    cache write, grouped-query attention, fp32 softmax). ``q [B, heads * head_dim]``,
    ``k``/``v [B, kv_heads * head_dim]`` (the new token, k before RoPE; rows may be
    slices of a fused qkv row), ``position [B]`` int64 (slot written and last slot
    attended; in ``[0, max_len)``), caches ``[B, kv_heads, max_len, head_dim]`` updated in
    place, ``inv_freq [head_dim / 2]`` float32: RoPE with ``cos``/``sin`` of
    ``position * inv_freq`` times ``rope_scale``, rounded to q's dtype, rotate-half
    convention (what :class:`~clada_export.model.llama.Decoder` computes). ``window > 0``: only
    slots ``> position - window`` are attended. ``scale`` defaults to ``head_dim ** -0.5``.
    Returns ``[B, heads * head_dim]`` in q's dtype."""
    if scale is None:
        scale = k_cache.shape[-1] ** -0.5
    load_library()  # raise the clear error before touching the dispatcher
    return decode_attention_cuda_op(q, k, v, position, k_cache, v_cache, inv_freq, float(rope_scale), int(window),
                                    float(scale))

