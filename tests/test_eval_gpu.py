"""The evidence sweep on a GPU (``clada-export report --device cuda``): the scorer gives
the CPU's results on a CUDA device for every kind of method, and ``--device`` refuses
what it cannot run. The GPU tests are skipped without CUDA."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from clada_export.errors import UserError
from clada_export.evaluation.methods import Method, static_method
from clada_export.evaluation.scoring import score_continuations
from clada_export.evaluation.sweep import sweep_device

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on the GPU machine)")


def test_device_names_are_checked():
    assert sweep_device(None) == torch.device("cpu")
    with pytest.raises(UserError, match="cpu or cuda"):
        sweep_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA device"):
            sweep_device("cuda")


def _methods(profile, L: int) -> list[Method]:
    from clada_export.runtime.controller import ControllerConfig

    thr = np.tile(np.array([[0.04, 0.02]], np.float32), (L, 1))
    return [static_method("dense", None, None), static_method("uniform", 0.4, thr),
            Method("griffin", 0.5, "griffin"),
            Method("clada_ref", 0.5, "clada_ref", info={"rule": {"window": 10, "percentile": 0.7}}),
            Method("dynamic", 0.5, "dynamic", profile=profile,
                   config=ControllerConfig(window=4, min_history=4, payback_steps=4, high=0.7, high_margin=0.05))]


@needs_cuda
def test_cuda_scores_equal_the_cpu_scores_for_every_method(tiny_checkpoints, tiny_profile):
    from clada_export.model.loading import load_decoder

    cpu, _ = load_decoder(tiny_checkpoints["llama"])
    gpu, _ = load_decoder(tiny_checkpoints["llama"], device="cuda")
    torch.backends.cuda.matmul.allow_tf32 = False
    g = torch.Generator().manual_seed(5)
    ctx = torch.randint(0, cpu.cfg.vocab_size, (12,), generator=g).tolist()
    conts = [torch.randint(0, cpu.cfg.vocab_size, (n,), generator=g).tolist() for n in (40, 23, 1)]
    for method in _methods(tiny_profile, cpu.cfg.num_layers):
        ref = score_continuations(cpu, method, ctx, conts)
        with torch.device("cuda"):  # as run_sweep scores: tensors made on the model's device
            got = score_continuations(gpu, method, ctx, conts)
        assert got.steps == ref.steps and got.fallbacks == 0, method.name
        for a, b in zip(got.token_logprobs, ref.token_logprobs):
            assert np.isfinite(a).all(), method.name
            # float32 on both sides; only the order of sums differs. A thresholded
            # network can flip an element that sits on a threshold, so the bound is
            # per token, not bit-equality.
            np.testing.assert_allclose(a, b, atol=2e-3, err_msg=method.name)
        np.testing.assert_allclose(got.logprobs, ref.logprobs, atol=1e-2, err_msg=method.name)
        assert got.greedy == ref.greedy, method.name
        if method.kind in ("griffin", "clada_ref"):
            assert got.selection_sparsity == ref.selection_sparsity
