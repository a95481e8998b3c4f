import pytest
import torch

from clada_export.ops.sparse_mlp import dense_mlp, sparse_mlp_op, sparse_mlp_reference


def _weights(H=48, I=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g) * 0.1 for s in ((H, I), (H, I), (I, H))]


def test_zero_thresholds_are_exactly_dense():
    torch.manual_seed(1)
    w = _weights()
    x = torch.randn(3, 7, 48)
    y = sparse_mlp_reference(x, *w, torch.zeros(3, 2))
    assert torch.equal(y, dense_mlp(x, *w))


def test_thresholds_mask_per_sequence():
    torch.manual_seed(2)
    w = _weights()
    x = torch.randn(2, 5, 48)
    th = torch.tensor([[0.0, 0.0], [0.8, 0.05]])
    y = sparse_mlp_reference(x, *w, th)
    # row 0 is dense, row 1 is computed by masking by hand (BLAS may block a batch of
    # one differently, hence a rounding-level tolerance across batch shapes)
    torch.testing.assert_close(y[0], dense_mlp(x[:1], *w)[0], rtol=1e-6, atol=1e-6)
    xs = x[1] * (x[1].abs() > 0.8)
    h = torch.nn.functional.silu(xs @ w[0]) * (xs @ w[1])
    expected = (h * (h.abs() > 0.05)) @ w[2]
    torch.testing.assert_close(y[1], expected, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(y[1], dense_mlp(x[1:], *w)[0])


def test_custom_op_is_the_reference():
    torch.manual_seed(3)
    w = _weights()
    x, th = torch.randn(2, 3, 48), torch.rand(2, 2) * 0.5
    assert torch.equal(sparse_mlp_op(x, *w, th, "silu"), sparse_mlp_reference(x, *w, th))


def test_per_token_thresholds_are_each_tokens_own_step():
    """Thresholds [B, T, 2] (teacher-forced evaluation of dynamic control): each token is
    computed as in a one-token step at its own thresholds, and constant per-token
    thresholds are the per-sequence op."""
    torch.manual_seed(4)
    w = _weights()
    x = torch.randn(2, 6, 48)
    per_seq = torch.rand(2, 2) * 0.5
    assert torch.equal(sparse_mlp_reference(x, *w, per_seq[:, None].expand(2, 6, 2)),
                       sparse_mlp_reference(x, *w, per_seq))
    per_tok = torch.rand(2, 6, 2) * torch.tensor([1.0, 0.1])
    y = sparse_mlp_reference(x, *w, per_tok)
    for t in range(6):
        torch.testing.assert_close(y[:, t], sparse_mlp_reference(x[:, t:t + 1], *w, per_tok[:, t])[:, 0],
                                   rtol=1e-6, atol=1e-6)
    assert not torch.allclose(y, sparse_mlp_reference(x, *w, per_tok[:, 0]))


@pytest.mark.parametrize("shape", [(2,), (3, 2), (2, 3), (2, 2, 1), (2, 3, 2)])
def test_wrong_threshold_shape_is_named(shape):
    w = _weights()
    with pytest.raises(ValueError, match=r"thresholds must have shape \[batch=2, 2\]"):
        sparse_mlp_reference(torch.randn(2, 4, 48), *w, torch.zeros(shape))
