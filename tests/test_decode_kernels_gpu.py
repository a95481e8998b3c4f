"""GPU tests of the fused decode attention kernel (plugins/kernels/decode_attention.cu):
the op against a float32 reference on random inputs, and whole models decoding through
it against the same models' reference attention.

Skipped without CUDA or without the kernel library (the skip says how to build it).
"""

from __future__ import annotations

import pytest
import torch

from clada_export.ops import native
from conftest import native_library_or_skip

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture(scope="module", autouse=True)
def library():
    return native_library_or_skip()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def reference(q, k, v, position, k_cache, v_cache, inv_freq, rope_scale, window, scale):
    """float32 attention of one token per sequence, RoPE factors and RoPE'd q and k rounded
    to the input dtype as the model's own elementwise kernels leave them. Returns out and
    the new caches."""
    B, kv_heads, max_len, d = k_cache.shape
    heads = q.shape[1] // d
    freqs = position[:, None].float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]
    c = (emb.cos() * rope_scale).to(q.dtype).float()
    s = (emb.sin() * rope_scale).to(q.dtype).float()
    qf = q.float().view(B, heads, d)
    kf = k.float().view(B, kv_heads, d)
    qf = (qf * c + rotate_half(qf) * s).to(q.dtype).float()
    kf = (kf * c + rotate_half(kf) * s).to(k.dtype)
    kc, vc = k_cache.clone(), v_cache.clone()
    rows = torch.arange(B, device=q.device)
    kc[rows, :, position] = kf
    vc[rows, :, position] = v.view(B, kv_heads, d)
    slots = torch.arange(max_len, device=q.device)
    visible = slots[None] <= position[:, None]
    if window:
        visible &= slots[None] > position[:, None] - window
    qg = qf.view(B, kv_heads, heads // kv_heads, d)
    scores = torch.einsum("bkgd,bksd->bkgs", qg, kc.float()) * scale
    scores = scores.masked_fill(~visible[:, None, None], float("-inf"))
    out = torch.einsum("bkgs,bksd->bkgd", torch.softmax(scores, dim=-1), vc.float())
    return out.reshape(B, heads * d), kc, vc


def inputs(B, heads, kv_heads, d, max_len, positions, dtype, seed, fused_rows=False):
    g = torch.Generator(device="cuda").manual_seed(seed)
    rnd = lambda *shape: torch.randn(*shape, device="cuda", generator=g).to(dtype)  # noqa: E731
    if fused_rows:  # q, k, v as column slices of one qkv row, as the fused projection gives them
        qkv = rnd(B, (heads + 2 * kv_heads) * d)
        q, k, v = qkv.split((heads * d, kv_heads * d, kv_heads * d), dim=1)
    else:
        q, k, v = rnd(B, heads * d), rnd(B, kv_heads * d), rnd(B, kv_heads * d)
    position = torch.tensor(positions, device="cuda", dtype=torch.long)
    # random (not zero) cache contents: slots outside the window must not leak in
    k_cache, v_cache = rnd(B, kv_heads, max_len, d), rnd(B, kv_heads, max_len, d)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, d, 2, device="cuda").float() / d))
    return q, k, v, position, k_cache, v_cache, inv_freq


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


CASES = [
    # B, heads, kv_heads, head_dim, max_len, positions, window, dtype, fused q/k/v rows
    (1, 32, 8, 128, 256, [37], 0, torch.bfloat16, True),  # Llama-3-8B, one split
    (3, 9, 3, 64, 1000, [5, 700, 999], 0, torch.bfloat16, False),  # SmolLM2-135M shape, 4 splits
    (2, 8, 2, 32, 300, [250, 30], 100, torch.bfloat16, True),  # sliding window
    (2, 8, 1, 256, 2048, [2047, 0], 0, torch.float16, False),  # 8 heads per KV head, 8 splits
    (1, 18, 2, 64, 8192, [5000], 0, torch.bfloat16, True),  # 9 heads per KV head, 32 splits
    (4, 28, 4, 128, 64, [63, 0, 17, 40], 0, torch.float16, True),  # Qwen2-7B groups of 7
    (2, 4, 2, 16, 40, [39, 3], 12, torch.bfloat16, False),  # the tiny test checkpoints' head size
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}-h{c[1]}-kv{c[2]}-d{c[3]}-len{c[4]}-w{c[6]}")
def test_decode_attention_matches_reference(case):
    B, heads, kv_heads, d, max_len, positions, window, dtype, fused_rows = case
    q, k, v, position, k_cache, v_cache, inv_freq = inputs(B, heads, kv_heads, d, max_len, positions, dtype,
                                                           seed=max_len, fused_rows=fused_rows)
    scale, rope_scale = d**-0.5, 1.25
    ref_out, ref_k, ref_v = reference(q, k, v, position, k_cache, v_cache, inv_freq, rope_scale, window, scale)
    outs = []
    for _ in range(2):  # twice: the split combine must leave its counters reset
        kc, vc = k_cache.clone(), v_cache.clone()
        outs.append(native.decode_attention_cuda(q, k, v, position, kc, vc, inv_freq, rope_scale, window, scale))
    torch.cuda.synchronize()
    out = outs[0]
    assert out.dtype == dtype and out.shape == (B, heads * d)
    assert torch.isfinite(out).all()
    err = _rel(out, ref_out)
    assert err <= (1e-2 if dtype == torch.bfloat16 else 3e-3), f"output vs float32 reference: {err:.3e}"
    assert _rel(outs[1], out) <= 1e-6
    # the new token's k (RoPE'd) and v land at its slot; every other slot is untouched
    assert torch.allclose(kc.float(), ref_k.float(), rtol=1e-2, atol=1e-2)
    assert torch.equal(vc, ref_v)
    untouched = torch.ones(B, max_len, dtype=torch.bool, device="cuda")
    untouched[torch.arange(B), position] = False
    assert torch.equal(kc.transpose(1, 2)[untouched], k_cache.transpose(1, 2)[untouched])


def test_decode_attention_rejects_unsupported_shapes():
    q, k, v, position, k_cache, v_cache, inv_freq = inputs(1, 8, 2, 96, 32, [3], torch.bfloat16, seed=0)
    assert not native.decode_attention_supported(8, 2, 96, torch.bfloat16)  # head_dim 96
    assert not native.decode_attention_supported(9, 2, 64, torch.bfloat16)  # heads not a multiple of kv_heads
    assert not native.decode_attention_supported(8, 2, 64, torch.float32)
    assert native.decode_attention_supported(18, 2, 64, torch.bfloat16)
    with pytest.raises(ValueError, match="does not support"):
        native.decode_attention_cuda(q, k, v, position, k_cache, v_cache, inv_freq)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
def test_models_decode_through_fused_attention(family, tiny_checkpoints, tmp_path):
    """Whole models (Llama 3 RoPE scaling, Mistral's sliding window, Qwen2's q/k/v
    biases, Qwen3's q/k norms) decode the same through the cuda backend's graph (one q/k/v
    GEMV, the decode attention kernel; dense MLP) as through the reference model, in bf16."""
    from conftest import TINY, make_checkpoint
    from transformers import Qwen3Config

    from clada_export.model.loading import load_decoder
    from clada_export.runtime.backends import CudaBackend, TorchBackend

    path = tiny_checkpoints[family]
    if family == "qwen3":  # the shared tiny Qwen3 has head_dim 24, which the kernel does not take
        path = make_checkpoint(Qwen3Config(**TINY, head_dim=32, tie_word_embeddings=True), tmp_path / "qwen3")
    ref_model, _ = load_decoder(path, dtype=torch.bfloat16, device="cuda")
    fast_model, _ = load_decoder(path, dtype=torch.bfloat16, device="cuda")
    L = ref_model.cfg.num_layers
    g = torch.Generator().manual_seed(3)
    ids, lens = torch.randint(0, ref_model.cfg.vocab_size, (2, 16), generator=g), torch.tensor([16, 11])
    logits = {}
    for name, be in (("ref", TorchBackend(ref_model, "cuda")), ("fast", CudaBackend(fast_model, mlp="dense"))):
        model = be.model
        be.start(2, 48)
        out = be.prefill(ids, lens, torch.zeros(L, 2, 2))
        tok = torch.randint(0, model.cfg.vocab_size, (6, 2), generator=torch.Generator().manual_seed(4))
        steps = []
        for step in range(6):  # teacher-forced, past Mistral's 12-token window
            out = be.decode(tok[step], lens + step, torch.zeros(L, 2, 2))
            steps.append(out.logits.float().cpu())
        logits[name] = torch.stack(steps)
    err = _rel(logits["fast"], logits["ref"])
    assert err <= 2e-2, f"{family}: fused decode attention vs reference attention: {err:.3e}"
