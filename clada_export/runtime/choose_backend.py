"""``generate``'s backend on a CPU when none is named: torch or onnxruntime, whichever
decodes faster here, measured over a few decode steps.

Why measure instead of a fixed rule: on the CPU the torch backend decodes through our
SparseMLP kernel, so sparsity saves time there (about 1.3x over torch's own dense at 50%),
but torch's eager small ops cost much per step; the onnxruntime backend runs the exported
graphs, whose SparseMLP function body computes the MLP dense and then masks (sparsity
saves nothing), yet its whole step is cheaper. On an idle 2-core AMD EPYC with the default
model (SmolLM2-135M, float32, batch 1) at 50% sparsity, torch with the kernel decoded about
17 tokens/s and onnxruntime about 32. Attempts to make onnxruntime profit from the sparsity
(the kernel as a Python custom op, a Gather-based pure-ONNX sparse MLP) predicted at most
1.11-1.18x and measured 0.93x. Which one wins depends on the machine, the model, its
sparsity and the batch, so the user's first command times both (about 4 s on the default
model, opening ONNX Runtime's session included) and runs the faster.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from clada_export.runtime.backends import Backend, TorchBackend

MEASURE_STEPS = 8
"""Decode steps timed per backend (after WARMUP_STEPS untimed ones)."""
WARMUP_STEPS = 2
PROMPT_TOKENS = 8
"""Each prompt's first tokens prefilled before the timed steps: a short context, cheap to fill."""


@dataclass
class BackendChoice:
    """The faster backend (still open), its name, and each candidate's measured decode
    tokens/s with a few words on how it ran (``details``: e.g. the torch backend's MLP);
    ``failed``: candidates that could not open or run here, with the error's text."""

    name: str
    backend: Backend
    rates: dict[str, float]
    details: dict[str, str] = field(default_factory=dict)
    steps: int = MEASURE_STEPS
    failed: dict[str, str] = field(default_factory=dict)

    def line(self) -> str:
        """One line for stderr naming the choice and the rates it was made on."""
        def rate(name: str) -> str:
            detail = self.details.get(name)
            return f"{self.rates[name]:.1f} tokens/s" + (f" {detail}" if detail else "")

        others = " and ".join(f"{n} ({rate(n)})" for n in self.rates if n != self.name)
        if not others:
            return f"backend: {self.name} ({rate(self.name)})"
        names = " or ".join(self.rates)
        return (f"backend: {self.name} ({rate(self.name)}) over {others}, measured over {self.steps} decode steps; "
                f"--backend {names} chooses")


def onnx_graphs_present(export_dir: str | Path, manifest: dict) -> bool:
    """Whether the export's ONNX graphs (what the onnxruntime backend runs) are all there."""
    from clada_export import contract as C

    graphs = manifest.get("graphs") or {}
    try:
        return all((Path(export_dir) / graphs[g]["onnx"]).is_file() for g in C.GRAPHS)
    except (KeyError, TypeError):
        return False


def decode_tokens_per_second(backend: Backend, prompts: Sequence[Sequence[int]], thresholds: np.ndarray,
                             steps: int = MEASURE_STEPS, warmup: int = WARMUP_STEPS,
                             clock: Callable[[], float] = time.perf_counter) -> float:
    """Greedy decode tokens/s of ``backend`` (batch / the median step time) over ``steps`` steps
    after ``warmup`` untimed ones, from a prefill of each prompt's first PROMPT_TOKENS tokens;
    every step runs ``thresholds [L, 2]`` (the same for each sequence). ``clock`` is
    injectable for tests."""
    if steps < 1 or warmup < 0:
        raise ValueError(f"steps must be >= 1 and warmup >= 0, got {steps} and {warmup}")
    short = [list(p)[:PROMPT_TOKENS] for p in prompts]
    if not short or any(len(p) == 0 for p in short):
        raise ValueError("every prompt needs at least one token")
    B, L = len(short), backend.num_layers
    lens = torch.tensor([len(p) for p in short], dtype=torch.long)
    ids = torch.zeros((B, int(lens.max())), dtype=torch.long)
    for b, p in enumerate(short):
        ids[b, : len(p)] = torch.tensor(p, dtype=torch.long)
    per_seq = torch.from_numpy(np.ascontiguousarray(
        np.repeat(np.asarray(thresholds, np.float32).reshape(L, 1, 2), B, axis=1)))
    backend.start(B, int(lens.max()) + warmup + steps)
    out = backend.prefill(ids, lens, torch.zeros((L, B, 2), dtype=torch.float32))
    position = lens.clone()
    tok = out.logits.argmax(-1).cpu()
    times = []
    for i in range(warmup + steps):
        t0 = clock()
        out = backend.decode(tok, position, per_seq)
        tok = out.logits.argmax(-1).cpu()  # waits for the step, as the Generator's read does
        position += 1
        if i >= warmup:
            times.append(clock() - t0)
    step = float(np.median(times))  # the median: one step descheduled on a busy machine does not decide
    return B / step if step > 0 else float("inf")


def _detail(backend: Backend, batch: int) -> str:
    from clada_export.ops.cpu_kernel import MAX_ROWS

    if not isinstance(backend, TorchBackend):
        return ""
    if backend.mlp == "cpu-kernel" and batch <= MAX_ROWS:
        return "with the CPU SparseMLP kernel"
    return "with the reference op"


def choose_faster(openers: Mapping[str, Callable[[], Backend]], prompts: Sequence[Sequence[int]],
                  thresholds: np.ndarray, steps: int = MEASURE_STEPS, warmup: int = WARMUP_STEPS,
                  clock: Callable[[], float] = time.perf_counter) -> BackendChoice:
    """Open each candidate in turn (``openers``: name -> a call opening it), time its decode
    with :func:`decode_tokens_per_second`, and keep the fastest open; the others are dropped
    as soon as they lose, so at most two are held at once. Ties go to the first named. A
    candidate that fails to open or run is left out (``failed``); when all fail, the last
    error is raised."""
    best: tuple[str, Backend] | None = None
    rates: dict[str, float] = {}
    details: dict[str, str] = {}
    failed: dict[str, str] = {}
    error: Exception | None = None
    for name, open_it in openers.items():
        backend = None
        try:
            backend = open_it()
            rate = decode_tokens_per_second(backend, prompts, thresholds, steps, warmup, clock)
        except Exception as e:  # noqa: BLE001 - e.g. an onnxruntime without the graphs' ops: the other runs
            failed[name], error = (str(e).splitlines() or [type(e).__name__])[0], e
        else:
            rates[name], details[name] = rate, _detail(backend, len(prompts))
            if best is None or rate > rates[best[0]]:
                best = (name, backend)
        del backend
        gc.collect()  # a losing backend's weights (torch's model, onnxruntime's sessions) go now
    if best is None:
        if error is None:
            raise ValueError("no backend to choose from")
        raise error
    return BackendChoice(best[0], best[1], rates, details, steps, failed)
