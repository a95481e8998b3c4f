"""Generation: prefill, then one decode loop that reads the cognitive-load signals of
each step and feeds the controller's thresholds into the next one.

Per step, only the picked token ids and three floats per sequence (entropy, logsumexp,
the picked token's logit) cross from the backend's device to the host.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from clada_export.runtime.backends import Backend
from clada_export.runtime.controller import ThresholdController
from clada_export.runtime.native_controller import make_controller
from clada_export.runtime.sampling import Sampler, SamplingConfig


@dataclass
class GenerationResult:
    """``tokens[b]``: generated ids of sequence b (EOS included if reached);
    ``surprisal``/``entropy`` ``[steps, B]`` of each generated token's distribution;
    ``sparsity [steps, B]``: the mean MLP byte sparsity the controller chose for the step
    that consumed that token (NaN where no controller, and for the last token, which no
    step consumes); ``denser [steps, B]``: whether that choice was made in the ``denser``
    state. The controller's full decisions go to its trace, when it was given one."""

    prompt_tokens: list[list[int]]
    tokens: list[list[int]]
    surprisal: np.ndarray
    entropy: np.ndarray
    sparsity: np.ndarray
    denser: np.ndarray
    prefill_seconds: float
    decode_seconds: float
    controller_seconds: float = 0.0
    """Host time spent in the controller's steps (part of ``decode_seconds``)."""

    @property
    def new_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)

    @property
    def decode_tokens_per_second(self) -> float:
        steps = self.surprisal.shape[0] - 1  # the first token comes from prefill
        return steps * len(self.tokens) / self.decode_seconds if self.decode_seconds > 0 else float("nan")


class Generator:
    """One decode loop over any :class:`Backend`.

    ``controller_factory(batch)``: a fresh :class:`ThresholdController` for each
    :meth:`generate` call (dynamic CLADA thresholds), or ``None`` for fixed thresholds:
    ``static_thresholds [L, 2]`` (``None``: zeros, i.e. dense).
    """

    def __init__(self, backend: Backend, eos_token_ids: Sequence[int] = (),
                 controller_factory: Callable[[int], ThresholdController] | None = None,
                 static_thresholds: np.ndarray | None = None):
        self.backend = backend
        self.eos = set(int(t) for t in eos_token_ids)
        self.controller_factory = controller_factory
        L = backend.num_layers
        self.static_thresholds = (np.zeros((L, 2), np.float32) if static_thresholds is None
                                  else np.asarray(static_thresholds, np.float32))
        if self.static_thresholds.shape != (L, 2):
            raise ValueError(f"static thresholds must have shape [{L}, 2], got {list(self.static_thresholds.shape)}")

    def _thresholds(self, per_seq: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(per_seq, dtype=np.float32)).to(self.backend.device)

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        sampling: SamplingConfig = SamplingConfig(),
        on_tokens: Callable[[np.ndarray], None] | None = None,
    ) -> GenerationResult:
        """Generate for a batch of tokenized prompts; ``on_tokens(ids [B])`` streams each step."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        if max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        backend, dev = self.backend, self.backend.device
        B = len(prompts)
        lens = torch.tensor([len(p) for p in prompts], dtype=torch.long)
        T = int(lens.max())
        ids = torch.zeros((B, T), dtype=torch.long)
        for b, p in enumerate(prompts):
            ids[b, : len(p)] = torch.tensor(list(p), dtype=torch.long)
        backend.start(B, T + max_new_tokens)
        sampler = Sampler(sampling, dev)
        controller = self.controller_factory(B) if self.controller_factory else None

        t0 = time.perf_counter()
        # prefill runs dense: its activation statistics are the prompt's own, and the
        # controller's sequence level starts from them
        out = backend.prefill(ids, lens, self._thresholds(np.zeros((backend.num_layers, B, 2))))
        if controller is not None:
            thresholds = controller.begin(None if out.act_stats is None else out.act_stats.cpu().numpy())
        else:
            thresholds = np.repeat(self.static_thresholds[:, None], B, axis=1)
        position = lens.clone()
        finished = np.zeros(B, dtype=bool)
        tokens: list[list[int]] = [[] for _ in range(B)]
        rec_s, rec_e, rec_sp, rec_d = [], [], [], []
        t_prefill, t_ctl = None, 0.0
        greedy = sampling.temperature == 0
        for step in range(max_new_tokens):
            if greedy and out.greedy is not None:  # picked inside the backend's step
                small = out.greedy()
            else:
                picked = sampler(out.logits)
                picked_logit = out.logits.gather(1, picked[:, None])[:, 0]
                small = torch.stack((picked.double(), out.entropy.double(), out.logsumexp.double(),
                                     picked_logit.double()), dim=1).cpu().numpy()
            if t_prefill is None:
                t_prefill = time.perf_counter() - t0
                t1 = time.perf_counter()
            tok = small[:, 0].astype(np.int64)
            entropy, surprisal = small[:, 1], small[:, 2] - small[:, 3]
            for b in range(B):
                if not finished[b]:
                    tokens[b].append(int(tok[b]))
                    finished[b] = int(tok[b]) in self.eos
            if on_tokens is not None:
                on_tokens(np.where(finished & ~np.isin(tok, list(self.eos)), -1, tok))
            rec_s.append(surprisal)
            rec_e.append(entropy)
            if finished.all() or step == max_new_tokens - 1:
                rec_sp.append(np.full(B, np.nan))
                rec_d.append(np.zeros(B, bool))
                break
            if controller is not None:
                tc = time.perf_counter()
                thresholds = controller.step(surprisal, entropy, tokens=tok, active=~finished)
                t_ctl += time.perf_counter() - tc
                realized, denser = controller.step_summary()  # NaN / False for finished sequences
                rec_sp.append(realized)
                rec_d.append(denser)
            else:
                rec_sp.append(np.full(B, np.nan))
                rec_d.append(np.zeros(B, bool))
            # decode inputs stay on the host: each backend copies them its own way (the cuda
            # backend through pinned staging buffers, without a synchronous transfer)
            out = backend.decode(torch.from_numpy(tok), position,
                                 torch.from_numpy(np.ascontiguousarray(thresholds, dtype=np.float32)))
            position += 1
        t_decode = time.perf_counter() - t1
        return GenerationResult(
            prompt_tokens=[list(p) for p in prompts],
            tokens=tokens,
            surprisal=np.array(rec_s),
            entropy=np.array(rec_e),
            sparsity=np.array(rec_sp),
            denser=np.array(rec_d),
            prefill_seconds=t_prefill,
            decode_seconds=t_decode,
            controller_seconds=t_ctl,
        )


def threshold_mode(profile, dense: bool, static: bool, controller_config, trace: str | None):
    """How an export's generation picks thresholds: dense (no profile, or ``dense``), the
    profile's static thresholds, or a controller per generation (the C++ one where the kernel
    library loads and no trace is asked for: the same decisions without Python's host time per
    step, runtime/native_controller.py). Returns (controller_factory,
    static_thresholds, mode, controllers), where ``controllers`` collects the controllers made."""
    factory, static_thresholds, mode = None, None, "dense"
    controllers: list[ThresholdController] = []
    if profile is not None and not dense:
        if static:
            static_thresholds, mode = profile.static_thresholds(), "static"
        else:
            def factory(batch: int) -> ThresholdController:
                controllers.append(make_controller(profile, controller_config, batch=batch, trace=trace))
                return controllers[-1]

            mode = "dynamic"
    return factory, static_thresholds, mode, controllers


def summary_stats(result: GenerationResult, backend: str, mode: str, profile) -> list[str]:
    """One generation's figures, for a one-line summary: tokens, decode speed, backend, threshold
    mode and the sparsity reached (dynamic: mean chosen and how often denser; static: the profile's)."""
    sp = result.sparsity[~np.isnan(result.sparsity)]
    stats = [f"{result.new_tokens} tokens", f"decode {result.decode_tokens_per_second:.1f} tokens/s",
             f"backend {backend}", f"thresholds {mode}"]
    if mode == "dynamic" and sp.size:
        stats.append(f"mean MLP sparsity {sp.mean():.3f} (target {profile.target_sparsity:.2f})")
        stats.append(f"denser on {100 * result.denser.mean():.0f}% of steps")
    elif mode == "static":
        stats.append(f"MLP sparsity {profile.mean_byte_sparsity():.3f}")
    return stats
