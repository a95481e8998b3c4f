"""The torch backend's GPU path (CUDA-graph decode with the SparseMLP kernels) against
the float32 reference path, on a small random Llama checkpoint."""

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (runs on the lent H100)"),
]


def _native_or_skip():
    from clada_export.ops import native

    if not native.is_available():
        pytest.fail("libclada_kernels.so is not built: run cmake -S plugins -B plugins/build && "
                    "cmake --build plugins/build (benchmarks/gpu_check.sh does)")


@pytest.fixture(scope="module")
def gpu_checkpoint(tmp_path_factory):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.05)
    path = tmp_path_factory.mktemp("gpu") / "llama"
    model.save_pretrained(path)
    return path


def _rel(a, b):
    a, b = a.double(), b.double()
    e = float((a - b).norm() / b.norm())
    return e if e == e else float("inf")


def _decode_run(backend, ids, lens, th, steps=8, teacher=None):
    """Prefill dense, then ``steps`` decode steps at thresholds ``th``; the fed tokens
    are ``teacher`` (or the backend's own greedy picks). Returns logits per step."""
    L, B = th.shape[0], ids.shape[0]
    backend.start(B, 64)
    out = backend.prefill(ids, lens, torch.zeros(L, B, 2))
    logits = [out.logits.float().cpu()]
    tok = out.logits.argmax(-1).cpu()
    for step in range(steps):
        if teacher is not None:
            tok = teacher[step]
        out = backend.decode(tok, lens + step, th)
        logits.append(out.logits.float().cpu())
        tok = out.logits.argmax(-1).cpu()
    return logits, out


def test_cuda_graph_decode_matches_fp32_reference_when_dense(gpu_checkpoint):
    _native_or_skip()
    from clada_export.model.loading import load_decoder
    from clada_export.runtime.backends import TorchBackend

    ref_model, _ = load_decoder(gpu_checkpoint, dtype=torch.float32, device="cuda")
    fast_model, _ = load_decoder(gpu_checkpoint, dtype=torch.bfloat16, device="cuda")
    g = torch.Generator().manual_seed(1)
    ids, lens = torch.randint(0, 512, (2, 12), generator=g), torch.tensor([12, 9])
    zeros = torch.zeros(ref_model.cfg.num_layers, 2, 2)
    ref_logits, _ = _decode_run(TorchBackend(ref_model, "cuda"), ids, lens, zeros)
    teacher = [l.argmax(-1) for l in ref_logits[:-1]]
    fast_logits, _ = _decode_run(TorchBackend(fast_model, "cuda", cuda_graph=True), ids, lens, zeros, teacher=teacher)
    worst = max(_rel(f, r) for f, r in zip(fast_logits, ref_logits))
    # bf16 weights and activations against float32: rounding-level differences only
    assert worst <= 3e-2, f"bf16 CUDA-graph decode vs fp32 reference: {worst:.3e}"


def test_cuda_graph_decode_matches_eager_kernels(gpu_checkpoint):
    """The captured graph (in-place cache, thresholds in static buffers) computes what
    the same bf16 model computes eagerly with the same kernels. (Kernel-vs-reference
    parity of the ops themselves is tests/test_kernels_gpu.py's and
    tests/test_attention_gpu.py's job.)

    The SparseMLP kernel adds fp32 partial sums with atomics, so the rounding of its bf16
    output varies a little from run to run; at ~50% sparsity, once such a difference
    decides a threshold, the cache carries it on: two eager runs of this model differ by
    up to ~0.1 (H100; bf16 vs fp32 differ by ~0.3 from threshold flips alone). So zero
    thresholds (no decision to flip) are held to bf16 rounding, sparse ones to the scale
    of threshold flips; that the graph applies the thresholds it is given is
    test_thresholds_update_between_replays' job."""
    _native_or_skip()
    from clada_export.model.loading import load_decoder
    from clada_export.runtime.backends import TorchBackend
    from clada_export.runtime.cuda_graph import use_decode_kernels

    eager_model, _ = load_decoder(gpu_checkpoint, dtype=torch.bfloat16, device="cuda")
    use_decode_kernels(eager_model)
    fast_model, _ = load_decoder(gpu_checkpoint, dtype=torch.bfloat16, device="cuda")
    g = torch.Generator().manual_seed(2)
    ids, lens = torch.randint(0, 512, (2, 12), generator=g), torch.tensor([12, 9])
    probe = TorchBackend(eager_model, "cuda")
    probe.start(2, 64)
    stats = probe.prefill(ids, lens, torch.zeros(eager_model.cfg.num_layers, 2, 2)).act_stats.float().cpu()
    sparse = stats.clone()
    sparse[:, 1] *= 1.3  # ~50% of |x| and |h| under threshold, the second sequence sparser
    fast = TorchBackend(fast_model, "cuda", cuda_graph=True)
    for th, tol, entropy_tol in ((torch.zeros_like(stats), 2e-2, 2e-2), (sparse, 0.3, 0.5)):
        eager_logits, eager_out = _decode_run(TorchBackend(eager_model, "cuda"), ids, lens, th)
        teacher = [l.argmax(-1) for l in eager_logits[:-1]]
        fast_logits, fast_out = _decode_run(fast, ids, lens, th, teacher=teacher)
        worst = max(_rel(f, r) for f, r in zip(fast_logits, eager_logits))
        assert worst <= tol, f"graph vs eager with the same kernels: {worst:.3e}"
        entropy_err = (fast_out.entropy.float().cpu() - eager_out.entropy.float().cpu()).abs().max()
        assert entropy_err <= entropy_tol, f"entropy, graph vs eager: {entropy_err:.3e}"


def test_thresholds_update_between_replays(gpu_checkpoint):
    """One captured graph serves every threshold: raising them changes the output."""
    _native_or_skip()
    from clada_export.model.loading import load_decoder
    from clada_export.runtime.backends import TorchBackend

    model, _ = load_decoder(gpu_checkpoint, dtype=torch.bfloat16, device="cuda")
    be = TorchBackend(model, "cuda", cuda_graph=True)
    L = model.cfg.num_layers
    ids = torch.randint(0, 512, (1, 6))
    outs = []
    for scale in (0.0, 1.0, 0.0):
        be.start(1, 32)
        pre = be.prefill(ids, torch.tensor([6]), torch.zeros(L, 1, 2))
        th = pre.act_stats.float().cpu() * scale
        outs.append(be.decode(pre.logits.argmax(-1).cpu(), torch.tensor([6]), th).logits.clone())
    assert len(be._graphs) == 1
    # The kernels' fp32 atomics may round the same step differently from run to run, so the
    # two replays at zero thresholds agree to a tolerance (usually exactly), and the change
    # from raised thresholds must stand well above that noise.
    noise = _rel(outs[2], outs[0])
    assert noise <= 1e-2
    assert _rel(outs[1], outs[0]) > max(1e-3, 10 * noise)
