"""The SparseMLP op: the one reference definition of CLADA's thresholded MLP, in its two
forms. The gated form (Llama, Qwen, Gemma, Phi-3: :func:`sparse_mlp_reference`) and the
plain form (GPT-2, OPT, GPT-NeoX: :func:`plain_sparse_mlp_reference`, with biases) share
the thresholding (:func:`threshold_columns`, :func:`keep_above`): what is thresholded is
the MLP's input ``x`` and its intermediate activation ``h`` in both.

The other implementations are tested against the references: the ONNX
function body in ``onnx_function.py`` (through the exported graphs, in
tests/test_onnx_export.py), and the CUDA kernels in ``plugins/kernels`` with the runtime's
dense-GEMM form of the op (tests/test_kernels_gpu.py, on a GPU). The TensorRT plugin calls
the same CUDA kernels.

Weight layout (shared by the torch model, the ONNX initializers and the CUDA kernels):
``w_gate_t`` and ``w_up_t`` are ``[hidden, intermediate]`` (input-major: a zero input
channel ``x_i`` skips the contiguous row ``i``), ``w_down_t`` is ``[intermediate, hidden]``
(a zero intermediate channel ``h_j`` skips the contiguous row ``j``). These are the
transposes of Hugging Face's ``nn.Linear`` weights. The plain form's ``w_in_t``
``[hidden, intermediate]`` and ``w_out_t`` ``[intermediate, hidden]`` follow the same rule
(GPT-2's ``Conv1D`` weights are stored this way already).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATIONS = ("silu", "gelu_tanh", "gelu", "relu")


def activation(h: torch.Tensor, name: str) -> torch.Tensor:
    if name == "silu":
        return F.silu(h)
    if name == "gelu_tanh":
        return F.gelu(h, approximate="tanh")
    if name == "gelu":
        return F.gelu(h)
    if name == "relu":
        return F.relu(h)
    raise ValueError(f"unsupported activation {name!r}; supported: {', '.join(ACTIVATIONS)}")


def gated_intermediate(x: torch.Tensor, w_gate_t: torch.Tensor, w_up_t: torch.Tensor, act: str = "silu"
                       ) -> torch.Tensor:
    """``h = act(x Wg) * (x Wu)``: the gated MLP's intermediate activation."""
    return activation(x @ w_gate_t, act) * (x @ w_up_t)


def plain_intermediate(x: torch.Tensor, w_in_t: torch.Tensor, b_in: torch.Tensor, act: str = "gelu"
                       ) -> torch.Tensor:
    """``h = act(x W1 + b1)``: the plain MLP's intermediate activation."""
    return activation(x @ w_in_t + b_in, act)


def keep_above(v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``v * (|v| > t)``: the one definition of thresholding, for ``x`` and for ``h``."""
    return torch.where(v.abs() > t, v, torch.zeros_like(v))


def _per_row(thresholds: torch.Tensor, column: int, like: torch.Tensor) -> torch.Tensor:
    # thresholds [B, 2] -> [B, 1, ..., 1] broadcastable over x/h of shape [B, ..., C]
    t = thresholds[:, column].to(like.dtype)
    return t.reshape(t.shape[0], *([1] * (like.dim() - 1)))


def check_thresholds(thresholds: torch.Tensor, batch: int) -> None:
    if thresholds.dim() != 2 or thresholds.shape[1] != 2 or thresholds.shape[0] != batch:
        raise ValueError(
            f"thresholds must have shape [batch={batch}, 2] (t_in, t_mid) for one layer, "
            f"got {list(thresholds.shape)}"
        )


def threshold_columns(thresholds: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(t_in, t_mid)`` in x's dtype, broadcastable over ``x [B, ..., C]`` (and h): from
    ``thresholds [B, 2]`` per sequence, or ``[B, T, 2]`` per token for ``x [B, T, C]``."""
    if thresholds.dim() == 3:
        if x.dim() != 3 or tuple(thresholds.shape) != (*x.shape[:2], 2):
            raise ValueError(f"thresholds must have shape [batch={x.shape[0]}, 2] (t_in, t_mid) for one layer, "
                             f"or per token {[*x.shape[:-1], 2]} for x of shape {list(x.shape)}, "
                             f"got {list(thresholds.shape)}")
        return thresholds[..., 0:1].to(x.dtype), thresholds[..., 1:2].to(x.dtype)
    check_thresholds(thresholds, x.shape[0])
    return _per_row(thresholds, 0, x), _per_row(thresholds, 1, x)


def sparse_mlp_reference(
    x: torch.Tensor,
    w_gate_t: torch.Tensor,
    w_up_t: torch.Tensor,
    w_down_t: torch.Tensor,
    thresholds: torch.Tensor,
    act: str = "silu",
) -> torch.Tensor:
    """Gated MLP with input and intermediate magnitude thresholds.

    x: ``[B, ..., hidden]``; thresholds: ``[B, 2]`` = (t_in, t_mid) per sequence (the
    graphs' contract), or ``[B, T, 2]`` per token for ``x [B, T, hidden]`` (teacher-forced
    evaluation of dynamic control in one pass: token ``t`` runs at its own thresholds,
    as it would in its own decode step).
    ``x_s = x * (|x| > t_in)``, ``h = act(x_s @ Wg) * (x_s @ Wu)``,
    ``h_s = h * (|h| > t_mid)``, ``y = h_s @ Wd``. Zero thresholds are exactly dense:
    ``|v| > 0`` keeps every nonzero value and a zero contributes nothing either way.
    """
    t_in, t_mid = threshold_columns(thresholds, x)
    h = gated_intermediate(keep_above(x, t_in), w_gate_t, w_up_t, act)
    return keep_above(h, t_mid.to(h.dtype)) @ w_down_t


def plain_sparse_mlp_reference(
    x: torch.Tensor,
    w_in_t: torch.Tensor,
    b_in: torch.Tensor,
    w_out_t: torch.Tensor,
    b_out: torch.Tensor,
    thresholds: torch.Tensor,
    act: str = "gelu",
) -> torch.Tensor:
    """The plain (non-gated) MLP with biases, thresholded as :func:`sparse_mlp_reference`:
    ``x_s = x * (|x| > t_in)``, ``h = act(x_s @ W1 + b1)``, ``h_s = h * (|h| > t_mid)``,
    ``y = h_s @ W2 + b2``. ``w_in_t [hidden, inter]``, ``b_in [inter]``, ``w_out_t
    [inter, hidden]``, ``b_out [hidden]``; thresholds as there. Zero thresholds are
    exactly the dense MLP. (A skipped ``x_i`` still leaves ``b1``: the bias is not a row.)"""
    t_in, t_mid = threshold_columns(thresholds, x)
    h = plain_intermediate(keep_above(x, t_in), w_in_t, b_in, act)
    return keep_above(h, t_mid.to(h.dtype)) @ w_out_t + b_out


def dense_mlp(
    x: torch.Tensor, w_gate_t: torch.Tensor, w_up_t: torch.Tensor, w_down_t: torch.Tensor, act: str = "silu"
) -> torch.Tensor:
    """The plain gated MLP, for tests that zero thresholds reproduce it exactly."""
    return gated_intermediate(x, w_gate_t, w_up_t, act) @ w_down_t


def dense_plain_mlp(x: torch.Tensor, w_in_t: torch.Tensor, b_in: torch.Tensor, w_out_t: torch.Tensor,
                    b_out: torch.Tensor, act: str = "gelu") -> torch.Tensor:
    """The dense plain MLP, for tests that zero thresholds reproduce it exactly."""
    return plain_intermediate(x, w_in_t, b_in, act) @ w_out_t + b_out


def mlp_activation_magnitudes(
    x: torch.Tensor, w_gate_t: torch.Tensor, w_up_t: torch.Tensor, t_in: torch.Tensor | float = 0.0, act: str = "silu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """|x| and |h| (h computed from x thresholded at ``t_in``), for calibration histograms
    (gated form; a module's ``magnitudes`` serves either form)."""
    return x.abs(), gated_intermediate(keep_above(x, t_in), w_gate_t, w_up_t, act).abs()


# A torch custom op, so that the exporter sees one opaque node per MLP and maps it to the
# ONNX `clada::SparseMLP` node (see clada_export/export/onnx_export.py). Its eager
# implementation is the reference above; nothing else defines the math.
@torch.library.custom_op("clada::sparse_mlp", mutates_args=())
def sparse_mlp_op(
    x: torch.Tensor,
    w_gate_t: torch.Tensor,
    w_up_t: torch.Tensor,
    w_down_t: torch.Tensor,
    thresholds: torch.Tensor,
    act: str,
) -> torch.Tensor:
    return sparse_mlp_reference(x, w_gate_t, w_up_t, w_down_t, thresholds, act)


@sparse_mlp_op.register_fake
def _(x, w_gate_t, w_up_t, w_down_t, thresholds, act):
    return x.new_empty((*x.shape[:-1], w_down_t.shape[-1]))


# The plain form's custom op (the exporter maps it to `clada::SparseMLP` with gated=0).
@torch.library.custom_op("clada::sparse_mlp_plain", mutates_args=())
def plain_sparse_mlp_op(
    x: torch.Tensor,
    w_in_t: torch.Tensor,
    b_in: torch.Tensor,
    w_out_t: torch.Tensor,
    b_out: torch.Tensor,
    thresholds: torch.Tensor,
    act: str,
) -> torch.Tensor:
    return plain_sparse_mlp_reference(x, w_in_t, b_in, w_out_t, b_out, thresholds, act)


@plain_sparse_mlp_op.register_fake
def _(x, w_in_t, b_in, w_out_t, b_out, thresholds, act):
    return x.new_empty((*x.shape[:-1], w_out_t.shape[-1]))
