"""GPU tests of the CUDA SparseMLP (plugins/kernels) against the reference op.

Skipped without CUDA, or without the kernel library (the skip says how to build it;
benchmarks/gpu_check.sh builds it first).
Every check draws fresh random inputs and poisons the output with NaN first.
"""

from __future__ import annotations

import ctypes
from types import SimpleNamespace

import pytest
import torch

from clada_export.ops import native
from conftest import native_library_or_skip
from clada_export.ops.sparse_mlp import dense_mlp, sparse_mlp_reference
from clada_export.runtime.cuda_graph import _dense_kernel_layout

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

# (hidden, intermediate) of the MLPs the kernels must serve
SHAPES = {
    "llama3-8b": (4096, 14336),
    "mistral-7b": (4096, 14336),
    "qwen2-7b": (3584, 18944),
    "smollm-135m": (576, 1536),
    "tiny": (256, 768),  # the random checkpoint of tests/test_gpu_decode.py
}
BATCHES = (1, 2, 4, 8)
SPARSITIES = (0.0, 0.25, 0.5, 0.7, 0.9)
DTYPES = (torch.bfloat16, torch.float16)
REL_TOL = 1e-2

_cache: dict = {}


@pytest.fixture(scope="module", autouse=True)
def library():
    return native_library_or_skip()


def weights(hidden: int, inter: int, dtype: torch.dtype, seed: int = 0):
    """Random weights in the kernel layout plus float64 copies; one entry cached."""
    key = (hidden, inter, dtype)
    if key not in _cache:
        _cache.clear()
        torch.cuda.empty_cache()
        g = torch.Generator(device="cuda").manual_seed(seed)
        wg = (torch.randn(hidden, inter, device="cuda", generator=g) / hidden**0.5).to(dtype)
        wu = (torch.randn(hidden, inter, device="cuda", generator=g) / hidden**0.5).to(dtype)
        wd = (torch.randn(inter, hidden, device="cuda", generator=g) / inter**0.5).to(dtype)
        _cache[key] = (wg, wu, wd, wg.double(), wu.double(), wd.double())
    return _cache[key]


def thresholds_for(x: torch.Tensor, w64, sparsity: float, act: str = "silu") -> torch.Tensor:
    """Per-row thresholds: quantiles of |x| and |h| of each row, at a sparsity that also
    differs a little between rows, so rows of one batch have different thresholds."""
    b = x.shape[0]
    if sparsity == 0.0:
        return torch.zeros(b, 2, device=x.device, dtype=torch.float32)
    per_row = (sparsity + 0.04 * (torch.arange(b, device=x.device) - (b - 1) / 2) / max(b, 1)).clamp(0.0, 0.97)
    xa = x.double().abs()
    t_in = torch.stack([torch.quantile(xa[i], per_row[i].double()) for i in range(b)])
    x_s = torch.where(xa > t_in[:, None], x.double(), 0.0)
    wg, wu, _ = w64
    from clada_export.ops.sparse_mlp import activation

    h = (activation(x_s @ wg, act) * (x_s @ wu)).abs()
    t_mid = torch.stack([torch.quantile(h[i], per_row[i].double()) for i in range(b)])
    return torch.stack([t_in, t_mid], dim=1).float().contiguous()


def run_kernel(x, wg, wu, wd, thr, act="silu") -> torch.Tensor:
    out = torch.full_like(x, float("nan"))  # poison: an unwritten element fails the check
    native.sparse_mlp_cuda_into(out, x, wg, wu, wd, thr, act)
    torch.cuda.synchronize()
    return out


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref).norm() / ref.norm()).item()  # NaN anywhere -> NaN -> fails <=


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("model", list(SHAPES))
def test_kernel_matches_reference(model, dtype):
    hidden, inter = SHAPES[model]
    wg, wu, wd, wg64, wu64, wd64 = weights(hidden, inter, dtype)
    failures = []
    for batch in BATCHES:
        for sparsity in SPARSITIES:
            x = torch.randn(batch, hidden, device="cuda").to(dtype)
            thr = thresholds_for(x, (wg64, wu64, wd64), sparsity)
            out = run_kernel(x, wg, wu, wd, thr)
            ref = sparse_mlp_reference(x.double(), wg64, wu64, wd64, thr)
            err = rel_err(out, ref)
            if not err <= REL_TOL:
                failures.append(f"B={batch} sparsity={sparsity}: rel err {err:.3g}")
    assert not failures, "; ".join(failures)


# 1000: a last column tile of 104; 1096: 9 tiles (the last of 72), so a cluster of 2 has a block
# past the last tile; 8192: the widest hidden (4 loads of each down row per thread)
FUSED_SHAPES = {**SHAPES, "odd": (264, 1000), "odd-tiles": (200, 1096), "max-hidden": (8192, 2048)}


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("model", list(FUSED_SHAPES))
def test_fused_launch_matches_reference(model, dtype):
    """The one-launch kernel (forced by flag FUSED, batch 1-2; in thread-block clusters on sm_90,
    and without them, as before sm_90) against the float64 reference at every sparsity, and its
    row counts against the two-kernel path's (forced) on the same inputs (the input rows exactly;
    the down rows within a few, where h sits on a threshold and the two summation orders
    differ)."""
    hidden, inter = FUSED_SHAPES[model]
    wg, wu, wd, wg64, wu64, wd64 = weights(hidden, inter, dtype)
    failures = []
    for batch in (1, 2):
        for sparsity in SPARSITIES:
            x = torch.randn(batch, hidden, device="cuda").to(dtype)
            thr = thresholds_for(x, (wg64, wu64, wd64), sparsity)
            ref = sparse_mlp_reference(x.double(), wg64, wu64, wd64, thr)
            counts = {}
            fused = (native.FLAG_FUSED, native.FLAG_FUSED | native.FLAG_NO_CLUSTER)
            for flags in (native.FLAG_TWO_KERNEL, *fused):
                native.set_tuning(flags=flags)
                try:
                    rows = torch.zeros(2, dtype=torch.int32, device="cuda")
                    out = torch.full_like(x, float("nan"))
                    native.sparse_mlp_cuda_into(out, x, wg, wu, wd, thr, "silu", rows)
                    torch.cuda.synchronize()
                finally:
                    native.set_tuning()
                counts[flags] = rows.tolist()
                err = rel_err(out, ref)
                if flags != native.FLAG_TWO_KERNEL and not err <= REL_TOL:
                    failures.append(f"flags {flags} B={batch} sparsity={sparsity}: rel err {err:.3g}")
            a_in, a_mid = counts[native.FLAG_TWO_KERNEL]
            for flags in fused:
                f_in, f_mid = counts[flags]
                if f_in != a_in or abs(f_mid - a_mid) > 2 + 0.005 * a_mid:
                    failures.append(f"flags {flags} B={batch} sparsity={sparsity}: "
                                    f"rows {[f_in, f_mid]} vs {[a_in, a_mid]}")
    assert not failures, "; ".join(failures)


def test_fused_launch_refuses_what_it_does_not_serve():
    """Batch 3+ is cudaErrorNotSupported with the fused flag, not a silent other path."""
    hidden, inter = SHAPES["smollm-135m"]
    wg, wu, wd, *_ = weights(hidden, inter, torch.bfloat16)
    x = torch.randn(4, hidden, device="cuda").to(torch.bfloat16)
    native.set_tuning(flags=native.FLAG_FUSED)
    try:
        with pytest.raises(RuntimeError, match="clada_sparse_mlp failed"):
            run_kernel(x, wg, wu, wd, torch.zeros(4, 2, device="cuda"))
    finally:
        native.set_tuning()


@pytest.mark.parametrize("flags", ["FUSED|TWO_KERNEL", "TWO_KERNEL|NO_CLUSTER"])
def test_contradicting_launch_flags_are_an_error(flags):
    hidden, inter = SHAPES["smollm-135m"]
    wg, wu, wd, *_ = weights(hidden, inter, torch.bfloat16)
    x = torch.randn(1, hidden, device="cuda").to(torch.bfloat16)
    native.set_tuning(flags=sum(getattr(native, f"FLAG_{name}") for name in flags.split("|")))
    try:
        with pytest.raises(RuntimeError, match="clada_sparse_mlp failed"):
            run_kernel(x, wg, wu, wd, torch.zeros(1, 2, device="cuda"))
    finally:
        native.set_tuning()


def test_unknown_flag_is_an_error():
    """A flag the library does not know (bit 1, removed in ABI 4) fails the call instead of
    being ignored."""
    hidden, inter = SHAPES["smollm-135m"]
    wg, wu, wd, *_ = weights(hidden, inter, torch.bfloat16)
    x = torch.randn(1, hidden, device="cuda").to(torch.bfloat16)
    native.set_tuning(flags=1)
    try:
        with pytest.raises(RuntimeError, match="clada_sparse_mlp failed"):
            run_kernel(x, wg, wu, wd, torch.zeros(1, 2, device="cuda"))
    finally:
        native.set_tuning()


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("model", ["llama3-8b", "smollm-135m"])
def test_zero_thresholds_match_dense(model, dtype):
    hidden, inter = SHAPES[model]
    wg, wu, wd, wg64, wu64, wd64 = weights(hidden, inter, dtype)
    # fp32 accumulation of exact inputs: the error is the output's own rounding
    tol = 4e-3 if dtype == torch.bfloat16 else 5e-4
    for batch in BATCHES:
        x = torch.randn(batch, hidden, device="cuda").to(dtype)
        out = run_kernel(x, wg, wu, wd, torch.zeros(batch, 2, device="cuda"))
        dense = dense_mlp(x.double(), wg64, wu64, wd64)
        assert rel_err(out, dense) <= tol, f"B={batch}: {rel_err(out, dense):.3g}"


def test_heavy_tailed_activations():
    """Activations shaped like an LLM's: log-normal channel scales, a few massive
    channels shared by all rows, heavy-tailed weights; per-row thresholds."""
    hidden, inter = SHAPES["llama3-8b"]
    dtype = torch.bfloat16
    wg, wu, wd, wg64, wu64, wd64 = weights(hidden, inter, dtype)
    for batch in (1, 4):
        for sparsity in (0.0, 0.5, 0.8):
            scale = torch.exp(1.0 * torch.randn(hidden, device="cuda"))
            x = torch.distributions.StudentT(3.0).sample((batch, hidden)).cuda() * scale
            x[:, torch.randint(0, hidden, (3,))] *= 100.0
            x = x.to(dtype)
            thr = thresholds_for(x, (wg64, wu64, wd64), sparsity)
            out = run_kernel(x, wg, wu, wd, thr)
            ref = sparse_mlp_reference(x.double(), wg64, wu64, wd64, thr)
            assert rel_err(out, ref) <= REL_TOL, f"B={batch} s={sparsity}: {rel_err(out, ref):.3g}"


@pytest.mark.parametrize("act", ["silu", "gelu_tanh", "gelu"])
def test_activations(act):
    hidden, inter = SHAPES["smollm-135m"]
    wg, wu, wd, wg64, wu64, wd64 = weights(hidden, inter, torch.bfloat16)
    x = torch.randn(3, hidden, device="cuda").to(torch.bfloat16)
    thr = thresholds_for(x, (wg64, wu64, wd64), 0.5, act)
    out = run_kernel(x, wg, wu, wd, thr, act)
    ref = sparse_mlp_reference(x.double(), wg64, wu64, wd64, thr, act)
    assert rel_err(out, ref) <= REL_TOL


def test_nan_input_is_dropped_like_reference():
    """|NaN| > t is false: the reference drops a NaN input; so must the kernel."""
    hidden, inter = SHAPES["smollm-135m"]
    wg, wu, wd, wg64, wu64, wd64 = weights(hidden, inter, torch.bfloat16)
    x = torch.randn(2, hidden, device="cuda").to(torch.bfloat16)
    x[0, 5] = float("nan")
    x[1, 100] = float("nan")
    thr = torch.zeros(2, 2, device="cuda")
    out = run_kernel(x, wg, wu, wd, thr)
    ref = sparse_mlp_reference(x.double(), wg64, wu64, wd64, thr)
    assert torch.isfinite(ref).all()
    assert rel_err(out, ref) <= REL_TOL


def test_batch_sizes_interleaved_and_repeated():
    """The persistent workspace is left zeroed by every call, whatever the batch size."""
    hidden, inter = SHAPES["qwen2-7b"]
    wg, wu, wd, wg64, wu64, wd64 = weights(hidden, inter, torch.bfloat16)
    for batch in (8, 1, 5, 8, 3, 3, 1):
        x = torch.randn(batch, hidden, device="cuda").to(torch.bfloat16)
        thr = thresholds_for(x, (wg64, wu64, wd64), 0.6)
        out = run_kernel(x, wg, wu, wd, thr)
        ref = sparse_mlp_reference(x.double(), wg64, wu64, wd64, thr)
        assert rel_err(out, ref) <= REL_TOL, f"B={batch}"


def test_scratch_workspace_is_zeroed_by_the_call(library):
    """workspace_is_zeroed=0 (a TensorRT scratch workspace): garbage in it must not matter."""
    hidden, inter = SHAPES["smollm-135m"]
    wg, wu, wd, wg64, wu64, wd64 = weights(hidden, inter, torch.bfloat16)
    batch = 4
    x = torch.randn(batch, hidden, device="cuda").to(torch.bfloat16)
    thr = thresholds_for(x, (wg64, wu64, wd64), 0.5)
    nbytes = library.clada_sparse_mlp_workspace_size(batch, hidden, inter)
    ws = torch.full((nbytes // 4,), float("nan"), device="cuda")
    out = torch.full_like(x, float("nan"))
    status = library.clada_sparse_mlp(
        x.data_ptr(), wg.data_ptr(), wu.data_ptr(), wd.data_ptr(), thr.data_ptr(), out.data_ptr(),
        batch, hidden, inter, 1, 0, ws.data_ptr(), ws.numel() * 4, 0, None,
        torch.cuda.current_stream().cuda_stream,
    )
    assert status == 0, library.clada_error_string(status)
    torch.cuda.synchronize()
    ref = sparse_mlp_reference(x.double(), wg64, wu64, wd64, thr)
    assert rel_err(out, ref) <= REL_TOL
    # and a too-small workspace is refused, not overrun
    status = library.clada_sparse_mlp(
        x.data_ptr(), wg.data_ptr(), wu.data_ptr(), wd.data_ptr(), thr.data_ptr(), out.data_ptr(),
        batch, hidden, inter, 1, 0, ws.data_ptr(), ctypes.c_size_t(nbytes - 4), 0, None,
        torch.cuda.current_stream().cuda_stream,
    )
    assert status != 0


def test_cuda_graph_with_thresholds_updated_in_place():
    """One captured graph serves every threshold: thresholds are read on the device."""
    hidden, inter = SHAPES["llama3-8b"]
    wg, wu, wd, wg64, wu64, wd64 = weights(hidden, inter, torch.bfloat16)
    batch = 2
    x = torch.randn(batch, hidden, device="cuda").to(torch.bfloat16)
    thr = torch.zeros(batch, 2, device="cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):  # warm-up outside capture (allocates the workspace)
            native.sparse_mlp_cuda(x, wg, wu, wd, thr)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = torch.ops.clada.sparse_mlp_cuda(x, wg, wu, wd, thr, "silu")
    for sparsity in (0.0, 0.5, 0.9, 0.3):
        x.copy_(torch.randn(batch, hidden, device="cuda").to(torch.bfloat16))
        thr.copy_(thresholds_for(x, (wg64, wu64, wd64), sparsity))
        y.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        ref = sparse_mlp_reference(x.double(), wg64, wu64, wd64, thr)
        assert rel_err(y, ref) <= REL_TOL, f"sparsity {sparsity}"


def test_custom_op_schema_and_fake():
    hidden, inter = SHAPES["smollm-135m"]
    wg, wu, wd, *_ = weights(hidden, inter, torch.bfloat16)
    x = torch.randn(2, 1, hidden, device="cuda").to(torch.bfloat16)
    thr = torch.full((2, 2), 0.1, device="cuda")
    torch.library.opcheck(
        torch.ops.clada.sparse_mlp_cuda.default, (x, wg, wu, wd, thr, "silu"),
        test_utils=("test_schema", "test_faketensor"),
    )
    y = native.sparse_mlp_cuda(x, wg, wu, wd, thr)
    assert y.shape == x.shape and y.dtype == x.dtype


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
def test_dense_gemm_path_matches_reference(dtype):
    """The op around dense GEMMs (mask_input, gate/up GEMM, gate_mask, down GEMM): the input
    mask is exact, the whole is the reference op to bf16/fp16 rounding. The bound is twice
    the kernel's: here cuBLAS rounds gate/up to 16 bits before the activation and the
    t_mid comparison (the kernel keeps them in fp32), so channels at the threshold flip
    more often; measured 1.2-1.5e-2 in bf16 over unseeded draws on an H200."""
    import torch.nn.functional as F

    hidden, inter = SHAPES["smollm-135m"]
    wg, wu, wd, wg64, wu64, wd64 = weights(hidden, inter, dtype)
    gate_up = torch.cat([wg.t(), wu.t()]).contiguous()
    down = wd.t().contiguous()
    g = torch.Generator(device="cuda").manual_seed(1)
    for batch in BATCHES:
        x = torch.randn(batch, hidden, device="cuda", generator=g).to(dtype)
        x[0, :3] = float("nan")  # dropped, as in the reference op
        thr = thresholds_for(torch.nan_to_num(x), (wg64, wu64, wd64), 0.5)
        xs = native.mask_input(x, thr)
        expect = torch.where(x.float().abs() > thr[:, :1], x, torch.zeros_like(x))
        assert torch.equal(xs, expect)
        y = F.linear(native.gate_mask(F.linear(xs, gate_up), thr, "silu"), down)
        ref = sparse_mlp_reference(torch.nan_to_num(x).double(), wg64, wu64, wd64, thr)
        assert rel_err(y, ref) <= 2 * REL_TOL, batch
        # the same op on the kernel's own input-major weights (the runtime's copy-free dense form)
        mlp = SimpleNamespace(w_gate_t=wg, w_up_t=wu, w_down_t=wd, act="silu")
        assert rel_err(_dense_kernel_layout(mlp, x, thr), ref) <= 2 * REL_TOL, batch


@pytest.mark.parametrize("batch", BATCHES)
def test_row_counts_are_the_union_over_the_batch(batch):
    """clada_sparse_mlp_counted adds exactly the rows any batch row keeps: input channels
    with |x| > t_in, intermediate channels with |h| > t_mid (h from the kernel's own
    rounding can flip a channel at the threshold, so those are allowed a few)."""
    hidden, inter = SHAPES["llama3-8b"]
    wg, wu, wd, wg64, wu64, wd64 = weights(hidden, inter, torch.bfloat16)
    x = torch.randn(batch, hidden, device="cuda").to(torch.bfloat16)
    thr = thresholds_for(x, (wg64, wu64, wd64), 0.6)
    counts = torch.full((2,), 7, dtype=torch.int32, device="cuda")
    out = torch.empty_like(x)
    native.sparse_mlp_cuda_into(out, x, wg, wu, wd, thr, row_counts=counts)
    native.sparse_mlp_cuda_into(out, x, wg, wu, wd, thr, row_counts=counts)  # adds again
    torch.cuda.synchronize()
    xf = x.double()
    keep_x = xf.abs() > thr[:, :1].double()  # the kernel compares in float32
    xs = torch.where(keep_x, xf, torch.zeros_like(xf))
    h = torch.nn.functional.silu(xs @ wg64) * (xs @ wu64)
    keep_h = h.abs() > thr[:, 1:].double()
    got = (counts.cpu().long() - 7) // 2
    assert int(got[0]) == int(keep_x.any(0).sum())
    assert abs(int(got[1]) - int(keep_h.any(0).sum())) <= max(4, inter // 1000)
    assert rel_err(out, sparse_mlp_reference(x.double(), wg64, wu64, wd64, thr)) <= REL_TOL


def test_decode_path_variants_match_reference_decoder():
    """DecodePath's one-token step through the kernel, and through the dense GEMMs (the
    op with thresholds applied), are at least as close to the float64 model (same weights,
    same thresholds) as the bf16 reference decoder is. (Thresholding is discontinuous: bf16
    rounding moves values across a threshold, so the bf16 paths are compared through their
    distance to the exact model, not to each other.) The model is left unmodified."""
    import copy

    from clada_export.model.config import DecoderConfig
    from clada_export.model.llama import Decoder
    from clada_export.runtime.cuda_graph import DecodePath

    cfg = DecoderConfig(
        model_type="llama", vocab_size=512, hidden_size=576, intermediate_size=1536, num_layers=3,
        num_heads=9, num_kv_heads=3, head_dim=64, rms_norm_eps=1e-5, max_position_embeddings=256,
        tie_word_embeddings=False, qkv_bias=False, o_bias=False, qk_norm=False, sliding_window=None, act="silu",
    )
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, 64, 2).float() / 64))
    model = Decoder(cfg, inv_freq).cuda()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0) if "norm" in name else p.normal_(0.0, 0.05)
    model = model.to(torch.bfloat16).eval()
    exact = copy.deepcopy(model).double()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batch = 3
    thr = torch.rand(cfg.num_layers, batch, 2, device="cuda") * 0.3  # different per layer and row
    ids = torch.randint(0, cfg.vocab_size, (batch, 1), device="cuda")
    pos = torch.full((batch, 1), 5, device="cuda")
    path = DecodePath(model)
    with torch.no_grad():
        kc, vc = exact.new_cache(batch, 16)
        ref64 = exact(ids, pos, kc, vc, thr).logits.double()
        kc, vc = model.new_cache(batch, 16)
        ref = model(ids, pos, kc, vc, thr).logits
        e_ref = rel_err(ref, ref64)
        counts = torch.zeros(cfg.num_layers, 2, dtype=torch.int32, device="cuda")
        for variant in ("kernel", "dense"):
            kc, vc = model.new_cache(batch, 16)
            out, _, _ = path.step(ids[:, 0], pos[:, 0], kc, vc, thr, variant, counts)
            e = rel_err(out, ref64)
            print(f"logits vs float64 model: bf16 reference {e_ref:.3e}, {variant} {e:.3e}")
            assert e <= 1.25 * e_ref + 5e-3, (variant, e, e_ref)
    assert int(counts.min()) > 0  # the kernel counted every layer's rows
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not hasattr(model.layers[0].self_attn, "qkv_weight")
