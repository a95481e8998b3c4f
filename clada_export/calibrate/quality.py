"""The quality harness: perplexity, the sparsity actually reached, and greedy-generation
agreement with the dense model.

* :func:`perplexity` -- teacher-forced, all positions of each window in one pass, with
  the same thresholds ``[L, 2]`` for every token (dense, or a profile's static ones).
* :func:`stepwise_perplexity` -- the exact step-by-step mode for dynamic control: each
  window's first ``prefix`` tokens are prefilled (with per-layer activation statistics),
  then the rest is decoded one token at a time through the KV cache, teacher-forced;
  before every step a thresholds source (e.g. the runtime's ``ThresholdController``)
  is given the previous step's signals (surprisal of the true next token, entropy) and
  returns the thresholds ``[L, B, 2]`` of the next step. Static thresholds through the
  same loop give the like-for-like baseline.
* :func:`one_pass_dynamic_perplexity` -- the same protocol in one sparse pass per
  window: each position runs at its own thresholds (per token), which the source chose
  from the signals of a dense pass; :func:`paired_difference` gives the mean NLL
  difference of two runs over the same windows with a bootstrap interval.
* :func:`greedy_agreement` -- K prompts from the evaluation text continued for 64 tokens
  greedily, dense and sparse; the fraction of positions where the two agree.

Realized sparsity is recorded by forward pre-hooks on each layer's MLP that only read
its arguments (x and the thresholds the op is given): fraction of |x| <= t_in, and of
|h| <= t_mid where h is computed from the thresholded x (the MLP module's ``magnitudes``,
either form, on a subset of rows).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from clada_export.model.llama import cognitive_signals
from clada_export.ops.sparse_mlp import threshold_columns
from clada_export.profile import byte_sparsity


class SparsityMeter:
    """Forward pre-hooks that measure the sparsity each layer's MLP is actually run at.

    ``h_rows``: rows (tokens) per call on which |h| is measured (the gate/up products
    are recomputed there); |x| is measured on every row. ``positions``: ``(start,
    stop)`` of the token positions to measure (default all), e.g. only the positions
    that stand for decode steps in a teacher-forced pass. Thresholds may be per
    sequence ``[B, 2]`` or per token ``[B, T, 2]``."""

    def __init__(self, model, h_rows: int = 32, seed: int = 0, positions: tuple[int, int] | None = None):
        self.model = model
        self.h_rows = h_rows
        self.positions = positions
        self.gen = torch.Generator().manual_seed(seed)
        L = len(model.layers)
        self.zero = np.zeros((L, 2))
        self.count = np.zeros((L, 2))
        self.handles = []

    def __enter__(self) -> "SparsityMeter":
        for i, layer in enumerate(self.model.layers):
            self.handles.append(layer.mlp.register_forward_pre_hook(self._hook(i)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def _hook(self, i: int):
        def hook(module, args):
            x, thr = args[0].detach(), args[1].detach()
            B = x.shape[0]
            rows = x.reshape(B, -1, x.shape[-1])  # [B, T, H]
            # per sequence [B, 2] or per token [B, T, 2], as the op reads them
            t_in, t_mid = (t.expand(B, rows.shape[1], 1) for t in threshold_columns(thr, rows))
            if self.positions is not None:
                a, b = self.positions
                rows, t_in, t_mid = rows[:, a:b], t_in[:, a:b], t_mid[:, a:b]
            self.zero[i, 0] += float((rows.abs() <= t_in).sum())
            self.count[i, 0] += rows.numel()
            T = rows.shape[1]
            n = min(T, max(1, self.h_rows // B))
            pick = torch.randperm(T, generator=self.gen, device="cpu")[:n] if n < T else torch.arange(T)
            _, ah = module.magnitudes(rows[:, pick], t_in[:, pick])  # either form of the MLP
            self.zero[i, 1] += float((ah <= t_mid[:, pick]).sum())
            self.count[i, 1] += ah.numel()
        return hook

    def per_layer(self) -> np.ndarray:
        """``[L, 2]``: fraction of |x| <= t_in and of |h| <= t_mid (what the op skips)."""
        return self.zero / np.maximum(self.count, 1)

    def byte_sparsity(self) -> float:
        s = self.per_layer()
        return float(np.mean(byte_sparsity(s[:, 0], s[:, 1], self.model.cfg.gated_mlp)))


@dataclass
class PerplexityResult:
    perplexity: float
    nll: float  # mean negative log-likelihood, nats per token
    tokens: int  # predicted tokens
    sparsity_per_layer: np.ndarray | None = None  # [L, 2] realized (fraction skipped)
    byte_sparsity: float | None = None  # realized mean byte sparsity

    def to_dict(self) -> dict:
        return {"perplexity": self.perplexity, "nll": self.nll, "tokens": self.tokens,
                "byte_sparsity": self.byte_sparsity,
                "sparsity_per_layer": None if self.sparsity_per_layer is None
                else np.round(self.sparsity_per_layer, 5).tolist()}


def _device(model) -> torch.device:
    return model.embed_tokens.weight.device


def _static_thresholds(model, thresholds: np.ndarray | None) -> torch.Tensor:
    """Per-layer thresholds ``[L, 2]`` float32 (zeros, i.e. dense, for None)."""
    L = model.cfg.num_layers
    thr = torch.zeros(L, 2) if thresholds is None else torch.as_tensor(np.asarray(thresholds), dtype=torch.float32)
    if thr.shape != (L, 2):
        raise ValueError(f"thresholds must have shape [{L}, 2], got {list(thr.shape)}")
    return thr


def perplexity(model, windows: torch.Tensor, thresholds: np.ndarray | None = None, batch_size: int = 4,
               measure_sparsity: bool = True, desc: str = "perplexity", progress: bool = True,
               first_target: int = 1) -> PerplexityResult:
    """Teacher-forced perplexity of ``windows [N, T]`` at static ``thresholds [L, 2]``
    (None: dense). Every position predicts the next token; targets are positions
    ``first_target..T-1`` of each window (default: all but the first token)."""
    L = model.cfg.num_layers
    thr = _static_thresholds(model, thresholds)
    dev = _device(model)
    N, T = windows.shape
    nll, n = 0.0, 0
    meter = SparsityMeter(model) if measure_sparsity else None
    with torch.inference_mode(), (meter if meter is not None else _null()):
        for s in tqdm(range(0, N, batch_size), total=-(-N // batch_size), desc=desc, unit="batch",
                      file=sys.stderr, disable=not progress, leave=False):
            ids = windows[s:s + batch_size].to(dev)
            B = ids.shape[0]
            pos = torch.arange(T, device=dev)[None].expand(B, T)
            k, v = model.new_cache(B, T)
            t = thr[:, None, :].expand(L, B, 2).contiguous().to(dev)
            logits = model(ids, pos, k, v, t, all_logits=True).logits
            tgt = ids[:, first_target:]
            pred = logits[:, first_target - 1:T - 1].float()
            nll += float(F.cross_entropy(pred.reshape(-1, pred.shape[-1]), tgt.reshape(-1), reduction="sum"))
            n += tgt.numel()
    mean = nll / max(n, 1)
    return PerplexityResult(math.exp(mean), mean, n,
                            meter.per_layer() if meter else None, meter.byte_sparsity() if meter else None)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


# -- exact step-by-step teacher-forced decoding for dynamic control ---------------------
class ThresholdSource(Protocol):
    """What :func:`stepwise_perplexity` asks for thresholds; the runtime's
    ``ThresholdController`` is one (same method names and shapes)."""

    def begin(self, act_stats: np.ndarray | None) -> np.ndarray:
        """``act_stats [L, B, 2]`` of the prefill -> thresholds ``[L, B, 2]`` of the first decode step."""

    def step(self, surprisal: np.ndarray, entropy: np.ndarray, tokens=None) -> np.ndarray:
        """Signals of the step just taken (``[B]`` nats; ``tokens [B]`` the true next
        tokens) -> thresholds ``[L, B, 2]`` of the next step."""


class StaticThresholds:
    """A :class:`ThresholdSource` that always returns the same ``[L, 2]`` thresholds."""

    def __init__(self, thresholds: np.ndarray, batch: int):
        self.thr = np.repeat(np.asarray(thresholds, dtype=np.float32)[:, None, :], batch, axis=1)

    def begin(self, act_stats=None) -> np.ndarray:
        return self.thr

    def step(self, surprisal, entropy, tokens=None) -> np.ndarray:
        return self.thr


@dataclass(kw_only=True)
class StepwiseResult(PerplexityResult):
    """Sparsity is realized over the decode steps."""

    surprisal: np.ndarray = field(repr=False)  # [steps, N] of the true tokens (dense prefill's first)
    entropy: np.ndarray = field(repr=False)


def stepwise_perplexity(model, windows: torch.Tensor, make_source, prefix: int = 32, batch_size: int = 8,
                        prefill_dense: bool = True, desc: str = "stepwise", progress: bool = True
                        ) -> StepwiseResult:
    """Exact teacher-forced evaluation with per-step thresholds.

    ``windows [N, T]``; ``make_source(batch) -> ThresholdSource`` (a fresh source per
    batch of windows, e.g. ``lambda B: ThresholdController(profile, config, batch=B)``).
    The first ``prefix`` tokens are prefilled (dense unless ``prefill_dense=False``, then
    at the source's first thresholds) with activation statistics for ``begin``; the
    logits of the last prefix token predict token ``prefix``, then each step feeds the
    true token ``t`` with the thresholds the source returned and predicts ``t+1``. Targets:
    tokens ``prefix..T-1`` (compare with ``perplexity(..., first_target=prefix)``).
    Sparsity is measured on the decode steps only."""
    L = model.cfg.num_layers
    dev = _device(model)
    N, T = windows.shape
    if not 1 <= prefix < T:
        raise ValueError(f"prefix must be in [1, {T - 1}], got {prefix}")
    nll, n = 0.0, 0
    meter = SparsityMeter(model, h_rows=8)
    all_u, all_e = [], []
    batches = list(range(0, N, batch_size))
    bar = tqdm(total=len(batches) * (T - prefix), desc=desc, unit="step", file=sys.stderr,
               disable=not progress, leave=False)
    with torch.inference_mode():
        for s in batches:
            ids = windows[s:s + batch_size].to(dev)
            B = ids.shape[0]
            source = make_source(B)
            k, v = model.new_cache(B, T)
            pos = torch.arange(prefix, device=dev)[None].expand(B, prefix)
            zeros = torch.zeros(L, B, 2, device=dev)
            if prefill_dense:
                out = model(ids[:, :prefix], pos, k, v, zeros, with_stats=True)
                thr = source.begin(out.act_stats.cpu().numpy())
            else:
                thr = source.begin(None)
                out = model(ids[:, :prefix], pos, k, v, torch.as_tensor(thr, device=dev), with_stats=True)
            k, v, logits = out.k_caches, out.v_caches, out.logits
            us, es = [], []
            for t in range(prefix, T):
                true = ids[:, t]
                entropy, lse = cognitive_signals(logits)
                surprisal = lse - logits.gather(-1, true[:, None])[:, 0]
                nll += float(surprisal.sum(dtype=torch.float64))
                n += B
                us.append(surprisal.cpu().numpy())
                es.append(entropy.cpu().numpy())
                if t == T - 1:
                    bar.update(1)
                    break
                # as in the runtime's Generator: every decoded token's signals (the first
                # one's come from the prefill) set the thresholds of the step consuming it
                thr = source.step(us[-1], es[-1], tokens=true.cpu().numpy())
                thr_t = torch.as_tensor(np.asarray(thr), dtype=torch.float32, device=dev)
                with meter:
                    out = model(true[:, None], torch.full((B, 1), t, device=dev), k, v, thr_t)
                k, v, logits = out.k_caches, out.v_caches, out.logits
                bar.update(1)
            all_u.append(np.stack(us))
            all_e.append(np.stack(es))
    bar.close()
    mean = nll / max(n, 1)
    return StepwiseResult(math.exp(mean), mean, n, meter.per_layer(), meter.byte_sparsity(),
                          surprisal=np.concatenate(all_u, axis=1), entropy=np.concatenate(all_e, axis=1))


@dataclass(kw_only=True)
class OnePassResult(PerplexityResult):
    """Sparsity is realized over the positions that stand for decode steps."""

    window_nll: np.ndarray = field(repr=False)  # [N] summed NLL per window (paired comparisons)
    window_tokens: int  # targets per window


@dataclass
class DenseSignals:
    """What the one-pass mode takes from the dense model, once per set of windows.
    ``surprisal``/``entropy`` ``[N, T-1]``: column ``t-1`` holds token ``t``'s surprisal
    under position ``t-1``'s distribution and that distribution's entropy (nats);
    ``act_stats [L, N, 2]``: the prefill statistics of each window's first ``prefix``
    tokens."""

    surprisal: np.ndarray
    entropy: np.ndarray
    act_stats: np.ndarray
    prefix: int

    def nll(self) -> float:
        """The dense model's mean NLL over the targets ``prefix..T-1``."""
        return float(self.surprisal[:, self.prefix - 1:].astype(np.float64).mean())


def dense_signals(model, windows: torch.Tensor, prefix: int = 32, batch_size: int = 8,
                  desc: str = "dense signals", progress: bool = True) -> DenseSignals:
    """The dense pass the one-pass mode needs (see :class:`DenseSignals`): every window in
    full for the signals; the statistics are read over the prefix only (``last_index``),
    which under the causal mask are those of the prefix prefilled alone, as the exact
    mode does it."""
    L = model.cfg.num_layers
    dev = _device(model)
    N, T = windows.shape
    if not 1 <= prefix < T - 1:
        raise ValueError(f"prefix must be in [1, {T - 2}], got {prefix}")
    surprisal, entropy, stats = np.zeros((N, T - 1), np.float32), np.zeros((N, T - 1), np.float32), []
    with torch.inference_mode():
        for s in tqdm(range(0, N, batch_size), total=-(-N // batch_size), desc=desc, unit="batch",
                      file=sys.stderr, disable=not progress, leave=False):
            ids = windows[s:s + batch_size].to(dev)
            B = ids.shape[0]
            pos = torch.arange(T, device=dev)[None].expand(B, T)
            zeros = torch.zeros(L, B, 2, device=dev)
            k, v = model.new_cache(B, T)
            last = torch.full((B,), prefix - 1, dtype=torch.long, device=dev)
            out = model(ids, pos, k, v, zeros, last_index=last, with_stats=True, all_logits=True)
            stats.append(out.act_stats.cpu())
            logits = out.logits[:, :-1]
            e, lse = cognitive_signals(logits.reshape(-1, logits.shape[-1]))
            surprisal[s:s + B] = (lse.view(B, T - 1) - logits.gather(-1, ids[:, 1:, None])[..., 0]).cpu().numpy()
            entropy[s:s + B] = e.view(B, T - 1).cpu().numpy()
    return DenseSignals(surprisal, entropy, torch.cat(stats, dim=1).numpy(), prefix)


def one_pass_dynamic_perplexity(model, windows: torch.Tensor, make_source, prefix: int = 32, batch_size: int = 8,
                                signals: DenseSignals | None = None, desc: str = "one pass",
                                progress: bool = True) -> OnePassResult:
    """Teacher-forced evaluation of dynamic control in one sparse pass per window.

    The same protocol as :func:`stepwise_perplexity` (dense prefix with activation
    statistics for ``begin``, then ``source.step`` with the signals of token ``t`` sets
    the thresholds of the position that consumes token ``t``; targets ``prefix..T-1``),
    except that the signals (surprisal of the true token, entropy) come from a dense
    pass instead of the sparse run itself. Every position then runs at its own
    thresholds (per-token ``[B, T, 2]``, see ``sparse_mlp_reference``), which in a
    decode loop it would do in its own step: the one difference from the exact mode is
    the source of the signals. Sparsity is measured on positions ``prefix..T-2`` (the
    decode steps of the exact mode). ``signals``: :func:`dense_signals` of these
    windows, when several runs share them (computed here otherwise)."""
    L = model.cfg.num_layers
    dev = _device(model)
    N, T = windows.shape
    if signals is None:
        signals = dense_signals(model, windows, prefix, batch_size, progress=progress)
    if signals.prefix != prefix or signals.surprisal.shape != (N, T - 1):
        raise ValueError(f"signals are for prefix {signals.prefix} and windows {list(signals.surprisal.shape)} "
                         f"(+1 token), not prefix {prefix} and windows {[N, T]}")
    meter = SparsityMeter(model, h_rows=32, positions=(prefix, T - 1))
    window_nll = np.zeros(N)
    with torch.inference_mode():
        for s in tqdm(range(0, N, batch_size), total=-(-N // batch_size), desc=desc, unit="batch",
                      file=sys.stderr, disable=not progress, leave=False):
            ids = windows[s:s + batch_size].to(dev)
            B = ids.shape[0]
            surprisal, entropy = signals.surprisal[s:s + B], signals.entropy[s:s + B]
            source = make_source(B)
            source.begin(signals.act_stats[:, s:s + B])
            thr = torch.zeros(L, B, T, 2)
            for t in range(prefix, T - 1):
                thr[:, :, t] = torch.as_tensor(np.asarray(source.step(surprisal[:, t - 1], entropy[:, t - 1],
                                                                      tokens=ids[:, t].cpu().numpy())))
            k, v = model.new_cache(B, T)
            with meter:
                logits = model(ids, torch.arange(T, device=dev)[None].expand(B, T), k, v, thr.to(dev),
                               all_logits=True).logits
            pred = logits[:, prefix - 1:T - 1].float()
            tok_nll = F.cross_entropy(pred.reshape(-1, pred.shape[-1]), ids[:, prefix:].reshape(-1),
                                      reduction="none").view(B, -1)
            window_nll[s:s + B] = tok_nll.double().sum(1).cpu().numpy()
    n = N * (T - prefix)
    mean = float(window_nll.sum()) / n
    return OnePassResult(math.exp(mean), mean, n, meter.per_layer(), meter.byte_sparsity(), window_nll=window_nll,
                         window_tokens=T - prefix)


def paired_difference(a: np.ndarray, b: np.ndarray, per_window: int, samples: int = 2000, seed: int = 0
                      ) -> tuple[float, float, float]:
    """Mean NLL difference (nats/token) of ``a - b`` (per-window NLL sums over the same
    windows) and its 95% bootstrap interval over windows; NaN bounds for fewer than 2
    windows (resampling one window gives a zero-width interval that means nothing)."""
    d = (np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)) / per_window
    if d.size < 2:
        return float(d.mean()), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    boot = d[rng.integers(0, d.size, size=(samples, d.size))].mean(1)
    return float(d.mean()), float(np.quantile(boot, 0.025)), float(np.quantile(boot, 0.975))


# -- greedy generation agreement ----------------------------------------------------------
def greedy_continuations(model, prompts: torch.Tensor, new_tokens: int, thresholds: np.ndarray | None
                         ) -> torch.Tensor:
    """Greedy continuations ``[K, new_tokens]`` of ``prompts [K, P]`` at static thresholds."""
    L = model.cfg.num_layers
    dev = _device(model)
    K, P = prompts.shape
    thr = _static_thresholds(model, thresholds)[:, None, :].expand(L, K, 2).contiguous().to(dev)
    k, v = model.new_cache(K, P + new_tokens)
    out = model(prompts.to(dev), torch.arange(P, device=dev)[None].expand(K, P), k, v, thr)
    toks = []
    for t in range(new_tokens):
        nxt = out.logits.argmax(-1)
        toks.append(nxt)
        if t == new_tokens - 1:
            break
        out = model(nxt[:, None], torch.full((K, 1), P + t, device=dev), out.k_caches, out.v_caches, thr)
    return torch.stack(toks, dim=1).cpu()


@dataclass
class Agreement:
    """Greedy continuations, sparse against dense: ``tokens`` is the fraction of positions
    with identical tokens; ``prefix`` the mean fraction of each continuation before the
    first difference (after a first difference the texts go separate ways, so ``tokens``
    counts chance matches as well)."""

    tokens: float
    prefix: float


def greedy_agreement(model, prompts: torch.Tensor, thresholds: np.ndarray, new_tokens: int = 64,
                     dense: torch.Tensor | None = None) -> tuple[Agreement, torch.Tensor]:
    """Agreement of the sparse greedy continuations (``new_tokens`` tokens of each of the
    K prompts ``[K, P]``) with the dense ones, and the dense continuations (pass them
    back in as ``dense`` to reuse them)."""
    with torch.inference_mode():
        if dense is None:
            dense = greedy_continuations(model, prompts, new_tokens, None)
        sparse = greedy_continuations(model, prompts, new_tokens, thresholds)
    same = sparse == dense
    prefix = same.long().cumprod(dim=1).sum(dim=1).double() / new_tokens
    return Agreement(float(same.double().mean()), float(prefix.mean())), dense
