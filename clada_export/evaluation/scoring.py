"""Scoring continuations of one context under a method, with our decoder.

The context is prefilled once, dense (as the runtime's Generator prefills), into a KV
cache sized for its longest continuation; the continuations (a task's choices, or the
rest of a perplexity window) are then run from that cache as one batch: in one pass for
methods whose sparsity does not depend on the tokens (static thresholds, Griffin), or,
for those that react to each token (the dynamic controller, the CLADA reference rule),
by a causal fixed point of teacher-forced passes that equals the step-by-step decode:

* A decode step's sparsity (the controller's thresholds, or the re-selected neurons)
  at position t is a function of the signals (logits) of positions < t, and those
  depend only on the sparsity at positions < t. So: run the whole continuation in one
  pass at guessed per-token sparsities (``thresholds [L, B, T, 2]``, which the
  reference op takes per token; per-token masks for the selection), replay the
  controller (or the re-selection rule) over the pass's logits to get every position's
  sparsity, and repeat with those until a pass reproduces its own input. Then, by
  induction over t, each position ran at the sparsity the controller chose from logits
  computed at exactly those sparsities: the step-by-step result, up to float rounding
  of a batched pass against single steps. That rounding is not negligible in a
  thresholded network: an element that sits on a threshold flips, and the flips
  cascade. Measured on SmolLM2-135M at 40% static thresholds (one 224-token window):
  one pass against step by step, per-token log-likelihoods differ by up to 1.1 nats and
  the window's mean by 0.018 nats; scaling the thresholds by 1 + 3e-7 in the one pass
  moves them as much (1.26 and 0.024). Dense, the two agree to 2e-5. So every method
  here, static or not, is scored by teacher-forced passes, and a step-by-step decode
  is one more draw of the same rounding noise, not a more exact answer. Position t is right after at most t + 1
  passes, so the iteration always converges within T passes; past ``max_passes`` the
  window falls back to the step-by-step protocol (counted in ``Scored.fallbacks``).
* ``protocol="stepwise"`` runs the step-by-step decode itself (the definition the
  fixed point is tested against, tests/test_methods.py).

Either way every continuation token runs at exactly the sparsity it would have as a
decode step. Shorter continuations are right-padded with their last token; padded
positions come after the real ones, so under the causal mask they change nothing that
is scored.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from clada_export.calibrate.quality import SparsityMeter
from clada_export.evaluation.methods import Method, ReselectRule, masked_mlps, top_k_mask
from clada_export.model.llama import cognitive_signals


@dataclass
class Scored:
    """Per continuation: summed log-likelihood, whether every token was the greedy pick,
    its per-token log-likelihoods; ``steps`` decode steps run (all continuations), and
    for neuron selection the MLP byte sparsity it ran at and the re-selections made."""

    logprobs: list[float]
    greedy: list[bool]
    token_logprobs: list[np.ndarray]
    steps: int
    selection_sparsity: float | None = None
    reselections: int = 0
    trace: list[dict] = field(default_factory=list)
    passes: int = 0  # teacher-forced passes of the fixed point (0: one pass or stepwise by design)
    fallbacks: int = 0  # 1 when the fixed point hit max_passes and the window ran step by step


def _expand_cache(caches: list[torch.Tensor], B: int) -> list[torch.Tensor]:
    return [c.expand(B, *c.shape[1:]).contiguous() for c in caches]


def _pad(conts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    n = max(len(c) for c in conts)
    ids = torch.tensor([c + [c[-1]] * (n - len(c)) for c in conts], dtype=torch.long)
    return ids, torch.tensor([len(c) for c in conts], dtype=torch.long)


def _gather(first_logits: torch.Tensor, rest_logits: torch.Tensor | None, cont: torch.Tensor, lens: torch.Tensor
            ) -> tuple[list[float], list[bool], list[np.ndarray]]:
    """``first_logits [B, V]`` predict token 0, ``rest_logits [B, n-1, V]`` tokens 1..n-1."""
    logits = first_logits[:, None] if rest_logits is None else torch.cat([first_logits[:, None], rest_logits], 1)
    logp = F.log_softmax(logits.float(), dim=-1)
    tok_lp = logp.gather(-1, cont[:, :logits.shape[1], None])[..., 0]
    hit = logp.argmax(-1) == cont[:, :logits.shape[1]]
    lps, greedy, per_tok = [], [], []
    for b, n in enumerate(lens.tolist()):
        lps.append(float(tok_lp[b, :n].double().sum()))
        greedy.append(bool(hit[b, :n].all()))
        per_tok.append(tok_lp[b, :n].cpu().numpy())
    return lps, greedy, per_tok


MAX_PASSES = 64
PROTOCOLS = ("fixed_point", "stepwise")


def score_continuations(model, method: Method, ctx_ids: list[int], conts: list[list[int]],
                        meter: SparsityMeter | None = None, trace: bool = False, protocol: str = "fixed_point",
                        max_passes: int = MAX_PASSES) -> Scored:
    """Log-likelihoods of ``conts`` after ``ctx_ids`` under ``method`` (see module doc).
    ``meter``: a SparsityMeter (not entered) that measures the threshold methods' decode
    steps; ``trace``: keep the dynamic controller's per-step records; ``protocol``: how
    the methods that react to each token are run (``fixed_point`` or ``stepwise``,
    the same result), ``max_passes`` the fixed point's cap."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    L = model.cfg.num_layers
    B = len(conts)
    cont, lens = _pad(conts)
    n = cont.shape[1]
    P = len(ctx_ids)
    ctx = torch.tensor([ctx_ids], dtype=torch.long)
    k, v = model.new_cache(1, P + n)
    with torch.inference_mode():
        if method.kind in ("griffin", "clada_ref"):
            return _score_selection(model, method, ctx, cont, lens, k, v, protocol, max_passes)
        out = model(ctx, torch.arange(P)[None], k, v, torch.zeros(L, 1, 2), with_stats=method.kind == "dynamic")
        k, v = _expand_cache(out.k_caches, B), _expand_cache(out.v_caches, B)
        first = out.logits.expand(B, -1)
        if method.kind == "static":
            rest = None
            if n > 1:
                thr = np.zeros((L, 2), np.float32) if method.thresholds is None else method.thresholds
                t = torch.as_tensor(thr, device=cont.device)[:, None, :].expand(L, B, 2).contiguous()
                pos = (P + torch.arange(n - 1))[None].expand(B, n - 1)
                with meter if meter is not None else _Null():
                    rest = model(cont[:, :-1], pos, k, v, t, all_logits=True).logits
            lps, greedy, per_tok = _gather(first, rest, cont, lens)
            return Scored(lps, greedy, per_tok, B * (n - 1))
        if method.kind == "dynamic":
            if protocol == "fixed_point" and n > 1:
                return _dynamic_fixed_point(model, method, out, first, cont, lens, k, v, meter, trace, max_passes)
            return _score_dynamic(model, method, out, first, cont, lens, k, v, meter, trace)
    raise ValueError(f"unknown method kind {method.kind!r}")


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


def _score_dynamic(model, method: Method, out, first, cont, lens, k, v, meter, trace: bool) -> Scored:
    from clada_export.runtime.controller import ThresholdController

    B, n = cont.shape
    P = k[0].shape[2] - n
    sink = io.StringIO() if trace else None  # the controller's trace, one JSON record a line
    ctl = ThresholdController(method.profile, method.config, batch=B, trace=sink)
    ctl.begin(np.repeat(out.act_stats.cpu().numpy(), B, axis=1))
    logits = first
    steps = []
    for t in range(n - 1):
        entropy, lse = cognitive_signals(logits)
        surprisal = lse - logits.gather(-1, cont[:, t:t + 1])[:, 0]
        thr = ctl.step(surprisal.cpu().numpy(), entropy.cpu().numpy(), tokens=cont[:, t].cpu().numpy(),
                       active=(lens > t + 1).cpu().numpy())
        with meter if meter is not None else _Null():
            o = model(cont[:, t:t + 1], torch.full((B, 1), P + t), k, v, torch.as_tensor(thr, device=cont.device))
        k, v, logits = o.k_caches, o.v_caches, o.logits
        steps.append(logits)
    rest = torch.stack(steps, 1) if steps else None
    lps, greedy, per_tok = _gather(first, rest, cont, lens)
    records = []
    if sink is not None:
        records = [r for r in map(json.loads, sink.getvalue().splitlines()) if r.get("event") == "step"]
    return Scored(lps, greedy, per_tok, int((lens - 1).clamp(min=0).sum()), trace=records)


def _signals(logits: torch.Tensor, token: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Surprisal of ``token [B]`` and entropy (nats) under ``logits [B, V]``: the signals
    a decode step hands the controller, computed per step as the step-wise decode does
    (the same shapes, so the same rounding)."""
    entropy, lse = cognitive_signals(logits)
    return lse - logits.gather(-1, token[:, None])[:, 0], entropy


def _step_logits(first: torch.Tensor, rest: torch.Tensor, t: int) -> torch.Tensor:
    """The logits that predict continuation token ``t``: the prefill's for t = 0, else
    the pass's output at position t - 1."""
    return first if t == 0 else rest[:, t - 1]


def _causal_fixed_point(n_pos: int, run, replay, first_change, chunk: int, max_passes: int) -> tuple[int, bool]:
    """Drive the causal fixed point over positions ``0..n_pos-1`` (module doc).

    ``run(f, end)`` runs positions ``[f, end)`` at the current plan (the per-position
    sparsity), continuing the KV cache of the positions before ``f``; ``replay(end)``
    re-derives the plan of every position from the signals of positions ``< end`` (the
    plan of positions past ``end`` is a guess: its value at ``end``); ``first_change(f,
    end)`` adopts the replayed plan and returns the first position in ``[f, end)`` where
    it differs from the one just run, or ``end``. Positions before that are final, so the
    next pass starts there: each pass finalises at least one position, and a pass runs at
    most ``chunk`` positions (a plan is rarely right far past its first change).
    Returns (passes, converged)."""
    f = 0
    for p in range(1, max_passes + 1):
        end = min(f + chunk, n_pos)
        run(f, end)
        replay(end)
        f = first_change(f, end)
        if f == n_pos:
            return p, True
    return max_passes, False


def _replay_controller(method: Method, act_stats: np.ndarray, first, rest, cont, lens, upto: int, trace: bool
                       ) -> tuple[np.ndarray, list[dict]]:
    """The thresholds ``[L, B, n-1, 2]`` a fresh controller chooses for the decode steps
    ``t < upto`` from the logits of teacher-forced passes (later steps repeat step
    ``upto - 1``'s), and the trace records."""
    from clada_export.runtime.controller import ThresholdController

    B, n = cont.shape
    sink = io.StringIO() if trace else None
    ctl = ThresholdController(method.profile, method.config, batch=B, trace=sink)
    ctl.begin(act_stats)
    thr = np.empty((ctl.L, B, n - 1, 2), np.float32)
    cont_np, lens_np = cont.cpu().numpy(), lens.cpu().numpy()  # once, not a device sync per step
    for t in range(upto):
        surprisal, entropy = _signals(_step_logits(first, rest, t), cont[:, t])
        thr[:, :, t] = ctl.step(surprisal.cpu().numpy(), entropy.cpu().numpy(), tokens=cont_np[:, t],
                                active=lens_np > t + 1)
    thr[:, :, upto:] = thr[:, :, upto - 1:upto]
    records = []
    if sink is not None:
        records = [r for r in map(json.loads, sink.getvalue().splitlines()) if r.get("event") == "step"]
    return thr, records


def _first_change(new: np.ndarray | list[torch.Tensor], old, axis_t: int, f: int, end: int) -> int:
    """The first position in ``[f, end)`` (along ``axis_t``) where ``new`` and ``old``
    differ anywhere, else ``end``."""
    if isinstance(new, np.ndarray):
        a, b = np.moveaxis(new, axis_t, 0)[f:end], np.moveaxis(old, axis_t, 0)[f:end]
        diff = (a != b).reshape(end - f, -1).any(1)
    else:
        diff = torch.stack([(torch.movedim(x, axis_t, 0)[f:end] != torch.movedim(y, axis_t, 0)[f:end])
                            .reshape(end - f, -1).any(1) for x, y in zip(new, old)]).any(0).cpu().numpy()
    idx = np.flatnonzero(diff)
    return f + int(idx[0]) if idx.size else end


FIXED_POINT_CHUNK = 64


def _dynamic_fixed_point(model, method: Method, out, first, cont, lens, k, v, meter, trace: bool,
                         max_passes: int) -> Scored:
    """The controller's decode as a causal fixed point (module doc)."""
    from clada_export.runtime.controller import ThresholdController

    B, n = cont.shape
    P = k[0].shape[2] - n
    act_stats = np.repeat(out.act_stats.cpu().numpy(), B, axis=1)
    # first guess: the generation's starting thresholds (prefix scale, no token control)
    # at every position; the warm-up keeps early steps there anyway
    start = ThresholdController(method.profile, method.config, batch=B).begin(act_stats)
    st = {"thr": np.repeat(start[:, :, None, :], n - 1, axis=2), "k": k, "v": v, "new": None, "records": [],
          "whole": False}
    rest = torch.empty(B, n - 1, first.shape[-1])
    saved = None if meter is None else (meter.zero.copy(), meter.count.copy())

    def run(f: int, end: int) -> None:
        pos = (P + torch.arange(f, end))[None].expand(B, end - f)
        # only a pass over the whole window may turn out to be the fixed point in one go
        st["whole"] = f == 0 and end == n - 1
        if meter is not None:
            meter.zero, meter.count = saved[0].copy(), saved[1].copy()
        with meter if meter is not None and st["whole"] else _Null():
            o = model(cont[:, f:end], pos, st["k"], st["v"], torch.as_tensor(np.ascontiguousarray(st["thr"][:, :, f:end]),
                                                                    device=cont.device),
                      all_logits=True)
        st["k"], st["v"] = o.k_caches, o.v_caches
        rest[:, f:end] = o.logits

    def replay(end: int) -> None:
        st["new"], st["records"] = _replay_controller(method, act_stats, first, rest, cont, lens, min(end + 1, n - 1),
                                                      trace)

    def first_change(f: int, end: int) -> int:
        c = _first_change(st["new"], st["thr"], 2, f, end)
        st["thr"] = st["new"]
        return c

    passes, ok = _causal_fixed_point(n - 1, run, replay, first_change, FIXED_POINT_CHUNK, max_passes)
    if not ok:
        if meter is not None:
            meter.zero, meter.count = saved
        s = _score_dynamic(model, method, out, first, cont, lens, k, v, meter, trace)
        s.passes, s.fallbacks = passes, 1
        return s
    if meter is not None and not (passes == 1 and st["whole"]):
        # the realized sparsity of the final thresholds: one metered pass over the window
        with meter:
            model(cont[:, :-1], (P + torch.arange(n - 1))[None].expand(B, n - 1), k, v, torch.as_tensor(st["thr"], device=cont.device),
                  all_logits=True)
    lps, greedy, per_tok = _gather(first, rest, cont, lens)
    return Scored(lps, greedy, per_tok, int((lens - 1).clamp(min=0).sum()), trace=st["records"], passes=passes)


def _score_selection(model, method: Method, ctx, cont, lens, k, v, protocol: str, max_passes: int) -> Scored:
    """Griffin (one pass) and the CLADA reference rule (fixed point or step by step), on
    masked MLPs."""
    L = model.cfg.num_layers
    B, n = cont.shape
    P = ctx.shape[1]
    with masked_mlps(model) as mlps:
        for m in mlps:  # the dense prompt pass gathers each neuron's statistic
            m.mask, m.record, m.sumsq = None, True, None
        out = model(ctx, torch.arange(P)[None], k, v, torch.zeros(L, 1, 2))
        width = mlps[0].sumsq.shape[-1]
        keep = method.keep(width)
        for m in mlps:
            m.sumsq = m.sumsq.expand(B, -1).clone()
            m.mask = top_k_mask(m.sumsq, keep)
            m.record = False
        prompt_sq = [m.sumsq.clone() for m in mlps]
        passes = fallbacks = 0
        k, v = _expand_cache(out.k_caches, B), _expand_cache(out.v_caches, B)
        first = out.logits.expand(B, -1)
        zeros = torch.zeros(L, B, 2)
        reselections = 0
        if method.kind == "griffin":
            rest = None
            if n > 1:
                pos = (P + torch.arange(n - 1))[None].expand(B, n - 1)
                rest = model(cont[:, :-1], pos, k, v, zeros, all_logits=True).logits
        elif protocol == "fixed_point" and n > 1:
            rest, reselections, passes, fallbacks = _reselect_fixed_point(model, method, mlps, first, cont, lens, k,
                                                                          v, keep, max_passes)
            if fallbacks:
                rest, reselections = _reselect_stepwise(model, method, mlps, prompt_sq, first, cont, lens, k, v,
                                                        keep)
        else:
            rest, reselections = _reselect_stepwise(model, method, mlps, prompt_sq, first, cont, lens, k, v, keep)
    lps, greedy, per_tok = _gather(first, rest, cont, lens)
    return Scored(lps, greedy, per_tok, int((lens - 1).clamp(min=0).sum()),
                  selection_sparsity=1.0 - keep / width, reselections=reselections, passes=passes,
                  fallbacks=fallbacks)


def _reselect_stepwise(model, method: Method, mlps, prompt_sq, first, cont, lens, k, v, keep: int):
    """The CLADA reference rule decoded step by step: before each step, a sequence whose
    signals fire re-selects its neurons from the statistic of everything so far."""
    L = model.cfg.num_layers
    B, n = cont.shape
    P = k[0].shape[2] - n
    zeros = torch.zeros(L, B, 2)
    for m, sq in zip(mlps, prompt_sq):
        m.sumsq, m.mask, m.record, m.record_tokens = sq.clone(), top_k_mask(sq, keep), True, False
    rules = [ReselectRule(**method.info.get("rule", {})) for _ in range(B)]
    logits, steps, reselections = first, [], 0
    for t in range(n - 1):
        surprisal, entropy = _signals(logits, cont[:, t])
        for b in range(B):
            if t + 1 < int(lens[b]) and rules[b].observe(float(surprisal[b]), float(entropy[b])):
                reselections += 1
                for m in mlps:
                    m.mask[b] = top_k_mask(m.sumsq[b:b + 1], keep)[0]
        o = model(cont[:, t:t + 1], torch.full((B, 1), P + t), k, v, zeros)
        k, v, logits = o.k_caches, o.v_caches, o.logits
        steps.append(logits)
    for m in mlps:
        m.record = False
    return (torch.stack(steps, 1) if steps else None), reselections


def _reselect_fixed_point(model, method: Method, mlps, first, cont, lens, k, v, keep: int, max_passes: int):
    """The CLADA reference rule as a causal fixed point (module doc): per-token masks,
    the rule replayed over the passes' signals, re-selections from the causal running
    statistic (the prompt's, then each position's term in order: the same additions, in
    the same order, as the step-wise decode makes)."""
    L = model.cfg.num_layers
    B, n = cont.shape
    P = k[0].shape[2] - n
    zeros = torch.zeros(L, B, 2)
    prompt_sq = [m.sumsq.clone() for m in mlps]
    initial = [top_k_mask(sq, keep) for sq in prompt_sq]
    tok_sq = [torch.zeros(B, n - 1, sq.shape[-1]) for sq in prompt_sq]
    rest = torch.empty(B, n - 1, first.shape[-1])
    st = {"masks": [im[:, None, :].expand(B, n - 1, im.shape[-1]).clone() for im in initial], "k": k, "v": v,
          "new": None, "resel": 0}

    def run(f: int, end: int) -> None:
        for m, mk in zip(mlps, st["masks"]):
            m.mask, m.record, m.record_tokens, m.tok_sq = mk[:, f:end], False, True, None
        pos = (P + torch.arange(f, end))[None].expand(B, end - f)
        o = model(cont[:, f:end], pos, st["k"], st["v"], zeros, all_logits=True)
        st["k"], st["v"] = o.k_caches, o.v_caches
        rest[:, f:end] = o.logits
        for buf, m in zip(tok_sq, mlps):
            buf[:, f:end] = m.tok_sq
            m.record_tokens, m.tok_sq = False, None

    def replay(end: int) -> None:
        upto = min(end + 1, n - 1)
        # running[l][:, t]: the statistic after the prompt and positions < t
        running = [torch.cumsum(torch.cat([sq[:, None], buf[:, :upto]], 1), dim=1)
                   for sq, buf in zip(prompt_sq, tok_sq)]
        current = [im.clone() for im in initial]
        new = [torch.empty_like(mk) for mk in st["masks"]]
        rules = [ReselectRule(**method.info.get("rule", {})) for _ in range(B)]
        resel = 0
        for t in range(upto):
            surprisal, entropy = _signals(_step_logits(first, rest, t), cont[:, t])
            for b in range(B):
                if t + 1 < int(lens[b]) and rules[b].observe(float(surprisal[b]), float(entropy[b])):
                    resel += 1
                    for cur, run_sq in zip(current, running):
                        cur[b] = top_k_mask(run_sq[b:b + 1, t], keep)[0]
            for nw, cur in zip(new, current):
                nw[:, t] = cur
        for nw, cur in zip(new, current):
            nw[:, upto:] = cur[:, None]
        st["new"], st["resel"] = new, resel

    def first_change(f: int, end: int) -> int:
        c = _first_change(st["new"], st["masks"], 1, f, end)
        st["masks"] = st["new"]
        return c

    passes, ok = _causal_fixed_point(n - 1, run, replay, first_change, FIXED_POINT_CHUNK, max_passes)
    for m in mlps:
        m.record_tokens, m.tok_sq = False, None
    return (rest, st["resel"], passes, 0) if ok else (None, 0, passes, 1)