"""The torch backend's GPU path (CUDA-graph decode with the SparseMLP kernels) against
the float32 reference path, on a small random Llama checkpoint."""

import numpy as np
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


@pytest.mark.parametrize("sparsity", [0.0, 0.5])
def test_cuda_graph_decode_matches_reference(gpu_checkpoint, sparsity):
    _native_or_skip()
    from clada_export.model.loading import load_decoder
    from clada_export.runtime.backends import TorchBackend

    ref_model, _ = load_decoder(gpu_checkpoint, dtype=torch.float32, device="cuda")
    fast_model, _ = load_decoder(gpu_checkpoint, dtype=torch.bfloat16, device="cuda")
    ref, fast = TorchBackend(ref_model, "cuda"), TorchBackend(fast_model, "cuda", cuda_graph=True)
    B, T, L = 2, 12, ref_model.cfg.num_layers
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 512, (B, T), generator=g)
    lens = torch.tensor([T, 9])
    for be in (ref, fast):
        be.start(B, 64)
    zeros = torch.zeros(L, B, 2)
    a = ref.prefill(ids, lens, zeros)
    b = fast.prefill(ids, lens, zeros)
    assert _rel(b.logits, a.logits) <= 2e-2
    # thresholds at the requested quantile of each layer's prompt statistics
    th = (a.act_stats * (2 * sparsity)).float().cpu() if sparsity else zeros
    tok = a.logits.argmax(-1).cpu()
    worst = 0.0
    for step in range(8):
        pos = lens + step
        a = ref.decode(tok, pos, th)
        b = fast.decode(tok, pos, th)
        worst = max(worst, _rel(b.logits, a.logits))
        assert torch.allclose(b.entropy.float(), a.entropy.float(), atol=0.05 * float(a.entropy.abs().max()))
        tok = a.logits.argmax(-1).cpu()  # teacher-forced on the reference's picks
    assert worst <= 3e-2, f"bf16 CUDA-graph decode vs fp32 reference: {worst:.3e}"


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
    assert torch.equal(outs[0], outs[2])
    assert _rel(outs[1], outs[0]) > 1e-3
