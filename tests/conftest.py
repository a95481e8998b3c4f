"""Shared fixtures: tiny random-weight checkpoints of each supported family, written
offline with transformers (``XxxConfig`` -> ``save_pretrained``), and their exports."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

TINY = dict(vocab_size=320, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)


def _configs():
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    return {
        # Llama 3 style RoPE scaling and tied embeddings, like SmolLM
        "llama": LlamaConfig(**TINY, tie_word_embeddings=True, rope_theta=50000.0,
                             rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                           "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
        # a sliding window shorter than the test sequences, so the window mask matters
        "mistral": MistralConfig(**TINY, sliding_window=12, tie_word_embeddings=False),
        "qwen2": Qwen2Config(**TINY, tie_word_embeddings=False),
        "qwen3": Qwen3Config(**TINY, head_dim=24, tie_word_embeddings=True),
    }


FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


def make_checkpoint(family_or_config, path: Path, seed: int = 0, std: float = 0.08) -> Path:
    """A random-weight checkpoint written with ``save_pretrained``: one of ``FAMILIES``
    (the tiny configs above) or any transformers config. The one checkpoint factory of the
    test suite; matrices drawn from N(0, std) so activations spread like a real model's."""
    from transformers import AutoModelForCausalLM

    cfg = _configs()[family_or_config] if isinstance(family_or_config, str) else family_or_config
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():  # random init is tiny; widen it
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, std)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpt")
    return {f: make_checkpoint(f, root / f) for f in FAMILIES}


@pytest.fixture(scope="session")
def tiny_export(tiny_checkpoints, tmp_path_factory) -> Path:
    """The llama tiny checkpoint exported once (float32)."""
    from clada_export.export.onnx_export import export_onnx
    from clada_export.model.loading import load_decoder

    out = tmp_path_factory.mktemp("export") / "llama"
    model, hf = load_decoder(tiny_checkpoints["llama"])
    export_onnx(model, hf, out, model_dir=tiny_checkpoints["llama"])
    return out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    err = float((a - b).norm() / b.norm().clamp_min(1e-30))
    return err if err == err else float("inf")  # NaN never passes


@pytest.fixture(scope="session")
def tiny_profile(tiny_checkpoints):
    """A profile for the tiny llama: tables recorded on random tokens, a uniform 50%
    allocation (the runtime tests need a real table, not a good one)."""
    import numpy as np

    from clada_export.calibrate.tables import record_tables
    from clada_export.model.loading import load_decoder
    from clada_export.profile import SparsityProfile, model_fingerprint

    model, hf = load_decoder(tiny_checkpoints["llama"])
    windows = torch.randint(0, model.cfg.vocab_size, (8, 32), generator=torch.Generator().manual_seed(0))
    t = record_tables(model, windows, batch_size=4, progress=False)
    L = model.cfg.num_layers
    return SparsityProfile(
        fingerprint=model_fingerprint(hf.to_dict()), model_type="llama", num_layers=L,
        hidden_size=model.cfg.hidden_size, intermediate_size=model.cfg.intermediate_size,
        levels=t.levels, t_in=t.t_in, t_mid=t.t_mid, calib_mean_abs=t.calib_mean_abs,
        target_sparsity=0.5, s_in=np.full(L, 0.5), s_mid=np.full(L, 0.5), method="uniform",
    )


def run_cli(capsys, *argv):
    """``clada-export ARGV`` in-process: (exit code, stdout, stderr)."""
    from clada_export.cli.main import main

    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(err: str) -> str:
    """The CLI's error line; fails unless there is exactly one."""
    lines = [l for l in err.splitlines() if "error:" in l]
    assert len(lines) == 1, err
    return lines[0]


def native_library_or_skip():
    """The CUDA kernel library (clada_export.ops.native.load_library()); skips the test when it
    is not built (the skip says how to build it)."""
    from clada_export.ops import native

    try:
        return native.load_library()
    except native.NativeKernelsUnavailable as e:
        pytest.skip(str(e))


def find_nvcc() -> str | None:
    """nvcc on PATH, in /usr/local/cuda, or named by $CUDACXX; None if absent."""
    import os
    import shutil

    found = shutil.which("nvcc")
    if found:
        return found
    for candidate in ("/usr/local/cuda/bin/nvcc", os.environ.get("CUDACXX", "")):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


@pytest.fixture(scope="session")
def tiny_chat_export(tiny_checkpoints, tiny_profile, tmp_path_factory) -> Path:
    """The tiny llama with a word-level tokenizer (``w0`` .. ``w319``, eos ``w1``), exported
    with ``tiny_profile``: what ``generate`` needs, end to end."""
    import shutil

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from clada_export.export.onnx_export import export_onnx
    from clada_export.model.loading import load_decoder

    root = tmp_path_factory.mktemp("chat")
    ckpt = root / "llama"
    shutil.copytree(tiny_checkpoints["llama"], ckpt)
    tk = Tokenizer(models.WordLevel({f"w{i}": i for i in range(320)}, unk_token="w0"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="w1").save_pretrained(ckpt)
    model, hf = load_decoder(ckpt)
    out = root / "export"
    export_onnx(model, hf, out, model_dir=ckpt, profile=tiny_profile)
    return out
