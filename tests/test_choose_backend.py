"""generate's backend on a CPU when none is named: torch and onnxruntime timed over a few
decode steps, the faster run (runtime/choose_backend.py). The chooser is tested on stub
backends whose steps advance a fake clock (no wall-clock flakiness); the CLI on the tiny export."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from clada_export.runtime.backends import Backend, StepResult
from clada_export.runtime.choose_backend import (MEASURE_STEPS, WARMUP_STEPS, BackendChoice, choose_faster,
                                                 decode_tokens_per_second)
from conftest import run_cli


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class StubBackend(Backend):
    """A backend whose decode step takes ``step_s`` seconds of the fake clock (prefill: 100 s,
    which must not count); it records what it was given."""

    num_layers, vocab_size, device = 2, 11, torch.device("cpu")

    def __init__(self, clock: FakeClock, step_s: float):
        self.clock, self.step_s = clock, step_s
        self.decodes, self.thresholds, self.positions = 0, [], []

    def start(self, batch, max_len):
        self.batch, self.max_len = batch, max_len

    def _out(self, batch):
        logits = torch.zeros(batch, self.vocab_size)
        logits[:, 3] = 1.0
        return StepResult(logits, torch.zeros(batch), torch.zeros(batch))

    def prefill(self, input_ids, seq_lens, thresholds):
        self.clock.now += 100.0
        return self._out(input_ids.shape[0])

    def decode(self, tokens, position, thresholds):
        self.clock.now += self.step_s
        self.decodes += 1
        self.thresholds.append(thresholds.clone())
        self.positions.append(position.clone())
        return self._out(tokens.shape[0])


def test_decode_rate_times_only_the_decode_steps_after_warm_up():
    clock = FakeClock()
    stub = StubBackend(clock, 0.05)
    thr = np.array([[0.1, 0.2], [0.3, 0.4]], np.float32)
    rate = decode_tokens_per_second(stub, [[5, 6, 7], [8]], thr, steps=8, warmup=2, clock=clock)
    assert rate == pytest.approx(2 / 0.05)  # 2 sequences a step, the prefill's 100 s not counted
    assert stub.decodes == 10 and stub.batch == 2 and stub.max_len == 3 + 10
    assert stub.positions[0].tolist() == [3, 1] and stub.positions[-1].tolist() == [12, 10]
    assert stub.thresholds[0].shape == (2, 2, 2)  # [L, B, 2]: the given thresholds for each sequence
    assert torch.equal(stub.thresholds[0][:, 1], torch.from_numpy(thr))


def test_decode_rate_takes_the_median_step():
    """One step descheduled on a busy machine (here 10 s) does not decide the rate."""
    clock = FakeClock()
    stub = StubBackend(clock, 0.05)
    decode = stub.decode

    def sometimes_slow(*a):
        if stub.decodes == WARMUP_STEPS + 3:
            clock.now += 10.0
        return decode(*a)

    stub.decode = sometimes_slow
    assert decode_tokens_per_second(stub, [[5]], np.zeros((2, 2), np.float32), clock=clock) == pytest.approx(20.0)


def test_chooser_keeps_the_faster_and_drops_the_other():
    clock = FakeClock()
    opened = {}

    def opener(name, step_s):
        def open_it():
            opened[name] = StubBackend(clock, step_s)
            return opened[name]
        return open_it

    zeros = np.zeros((2, 2), np.float32)
    for slow, fast in (("torch", "onnxruntime"), ("onnxruntime", "torch")):
        steps = {slow: 0.06, fast: 0.03}
        choice = choose_faster({n: opener(n, steps[n]) for n in ("torch", "onnxruntime")}, [[5, 6]], zeros,
                               clock=clock)
        assert choice.name == fast and choice.backend is opened[fast]
        assert choice.rates[fast] == pytest.approx(1 / 0.03) and choice.rates[slow] == pytest.approx(1 / 0.06)
        assert opened[slow].decodes == opened[fast].decodes == WARMUP_STEPS + MEASURE_STEPS
        line = choice.line()
        assert line.startswith(f"backend: {fast} (") and f"over {slow} (" in line
        assert f"measured over {MEASURE_STEPS} decode steps" in line and "--backend torch or onnxruntime" in line


def test_chooser_leaves_out_a_backend_that_fails():
    clock = FakeClock()

    def broken():
        raise RuntimeError("no kernel for op SparseMLP\nmore")

    choice = choose_faster({"torch": lambda: StubBackend(clock, 0.05), "onnxruntime": broken}, [[5]],
                           np.zeros((2, 2), np.float32), clock=clock)
    assert choice.name == "torch" and choice.failed == {"onnxruntime": "no kernel for op SparseMLP"}
    assert choice.line() == "backend: torch (20.0 tokens/s)"
    with pytest.raises(RuntimeError, match="SparseMLP"):
        choose_faster({"onnxruntime": broken}, [[5]], np.zeros((2, 2), np.float32), clock=clock)


def test_choice_line_names_the_torch_kernel():
    choice = BackendChoice("onnxruntime", None, {"torch": 17.24, "onnxruntime": 31.81},
                           {"torch": "with the CPU SparseMLP kernel", "onnxruntime": ""}, steps=8)
    assert choice.line() == ("backend: onnxruntime (31.8 tokens/s) over torch (17.2 tokens/s with the CPU SparseMLP "
                             "kernel), measured over 8 decode steps; --backend torch or onnxruntime chooses")


def _ran_on(err: str) -> str:
    """The backend generate's summary line names."""
    found = re.findall(r"^\[.*, backend (\w+), thresholds", err, re.M)
    assert len(found) == 1, err
    return found[0]


def _stub_cli_backends(monkeypatch, torch_step_s: float, ort_step_s: float) -> list[str]:
    """Make generate's measurement see torch and onnxruntime at the given step times (the
    real backends still open and run the generation), and record which were timed."""
    from clada_export.runtime import choose_backend

    timed: list[str] = []
    clock = FakeClock()
    real = choose_backend.decode_tokens_per_second

    def fake_rate(backend, prompts, thresholds, steps, warmup, _clock):
        name = "torch" if type(backend).__name__ == "TorchBackend" else "onnxruntime"
        timed.append(name)
        real(backend, prompts, thresholds, 1, 0, clock)  # it really runs
        return 1.0 / (torch_step_s if name == "torch" else ort_step_s)

    monkeypatch.setattr(choose_backend, "decode_tokens_per_second", fake_rate)
    return timed


@pytest.mark.parametrize("faster", ["onnxruntime", "torch"])
def test_generate_runs_the_faster_and_says_so(tiny_chat_export, capsys, monkeypatch, faster):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    timed = _stub_cli_backends(monkeypatch, *((0.1, 0.02) if faster == "onnxruntime" else (0.02, 0.1)))
    code, out, err = run_cli(capsys, "generate", tiny_chat_export, "--prompt", "w5 w9 w17", "--max-new-tokens", 6,
                             "--static")
    assert code == 0, err
    assert sorted(timed) == ["onnxruntime", "torch"]
    slower = "torch" if faster == "onnxruntime" else "onnxruntime"
    lines = [l for l in err.splitlines() if l.startswith("backend: ")]
    assert len(lines) == 1 and lines[0].startswith(f"backend: {faster} (50.0 tokens/s") and \
        f"over {slower} (10.0 tokens/s" in lines[0], err
    assert out.startswith("w5 w9 w17")
    assert _ran_on(err) == faster
    found = re.search(r"decode ([\d.]+) tokens/s, dense ([\d.]+) vs ([\d.]+) tokens/s over the same (\d+) tokens: "
                      r"([\d.]+)x(.*?),", err)
    assert found, err
    assert ("onnxruntime computes the MLP dense" in found.group(6)) == (faster == "onnxruntime")


def test_named_backend_skips_the_measurement(tiny_chat_export, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    timed = _stub_cli_backends(monkeypatch, 0.1, 0.02)
    for name in ("torch", "onnxruntime"):
        code, _, err = run_cli(capsys, "generate", tiny_chat_export, "--prompt", "w5 w9", "--max-new-tokens", 3,
                               "--backend", name, "--no-dense-baseline")
        assert code == 0, err
        assert "backend: " not in err and _ran_on(err) == name
    assert timed == []


def test_generate_without_the_checkpoint_runs_onnxruntime_unmeasured(tiny_chat_export, tmp_path, capsys,
                                                                     monkeypatch):
    import json
    import shutil

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "export"
    shutil.copytree(tiny_chat_export, out)
    manifest = json.loads((out / "clada_export.json").read_text())
    manifest["source"] = str(tmp_path / "gone")
    (out / "clada_export.json").write_text(json.dumps(manifest))
    timed = _stub_cli_backends(monkeypatch, 0.1, 0.02)
    code, _, err = run_cli(capsys, "generate", out, "--prompt", "w5 w9", "--max-new-tokens", 3, "--dense")
    assert code == 0, err
    assert timed == [] and "backend: " not in err and _ran_on(err) == "onnxruntime"


def test_generate_default_choice_end_to_end(tiny_chat_export, capsys, monkeypatch):
    """No stubs: both backends are timed for real on the tiny export and the generation runs on
    the faster, in each threshold mode."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for mode in ("--static", "--dense", None):
        args = ["generate", tiny_chat_export, "--prompt", "w5 w9 w17", "--max-new-tokens", 5] + ([mode] if mode else [])
        code, out, err = run_cli(capsys, *args)
        assert code == 0, err
        found = re.search(r"^backend: (torch|onnxruntime) \(([\d.]+) tokens/s[^)]*\) over (torch|onnxruntime) "
                          r"\(([\d.]+) tokens/s", err, re.M)
        assert found, err
        chosen, fast, other, slow = found.group(1), float(found.group(2)), found.group(3), float(found.group(4))
        assert chosen != other and fast >= slow > 0
        assert _ran_on(err) == chosen and out.startswith("w5 w9 w17")


def test_dense_comparison_runs_both_as_long_at_their_own_thresholds():
    """generate's dense figure (runtime/baseline.py): a dense run, then one at the generation's
    thresholds, both DENSE_BASELINE_TOKENS long with EOS ignored (the stub always picks token 3,
    here the EOS, which would end a generation after one token)."""
    from clada_export.runtime.baseline import DENSE_BASELINE_TOKENS, compare_with_dense
    from clada_export.runtime.generator import Generator

    stub = StubBackend(FakeClock(), 0.0)
    thr = np.array([[0.1, 0.2], [0.3, 0.4]], np.float32)
    sparse = Generator(stub, eos_token_ids=[3], static_thresholds=thr)
    assert len(sparse.generate([[5, 6]], 40).tokens[0]) == 1
    stub.thresholds.clear()
    comparison = compare_with_dense(sparse, [[5, 6]], 40)
    steps = DENSE_BASELINE_TOKENS - 1  # the first token comes from prefill
    assert comparison.tokens == DENSE_BASELINE_TOKENS and len(stub.thresholds) == 2 * steps
    assert all(not t.any() for t in stub.thresholds[:steps])  # dense first
    assert all(torch.equal(t[:, 0], torch.from_numpy(thr)) for t in stub.thresholds[steps:])
    assert comparison.dense > 0 and comparison.sparse > 0
    assert comparison.speedup == pytest.approx(comparison.sparse / comparison.dense)
    assert compare_with_dense(sparse, [[5, 6]], 1) is None  # one token: no decode step to time
