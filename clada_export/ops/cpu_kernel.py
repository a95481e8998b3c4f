"""ctypes binding of ``libclada_cpu.so`` (plugins/cpu): the SparseMLP op on the CPU.

``sparse_mlp_cpu(x, w_gate_t, w_up_t, w_down_t, thresholds, act)`` computes exactly the op
of :func:`clada_export.ops.sparse_mlp.sparse_mlp_reference` (same weight layout:
``w_gate_t``/``w_up_t`` ``[hidden, inter]``, ``w_down_t`` ``[inter, hidden]``) in float32
for up to 8 token rows, reading only the weight rows some row keeps. It is the torch custom
op ``clada::sparse_mlp_cpu``, which also adds the weight rows it read to a counter tensor.

The library is found like the CUDA one (:func:`clada_export.ops.native.find_library`:
``$CLADA_CPU_LIB``, then the package's ``clada_export/lib``, where ``pip install`` builds it
with cmake and a C++ compiler), then in a repository build ``plugins/cpu/build``. There is no
silent fallback: if it is missing, calls raise :class:`CpuKernelUnavailable` saying how to
build it.
"""

from __future__ import annotations

import ctypes
import threading
from pathlib import Path

import torch

from clada_export.ops.native import ACT_CODES, find_library, open_library

CPU_LIB = "libclada_cpu.so"
REPO_CPU_BUILD_DIR = Path(__file__).resolve().parents[2] / "plugins" / "cpu" / "build"
BUILD_COMMAND = (
    "pip install -e . (with cmake and a C++ compiler with OpenMP (gcc) on PATH: the install builds it into "
    "clada_export/lib), or from the repository root: cmake -S plugins/cpu -B plugins/cpu/build && "
    "cmake --build plugins/cpu/build -j"
)
ABI_VERSION = 1
# The activations of the CPU library (clada_cpu_act_t: ACT_CODES without relu, which only the CUDA kernels have)
CPU_ACTIVATIONS = ("silu", "gelu_tanh", "gelu")
assert set(CPU_ACTIVATIONS) <= set(ACT_CODES)
MAX_ROWS = 8
ISAS = {"auto": 0, "generic": 1, "avx2": 2, "avx512": 3}
_STATUS_INVALID, _STATUS_UNSUPPORTED = 1, 2


class CpuKernelUnavailable(RuntimeError):
    """libclada_cpu.so could not be found or loaded."""


_lib: ctypes.CDLL | None = None
_lib_lock = threading.Lock()


def library_path() -> Path | None:
    found = find_library(CPU_LIB, "CLADA_CPU_LIB")
    if found is None and (REPO_CPU_BUILD_DIR / CPU_LIB).is_file():
        return REPO_CPU_BUILD_DIR / CPU_LIB
    return found


def load_library() -> ctypes.CDLL:
    """Load (once) and return the CPU kernel library; raise CpuKernelUnavailable if absent."""
    global _lib
    if _lib is not None:
        return _lib
    with _lib_lock:
        if _lib is not None:
            return _lib
        lib = open_library(library_path(), f"CPU kernel library {CPU_LIB}",
                           "clada_export/lib or " + str(REPO_CPU_BUILD_DIR), "CLADA_CPU_LIB", "clada_cpu_abi_version",
                           ABI_VERSION, BUILD_COMMAND, CpuKernelUnavailable)
        lib.clada_cpu_best_isa.restype = ctypes.c_int
        lib.clada_sparse_mlp_cpu.restype = ctypes.c_int
        lib.clada_sparse_mlp_cpu.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_int] * 6 + [ctypes.c_void_p]
        lib.clada_cpu_error_string.restype = ctypes.c_char_p
        lib.clada_cpu_error_string.argtypes = [ctypes.c_int]
        lib.clada_cpu_isa_name.restype = ctypes.c_char_p
        lib.clada_cpu_isa_name.argtypes = [ctypes.c_int]
        _lib = lib
        return lib


def is_available() -> bool:
    try:
        load_library()
    except CpuKernelUnavailable:
        return False
    return True


def best_isa() -> str:
    """The instruction set the kernel runs on this CPU: "avx512", "avx2" or "generic"."""
    lib = load_library()
    return lib.clada_cpu_isa_name(lib.clada_cpu_best_isa()).decode()


_isa = ISAS["auto"]


def set_isa(name: str) -> None:
    """Force the row kernels' instruction set for later calls ("auto", "generic", "avx2",
    "avx512"); for tests and benchmarks. A set the CPU lacks makes calls fail."""
    global _isa
    if name not in ISAS:
        raise ValueError(f"unknown isa {name!r}; choose one of {', '.join(ISAS)}")
    _isa = ISAS[name]


def _row_thresholds(thresholds: torch.Tensor, x: torch.Tensor, rows: int) -> torch.Tensor:
    # [B, 2] per sequence -> one pair per token row; [B, T, 2] per token is already that
    batch = x.shape[0]
    per_token = (*x.shape[:-1], 2)
    if thresholds.dim() == 2 and tuple(thresholds.shape) == (batch, 2):
        thresholds = thresholds.repeat_interleave(rows // batch, dim=0) if rows != batch else thresholds
    elif tuple(thresholds.shape) == per_token:
        thresholds = thresholds.reshape(rows, 2)
    else:
        raise ValueError(f"thresholds must have shape [batch={batch}, 2] (t_in, t_mid), or per token {list(per_token)}, "
                         f"got {list(thresholds.shape)}")
    return thresholds.to(torch.float32).contiguous()


def check_inputs(x: torch.Tensor, w_gate_t: torch.Tensor, w_up_t: torch.Tensor, w_down_t: torch.Tensor,
                 act: str) -> int:
    """Raise ValueError/TypeError naming the bad argument; return the number of token rows."""
    if act not in CPU_ACTIVATIONS:
        note = " (relu is the CUDA kernels' alone)" if act == "relu" else ""
        raise ValueError(f"sparse_mlp_cpu does not support activation {act!r}{note}; "
                         f"supported: {', '.join(CPU_ACTIVATIONS)}")
    if x.dim() < 2:
        raise ValueError(f"x must be [batch, ..., hidden], got shape {list(x.shape)}")
    hidden = x.shape[-1]
    if w_gate_t.dim() != 2 or w_gate_t.shape[0] != hidden:
        raise ValueError(f"w_gate_t must be [hidden={hidden}, inter], got {list(w_gate_t.shape)}")
    inter = w_gate_t.shape[1]
    for name, t, shape in (("w_up_t", w_up_t, (hidden, inter)), ("w_down_t", w_down_t, (inter, hidden))):
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must be {list(shape)} (w_gate_t is [{hidden}, {inter}]), got {list(t.shape)}")
    for name, t in (("x", x), ("w_gate_t", w_gate_t), ("w_up_t", w_up_t), ("w_down_t", w_down_t)):
        if t.dtype != torch.float32:
            raise TypeError(f"sparse_mlp_cpu runs float32; {name} is {t.dtype}")
        if t.device.type != "cpu":
            raise ValueError(f"sparse_mlp_cpu runs on the CPU; {name} is on {t.device}")
    rows = x.numel() // hidden
    if not 1 <= rows <= MAX_ROWS:
        raise ValueError(f"sparse_mlp_cpu takes 1..{MAX_ROWS} token rows (decode), got {rows} "
                         f"(x of shape {list(x.shape)}); larger inputs are for the reference op's GEMMs")
    return rows


@torch.library.custom_op("clada::sparse_mlp_cpu", mutates_args=("row_counts",), device_types="cpu")
def sparse_mlp_cpu_op(
    x: torch.Tensor,
    w_gate_t: torch.Tensor,
    w_up_t: torch.Tensor,
    w_down_t: torch.Tensor,
    thresholds: torch.Tensor,
    act: str,
    row_counts: torch.Tensor,
) -> torch.Tensor:
    """The op; ``row_counts`` (int64 ``[2]``) gains the rows of W_gate_t/W_up_t and of
    W_down_t the kernel read."""
    rows = check_inputs(x, w_gate_t, w_up_t, w_down_t, act)
    if row_counts.dtype != torch.int64 or tuple(row_counts.shape) != (2,) or not row_counts.is_contiguous():
        raise ValueError(f"row_counts must be a contiguous int64 [2] tensor, got {row_counts.dtype} "
                         f"{list(row_counts.shape)}")
    thr = _row_thresholds(thresholds, x, rows)
    x_c = x.contiguous()
    ws = [w.contiguous() for w in (w_gate_t, w_up_t, w_down_t)]
    out = torch.empty_like(x_c)
    lib = load_library()
    status = lib.clada_sparse_mlp_cpu(
        x_c.data_ptr(), ws[0].data_ptr(), ws[1].data_ptr(), ws[2].data_ptr(), thr.data_ptr(), out.data_ptr(),
        rows, x.shape[-1], w_gate_t.shape[1], ACT_CODES[act], torch.get_num_threads(), _isa, row_counts.data_ptr())
    if status != 0:
        message = lib.clada_cpu_error_string(status).decode()
        if status == _STATUS_UNSUPPORTED:
            message += f" (isa {next(k for k, v in ISAS.items() if v == _isa)!r} forced by set_isa)"
        raise RuntimeError(f"clada_sparse_mlp_cpu failed: {message} (status {status})")
    return out


@sparse_mlp_cpu_op.register_fake
def _(x, w_gate_t, w_up_t, w_down_t, thresholds, act, row_counts):
    return torch.empty_like(x)


def sparse_mlp_cpu(
    x: torch.Tensor,
    w_gate_t: torch.Tensor,
    w_up_t: torch.Tensor,
    w_down_t: torch.Tensor,
    thresholds: torch.Tensor,
    act: str = "silu",
    row_counts: torch.Tensor | None = None,
) -> torch.Tensor:
    """The SparseMLP op on the CPU. ``x``: ``[B, ..., hidden]`` float32 with at most 8 token
    rows; ``thresholds``: ``[B, 2]`` (t_in, t_mid) or ``[B, T, 2]`` per token. Returns
    ``[B, ..., hidden]``. Raises CpuKernelUnavailable when the library is missing."""
    load_library()  # raise the clear error before touching the dispatcher
    if row_counts is None:
        row_counts = torch.zeros(2, dtype=torch.int64)
    return sparse_mlp_cpu_op(x, w_gate_t, w_up_t, w_down_t, thresholds, act, row_counts)
