"""The graph I/O contract: every input and output of the exported graphs, named once.

The exporter, the runtime backends, the TensorRT engine builder and the tests all read
these names and shapes from here. Symbolic dimensions: ``batch``, ``seq`` (prefill
tokens), ``max_len`` (KV cache slots).
"""

from __future__ import annotations

from dataclasses import dataclass

OP_DOMAIN = "clada"
OP_NAME = "SparseMLP"
OP_VERSION = 1
# the SparseMLP node's attributes, and its inputs in order in each form (gated=1, the
# default: Llama, Qwen, Gemma, Phi-3; gated=0, the plain MLP with biases: GPT-2, OPT, NeoX)
OP_ACTIVATION_ATTRIBUTE = "activation"  # silu, gelu_tanh, gelu, relu
OP_GATED_ATTRIBUTE = "gated"
OP_GATED_INPUTS = ("x", "w_gate_t", "w_up_t", "w_down_t", "thresholds")
OP_PLAIN_INPUTS = ("x", "w_in_t", "b_in", "w_out_t", "b_out", "thresholds")

PREFILL = "prefill"
DECODE = "decode"
GRAPHS = (PREFILL, DECODE)

# metadata keys in the ONNX models and in the export's manifest
META_PROFILE = "clada.profile"
META_DEFAULT_THRESHOLDS = "clada.default_thresholds"
MANIFEST = "clada_export.json"
DEFAULT_THRESHOLDS_FILE = "default_thresholds.npy"


def past_key(i: int) -> str:
    return f"past_key.{i}"


def past_value(i: int) -> str:
    return f"past_value.{i}"


def present_key(i: int) -> str:
    return f"present_key.{i}"


def present_value(i: int) -> str:
    return f"present_value.{i}"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name
    shape: tuple[str | int, ...]


def graph_inputs(graph: str, num_layers: int, kv_heads: int, head_dim: int, cache_dtype: str = "float32"
                 ) -> list[TensorSpec]:
    """Inputs, in order. Prefill: ``input_ids [batch, seq]`` right-padded, ``seq_lens
    [batch]`` (real tokens per row; positions are ``0..seq-1``). Decode: ``input_ids
    [batch, 1]``, ``position [batch]`` (cache slot and RoPE position of the token)."""
    specs = [TensorSpec("input_ids", "int64", ("batch", "seq") if graph == PREFILL else ("batch", 1))]
    specs.append(TensorSpec("seq_lens", "int64", ("batch",)) if graph == PREFILL
                 else TensorSpec("position", "int64", ("batch",)))
    specs.append(TensorSpec("thresholds", "float32", (num_layers, "batch", 2)))
    for i in range(num_layers):
        specs.append(TensorSpec(past_key(i), cache_dtype, ("batch", kv_heads, "max_len", head_dim)))
        specs.append(TensorSpec(past_value(i), cache_dtype, ("batch", kv_heads, "max_len", head_dim)))
    return specs


def graph_outputs(graph: str, num_layers: int, kv_heads: int, head_dim: int, vocab: int,
                  cache_dtype: str = "float32") -> list[TensorSpec]:
    """Outputs, in order: ``logits [batch, vocab]`` (float32, last real token),
    ``entropy [batch]`` and ``logsumexp [batch]`` (nats), prefill only ``act_stats
    [layers, batch, 2]`` (mean |x|, mean |h| of each MLP on the prompt), then the caches."""
    specs = [
        TensorSpec("logits", "float32", ("batch", vocab)),
        TensorSpec("entropy", "float32", ("batch",)),
        TensorSpec("logsumexp", "float32", ("batch",)),
    ]
    if graph == PREFILL:
        specs.append(TensorSpec("act_stats", "float32", (num_layers, "batch", 2)))
    for i in range(num_layers):
        specs.append(TensorSpec(present_key(i), cache_dtype, ("batch", kv_heads, "max_len", head_dim)))
        specs.append(TensorSpec(present_value(i), cache_dtype, ("batch", kv_heads, "max_len", head_dim)))
    return specs
