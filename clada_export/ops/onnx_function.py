"""SparseMLP in ONNX: the ``clada::SparseMLP`` node, and its function body of standard ops.

The node has two forms, told apart by its int attribute ``gated`` (default 1):

* gated (``gated=1``): inputs ``(x [B, T, H], w_gate_t [H, I], w_up_t [H, I], w_down_t
  [I, H], thresholds [B, 2])``; the math is
  :func:`clada_export.ops.sparse_mlp.sparse_mlp_reference`;
* plain (``gated=0``): inputs ``(x, w_in_t [H, I], b_in [I], w_out_t [I, H], b_out [H],
  thresholds [B, 2])``; the math is :func:`clada_export.ops.sparse_mlp.plain_sparse_mlp_reference`.

The output is ``y [B, T, H]``. The attribute ``activation`` (``silu``, ``gelu_tanh``,
``gelu`` or ``relu``; the TensorRT plugin reads it and ``gated`` as plugin fields) names the
activation. A model carries the function body (so ONNX Runtime, or any runtime without
our plugin, inlines and runs it); the TensorRT variant of a graph drops the body, and the
TensorRT parser binds the node to the SparseMLP plugin by its op type. A body is written
for one form and one activation (opset 18 has no op that switches on an attribute):
every MLP of a model has the same form and activation, and the exporter attaches that
body and checks that the nodes agree.
"""

from __future__ import annotations

import math

import onnx
import onnxscript
from onnx import TensorProto, helper

from clada_export.contract import (OP_ACTIVATION_ATTRIBUTE, OP_DOMAIN, OP_GATED_ATTRIBUTE, OP_GATED_INPUTS, OP_NAME,
                                   OP_PLAIN_INPUTS, OP_VERSION)
from clada_export.ops.sparse_mlp import ACTIVATIONS

clada_opset = onnxscript.values.Opset(OP_DOMAIN, OP_VERSION)
ACTIVATION_ATTRIBUTE = OP_ACTIVATION_ATTRIBUTE
GATED_ATTRIBUTE = OP_GATED_ATTRIBUTE
# the node's inputs in each form, in order (the function body's formal inputs; contract.py)
GATED_INPUTS, PLAIN_INPUTS = OP_GATED_INPUTS, OP_PLAIN_INPUTS
ONNX_OPSET = 18


def _const(name: str, value: float) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=helper.make_tensor(name, TensorProto.FLOAT, [], [value]))


def _activation_nodes(act: str, g: str, out: str) -> list[onnx.NodeProto]:
    """``out = act(g)``, in standard ops, with g's dtype (constants are cast like g)."""
    n = helper.make_node
    if act == "silu":
        return [n("Sigmoid", [g], ["sig"]), n("Mul", [g, "sig"], [out])]
    if act == "relu":
        return [n("Relu", [g], [out])]
    half = [_const("half_f", 0.5), n("CastLike", ["half_f", g], ["half"]),
            _const("one_f", 1.0), n("CastLike", ["one_f", g], ["one"])]
    if act == "gelu_tanh":  # 0.5 g (1 + tanh(sqrt(2/pi) (g + 0.044715 g^3))), as torch's approximate="tanh"
        return half + [
            _const("c_f", math.sqrt(2.0 / math.pi)), n("CastLike", ["c_f", g], ["c"]),
            _const("k_f", 0.044715), n("CastLike", ["k_f", g], ["k"]),
            n("Mul", [g, g], ["g2"]), n("Mul", ["g2", g], ["g3"]), n("Mul", ["k", "g3"], ["kg3"]),
            n("Add", [g, "kg3"], ["inner"]), n("Mul", ["c", "inner"], ["arg"]), n("Tanh", ["arg"], ["th"]),
            n("Add", ["one", "th"], ["onept"]), n("Mul", ["half", g], ["hg"]), n("Mul", ["hg", "onept"], [out]),
        ]
    if act == "gelu":  # 0.5 g (1 + erf(g / sqrt(2)))
        return half + [
            _const("r_f", 1.0 / math.sqrt(2.0)), n("CastLike", ["r_f", g], ["r"]),
            n("Mul", [g, "r"], ["gr"]), n("Erf", ["gr"], ["e"]),
            n("Add", ["one", "e"], ["onepe"]), n("Mul", ["half", g], ["hg"]), n("Mul", ["hg", "onepe"], [out]),
        ]
    raise ValueError(f"unsupported activation {act!r}; supported: {', '.join(ACTIVATIONS)}")


def sparse_mlp_function_proto(act: str = "silu", gated: bool = True) -> onnx.FunctionProto:
    """The body of ``clada::SparseMLP`` for activation ``act`` and one form: gated,
    ``x_s = x * (|x| > t_in)``, ``h = act(x_s Wg) * (x_s Wu)``, ``h_s = h * (|h| > t_mid)``,
    ``y = h_s Wd``; plain, ``h = act(x_s W1 + b1)``, ``y = h_s W2 + b2``. Thresholds
    ``[B, 2]`` broadcast over tokens and channels."""
    n = helper.make_node
    nodes = [
        # thresholds [B, 2] -> t_in, t_mid as [B, 1, 1]
        n("Constant", [], ["i0"], value=helper.make_tensor("i0", TensorProto.INT64, [], [0])),
        n("Constant", [], ["i1"], value=helper.make_tensor("i1", TensorProto.INT64, [], [1])),
        n("Constant", [], ["axes"], value=helper.make_tensor("axes", TensorProto.INT64, [2], [1, 2])),
        n("Gather", ["thresholds", "i0"], ["t_in0"], axis=1), n("Unsqueeze", ["t_in0", "axes"], ["t_in1"]),
        n("Gather", ["thresholds", "i1"], ["t_mid0"], axis=1), n("Unsqueeze", ["t_mid0", "axes"], ["t_mid1"]),
        _const("zero_f", 0.0), n("CastLike", ["zero_f", "x"], ["zero"]),
        n("CastLike", ["t_in1", "x"], ["t_in"]),
        n("Abs", ["x"], ["ax"]), n("Greater", ["ax", "t_in"], ["keep_x"]), n("Where", ["keep_x", "x", "zero"], ["x_s"]),
    ]
    if gated:
        nodes += [
            n("MatMul", ["x_s", "w_gate_t"], ["g"]),
            *_activation_nodes(act, "g", "ag"),
            n("MatMul", ["x_s", "w_up_t"], ["u"]), n("Mul", ["ag", "u"], ["h"]),
        ]
    else:
        nodes += [
            n("MatMul", ["x_s", "w_in_t"], ["g0"]), n("Add", ["g0", "b_in"], ["g"]),
            *_activation_nodes(act, "g", "h"),
        ]
    nodes += [
        n("CastLike", ["t_mid1", "h"], ["t_mid"]),
        n("Abs", ["h"], ["ah"]), n("Greater", ["ah", "t_mid"], ["keep_h"]), n("Where", ["keep_h", "h", "zero"], ["h_s"]),
    ]
    if gated:
        nodes.append(n("MatMul", ["h_s", "w_down_t"], ["y"]))
    else:
        nodes += [n("MatMul", ["h_s", "w_out_t"], ["y0"]), n("Add", ["y0", "b_out"], ["y"])]
    return helper.make_function(
        OP_DOMAIN, OP_NAME, list(GATED_INPUTS if gated else PLAIN_INPUTS), ["y"], nodes,
        [helper.make_opsetid("", ONNX_OPSET)], attributes=[ACTIVATION_ATTRIBUTE, GATED_ATTRIBUTE])


def _register_schema() -> None:
    """Declare ``clada::SparseMLP`` to onnx, so builders and checkers know its signature
    (the exporter emits the node from this schema; the body is attached afterwards)."""
    try:
        onnx.defs.get_schema(OP_NAME, OP_VERSION, OP_DOMAIN)
        return
    except onnx.defs.SchemaError:
        pass
    P = onnx.defs.OpSchema.FormalParameter
    optional = onnx.defs.OpSchema.FormalParameterOption.Optional
    types = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]
    # one schema for both forms: the fifth input is the gated form's thresholds (float32)
    # or the plain form's b_out (T); the sixth, the plain form's thresholds, is optional
    schema = onnx.defs.OpSchema(
        OP_NAME, OP_DOMAIN, OP_VERSION,
        doc="CLADA SparseMLP. gated=1 (x, w_gate_t, w_up_t, w_down_t, thresholds): "
            "y = ((act(x_s Wg) * (x_s Wu)) thresholded at t_mid) Wd; gated=0 (x, w_in_t, b_in, w_out_t, b_out, "
            "thresholds): y = (act(x_s W1 + b1) thresholded at t_mid) W2 + b2; x_s = x thresholded at t_in",
        inputs=[P("x", "T"), P("w1", "T"), P("w2", "T"), P("w3", "T"), P("thresholds_or_b_out", "T1"),
                P("plain_thresholds", "tensor(float)", param_option=optional)],
        outputs=[P("y", "T")],
        type_constraints=[("T", types, "activation and weight type"),
                          ("T1", types, "thresholds (float32, gated form) or b_out (T, plain form)")],
        attributes=[
            onnx.defs.OpSchema.Attribute(ACTIVATION_ATTRIBUTE, helper.make_attribute(
                ACTIVATION_ATTRIBUTE, "silu"), f"the activation: {', '.join(ACTIVATIONS)}"),
            onnx.defs.OpSchema.Attribute(GATED_ATTRIBUTE, helper.make_attribute(
                GATED_ATTRIBUTE, 1), "1: the gated form (5 inputs); 0: the plain form with biases (6 inputs)"),
        ],
    )
    onnx.defs.register_schema(schema)


_register_schema()


def sparse_mlp_translation(x, w_gate_t, w_up_t, w_down_t, thresholds, act: str = "silu"):
    """Translation of ``torch.ops.clada.sparse_mlp`` for torch.onnx's exporter: emit one
    ``clada::SparseMLP`` node carrying its activation. The exporter's own passes inline
    model-local functions, so the body is attached after export (``sparse_mlp_function_proto``)."""
    if act not in ACTIVATIONS:
        raise NotImplementedError(f"SparseMLP ONNX export supports activations {', '.join(ACTIVATIONS)}, "
                                  f"not {act!r}")
    return clada_opset.SparseMLP(x, w_gate_t, w_up_t, w_down_t, thresholds, activation=act)


def plain_sparse_mlp_translation(x, w_in_t, b_in, w_out_t, b_out, thresholds, act: str = "gelu"):
    """Translation of ``torch.ops.clada.sparse_mlp_plain``: one ``clada::SparseMLP`` node
    with ``gated=0`` and the plain form's six inputs."""
    if act not in ACTIVATIONS:
        raise NotImplementedError(f"SparseMLP ONNX export supports activations {', '.join(ACTIVATIONS)}, "
                                  f"not {act!r}")
    return clada_opset.SparseMLP(x, w_in_t, b_in, w_out_t, b_out, thresholds, activation=act, gated=0)
