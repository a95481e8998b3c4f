"""SparseMLP in ONNX: the ``clada::SparseMLP`` node, and its function body of standard ops.

The node's inputs are ``(x [B, T, H], w_gate_t [H, I], w_up_t [H, I], w_down_t [I, H],
thresholds [B, 2])``, its output ``y [B, T, H]``; it has no attributes: the activation is
SiLU, the only one the export supports.
A model carries the function body (so ONNX Runtime, or any runtime without our plugin,
inlines and runs it); the TensorRT variant of a graph drops the body, and the TensorRT
parser binds the node to the SparseMLP plugin by its op type.
"""

from __future__ import annotations

import onnx
import onnxscript
from onnxscript import opset18 as op

from clada_export.contract import OP_DOMAIN, OP_NAME, OP_VERSION

clada_opset = onnxscript.values.Opset(OP_DOMAIN, OP_VERSION)


@onnxscript.script(clada_opset, default_opset=op)
def SparseMLP(x, w_gate_t, w_up_t, w_down_t, thresholds):
    # thresholds [B, 2] -> t_in, t_mid as [B, 1, 1], broadcast over tokens and channels
    t_in = op.Unsqueeze(op.Gather(thresholds, op.Constant(value_int=0), axis=1), op.Constant(value_ints=[1, 2]))
    t_mid = op.Unsqueeze(op.Gather(thresholds, op.Constant(value_int=1), axis=1), op.Constant(value_ints=[1, 2]))
    zero = op.CastLike(op.Constant(value_float=0.0), x)
    x_s = op.Where(op.Greater(op.Abs(x), op.CastLike(t_in, x)), x, zero)
    g = op.MatMul(x_s, w_gate_t)
    h = op.Mul(op.Mul(g, op.Sigmoid(g)), op.MatMul(x_s, w_up_t))
    h_s = op.Where(op.Greater(op.Abs(h), op.CastLike(t_mid, h)), h, zero)
    return op.MatMul(h_s, w_down_t)


def sparse_mlp_function_proto() -> onnx.FunctionProto:
    return SparseMLP.to_function_proto()


def _register_schema() -> None:
    """Declare ``clada::SparseMLP`` to onnx, so builders and checkers know its signature
    (the exporter emits the node from this schema; the body is attached afterwards)."""
    try:
        onnx.defs.get_schema(OP_NAME, OP_VERSION, OP_DOMAIN)
        return
    except onnx.defs.SchemaError:
        pass
    P = onnx.defs.OpSchema.FormalParameter
    types = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]
    schema = onnx.defs.OpSchema(
        OP_NAME, OP_DOMAIN, OP_VERSION,
        doc="CLADA SparseMLP: y = ((act(x_s Wg) * (x_s Wu)) thresholded at t_mid) Wd, x_s = x thresholded at t_in",
        inputs=[P("x", "T"), P("w_gate_t", "T"), P("w_up_t", "T"), P("w_down_t", "T"),
                P("thresholds", "tensor(float)")],
        outputs=[P("y", "T")],
        type_constraints=[("T", types, "activation and weight type")],
    )
    onnx.defs.register_schema(schema)


_register_schema()


def sparse_mlp_translation(x, w_gate_t, w_up_t, w_down_t, thresholds, act: str = "silu"):
    """Translation of ``torch.ops.clada.sparse_mlp`` for torch.onnx's exporter: emit one
    ``clada::SparseMLP`` node. The exporter's own passes inline model-local functions,
    so the body is attached after export (``attach_function_bodies``)."""
    if act != "silu":
        raise NotImplementedError(f"SparseMLP ONNX export supports activation silu, not {act!r}")
    return clada_opset.SparseMLP(x, w_gate_t, w_up_t, w_down_t, thresholds)
