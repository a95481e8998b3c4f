"""The plain (non-gated) SparseMLP of the CUDA kernels (``clada_sparse_mlp_plain``, ABI 6) and
relu in both forms, against the reference op ``plain_sparse_mlp_reference`` in float64.

GPU tests (marked ``gpu``) skip without CUDA or without the kernel library. The rest runs
anywhere: the C ABI as the header declares it against the ctypes binding, the argument checks
of the torch binding (their messages name the bad argument), the library's host-side refusals
(needs the library built, no GPU) and the CPU library's refusal of relu.
Every GPU check draws fresh random inputs and poisons the output with NaN first.
"""

from __future__ import annotations

import ctypes
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from clada_export.ops import native
from clada_export.ops.sparse_mlp import (
    activation,
    dense_plain_mlp,
    plain_sparse_mlp_reference,
    sparse_mlp_reference,
)
from conftest import native_library_or_skip

HEADER = Path(__file__).resolve().parents[1] / "plugins" / "kernels" / "sparse_mlp.h"

# (hidden, intermediate, activation) of plain MLPs the kernel must serve
SHAPES = {
    "gpt2-small": (768, 3072, "gelu_tanh"),
    "opt-125m": (768, 3072, "relu"),
    "pythia-410m": (1024, 4096, "gelu"),
    "gpt-neox-20b": (6144, 24576, "gelu"),  # hidden > 4096: 16 columns per thread in stage 2
    "odd": (264, 1000, "silu"),  # legal, but neither is a multiple of 32 or of a column tile
}
BATCHES = (1, 3, 8)
SPARSITIES = (0.0, 0.5, 0.9)
DTYPES = (torch.bfloat16, torch.float16)
ACTS = ("silu", "gelu_tanh", "gelu", "relu")
# the gated tests' bound (tests/test_kernels_gpu.py): fp32 accumulation, h kept in fp32 (the
# float64 reference decides channels at t_mid a rounding step apart), y rounded to bf16
REL_TOL = 1e-2

_cache: dict = {}


# ------------------------------------------------------------------ helpers
def weights(hidden: int, inter: int, dtype: torch.dtype, seed: int = 0):
    """Random plain-MLP weights and biases in the kernel layout, plus float64 copies; one entry cached."""
    key = (hidden, inter, dtype)
    if key not in _cache:
        _cache.clear()
        torch.cuda.empty_cache()
        g = torch.Generator(device="cuda").manual_seed(seed)
        w_in = (torch.randn(hidden, inter, device="cuda", generator=g) / hidden**0.5).to(dtype)
        b_in = (0.3 * torch.randn(inter, device="cuda", generator=g)).to(dtype)
        w_out = (torch.randn(inter, hidden, device="cuda", generator=g) / inter**0.5).to(dtype)
        b_out = (0.3 * torch.randn(hidden, device="cuda", generator=g)).to(dtype)
        lowp = (w_in, b_in, w_out, b_out)
        _cache[key] = (lowp, tuple(t.double() for t in lowp))
    return _cache[key]


def thresholds_for(x: torch.Tensor, w64, sparsity: float, act: str) -> torch.Tensor:
    """Per-row thresholds: quantiles of |x| and |h| of each row, at a sparsity that differs a
    little between rows, so rows of one batch have different thresholds."""
    b = x.shape[0]
    if sparsity == 0.0:
        return torch.zeros(b, 2, device=x.device, dtype=torch.float32)
    per_row = (sparsity + 0.04 * (torch.arange(b, device=x.device) - (b - 1) / 2) / max(b, 1)).clamp(0.0, 0.97)
    xa = x.double().abs()
    t_in = torch.stack([torch.quantile(xa[i], per_row[i].double()) for i in range(b)])
    x_s = torch.where(xa > t_in[:, None], x.double(), 0.0)
    w_in, b_in, _, _ = w64
    h = activation(x_s @ w_in + b_in, act).abs()
    t_mid = torch.stack([torch.quantile(h[i], per_row[i].double()) for i in range(b)])
    return torch.stack([t_in, t_mid], dim=1).float().contiguous()


def run_plain(x, lowp, thr, act, row_counts=None) -> torch.Tensor:
    out = torch.full_like(x, float("nan"))  # poison: an unwritten element fails the check
    native.sparse_mlp_plain_cuda_into(out, x, *lowp, thr, act, row_counts)
    torch.cuda.synchronize()
    return out


def reference(x, w64, thr, act) -> torch.Tensor:
    return plain_sparse_mlp_reference(x.double(), *w64, thr, act)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref).norm() / ref.norm()).item()  # NaN anywhere -> NaN -> fails <=


def kept_rows(x, w64, thr, act) -> tuple[int, int]:
    """Rows of w_in_t and of w_out_t that any batch row keeps (float64 h, float32 comparisons)."""
    xf = x.double()
    keep_x = xf.abs() > thr[:, :1].double()
    x_s = torch.where(keep_x, xf, torch.zeros_like(xf))
    h = activation(x_s @ w64[0] + w64[1], act)
    return int(keep_x.any(0).sum()), int((h.abs() > thr[:, 1:].double()).any(0).sum())


# ------------------------------------------------------------------ GPU
@pytest.fixture(scope="module")
def library():
    return native_library_or_skip()


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("model", list(SHAPES))
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_plain_kernel_matches_reference(model, dtype, library):
    hidden, inter, act = SHAPES[model]
    lowp, w64 = weights(hidden, inter, dtype)
    failures = []
    for batch in BATCHES:
        for sparsity in SPARSITIES:
            x = torch.randn(batch, hidden, device="cuda").to(dtype)
            thr = thresholds_for(x, w64, sparsity, act)
            err = rel_err(run_plain(x, lowp, thr, act), reference(x, w64, thr, act))
            if not err <= REL_TOL:
                failures.append(f"B={batch} sparsity={sparsity}: rel err {err:.3g}")
    assert not failures, "; ".join(failures)


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_plain_activations(act, library):
    hidden, inter, _ = SHAPES["gpt2-small"]
    lowp, w64 = weights(hidden, inter, torch.bfloat16)
    for batch in BATCHES:
        for sparsity in SPARSITIES:
            x = torch.randn(batch, hidden, device="cuda").to(torch.bfloat16)
            thr = thresholds_for(x, w64, sparsity, act)
            err = rel_err(run_plain(x, lowp, thr, act), reference(x, w64, thr, act))
            assert err <= REL_TOL, f"{act} B={batch} s={sparsity}: {err:.3g}"


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("model", ["gpt2-small", "opt-125m", "odd"])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_plain_zero_thresholds_match_dense(model, dtype, library):
    """|v| > 0 keeps every nonzero value: zero thresholds are the dense plain MLP, biases included."""
    hidden, inter, act = SHAPES[model]
    lowp, w64 = weights(hidden, inter, dtype)
    tol = 4e-3 if dtype == torch.bfloat16 else 5e-4  # the output's own rounding, as for the gated form
    for batch in BATCHES:
        x = torch.randn(batch, hidden, device="cuda").to(dtype)
        out = run_plain(x, lowp, torch.zeros(batch, 2, device="cuda"), act)
        dense = dense_plain_mlp(x.double(), *w64, act)
        assert rel_err(out, dense) <= tol, f"B={batch}: {rel_err(out, dense):.3g}"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_plain_every_input_skipped_leaves_the_biases(library):
    """t_in above every |x|: stage 1 reads no row, h = act(b_in), y = act(b_in)_s W_out + b_out;
    and t_mid above every |h| too: y = b_out."""
    hidden, inter, act = SHAPES["opt-125m"]
    lowp, w64 = weights(hidden, inter, torch.bfloat16)
    x = torch.randn(3, hidden, device="cuda").to(torch.bfloat16)
    thr = torch.tensor([[1e30, 0.0], [1e30, 0.1], [1e30, 1e30]], device="cuda")
    counts = torch.zeros(2, dtype=torch.int32, device="cuda")
    out = run_plain(x, lowp, thr, act, counts)
    ref = reference(x, w64, thr, act)
    assert rel_err(out, ref) <= REL_TOL
    assert torch.equal(out[2], lowp[3])  # b_out exactly
    assert int(counts[0]) == 0 and int(counts[1]) == kept_rows(x, w64, thr, act)[1]


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_plain_row_counts_are_the_rows_kept(batch, library):
    """row_counts[0] += the rows of w_in_t any batch row keeps (exact: the same fp32 test of
    the same bf16 x), row_counts[1] += the rows of w_out_t (h in fp32 against float64 may flip
    a channel at the threshold: a few allowed)."""
    hidden, inter, act = SHAPES["gpt2-small"]
    lowp, w64 = weights(hidden, inter, torch.bfloat16)
    for sparsity in (0.5, 0.9):
        x = torch.randn(batch, hidden, device="cuda").to(torch.bfloat16)
        thr = thresholds_for(x, w64, sparsity, act)
        counts = torch.full((2,), 7, dtype=torch.int32, device="cuda")
        run_plain(x, lowp, thr, act, counts)
        out = run_plain(x, lowp, thr, act, counts)  # adds again
        got = (counts.cpu().long() - 7) // 2
        rows_in, rows_out = kept_rows(x, w64, thr, act)
        assert int(got[0]) == rows_in, (sparsity, int(got[0]), rows_in)
        assert abs(int(got[1]) - rows_out) <= max(4, inter // 1000), (sparsity, int(got[1]), rows_out)
        assert rel_err(out, reference(x, w64, thr, act)) <= REL_TOL


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_plain_and_gated_share_the_workspace(library):
    """Both forms use the (hidden, inter) workspace; each call leaves it zeroed for the other,
    whatever the batch size."""
    hidden, inter, act = SHAPES["pythia-410m"]
    lowp, w64 = weights(hidden, inter, torch.bfloat16)
    g = torch.Generator(device="cuda").manual_seed(3)
    wg, wu = (torch.randn(hidden, inter, device="cuda", generator=g) / hidden**0.5).bfloat16(), lowp[0]
    wd = lowp[2]
    for batch in (8, 1, 5, 3, 8):
        x = torch.randn(batch, hidden, device="cuda").to(torch.bfloat16)
        thr = thresholds_for(x, w64, 0.6, act)
        out = run_plain(x, lowp, thr, act)
        assert rel_err(out, reference(x, w64, thr, act)) <= REL_TOL, f"plain B={batch}"
        thr_g = thr.clone()
        thr_g[:, 1] = 0.0  # t_mid drawn for the plain h means nothing for the gated one: keep every h
        y = torch.full_like(x, float("nan"))
        native.sparse_mlp_cuda_into(y, x, wg, wu, wd, thr_g, "gelu")
        torch.cuda.synchronize()
        ref = sparse_mlp_reference(x.double(), wg.double(), wu.double(), wd.double(), thr_g, "gelu")
        assert rel_err(y, ref) <= REL_TOL, f"gated B={batch}"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_plain_scratch_workspace_is_zeroed_by_the_call(library):
    """workspace_is_zeroed=0 (a TensorRT scratch workspace): garbage in it must not matter; a
    too-small workspace and unaligned or missing biases are refused."""
    hidden, inter, act = SHAPES["odd"]
    (w_in, b_in, w_out, b_out), w64 = weights(hidden, inter, torch.bfloat16)
    batch = 4
    x = torch.randn(batch, hidden, device="cuda").to(torch.bfloat16)
    thr = thresholds_for(x, w64, 0.5, act)
    nbytes = library.clada_sparse_mlp_workspace_size(batch, hidden, inter)
    ws = torch.full((nbytes // 4,), float("nan"), device="cuda")
    out = torch.full_like(x, float("nan"))
    stream = torch.cuda.current_stream().cuda_stream

    def call(bi=b_in.data_ptr(), bo=b_out.data_ptr(), size=nbytes):
        return library.clada_sparse_mlp_plain(
            x.data_ptr(), w_in.data_ptr(), bi, w_out.data_ptr(), bo, thr.data_ptr(), out.data_ptr(),
            batch, hidden, inter, 1, native.ACT_CODES[act], ws.data_ptr(), ctypes.c_size_t(size), 0, None, None, stream)

    assert call() == 0
    torch.cuda.synchronize()
    assert rel_err(out, reference(x, w64, thr, act)) <= REL_TOL
    assert call(size=nbytes - 4) != 0
    assert call(bi=None) != 0 and call(bo=None) != 0
    assert call(bi=b_in.data_ptr() + 2) != 0  # 16-byte alignment, as for every other pointer


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_plain_cuda_graph_with_thresholds_updated_in_place(library):
    hidden, inter, act = SHAPES["gpt2-small"]
    lowp, w64 = weights(hidden, inter, torch.bfloat16)
    batch = 2
    x = torch.randn(batch, hidden, device="cuda").to(torch.bfloat16)
    thr = torch.zeros(batch, 2, device="cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):  # warm-up outside capture (allocates the workspace)
            native.sparse_mlp_plain_cuda(x, *lowp, thr, act)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = torch.ops.clada.sparse_mlp_plain_cuda(x, *lowp, thr, act)
    for sparsity in (0.0, 0.5, 0.9, 0.3):
        x.copy_(torch.randn(batch, hidden, device="cuda").to(torch.bfloat16))
        thr.copy_(thresholds_for(x, w64, sparsity, act))
        y.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert rel_err(y, reference(x, w64, thr, act)) <= REL_TOL, f"sparsity {sparsity}"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_plain_custom_op_schema_and_fake(library):
    hidden, inter, act = SHAPES["odd"]
    lowp, w64 = weights(hidden, inter, torch.bfloat16)
    x = torch.randn(2, 1, hidden, device="cuda").to(torch.bfloat16)  # [B, T, H] with T = 1
    thr = torch.full((2, 2), 0.1, device="cuda")
    torch.library.opcheck(torch.ops.clada.sparse_mlp_plain_cuda.default, (x, *lowp, thr, act),
                          test_utils=("test_schema", "test_faketensor"))
    counts = torch.zeros(2, dtype=torch.int32, device="cuda")
    torch.library.opcheck(torch.ops.clada.sparse_mlp_plain_cuda_counted.default, (x[:, 0], *lowp, thr, act, counts),
                          test_utils=("test_schema", "test_faketensor"))
    y = native.sparse_mlp_plain_cuda(x, *lowp, thr, act)
    assert y.shape == x.shape and y.dtype == x.dtype
    w_in, b_in, w_out, b_out = lowp
    shifted = torch.cat([b_in[:1], b_in])[1:]  # the same values in a view 2 bytes off alignment
    with pytest.raises(ValueError, match="b_in must start 16-byte aligned"):
        native.sparse_mlp_plain_cuda(x, w_in, shifted, w_out, b_out, thr, act)
    assert rel_err(y[:, 0], reference(x[:, 0], w64, thr, act)) <= REL_TOL


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_plain_dense_gemm_path_matches_reference(dtype, library):
    """The plain op around dense GEMMs: mask_input, the x_s W_in GEMM, bias_act_mask (bias
    added there, or by the GEMM with b_in=None), the W_out GEMM with b_out. Twice the kernel's
    bound, as for the gated dense path: cuBLAS rounds the pre-activation to 16 bits."""
    hidden, inter, act = SHAPES["opt-125m"]
    (w_in, b_in, w_out, b_out), w64 = weights(hidden, inter, dtype)
    w_in_nk, w_out_nk = w_in.t().contiguous(), w_out.t().contiguous()
    for batch in BATCHES:
        x = torch.randn(batch, hidden, device="cuda").to(dtype)
        thr = thresholds_for(x, w64, 0.5, act)
        ref = reference(x, w64, thr, act)
        xs = native.mask_input(x, thr)
        h = native.bias_act_mask(F.linear(xs, w_in_nk), b_in, thr, act)
        assert rel_err(F.linear(h, w_out_nk, b_out), ref) <= 2 * REL_TOL, batch
        h = native.bias_act_mask(F.linear(xs, w_in_nk, b_in), None, thr, act)
        assert rel_err(F.linear(h, w_out_nk, b_out), ref) <= 2 * REL_TOL, batch
        pre = (xs @ w_in).float() + b_in.float()
        expect = torch.where(activation(pre, act).abs() > thr[:, 1:], activation(pre, act), 0.0)
        got = native.bias_act_mask(xs @ w_in, b_in, thr, act)
        assert rel_err(got, expect.double()) <= 1e-2, batch


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gated_kernel_relu(dtype, library):
    """relu (CLADA_ACT_RELU) in the gated form too, and in its dense-path gate_mask."""
    hidden, inter = 576, 1536
    g = torch.Generator(device="cuda").manual_seed(5)
    wg, wu = ((torch.randn(hidden, inter, device="cuda", generator=g) / hidden**0.5).to(dtype) for _ in range(2))
    wd = (torch.randn(inter, hidden, device="cuda", generator=g) / inter**0.5).to(dtype)
    w64 = (wg.double(), wu.double(), wd.double())
    for batch in BATCHES:
        for sparsity in SPARSITIES:
            x = torch.randn(batch, hidden, device="cuda").to(dtype)
            if sparsity == 0.0:
                thr = torch.zeros(batch, 2, device="cuda")
            else:
                xa = x.double().abs()
                t_in = torch.quantile(xa, sparsity, dim=1)
                xs = torch.where(xa > t_in[:, None], x.double(), 0.0)
                h = (F.relu(xs @ w64[0]) * (xs @ w64[1])).abs()
                thr = torch.stack([t_in, torch.quantile(h, sparsity, dim=1)], 1).float().contiguous()
            out = torch.full_like(x, float("nan"))
            native.sparse_mlp_cuda_into(out, x, wg, wu, wd, thr, "relu")
            torch.cuda.synchronize()
            ref = sparse_mlp_reference(x.double(), *w64, thr, "relu")
            assert rel_err(out, ref) <= REL_TOL, f"B={batch} s={sparsity}: {rel_err(out, ref):.3g}"
    gate_up = torch.randn(2, 2 * inter, device="cuda").to(dtype)
    thr = torch.tensor([[0.0, 0.0], [0.0, 0.3]], device="cuda")
    got = native.gate_mask(gate_up, thr, "relu").double()
    hh = F.relu(gate_up[:, :inter].double()) * gate_up[:, inter:].double()
    expect = torch.where(hh.abs() > thr[:, 1:].double(), hh, 0.0)
    assert rel_err(got, expect) <= 1e-2


# ------------------------------------------------------------------ anywhere (no GPU)
def _header_params(name: str) -> list[str]:
    text = re.sub(r"/\*.*?\*/", "", HEADER.read_text(), flags=re.S)
    m = re.search(rf"CLADA_API\s+int\s+{name}\s*\((.*?)\);", text, flags=re.S)
    assert m, f"{name} not declared in {HEADER}"
    return [p.strip() for p in m.group(1).split(",")]


def _ctype_of(param: str):
    if "*" in param or param.startswith("cudaStream_t"):
        return ctypes.c_void_p
    if param.startswith("size_t"):
        return ctypes.c_size_t
    assert param.startswith("int "), param
    return ctypes.c_int


@pytest.mark.parametrize("name, argtypes", [
    ("clada_sparse_mlp_plain", native.PLAIN_ARGTYPES),
    ("clada_bias_act_mask", native.BIAS_ACT_MASK_ARGTYPES),
])
def test_ctypes_signatures_follow_the_header(name, argtypes):
    """The binding's argument types are the header's, one for one (a missed or swapped
    argument would shift every later one)."""
    params = _header_params(name)
    assert [_ctype_of(p) for p in params] == list(argtypes), params
    if name == "clada_sparse_mlp_plain":
        names = [re.split(r"[\s\*]+", p)[-1] for p in params]
        assert names[:7] == ["x", "w_in_t", "b_in", "w_out_t", "b_out", "thresholds", "y"]
        assert names[-3:] == ["row_counts", "config", "stream"]


def test_abi_version_and_activation_codes_follow_the_header():
    text = HEADER.read_text()
    assert int(re.search(r"#define CLADA_KERNELS_ABI_VERSION (\d+)", text).group(1)) == native.ABI_VERSION
    codes = {name.lower(): int(v) for name, v in re.findall(r"CLADA_ACT_(\w+) = (\d+)", text)}
    assert codes == native.ACT_CODES
    assert native.ACT_CODES["relu"] == 3
    flags = {name: int(v) for name, v in re.findall(r"#define CLADA_SPARSE_MLP_FLAG_(\w+) (\d+)", text)}
    assert flags == {name: getattr(native, f"FLAG_{name}") for name in ("FUSED", "TWO_KERNEL", "NO_CLUSTER")}


def _plain_args(hidden=64, inter=128, batch=2, dtype=torch.bfloat16):
    return dict(
        x=torch.zeros(batch, hidden, dtype=dtype), w_in_t=torch.zeros(hidden, inter, dtype=dtype),
        b_in=torch.zeros(inter, dtype=dtype), w_out_t=torch.zeros(inter, hidden, dtype=dtype),
        b_out=torch.zeros(hidden, dtype=dtype), thresholds=torch.zeros(batch, 2), act="relu")


@pytest.mark.parametrize("change, error, message", [
    (dict(act="swish"), ValueError, "unsupported activation 'swish'; supported: silu, gelu_tanh, gelu, relu"),
    (dict(x=torch.zeros(2, 64)), TypeError, "supports bfloat16 and float16, got x torch.float32"),
    (dict(x=torch.zeros(64, dtype=torch.bfloat16)), ValueError, r"x must be \[batch, ..., hidden\]"),
    (dict(w_in_t=torch.zeros(128, 64, dtype=torch.bfloat16)), ValueError, r"w_in_t must be \[hidden=64, inter\]"),
    (dict(b_in=torch.zeros(64, dtype=torch.bfloat16)), ValueError, r"b_in must be \[128\] .* got \[64\]"),
    (dict(b_in=torch.zeros(1, 128, dtype=torch.bfloat16)), ValueError, r"b_in must be \[128\]"),
    (dict(w_out_t=torch.zeros(64, 128, dtype=torch.bfloat16)), ValueError, r"w_out_t must be \[128, 64\]"),
    (dict(b_out=torch.zeros(128, dtype=torch.bfloat16)), ValueError, r"b_out must be \[64\]"),
    (dict(b_out=torch.zeros(64, dtype=torch.float16)), TypeError, "b_out has dtype torch.float16, x has torch.bfloat16"),
    (dict(b_in=torch.zeros(128, dtype=torch.float32)), TypeError, "b_in has dtype torch.float32"),
    (dict(w_out_t=torch.zeros(64, 128, dtype=torch.bfloat16).t()), ValueError, "w_out_t must be contiguous"),
    (dict(thresholds=torch.zeros(3, 2)), ValueError, r"thresholds must have shape \[batch=2, 2\]"),
    (dict(), ValueError, "needs CUDA tensors, got x on cpu"),  # every other argument is right
])
def test_plain_argument_errors_name_the_argument(change, error, message):
    args = _plain_args()
    args.update(change)
    with pytest.raises(error, match=message):
        native.sparse_mlp_plain_cuda(**args)


def test_plain_sizes_must_be_multiples_of_8():
    with pytest.raises(ValueError, match="multiples of 8 .* got 64, 100"):
        native.sparse_mlp_plain_cuda(**_plain_args(inter=100))


def test_library_refuses_bad_plain_calls_on_the_host():
    """The C entry points check their arguments before touching the GPU (a GPU is not needed
    to see the refusals; the library is)."""
    lib = native_library_or_skip()
    assert lib.clada_kernels_abi_version() == native.ABI_VERSION
    p = ctypes.c_void_p(1 << 20)  # aligned, never dereferenced: every call below is refused first
    invalid = 1  # cudaErrorInvalidValue

    def plain(batch=1, hidden=64, inter=128, act=3, b_in=p, b_out=p, dtype=1):
        return lib.clada_sparse_mlp_plain(p, p, b_in, p, b_out, p, p, batch, hidden, inter, dtype, act, p,
                                          ctypes.c_size_t(0), 1, None, None, None)

    assert plain(batch=0) == invalid and plain(batch=9) == invalid
    assert plain(hidden=60) == invalid and plain(inter=12) == invalid
    assert plain(act=4) == invalid and plain(act=-1) == invalid
    assert plain(b_in=None) == invalid and plain(b_out=None) == invalid
    assert plain(b_in=ctypes.c_void_p((1 << 20) + 8)) == invalid
    assert plain(hidden=8200) == 801  # cudaErrorNotSupported: hidden above CLADA_SPARSE_MLP_MAX_HIDDEN
    assert plain() == invalid  # a workspace of 0 bytes
    assert lib.clada_bias_act_mask(p, None, p, p, 1, 12, 1, 3, None) == invalid
    assert lib.clada_bias_act_mask(p, None, p, p, 1, 16, 1, 4, None) == invalid
    assert lib.clada_error_string(invalid).decode() == "invalid argument"


def test_cpu_kernel_refuses_relu():
    """ACT_CODES has relu for the CUDA kernels; the CPU library has no relu, and says so."""
    from clada_export.ops import cpu_kernel

    w = torch.zeros(16, 32)
    with pytest.raises(ValueError, match="does not support activation 'relu'.*CUDA kernels"):
        cpu_kernel.check_inputs(torch.zeros(1, 16), w, w, torch.zeros(32, 16), "relu")
    assert "relu" not in cpu_kernel.CPU_ACTIVATIONS and set(cpu_kernel.CPU_ACTIVATIONS) < set(native.ACT_CODES)
