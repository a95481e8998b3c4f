"""The generation loop with the controller in it, on both CPU backends."""

import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np
import pytest
import torch

from clada_export.cli.main import main
from clada_export.model.loading import load_decoder
from clada_export.runtime.backends import OnnxRuntimeBackend, TorchBackend
from clada_export.runtime.controller import ControllerConfig, ThresholdController
from clada_export.runtime.generator import Generator
from clada_export.runtime.sampling import SamplingConfig
from conftest import one_line_error


def _prompts():
    g = torch.Generator().manual_seed(3)
    return [torch.randint(0, 320, (12,), generator=g).tolist(), torch.randint(0, 320, (7,), generator=g).tolist()]


def test_greedy_identical_on_torch_and_onnxruntime_with_controller(tiny_export, tiny_checkpoints, tiny_profile):
    model, _ = load_decoder(tiny_checkpoints["llama"])
    results, controllers = [], []
    for backend in (TorchBackend(model), OnnxRuntimeBackend(tiny_export)):
        def factory(batch):
            controllers.append(ThresholdController(tiny_profile, ControllerConfig(), batch=batch, keep_records=True))
            return controllers[-1]
        results.append(Generator(backend, controller_factory=factory).generate(_prompts(), 40))
    a, b = results
    assert a.tokens == b.tokens
    # the controller made the same decisions from both backends' signals
    sa = [(r["seq"], r["state"], round(r["target"], 9)) for r in controllers[0].step_records()]
    sb = [(r["seq"], r["state"], round(r["target"], 9)) for r in controllers[1].step_records()]
    assert sa == sb and len(sa) == 2 * 39
    # and it really moved: warm-up over, the load reached both states on random-weight text
    assert not np.isnan(a.sparsity[:-1]).any()
    assert abs(np.nanmean(a.sparsity) - controllers[0].target) <= 0.02


def test_sampling_is_seeded(tiny_checkpoints):
    model, _ = load_decoder(tiny_checkpoints["llama"])
    gen = Generator(TorchBackend(model))
    cfg = SamplingConfig(temperature=0.9, top_k=50, top_p=0.9, seed=7)
    r1, r2 = gen.generate(_prompts(), 16, cfg), gen.generate(_prompts(), 16, cfg)
    r3 = gen.generate(_prompts(), 16, SamplingConfig(temperature=0.9, top_k=50, top_p=0.9, seed=8))
    assert r1.tokens == r2.tokens and r1.tokens != r3.tokens


def test_stops_at_eos(tiny_checkpoints):
    model, _ = load_decoder(tiny_checkpoints["llama"])
    first = Generator(TorchBackend(model)).generate(_prompts()[:1], 8).tokens[0]
    eos = first[2]
    stopped = Generator(TorchBackend(model), eos_token_ids=[eos]).generate(_prompts()[:1], 8).tokens[0]
    assert stopped == first[: first.index(eos) + 1]


def test_generate_cli_streams_traces_and_plots(tiny_chat_export, tmp_path, capsys):
    out = tiny_chat_export
    trace, plot = tmp_path / "trace.jsonl", tmp_path / "signals.png"
    code = main(["generate", str(out), "--prompt", "w5 w9 w17 w33 w2 w8 w100 w7", "--max-new-tokens", "30",
                 "--trace", str(trace), "--plot", str(plot)])
    stdout, stderr = capsys.readouterr()
    assert code == 0
    assert stdout.startswith("w5 w9") and len(stdout.split()) > 8
    assert "tokens/s" in stderr and "mean MLP sparsity" in stderr and "denser on" in stderr
    records = [json.loads(l) for l in trace.read_text().splitlines()]
    assert records[0]["event"] == "config" and sum(r["event"] == "step" for r in records) >= 1
    image = plt.imread(plot)  # a real figure: two panels of lines, not a blank canvas
    assert image.ndim == 3 and image.shape[0] > 300 and image.shape[1] > 600
    assert image[..., :3].std() > 0.05 and (image[..., :3] < 0.5).mean() > 0.005
    # the static mode and the torch backend run too
    assert main(["generate", str(out), "--prompt", "w5 w9", "--max-new-tokens", "5", "--static",
                 "--backend", "torch"]) == 0
    assert "thresholds static" in capsys.readouterr().err


def test_generate_cli_errors(tiny_export, tmp_path, capsys):
    assert main(["generate", str(tmp_path), "--prompt", "x"]) == 2
    assert "not a clada-export output" in capsys.readouterr().err
    assert main(["generate", str(tiny_export), "--prompt", "x", "--max-new-tokens", "0"]) == 2
    assert "--max-new-tokens" in one_line_error(capsys.readouterr().err)
    assert main(["generate", str(tiny_export), "--prompt", "x", "--top-p", "0"]) == 2
    assert "top_p" in one_line_error(capsys.readouterr().err).replace("-", "_")
