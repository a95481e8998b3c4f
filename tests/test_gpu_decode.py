"""The cuda backend (runtime/cuda_graph.py: CUDA-graph decode with the SparseMLP and decode
attention kernels) against the reference decoder, the never-slower-than-dense rule, and
`generate --backend cuda` end to end, on small random checkpoints built here. (The default
model is not carried to the GPU machine by these tests.)"""

import pytest
import torch

from conftest import make_checkpoint, native_library_or_skip

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.fixture(scope="module")
def gpu_checkpoint(tmp_path_factory):
    from transformers import LlamaConfig

    cfg = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512)
    return make_checkpoint(cfg, tmp_path_factory.mktemp("gpu") / "llama", std=0.05)


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
        logits.append(out.logits.float().cpu().clone())
        tok = out.logits.argmax(-1).cpu()
    return logits, out


@pytest.mark.parametrize("mlp,layout", [("kernel", "auto"), ("dense", "linear"), ("dense", "kernel"),
                                        ("auto", "auto")])
def test_cuda_backend_at_zero_thresholds_matches_torch_bf16(gpu_checkpoint, mlp, layout):
    """Teacher-forced over 32 steps at zero thresholds, the cuda backend's logits stay within
    bf16 rounding of the torch backend running the same bf16 model eagerly (bound: relative
    L2 error <= 2e-2 per step; measured on the H200 in benchmarks/results), whichever weights
    the dense GEMMs read (nn.Linear-layout copies, or the kernel's own layout)."""
    native_library_or_skip()
    from clada_export.model.loading import load_decoder
    from clada_export.runtime.backends import CudaBackend, TorchBackend

    ref_model, _ = load_decoder(gpu_checkpoint, dtype=torch.bfloat16, device="cuda")
    fast_model, _ = load_decoder(gpu_checkpoint, dtype=torch.bfloat16, device="cuda")
    g = torch.Generator().manual_seed(1)
    ids, lens = torch.randint(0, 512, (2, 12), generator=g), torch.tensor([12, 9])
    zeros = torch.zeros(ref_model.cfg.num_layers, 2, 2)
    ref_logits, _ = _decode_run(TorchBackend(ref_model, "cuda"), ids, lens, zeros, steps=32)
    teacher = [l.argmax(-1) for l in ref_logits[:-1]]
    fast = CudaBackend(fast_model, mlp=mlp, dense_layout=layout)
    fast_logits, _ = _decode_run(fast, ids, lens, zeros, steps=32, teacher=teacher)
    errs = [_rel(f, r) for f, r in zip(fast_logits, ref_logits)]
    print(f"cuda backend ({mlp}, dense weights {fast.path.dense_layout}) vs torch bf16, zero thresholds, 32 steps: "
          f"worst {max(errs):.3e}" + (f"; layout timings {fast.path.layout_times}" if fast.path.layout_times else ""))
    assert max(errs) <= 2e-2
    assert len(fast.graph.variants) == 32


def test_thresholds_update_between_replays(gpu_checkpoint):
    """One captured graph serves every threshold: raising them changes the output, and the
    kernel's row counts show it read fewer weight rows."""
    native_library_or_skip()
    from clada_export.model.loading import load_decoder
    from clada_export.runtime.backends import CudaBackend

    model, _ = load_decoder(gpu_checkpoint, dtype=torch.bfloat16, device="cuda")
    be = CudaBackend(model, mlp="kernel")
    L = model.cfg.num_layers
    ids = torch.randint(0, 512, (1, 6))
    outs, fractions = [], []
    for scale in (0.0, 1.0, 0.0):
        be.start(1, 32)
        pre = be.prefill(ids, torch.tensor([6]), torch.zeros(L, 1, 2))
        th = pre.act_stats.float().cpu() * scale
        outs.append(be.decode(pre.logits.argmax(-1).cpu(), torch.tensor([6]), th).logits.clone())
        be.graph.finish()
        fractions.append(be.graph.fractions[-1])
    assert len(be._graphs) == 1
    noise = _rel(outs[2], outs[0])
    assert noise <= 1e-2
    assert _rel(outs[1], outs[0]) > max(1e-3, 10 * noise)
    assert fractions[0] == pytest.approx(1.0, abs=1e-3) and fractions[2] == pytest.approx(1.0, abs=1e-3)
    assert 0.2 < fractions[1] < 0.8, fractions  # thresholds at the mean |x|, |h|: about half read


def test_dense_rule_picks_by_measured_bytes(gpu_checkpoint):
    """The never-slower-than-dense rule: measured times are sane, a step runs dense exactly
    when the kernel's predicted time at the last measured byte fraction exceeds the dense
    time, and on the dense graph the kernel runs again every PROBE_EVERY-th step."""
    native_library_or_skip()
    from clada_export.model.loading import load_decoder
    from clada_export.runtime.backends import CudaBackend
    from clada_export.runtime.cuda_graph import PROBE_EVERY, DenseRule

    model, _ = load_decoder(gpu_checkpoint, dtype=torch.bfloat16, device="cuda")
    be = CudaBackend(model, mlp="auto")
    L = model.cfg.num_layers
    be.start(4, 128)
    rule = be.graph.rule
    assert 0 < rule.kernel_fixed < rule.kernel_full and rule.dense > 0
    print(f"B=4 rule: kernel {rule.kernel_fixed*1e6:.1f} + {(rule.kernel_full-rule.kernel_fixed)*1e6:.1f} * f us, "
          f"dense {rule.dense*1e6:.1f} us, crossover f = {rule.crossover:.2f}")
    # force each side of the rule: dense always faster, then kernel always faster
    ids, lens = torch.randint(0, 512, (4, 8)), torch.full((4,), 8)
    for forced, expect in ((DenseRule(1.0, 2.0, 0.5), "dense"), (DenseRule(0.1, 0.2, 0.5), "kernel")):
        be.start(4, 128)
        be.graph.rule = forced
        be.prefill(ids, lens, torch.zeros(L, 4, 2))
        tok = torch.zeros(4, dtype=torch.long)
        for step in range(2 * PROBE_EVERY + 2):
            be.decode(tok, lens + step, torch.zeros(L, 4, 2))
        v = be.graph.variants
        assert v[0] == "kernel"  # nothing measured yet: the kernel measures
        if expect == "dense":
            probes = [i for i, x in enumerate(v) if x == "kernel"]
            assert probes == [0, PROBE_EVERY + 1, 2 * PROBE_EVERY + 2][:len(probes)] and len(probes) >= 2, probes
        else:
            assert set(v) == {"kernel"}
    be.graph.rule = rule


def test_generate_cli_on_the_cuda_backend(tiny_chat_export, tmp_path, capsys):
    """`generate --backend cuda` end to end (tiny export with a profile): streams text,
    writes the trace and the plot, reports the backend; a dtype it does not run is one line."""
    native_library_or_skip()
    from conftest import one_line_error, run_cli

    trace, plot = tmp_path / "t.jsonl", tmp_path / "p.png"
    code, out, err = run_cli(capsys, "generate", tiny_chat_export, "--backend", "cuda", "--prompt", "w5 w6 w7",
                             "--max-new-tokens", "12", "--trace", trace, "--plot", plot)
    assert code == 0, err
    assert "backend cuda" in out + err
    assert trace.read_text().count("\n") >= 2
    assert plot.read_bytes()[:4] == b"\x89PNG"
    code, _, err = run_cli(capsys, "generate", tiny_chat_export, "--backend", "cuda", "--dtype", "float32",
                           "--prompt", "w5")
    assert code == 2 and "bfloat16" in one_line_error(err)


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_sparsity_reached_meets_the_profile(mode):
    """With a profile at 50% (recorded on random tokens, SmolLM2-135M's shape with random
    weights), the MLP sparsity the kernel measures while generating (bytes skipped, from its
    row counts) is within 0.02 of the target, for static thresholds and for the controller."""
    native_library_or_skip()
    import numpy as np

    from clada_export.runtime import bench
    from clada_export.runtime.backends import CudaBackend
    from clada_export.runtime.controller import ControllerConfig, ThresholdController
    from clada_export.runtime.generator import Generator

    cfg, theta = bench.SYNTHETIC["smollm2-135m"]
    model = bench.synthetic_model(cfg, theta, torch.bfloat16, "cuda")
    profile = bench.synthetic_profile(model, 0.5, progress=False)
    backend = CudaBackend(model, mlp="kernel")
    factory = (lambda b: ThresholdController(profile, ControllerConfig(), batch=b)) if mode == "dynamic" else None
    gen = Generator(backend, controller_factory=factory,
                    static_thresholds=profile.static_thresholds() if mode == "static" else None)
    prompts = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, 64)).tolist()
    gen.generate(prompts, 48)
    backend.graph.finish()
    reached = 1.0 - float(np.mean(backend.graph.fractions))
    print(f"{mode}: sparsity reached {reached:.4f}, target {profile.target_sparsity}")
    assert abs(reached - profile.target_sparsity) <= 0.02
