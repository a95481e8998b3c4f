"""Loading a Hugging Face checkpoint directory, offline, into our Decoder.

Our module names mirror transformers' Llama names (``model.`` prefix aside), and the
MLP's matrices are transposed once into the kernel layout. A family that fuses matrices
(Phi-3's ``qkv_proj``, ``gate_up_proj``) has them split first, and a family named
otherwise (GPT-2, OPT, GPT-NeoX) has its tensors renamed onto ours
(``model/families.py``: ``checkpoint_tensors``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from clada_export.errors import UserError
from clada_export.model.config import DecoderConfig, supported_list
from clada_export.model.families import checkpoint_tensors
from clada_export.model.llama import Decoder
from clada_export.model.rope import rope_tables

_MLP = {"gate_proj": "w_gate_t", "up_proj": "w_up_t", "down_proj": "w_down_t"}


def resolve_model_dir(model: str | os.PathLike | None) -> Path:
    """A checkpoint directory; ``None`` means the default model, and a name that is not a
    path a named model (``clada-export models list``), converted on first use."""
    if model is None:
        from clada_export.model.default import default_model_dir

        return default_model_dir()
    path = Path(model)
    if not path.exists():
        from clada_export.model.registry import lookup, model_dir

        spec = lookup(str(model))
        if spec is not None:
            return model_dir(spec)
        raise UserError(f"model directory {path} does not exist; pass a Hugging Face checkpoint directory "
                        "(config.json + safetensors + tokenizer) or a named model (`clada-export models list`), "
                        "or omit MODEL to use the default model")
    if not path.is_dir():
        raise UserError(f"{path} is a file; MODEL must be a checkpoint directory holding config.json")
    if not (path / "config.json").is_file():
        raise UserError(f"{path} has no config.json; is it a Hugging Face checkpoint directory?")
    return path


def load_hf_config(model_dir: Path):
    from transformers import AutoConfig

    try:
        raw = json.loads((model_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{model_dir / 'config.json'} is not readable JSON ({e})") from None
    if raw.get("model_type") is None:
        raise UserError(f"{model_dir / 'config.json'} has no model_type; supported: {supported_list()}")
    try:
        return AutoConfig.from_pretrained(model_dir, local_files_only=True)
    except (ValueError, KeyError) as e:
        raise UserError(f"cannot read {model_dir / 'config.json'} as a transformers config "
                        f"(model_type {raw.get('model_type')!r}; supported: {supported_list()}): {e}") from None


def load_tokenizer(model_dir: Path):
    """The checkpoint's own tokenizer (offline); UserError if it has none."""
    from transformers import AutoTokenizer

    if not any((model_dir / n).is_file() for n in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise UserError(f"{model_dir} has no tokenizer files (tokenizer.json); calibration and evaluation "
                        "tokenize text, so MODEL must include its tokenizer")
    try:
        return AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load the tokenizer of {model_dir} ({e})") from None


def read_state_dict(model_dir: Path) -> dict[str, torch.Tensor]:
    files = sorted(model_dir.glob("*.safetensors"))
    if files:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        state: dict[str, torch.Tensor] = {}
        for f in files:
            try:
                state.update(load_file(f))
            except (SafetensorError, OSError) as e:
                raise UserError(f"cannot read weights {f} ({e}); the file is damaged or truncated") from None
        return state
    files = sorted(model_dir.glob("pytorch_model*.bin"))
    if files:
        state = {}
        for f in files:
            try:
                state.update(torch.load(f, map_location="cpu", weights_only=True))
            except Exception as e:  # torch raises many types for a damaged pickle
                raise UserError(f"cannot read weights {f} ({e}); the file is damaged or truncated") from None
        return state
    raise UserError(f"{model_dir} holds no weights (*.safetensors or pytorch_model*.bin)")


def load_decoder(model_dir: Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
                 ) -> tuple[Decoder, object]:
    """Our Decoder with the checkpoint's weights, and the transformers config it came from."""
    hf_config = load_hf_config(model_dir)
    cfg = DecoderConfig.from_hf(hf_config)
    rope = rope_tables(hf_config)
    with torch.device("meta"):
        model = Decoder(cfg, rope.inv_freq, rope.scaling, rope.local, rope.local_scaling, rope.long)
    state = read_state_dict(model_dir)
    ours: dict[str, torch.Tensor] = {}
    pairs = (pair for item in state.items() for pair in checkpoint_tensors(cfg.model_type, hf_config, *item))
    for name, tensor in pairs:
        key = name.removeprefix("model.")
        parts = key.split(".")
        if len(parts) >= 2 and parts[-2] in _MLP and parts[-1] == "weight":
            key = ".".join(parts[:-2] + [_MLP[parts[-2]]])
            tensor = tensor.t()
        elif parts[-1] == "bias" and len(parts) >= 2 and parts[-2] in _MLP:
            raise UserError(f"{model_dir}: MLP biases ({name}) are not supported by SparseMLP")
        ours[key] = tensor
    if cfg.tie_word_embeddings:
        ours.pop("lm_head.weight", None)
    expected = {k: v for k, v in model.state_dict().items() if not (cfg.tie_word_embeddings and k == "lm_head.weight")}
    missing = sorted(set(expected) - set(ours))
    if missing:
        raise UserError(f"weights in {model_dir} don't match config.json: {len(missing)} tensors missing "
                        f"(e.g. {', '.join(missing[:3])}); is the checkpoint complete?")
    # rotary caches some exporters save are not weights of ours
    unexpected = sorted(k for k in set(ours) - set(expected) if not k.endswith("rotary_emb.inv_freq"))
    if unexpected:
        raise UserError(f"weights in {model_dir} don't match config.json: unexpected tensors "
                        f"{', '.join(unexpected[:3])}; is config.json from another model?")
    for k, v in expected.items():
        if tuple(ours[k].shape) != tuple(v.shape):
            raise UserError(f"weights in {model_dir} don't match config.json: {k} has shape "
                            f"{list(ours[k].shape)}, config implies {list(v.shape)}")
    model = model.to_empty(device=device)
    if cfg.tie_word_embeddings:  # to_empty makes new parameters from meta ones: tie again
        model.lm_head.weight = model.embed_tokens.weight
    with torch.no_grad():
        model.load_state_dict({k: ours[k].to(dtype) for k in expected}, strict=False, assign=False)
        for name, table in (("inv_freq", rope.inv_freq), ("inv_freq_local", rope.local), ("inv_freq_long", rope.long)):
            if table is not None:
                getattr(model, name).copy_(table)
    model = model.to(dtype)  # the RoPE tables stay float32 (Decoder._apply)
    model.eval()
    return model, hf_config
