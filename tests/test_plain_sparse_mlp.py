"""The SparseMLP op's plain form (GPT-2, OPT, GPT-NeoX): ``y = (act(x_s W1 + b1)
thresholded at t_mid) W2 + b2``. The reference against the dense MLP and a float64
formula, the custom op, the ONNX function body (``gated=0``, six inputs) in ONNX Runtime,
and the byte sparsity of the form."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clada_export.ops.sparse_mlp import (ACTIVATIONS, dense_plain_mlp, plain_sparse_mlp_op,
                                         plain_sparse_mlp_reference)

H, I = 48, 96


def _weights(seed: int = 0, dtype=torch.float32) -> list[torch.Tensor]:
    """``w_in_t [H, I]``, ``b_in [I]``, ``w_out_t [I, H]``, ``b_out [H]``."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(*s, generator=g) * 0.15).to(dtype) for s in ((H, I), (I,), (I, H), (H,))]


_F64 = {"silu": F.silu, "gelu_tanh": lambda v: F.gelu(v, approximate="tanh"), "gelu": F.gelu, "relu": F.relu}


@pytest.mark.parametrize("act", ACTIVATIONS)
def test_zero_thresholds_are_exactly_dense(act):
    torch.manual_seed(1)
    w = _weights()
    x = torch.randn(3, 7, H)
    assert torch.equal(plain_sparse_mlp_reference(x, *w, torch.zeros(3, 2), act), dense_plain_mlp(x, *w, act))


@pytest.mark.parametrize("act", ACTIVATIONS)
def test_thresholding_matches_a_float64_formula(act):
    """Each sequence at its own (t_in, t_mid), against the formula written out in float64."""
    torch.manual_seed(2)
    w = _weights()
    x = torch.randn(2, 5, H)
    th = torch.tensor([[0.6, 0.05], [0.3, 0.2]])
    y = plain_sparse_mlp_reference(x, *w, th, act)
    w_in, b_in, w_out, b_out = (t.double() for t in w)
    for b in range(2):
        xs = torch.where(x[b].abs() > th[b, 0], x[b], 0.0).double()
        h = _F64[act](xs @ w_in + b_in)
        h_s = torch.where(h.abs() > th[b, 1].double(), h, 0.0)
        expected = h_s @ w_out + b_out
        torch.testing.assert_close(y[b].double(), expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(y, dense_plain_mlp(x, *w, act))


def test_custom_op_is_the_reference():
    torch.manual_seed(3)
    w = _weights()
    x, th = torch.randn(2, 3, H), torch.rand(2, 2) * 0.5
    assert torch.equal(plain_sparse_mlp_op(x, *w, th, "gelu"), plain_sparse_mlp_reference(x, *w, th, "gelu"))


def _node_model(act: str, gated: bool, dtype=np.float32):
    """A model of one ``clada::SparseMLP`` node with its function body."""
    import onnx
    from onnx import TensorProto, helper

    from clada_export import contract as C
    from clada_export.ops.onnx_function import (GATED_INPUTS, ONNX_OPSET, PLAIN_INPUTS,
                                                sparse_mlp_function_proto)

    t = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    names = GATED_INPUTS if gated else PLAIN_INPUTS
    shapes = {"x": ["B", "T", H], "w_gate_t": [H, I], "w_up_t": [H, I], "w_down_t": [I, H], "w_in_t": [H, I],
              "b_in": [I], "w_out_t": [I, H], "b_out": [H], "thresholds": ["B", 2]}
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT if n == "thresholds" else t, shapes[n])
              for n in names]
    attrs = {"activation": act} if gated else {"activation": act, "gated": 0}
    node = helper.make_node(C.OP_NAME, list(names), ["y"], domain=C.OP_DOMAIN, **attrs)
    graph = helper.make_graph([node], "g", inputs, [helper.make_tensor_value_info("y", t, ["B", "T", H])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", ONNX_OPSET),
                                                    helper.make_opsetid(C.OP_DOMAIN, C.OP_VERSION)],
                              functions=[sparse_mlp_function_proto(act, gated)])
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.parametrize("act", ACTIVATIONS)
def test_onnx_function_body_is_the_reference(act):
    """The plain body (gated=0, inputs x, w_in_t, b_in, w_out_t, b_out, thresholds) in ONNX
    Runtime against the reference, dense and thresholded per sequence."""
    import onnxruntime as ort

    sess = ort.InferenceSession(_node_model(act, gated=False).SerializeToString(), providers=["CPUExecutionProvider"])
    torch.manual_seed(4)
    w = _weights()
    x = torch.randn(2, 5, H)
    for th in (torch.zeros(2, 2), torch.tensor([[0.5, 0.1], [0.2, 0.3]])):
        feeds = dict(zip(("x", "w_in_t", "b_in", "w_out_t", "b_out", "thresholds"),
                         (t.numpy() for t in (x, *w, th))))
        got = torch.from_numpy(sess.run(None, feeds)[0])
        torch.testing.assert_close(got, plain_sparse_mlp_reference(x, *w, th, act), rtol=1e-5, atol=1e-5)


def test_gated_relu_body_is_the_reference():
    """relu is an activation of both forms: the gated body with it (ReGLU)."""
    import onnxruntime as ort

    from clada_export.ops.sparse_mlp import sparse_mlp_reference

    sess = ort.InferenceSession(_node_model("relu", gated=True).SerializeToString(), providers=["CPUExecutionProvider"])
    g = torch.Generator().manual_seed(5)
    w = [torch.randn(*s, generator=g) * 0.15 for s in ((H, I), (H, I), (I, H))]
    x, th = torch.randn(2, 5, H, generator=g), torch.tensor([[0.5, 0.01], [0.0, 0.0]])
    feeds = dict(zip(("x", "w_gate_t", "w_up_t", "w_down_t", "thresholds"), (t.numpy() for t in (x, *w, th))))
    torch.testing.assert_close(torch.from_numpy(sess.run(None, feeds)[0]),
                               sparse_mlp_reference(x, *w, th, "relu"), rtol=1e-5, atol=1e-5)


def test_byte_sparsity_of_each_form():
    """Gated: an input channel skips two rows (W_gate, W_up) to the intermediate's one;
    plain: one row each. The gated formula is unchanged bit for bit."""
    from clada_export.profile import byte_sparsity

    s_in, s_mid = np.array([0.1, 0.5, 0.3]), np.array([0.7, 0.2, 0.3])
    assert np.array_equal(byte_sparsity(s_in, s_mid), (2.0 * s_in + s_mid) / 3.0)
    assert np.allclose(byte_sparsity(s_in, s_mid, gated=False), (s_in + s_mid) / 2)
