"""Converting a GGUF checkpoint into an ordinary Hugging Face checkpoint directory.

transformers (>= 5) reads a GGUF with ``gguf_file=`` and dequantizes it to float32, but
refuses to ``save_pretrained`` a model loaded that way; so the dequantized weights are
moved (not copied: ``assign=True`` on a model built on the meta device, so a 1.5B model
needs its 6 GB once, not twice) into a plain model built from a clean config, checked
against the GGUF model's logits, and saved with the tokenizer. The result must load
from the directory alone, encode as the GGUF tokenizer does, and have a sane
perplexity on the shipped calibration text.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from clada_export.errors import UserError


@dataclass(frozen=True)
class ConversionChecks:
    """What a converted model must satisfy. ``reference_ids``: the token ids of "The
    capital of France is" under the model's own tokenizer (None: not checked);
    ``max_perplexity``: on 256 tokens of the shipped calibration text (a broken
    conversion, e.g. a random lm_head, gives thousands)."""

    model_type: str
    architecture: str
    reference_ids: tuple[int, ...] | None
    max_perplexity: float


REFERENCE_PROMPT = "The capital of France is"


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", version)[:2])


def dtype_kwargs(dtype) -> dict:
    """transformers >= 4.56 calls it ``dtype``; older releases ``torch_dtype``."""
    import transformers

    return {"dtype": dtype} if _version_tuple(transformers.__version__) >= (4, 56) else {"torch_dtype": dtype}


def convert_gguf(gguf: Path, out: Path, checks: ConversionChecks, reinstall_hint: str, progress: bool) -> dict:
    """Write the checkpoint of ``gguf`` into ``out``; returns facts for the cache marker."""
    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if _version_tuple(transformers.__version__) < (5, 0):
        # 4.x reads these GGUFs wrongly (e.g. SmolLM2: untied, randomly initialized lm_head
        # and a tokenizer that prepends <|im_start|>). A checkpoint converted by 5.x loads in 4.x.
        raise UserError(f"converting a GGUF model needs transformers>=5 (found {transformers.__version__}): "
                        "`pip install -U 'transformers>=5'`, or pass a checkpoint directory as MODEL")
    if importlib.util.find_spec("gguf") is None:
        raise UserError("converting a GGUF model needs the gguf package: `pip install gguf` "
                        "(the project's install brings it)")
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # GGUF loading warns about every dequantized tensor type
    # The GGUF reader draws its own tqdm bar (not transformers' switchable one): with
    # progress off, its stderr goes nowhere.
    quiet = contextlib.nullcontext() if progress else contextlib.redirect_stderr(io.StringIO())
    try:
        with quiet:
            tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                             **dtype_kwargs(torch.float32))
    finally:
        hf_logging.set_verbosity(verbosity)
    quantized.eval()

    cfg = quantized.config.to_dict()
    if cfg.get("model_type") != checks.model_type:
        raise UserError(f"{gguf} holds a {cfg.get('model_type')!r} model, expected {checks.model_type}; "
                        f"reinstall: `{reinstall_hint}`")
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version",
                "_commit_hash", "torch_dtype", "dtype"):
        cfg.pop(key, None)
    cfg["architectures"] = [checks.architecture]
    model_type = cfg.pop("model_type")
    config = AutoConfig.for_model(model_type, **cfg)
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config)
    state = quantized.state_dict()
    missing, unexpected = plain.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        missing = [k for k in missing if k != "lm_head.weight"]
        plain.tie_weights()
    if missing or unexpected:
        raise RuntimeError(f"GGUF weights do not fit a {checks.architecture}: missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]}")
    # non-persistent buffers (rotary frequencies) are not in the state dict: take the GGUF model's
    quantized_buffers = dict(quantized.named_buffers())
    for name, buf in list(plain.named_buffers()):
        if buf.is_meta:
            owner, _, attr = name.rpartition(".")
            src = quantized_buffers.get(name)
            if src is None:
                raise RuntimeError(f"buffer {name} of the converted model has no counterpart in the GGUF model")
            plain.get_submodule(owner)._buffers[attr] = src.clone()
    left = [n for n, p in plain.named_parameters() if p.is_meta]
    if left:
        raise RuntimeError(f"GGUF weights do not fill a {checks.architecture}: {left[:3]} have no values")
    plain.eval()
    with torch.no_grad():  # same logits as the GGUF-loaded model (attention kernels may differ)
        ids = torch.tensor([tok(REFERENCE_PROMPT).input_ids])
        ref, got = quantized(ids).logits, plain(ids).logits
        err = float((ref - got).abs().max()) / max(1.0, float(ref.abs().max()))
        if not err <= 1e-4:
            raise RuntimeError(f"the converted model's logits differ from the GGUF model's (rel. error {err:.2e})")
    del quantized, state, quantized_buffers
    with contextlib.nullcontext() if progress else contextlib.redirect_stderr(io.StringIO()):
        plain.save_pretrained(out)
        tok.save_pretrained(out)

    # config.json: transformers 5.x writes rope_theta inside rope_parameters only; 4.x
    # reads the top-level key (and would silently fall back to 10000). Write both.
    cfg_path = out / "config.json"
    saved = json.loads(cfg_path.read_text())
    rope = saved.get("rope_parameters") or {}
    if "rope_theta" not in saved and "rope_theta" in rope:
        saved["rope_theta"] = rope["rope_theta"]
    cfg_path.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")

    # tokenizer_config.json: a class every transformers release knows (4.x has no
    # "TokenizersBackend"), and none of the load-time flags 5.x writes into it.
    tc_path = out / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text())
    tc["tokenizer_class"] = "PreTrainedTokenizerFast"
    for key in ("is_local", "local_files_only"):
        tc.pop(key, None)
    tc_path.write_text(json.dumps(tc, indent=2, ensure_ascii=False) + "\n")

    # The saved tokenizer must load from the directory alone and encode as the GGUF one does.
    reloaded = AutoTokenizer.from_pretrained(out, local_files_only=True)
    sample = "The capital of France is Paris.\n  Naïve café, 1234 — <|im_start|>user\nhi<|im_end|>"
    if reloaded(sample).input_ids != tok(sample).input_ids:
        raise RuntimeError("the saved tokenizer encodes differently from the GGUF tokenizer")
    if checks.reference_ids is not None and reloaded(REFERENCE_PROMPT).input_ids != list(checks.reference_ids):
        raise RuntimeError(f"the saved tokenizer does not encode {REFERENCE_PROMPT!r} as the model's own "
                           f"tokenizer does")

    from clada_export.data import calibration_text_sources, load_windows

    window = load_windows(reloaded, calibration_text_sources(), n_tokens=256, window=256)
    with torch.no_grad():
        ppl = math.exp(float(plain(window, labels=window).loss))
    if not ppl < checks.max_perplexity:
        raise RuntimeError(f"the converted model is broken: perplexity {ppl:.1f} on a slice of the "
                           f"calibration text (expected under {checks.max_perplexity:g}; "
                           f"transformers {transformers.__version__})")
    return {
        "config": {"model_type": model_type, "num_hidden_layers": config.num_hidden_layers,
                   "hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
                   "parameters": int(sum(p.numel() for p in plain.parameters()))},
        "converted_with": {"transformers": transformers.__version__, "torch": torch.__version__},
        "sanity_perplexity": round(ppl, 3),
    }
