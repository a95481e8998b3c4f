"""The decoder's configuration, read from a checkpoint's config.json (never guessed from a name).

One :class:`DecoderConfig` describes every supported family: the Llama layout is the
default, and each other family (``model/families.py``) sets only the fields in which it
differs (Gemma's norms, embedding scale and soft-caps; Phi-3's partial rotary and longrope;
GPT-2's, OPT's and GPT-NeoX's LayerNorm, plain MLP with biases, learned positions or
parallel residual).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from clada_export.errors import UserError

# model_type -> the transformers module whose rotary-embedding class computes RoPE frequencies
# (so every rope_scaling variant the checkpoint may declare is handled by transformers itself);
# None for a family with learned positions and no RoPE.
SUPPORTED_MODEL_TYPES = {
    "llama": "llama",
    "mistral": "mistral",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma2": "gemma2",
    "gemma3_text": "gemma3",
    "phi3": "phi3",
    "gpt2": None,  # learned positions: no RoPE
    "opt": None,
    "gpt_neox": "gpt_neox",
}
# transformers' activation names -> the SparseMLP op's (ops/sparse_mlp.py: ACTIVATIONS)
SUPPORTED_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
                         "gelu": "gelu", "relu": "relu"}
# RoPE variants whose frequencies change continuously with the sequence length at run time
# cannot be baked into a static graph. (longrope switches once, at a fixed length: the
# graph selects its frequencies from the position input, see model/rope.py.)
UNSUPPORTED_ROPE_TYPES = {"dynamic"}
SUPPORTED_ROPE_TYPES = "default, linear, llama3, yarn, longrope"


def supported_list() -> str:
    return ", ".join(sorted(SUPPORTED_MODEL_TYPES))


# keys of a config's dict (``to_dict()``, config.json) under their families' names
_HF_KEYS = {
    "hidden_size": ("hidden_size", "n_embd"),
    "num_hidden_layers": ("num_hidden_layers", "n_layer"),
    "num_attention_heads": ("num_attention_heads", "n_head"),
    "max_position_embeddings": ("max_position_embeddings", "n_positions"),
    "intermediate_size": ("intermediate_size", "ffn_dim", "n_inner"),
}


def hf_dict_value(d: dict, key: str) -> Any:
    """``d[key]`` of a transformers config's dict, read under the family's own name where
    it has one (GPT-2's ``n_embd``, OPT's ``ffn_dim``, ...); GPT-2's FFN width defaults to
    4 x hidden. None when absent."""
    for name in _HF_KEYS.get(key, (key,)):
        if d.get(name) is not None:
            return d[name]
    if key == "intermediate_size" and d.get("model_type") == "gpt2" and d.get("n_embd") is not None:
        return 4 * d["n_embd"]
    return None


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
    # -- where a family differs from the Llama layout (defaults: Llama) --
    norm_offset: float = 0.0  # RMSNorm scales by (norm_offset + weight): Gemma stores weight - 1
    embed_scale: float | None = None  # embeddings multiplied by this (Gemma: sqrt(hidden))
    sandwich_norms: bool = False  # Gemma: the attention and MLP outputs are normed too (four norms a block)
    attn_scale: float | None = None  # attention scores' scale; None: head_dim ** -0.5
    attn_softcap: float | None = None  # scores -> cap * tanh(scores / cap) (Gemma 2)
    final_softcap: float | None = None  # logits -> cap * tanh(logits / cap) (Gemma 2)
    sliding_layers: tuple[bool, ...] | None = None  # which layers use sliding_window; None: all of them
    local_rope: bool = False  # sliding layers have their own RoPE frequencies (Gemma 3)
    rotary_dim: int | None = None  # RoPE on the first rotary_dim channels of a head; None: all (Phi-3 may use fewer)
    rope_long_after: int | None = None  # longrope: long-factor frequencies once a sequence is longer than this
    layer_norm: bool = False  # LayerNorm with bias instead of RMSNorm (eps: rms_norm_eps) (GPT-2, OPT, GPT-NeoX)
    gated_mlp: bool = True  # False: the plain MLP act(x W1 + b1) W2 + b2, SparseMLP's plain form (GPT-2, OPT, NeoX)
    learned_positions: bool = False  # position embeddings added to the token embeddings, no RoPE (GPT-2, OPT)
    position_offset: int = 0  # the learned position table's row of position p is p + offset (OPT: 2)
    parallel_residual: bool = False  # x + attn(norm1(x)) + mlp(norm2(x)) (GPT-NeoX's use_parallel_residual)

    def is_sliding(self, layer: int) -> bool:
        """Whether ``layer`` attends through the sliding window."""
        if self.sliding_window is None:
            return False
        return True if self.sliding_layers is None else self.sliding_layers[layer]

    @property
    def rope_dim(self) -> int:
        """Channels of a head that RoPE rotates (0 with learned positions)."""
        return 0 if self.learned_positions else (self.rotary_dim or self.head_dim)

    def llama_layout_differences(self) -> list[str]:
        """The family fields set away from the Llama layout (empty for Llama, Mistral,
        Qwen2/3, and Phi-3 without partial rotary or longrope). A fast path written for the
        Llama layout (runtime/cuda_graph.py) must refuse a model for which this is not
        empty, or it computes another model."""
        # the family fields are the ones with a default, and the default is Llama's
        return [f.name for f in dataclasses.fields(self)
                if f.default is not dataclasses.MISSING and getattr(self, f.name) != f.default]

    @classmethod
    def from_hf(cls, hf: Any) -> "DecoderConfig":
        """From a transformers ``PretrainedConfig`` (``AutoConfig.from_pretrained(dir)``)."""
        from clada_export.model.families import family_fields

        model_type = getattr(hf, "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UserError(
                f"model_type {model_type!r} is not supported; supported architectures: {supported_list()}"
            )
        hf_act = (getattr(hf, "hidden_activation", None) or getattr(hf, "hidden_act", None)
                  or getattr(hf, "activation_function", None) or "silu")
        act = SUPPORTED_ACTIVATIONS.get(hf_act)
        if act is None:
            raise UserError(f"hidden_act {hf_act!r} is not supported for {model_type}; supported: "
                            f"{', '.join(SUPPORTED_ACTIVATIONS)}")
        if getattr(hf, "mlp_bias", False):
            raise UserError("checkpoints with mlp_bias=true are not supported (the gated SparseMLP has no bias)")
        for rope_type in rope_types(hf):
            if rope_type in UNSUPPORTED_ROPE_TYPES:
                raise UserError(f"rope type {rope_type!r} changes with sequence length and cannot be exported; "
                                f"supported: {SUPPORTED_ROPE_TYPES}")
        # hidden_size, num_attention_heads, num_hidden_layers and max_position_embeddings
        # are aliases in every config (GPT-2's n_embd, n_head, ...); the FFN width and the
        # norm's eps have family names (model/families.py)
        num_heads = hf.num_attention_heads
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // num_heads
        fields = dict(
            model_type=model_type,
            vocab_size=hf.vocab_size,
            hidden_size=hf.hidden_size,
            intermediate_size=getattr(hf, "intermediate_size", None),
            num_layers=hf.num_hidden_layers,
            num_heads=num_heads,
            num_kv_heads=getattr(hf, "num_key_value_heads", None) or num_heads,
            head_dim=head_dim,
            rms_norm_eps=getattr(hf, "rms_norm_eps", None),
            max_position_embeddings=hf.max_position_embeddings,
            tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
            qkv_bias=bool(getattr(hf, "attention_bias", False)),
            o_bias=bool(getattr(hf, "attention_bias", False)),
            qk_norm=False,
            sliding_window=None,
            act=act,
        )
        fields.update(family_fields(model_type, hf, head_dim))
        return cls(**fields)


def rope_parameter_sets(hf: Any) -> dict[str | None, dict]:
    """The checkpoint's RoPE parameters: ``{None: params}``, or one set per layer type
    (Gemma 3: ``full_attention``, ``sliding_attention``)."""
    rope = getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None) or {}
    if not isinstance(rope, dict):
        return {None: {}}
    if rope and all(isinstance(v, dict) for v in rope.values()):
        return dict(rope)
    return {None: rope}


def rope_types(hf: Any) -> list[str]:
    return [p.get("rope_type", p.get("type", "default")) or "default" for p in rope_parameter_sets(hf).values()]
