"""The dense figure beside a generation's speed: a short dense run on the same weights and
device, through the fastest dense path the backend has (what ``generate`` prints)."""

from __future__ import annotations

from collections.abc import Sequence

from clada_export.runtime.backends import Backend, TorchBackend
from clada_export.runtime.generator import Generator

# Long enough for a stable tokens/s on the default model (about 1 s on 2 CPU cores), short
# enough not to double the wait of a 64-token generation.
DENSE_BASELINE_TOKENS = 32


def dense_backend_for(backend: Backend) -> Backend:
    """The torch backend's dense path is torch's own GEMMs (the reference op), not the CPU
    kernel at zero thresholds; any other backend runs dense as itself, at zero thresholds."""
    if isinstance(backend, TorchBackend) and backend.mlp == "cpu-kernel":
        return TorchBackend(backend.model, backend.device, mlp="reference")
    return backend


def dense_tokens_per_second(backend: Backend, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> float:
    """Decode tokens/s of a dense greedy generation of up to DENSE_BASELINE_TOKENS tokens
    (EOS ignored) from ``prompts``; NaN when fewer than 2 tokens are asked for."""
    tokens = min(max_new_tokens, DENSE_BASELINE_TOKENS)
    if tokens < 2:
        return float("nan")
    return Generator(dense_backend_for(backend), eos_token_ids=()).generate(prompts, tokens).decode_tokens_per_second
