"""The compared methods (evaluation/methods.py): TEAL's block-wise greedy on a toy
objective, Griffin's selection, the masked MLP, the CLADA reference rule's trigger, and
the dynamic controller driven through the scorer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from clada_export.evaluation.methods import (MaskedMLP, Method, ReselectRule, TealLookup, griffin_scores,
                                             masked_mlps, teal_greedy_layer, top_k_mask)
from clada_export.evaluation.scoring import score_continuations
from clada_export.ops.sparse_mlp import sparse_mlp_reference
from clada_export.profile import byte_sparsity


def test_teal_greedy_takes_the_cheaper_projection_each_step():
    # input sparsity costs 5x more error per unit than intermediate: the greedy spends
    # bytes on the intermediate first, then on the input once that is cheaper
    def error_of(a, b):
        return 5.0 * a * a + b * b

    s_in, s_mid, err = teal_greedy_layer(error_of, max_byte=0.3, step=0.025, top=0.9)
    assert len(s_in) == 13
    for i in range(1, len(s_in)):  # every move gains exactly one step of byte sparsity
        assert byte_sparsity(s_in[i], s_mid[i]) == pytest.approx(0.025 * i)
        a, b = s_in[i - 1], s_mid[i - 1]
        options = [(a + 0.0375, b), (a, b + 0.075)]
        best = min(options, key=lambda o: error_of(*o))
        assert (s_in[i], s_mid[i]) == pytest.approx(best)
        assert err[i] == pytest.approx(error_of(s_in[i], s_mid[i]))
    assert s_mid[1] > 0 and s_in[1] == 0  # the first move goes to the cheap projection
    # a projection at the top is not raised further
    s_in, s_mid, _ = teal_greedy_layer(lambda a, b: a, max_byte=0.5, step=0.05, top=0.3)
    assert max(s_mid) <= 0.3 + 1e-9


def test_teal_lookup_interpolates_every_layer_at_the_level():
    lk = TealLookup(np.array([0.0, 0.1, 0.2]), np.array([[0, 0, 0.15], [0, 0.15, 0.3]]),
                    np.array([[0, 0.3, 0.3], [0, 0, 0]]), np.zeros((2, 3)))
    s_in, s_mid = lk.at(0.15)
    np.testing.assert_allclose(byte_sparsity(s_in, s_mid), [0.15, 0.15])
    assert TealLookup.from_dict(lk.to_dict()).at(0.2)[0].tolist() == [0.15, 0.3]


def test_griffin_scores_and_top_k():
    h = torch.tensor([[[3.0, 0.0, 4.0, 0.0], [0.0, 1.0, 0.0, 0.0]]])  # [B=1, T=2, F=4]
    s = griffin_scores(h)
    # rows normalised: [0.6, 0, 0.8, 0] and [0, 1, 0, 0]; L2 over tokens per neuron
    np.testing.assert_allclose(s[0].numpy(), [0.6, 1.0, 0.8, 0.0], atol=1e-6)
    assert top_k_mask(s, 2)[0].tolist() == [False, True, True, False]


def test_masked_mlp_all_neurons_equals_the_dense_op_and_masks_slice():
    torch.manual_seed(0)
    H, F = 8, 16

    from types import SimpleNamespace

    from clada_export.model.llama import SparseMLP

    inner = SparseMLP(SimpleNamespace(act="silu", hidden_size=H, intermediate_size=F))
    for p in (inner.w_gate_t, inner.w_up_t, inner.w_down_t):
        p.requires_grad_(False).normal_()
    x = torch.randn(2, 3, H)
    m = MaskedMLP(inner)
    dense = sparse_mlp_reference(x, inner.w_gate_t, inner.w_up_t, inner.w_down_t, torch.zeros(2, 2))
    torch.testing.assert_close(m(x, torch.zeros(2, 2)), dense)
    keep = torch.zeros(2, F, dtype=torch.bool)
    keep[:, :5] = True
    m.mask = keep
    sliced = (torch.nn.functional.silu(x @ inner.w_gate_t[:, :5]) * (x @ inner.w_up_t[:, :5])) @ inner.w_down_t[:5]
    torch.testing.assert_close(m(x, torch.zeros(2, 2)), sliced)


def test_griffin_selects_from_the_prompt_and_keeps_k(tiny_checkpoints):
    from clada_export.model.loading import load_decoder

    model, _ = load_decoder(tiny_checkpoints["llama"])
    F = model.cfg.intermediate_size
    ctx, conts = [5, 17, 33, 2, 9], [[4, 8, 15], [16, 23]]
    dense = score_continuations(model, Method("dense", None, "static"), ctx, conts)
    nearly_all = score_continuations(model, Method("griffin", 1e-6, "griffin"), ctx, conts)
    np.testing.assert_allclose(nearly_all.logprobs, dense.logprobs, atol=1e-4)
    half = score_continuations(model, Method("griffin", 0.5, "griffin"), ctx, conts)
    assert half.selection_sparsity == pytest.approx(1 - round(0.5 * F) / F)
    assert not np.allclose(half.logprobs, dense.logprobs, atol=1e-4)
    # the masks are the top-k of the prompt's statistic, computed independently here
    with masked_mlps(model) as mlps:
        for m in mlps:
            m.record = True
        L = model.cfg.num_layers
        k, v = model.new_cache(1, len(ctx))
        with torch.no_grad():
            model(torch.tensor([ctx]), torch.arange(len(ctx))[None], k, v, torch.zeros(L, 1, 2))
        layer0 = mlps[0].inner
        x_hooked = mlps[0].sumsq
    assert model.layers[0].mlp is layer0  # restored
    assert int(top_k_mask(x_hooked, 80).sum()) == 80


def test_reselect_rule_fires_after_the_window_on_high_load():
    rule = ReselectRule(window=10, percentile=0.7)
    fired = [rule.observe(1.0, 1.0) for _ in range(10)]
    assert not any(fired)  # history not longer than the window yet
    # at i=10 the percentiles are refreshed (to 1.0) and the comparison is strict: no fire
    assert not rule.observe(1.0, 1.0) and rule.thr_u == 1.0
    rule = ReselectRule(window=10, percentile=0.7)
    for i in range(10):
        rule.observe(float(i), float(i))
    assert rule.observe(100.0, 100.0) and rule.thr_u == pytest.approx(np.percentile(list(range(1, 10)) + [100.0], 70))
    assert not rule.observe(0.0, 0.0)


def test_dynamic_method_runs_the_controller_per_step(tiny_checkpoints, tiny_profile):
    from clada_export.model.loading import load_decoder
    from clada_export.runtime.controller import ControllerConfig

    model, _ = load_decoder(tiny_checkpoints["llama"])
    dyn = Method("dynamic", 0.5, "dynamic", profile=tiny_profile, config=ControllerConfig())
    ctx, cont = [5, 17, 33, 2, 9], [list(range(10, 40))]
    s = score_continuations(model, dyn, ctx, cont, trace=True)
    assert len(s.trace) == 29 and all("realized" in r for r in s.trace)
    dense = score_continuations(model, Method("dense", None, "static"), ctx, cont)
    assert s.logprobs[0] != pytest.approx(dense.logprobs[0], abs=1e-4)
    assert s.token_logprobs[0][0] == pytest.approx(dense.token_logprobs[0][0], abs=1e-6)  # dense prefill


def _dynamic(profile):
    from clada_export.runtime.controller import ControllerConfig

    # a short window so that the controller leaves its warm-up and changes state within
    # the continuation: the fixed point then has decisions to get right
    return Method("dynamic", 0.5, "dynamic", profile=profile,
                  config=ControllerConfig(window=4, min_history=4, payback_steps=4, high=0.7, high_margin=0.05))


@pytest.mark.parametrize("kind", ["dynamic", "clada_ref"])
def test_fixed_point_equals_the_step_by_step_decode(tiny_checkpoints, tiny_profile, kind):
    from clada_export.model.loading import load_decoder

    model, _ = load_decoder(tiny_checkpoints["llama"])
    g = torch.Generator().manual_seed(3)
    ctx = torch.randint(0, model.cfg.vocab_size, (12,), generator=g).tolist()
    conts = [torch.randint(0, model.cfg.vocab_size, (n,), generator=g).tolist() for n in (48, 37)]
    method = _dynamic(tiny_profile) if kind == "dynamic" else Method("clada_ref", 0.5, "clada_ref",
                                                                      info={"rule": {"window": 10, "percentile": 0.7}})
    step = score_continuations(model, method, ctx, conts, trace=True, protocol="stepwise")
    fixed = score_continuations(model, method, ctx, conts, trace=True, protocol="fixed_point")
    assert fixed.fallbacks == 0 and fixed.passes > 1  # it iterated, and converged
    for a, b in zip(step.token_logprobs, fixed.token_logprobs):
        np.testing.assert_allclose(a, b, atol=2e-5)
    np.testing.assert_allclose(step.logprobs, fixed.logprobs, atol=1e-4)
    if kind == "dynamic":
        # the same decisions: state, target and thresholds of every step of every sequence
        assert len(step.trace) == len(fixed.trace) == 47 + 36
        assert len({r["state"] for r in step.trace}) > 1  # the controller did react
        for r, q in zip(step.trace, fixed.trace):
            assert (r["step"], r["seq"], r["state"]) == (q["step"], q["seq"], q["state"])
            assert r["t_in_mean"] == q["t_in_mean"] and r["t_mid_mean"] == q["t_mid_mean"]
            assert r["surprisal"] == pytest.approx(q["surprisal"], abs=1e-4)
    else:
        assert step.reselections == fixed.reselections > 0
    # not the same as never reacting: the static start differs
    if kind == "clada_ref":
        griffin = score_continuations(model, Method("griffin", 0.5, "griffin"), ctx, conts)
        assert not np.allclose(griffin.logprobs, fixed.logprobs, atol=1e-4)


def test_fixed_point_falls_back_to_step_by_step_at_the_cap(tiny_checkpoints, tiny_profile):
    from clada_export.model.loading import load_decoder

    model, _ = load_decoder(tiny_checkpoints["llama"])
    g = torch.Generator().manual_seed(3)
    ctx = torch.randint(0, model.cfg.vocab_size, (12,), generator=g).tolist()
    conts = [torch.randint(0, model.cfg.vocab_size, (48,), generator=g).tolist()]
    method = _dynamic(tiny_profile)
    step = score_continuations(model, method, ctx, conts, protocol="stepwise")
    capped = score_continuations(model, method, ctx, conts, max_passes=1)
    assert capped.fallbacks == 1
    np.testing.assert_allclose(step.token_logprobs[0], capped.token_logprobs[0], atol=1e-6)


def test_spearman_of_the_signal_analysis():
    from clada_export.evaluation.signals import spearman

    x = np.arange(50, dtype=float)
    rho, p = spearman(x, x ** 3)  # monotone: rank correlation 1
    assert rho == pytest.approx(1.0) and p < 0.01
    rho, p = spearman(x, -np.exp(x / 10))
    assert rho == pytest.approx(-1.0)
    rng = np.random.default_rng(1)
    rho, p = spearman(rng.normal(size=400), rng.normal(size=400))
    assert abs(rho) < 0.15 and p > 0.01


def test_teal_moves_gain_one_step_of_the_plain_forms_byte_sparsity():
    s_in, s_mid, _ = teal_greedy_layer(lambda a, b: a + 2 * b, max_byte=0.2, step=0.025, top=0.9, gated=False)
    for i in range(1, len(s_in)):
        assert byte_sparsity(s_in[i], s_mid[i], gated=False) == pytest.approx(0.025 * i)
    assert s_in[1] == pytest.approx(0.05) and s_mid[1] == 0  # plain: each projection weighs 1


def test_masked_mlp_of_a_plain_model_keeps_its_biases(tmp_path):
    from transformers import GPT2Config

    from conftest import make_checkpoint
    from clada_export.model.loading import load_decoder

    ckpt = make_checkpoint(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2, n_positions=32, n_inner=80),
                           tmp_path / "gpt2")
    model, _ = load_decoder(ckpt)
    inner = model.layers[0].mlp
    with torch.no_grad():
        inner.b_in.normal_(0, 0.5)
        inner.b_out.normal_(0, 0.5)
    x = torch.randn(2, 3, 32, generator=torch.Generator().manual_seed(0))
    m = MaskedMLP(inner)
    with torch.inference_mode():
        torch.testing.assert_close(m(x, torch.zeros(2, 2)), inner(x, torch.zeros(2, 2)), rtol=1e-6, atol=1e-6)
        m.mask = top_k_mask(torch.rand(2, 80, generator=torch.Generator().manual_seed(1)), 40)
        h = torch.nn.functional.gelu(x @ inner.w_in_t + inner.b_in, approximate="tanh") * m.mask[:, None, :]
        torch.testing.assert_close(m(x, torch.zeros(2, 2)), h @ inner.w_out_t + inner.b_out, rtol=1e-5, atol=1e-6)
