"""The decoder's configuration, read from a checkpoint's config.json (never guessed from a name)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from clada_export.errors import UserError

# model_type -> the transformers module whose rotary-embedding class computes RoPE frequencies
# (so every rope_scaling variant the checkpoint may declare is handled by transformers itself).
SUPPORTED_MODEL_TYPES = {
    "llama": "llama",
    "mistral": "mistral",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
}
SUPPORTED_ACTIVATIONS = {"silu": "silu", "swish": "silu"}
# RoPE variants whose frequencies change with the sequence length at run time cannot be
# baked into a static graph.
UNSUPPORTED_ROPE_TYPES = {"dynamic", "longrope"}


def supported_list() -> str:
    return ", ".join(sorted(SUPPORTED_MODEL_TYPES))


@dataclass(frozen=True)
class DecoderConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    qk_norm: bool
    sliding_window: int | None
    act: str

    @classmethod
    def from_hf(cls, hf: Any) -> "DecoderConfig":
        """From a transformers ``PretrainedConfig`` (``AutoConfig.from_pretrained(dir)``)."""
        model_type = getattr(hf, "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UserError(
                f"model_type {model_type!r} is not supported; supported architectures: {supported_list()}"
            )
        act = SUPPORTED_ACTIVATIONS.get(getattr(hf, "hidden_act", "silu"))
        if act is None:
            raise UserError(f"hidden_act {hf.hidden_act!r} is not supported for {model_type}; supported: silu")
        if getattr(hf, "mlp_bias", False):
            raise UserError("checkpoints with mlp_bias=true are not supported (SparseMLP has no bias)")
        rope = getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None) or {}
        rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
        if rope_type in UNSUPPORTED_ROPE_TYPES:
            raise UserError(f"rope type {rope_type!r} changes with sequence length and cannot be exported; "
                            "supported: default, linear, llama3, yarn")
        num_heads = hf.num_attention_heads
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // num_heads
        sliding = None
        if model_type == "mistral":
            sliding = getattr(hf, "sliding_window", None)
        elif model_type in ("qwen2", "qwen3") and getattr(hf, "use_sliding_window", False):
            raise UserError(f"{model_type} with use_sliding_window=true is not supported")
        return cls(
            model_type=model_type,
            vocab_size=hf.vocab_size,
            hidden_size=hf.hidden_size,
            intermediate_size=hf.intermediate_size,
            num_layers=hf.num_hidden_layers,
            num_heads=num_heads,
            num_kv_heads=getattr(hf, "num_key_value_heads", None) or num_heads,
            head_dim=head_dim,
            rms_norm_eps=hf.rms_norm_eps,
            max_position_embeddings=hf.max_position_embeddings,
            tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
            # Qwen2 always has q/k/v biases and no o bias; Llama/Qwen3 follow attention_bias.
            qkv_bias=model_type == "qwen2" or bool(getattr(hf, "attention_bias", False)),
            o_bias=model_type != "qwen2" and bool(getattr(hf, "attention_bias", False)),
            qk_norm=model_type == "qwen3",
            sliding_window=sliding,
            act=act,
        )
