"""The dense figure beside a generation's speed (what ``generate`` prints): two short greedy
runs on the same weights and device, dense through the fastest dense path the backend has and
then at the generation's own thresholds, equally long and both after the generation, so that
their ratio compares like with like (the generation itself may stop early at EOS, and its first
steps run cold)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

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


@dataclass(frozen=True)
class DenseComparison:
    """Decode tokens/s of dense and of the generation's thresholds over the same tokens."""

    tokens: int
    dense: float
    sparse: float

    @property
    def speedup(self) -> float:
        return self.sparse / self.dense

    def line(self) -> str:
        return (f"dense {self.dense:.1f} vs {self.sparse:.1f} tokens/s over the same {self.tokens} tokens: "
                f"{self.speedup:.2f}x")


def compare_with_dense(sparse: Generator, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> DenseComparison | None:
    """A dense greedy generation of up to DENSE_BASELINE_TOKENS tokens from ``prompts`` (EOS
    ignored), then one as long with ``sparse``'s thresholds (its static thresholds, or a fresh
    controller from its factory); None when fewer than 2 tokens are asked for."""
    tokens = min(max_new_tokens, DENSE_BASELINE_TOKENS)
    if tokens < 2:
        return None
    dense = Generator(dense_backend_for(sparse.backend), eos_token_ids=()).generate(prompts, tokens)
    same = Generator(sparse.backend, eos_token_ids=(), controller_factory=sparse.controller_factory,
                     static_thresholds=sparse.static_thresholds).generate(prompts, tokens)
    return DenseComparison(tokens, dense.decode_tokens_per_second, same.decode_tokens_per_second)
