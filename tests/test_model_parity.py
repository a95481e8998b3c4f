"""Our decoder against transformers' own implementation of the same checkpoint."""

import pytest
import torch

from clada_export.errors import UserError
from clada_export.model.loading import load_decoder
from conftest import FAMILIES, rel_err

PROMPT_LEN, STEPS, MAX_LEN = 10, 16, 40


@pytest.mark.parametrize("family", FAMILIES)
def test_prefill_and_greedy_decode_match_transformers(family, tiny_checkpoints):
    from transformers import AutoModelForCausalLM

    path = tiny_checkpoints[family]
    ours, _ = load_decoder(path)
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    torch.manual_seed(0)
    B = 2
    prompt = torch.randint(0, ours.cfg.vocab_size, (B, PROMPT_LEN))
    k, v = ours.new_cache(B, MAX_LEN)
    zeros = torch.zeros(ours.cfg.num_layers, B, 2)
    seq = prompt
    worst = 0.0
    with torch.no_grad():
        out = ours(prompt, torch.arange(PROMPT_LEN)[None].expand(B, -1), k, v, zeros)
        for step in range(STEPS + 1):
            expected = ref(seq).logits[:, -1]
            worst = max(worst, rel_err(out.logits, expected))
            if step == STEPS:
                break
            nxt = out.logits.argmax(-1)
            assert torch.equal(nxt, expected.argmax(-1)), f"greedy token differs at step {step}"
            seq = torch.cat([seq, nxt[:, None]], dim=1)
            pos = torch.full((B, 1), seq.shape[1] - 1)
            out = ours(nxt[:, None], pos, out.k_caches, out.v_caches, zeros)
    assert worst <= 1e-4, f"{family}: worst logits relative error {worst:.2e}"


def test_right_padded_batch_matches_unpadded():
    """A short prompt padded on the right gives the same logits as alone."""
    from conftest import make_checkpoint
    import tempfile, pathlib

    with tempfile.TemporaryDirectory() as d:
        ours, _ = load_decoder(make_checkpoint("llama", pathlib.Path(d) / "m"))
    torch.manual_seed(1)
    a = torch.randint(0, 320, (1, 9))
    b = torch.randint(0, 320, (1, 5))
    batch = torch.cat([a, torch.cat([b, torch.zeros(1, 4, dtype=torch.long)], 1)])
    zeros = torch.zeros(ours.cfg.num_layers, 2, 2)
    with torch.no_grad():
        k, v = ours.new_cache(2, 16)
        both = ours(batch, torch.arange(9)[None].expand(2, -1), k, v, zeros, last_index=torch.tensor([8, 4]))
        k1, v1 = ours.new_cache(1, 16)
        alone = ours(b, torch.arange(5)[None], k1, v1, zeros[:, :1])
    assert rel_err(both.logits[1], alone.logits[0]) <= 1e-5


def test_unsupported_architecture_names_supported_ones(tmp_path):
    from transformers import GPTJConfig

    GPTJConfig(n_layer=1, n_embd=32, n_head=2, vocab_size=64).save_pretrained(tmp_path)
    with pytest.raises(UserError, match="gptj.*not supported.*gemma2, gemma3_text, gpt2, gpt_neox, llama, mistral, "
                                       "opt, phi3, qwen2, qwen3"):
        load_decoder(tmp_path)
