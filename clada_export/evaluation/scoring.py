"""Scoring continuations of one context under a method, with our decoder.

The context is prefilled once, dense (as the runtime's Generator prefills), into a KV
cache sized for its longest continuation; the continuations (a task's choices, or the
rest of a perplexity window) are then run from that cache as one batch: in one pass for
methods whose sparsity does not depend on the tokens (static thresholds, Griffin), or
one decode step at a time for those that react to each token (the dynamic controller,
the CLADA reference rule). Either way every continuation token runs at exactly the
sparsity it would have as a decode step. Shorter continuations are right-padded with
their last token; padded positions come after the real ones, so under the causal mask
they change nothing that is scored.
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


def score_continuations(model, method: Method, ctx_ids: list[int], conts: list[list[int]],
                        meter: SparsityMeter | None = None, trace: bool = False) -> Scored:
    """Log-likelihoods of ``conts`` after ``ctx_ids`` under ``method`` (see module doc).
    ``meter``: a SparsityMeter (not entered) that measures the threshold methods' decode
    steps; ``trace``: keep the dynamic controller's per-step records."""
    L = model.cfg.num_layers
    B = len(conts)
    cont, lens = _pad(conts)
    n = cont.shape[1]
    P = len(ctx_ids)
    ctx = torch.tensor([ctx_ids], dtype=torch.long)
    k, v = model.new_cache(1, P + n)
    with torch.inference_mode():
        if method.kind in ("griffin", "clada_ref"):
            return _score_selection(model, method, ctx, cont, lens, k, v)
        out = model(ctx, torch.arange(P)[None], k, v, torch.zeros(L, 1, 2), with_stats=method.kind == "dynamic")
        k, v = _expand_cache(out.k_caches, B), _expand_cache(out.v_caches, B)
        first = out.logits.expand(B, -1)
        if method.kind == "static":
            rest = None
            if n > 1:
                thr = np.zeros((L, 2), np.float32) if method.thresholds is None else method.thresholds
                t = torch.as_tensor(thr)[:, None, :].expand(L, B, 2).contiguous()
                pos = (P + torch.arange(n - 1))[None].expand(B, n - 1)
                with meter if meter is not None else _Null():
                    rest = model(cont[:, :-1], pos, k, v, t, all_logits=True).logits
            lps, greedy, per_tok = _gather(first, rest, cont, lens)
            return Scored(lps, greedy, per_tok, B * (n - 1))
        if method.kind == "dynamic":
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
        thr = ctl.step(surprisal.cpu().numpy(), entropy.cpu().numpy(), tokens=cont[:, t].numpy(),
                       active=(lens > t + 1).numpy())
        with meter if meter is not None else _Null():
            o = model(cont[:, t:t + 1], torch.full((B, 1), P + t), k, v, torch.as_tensor(thr))
        k, v, logits = o.k_caches, o.v_caches, o.logits
        steps.append(logits)
    rest = torch.stack(steps, 1) if steps else None
    lps, greedy, per_tok = _gather(first, rest, cont, lens)
    records = []
    if sink is not None:
        records = [r for r in map(json.loads, sink.getvalue().splitlines()) if r.get("event") == "step"]
    return Scored(lps, greedy, per_tok, int((lens - 1).clamp(min=0).sum()), trace=records)


def _score_selection(model, method: Method, ctx, cont, lens, k, v) -> Scored:
    """Griffin (one pass) and the CLADA reference rule (step by step), on masked MLPs."""
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
            m.record = method.kind == "clada_ref"
        k, v = _expand_cache(out.k_caches, B), _expand_cache(out.v_caches, B)
        first = out.logits.expand(B, -1)
        zeros = torch.zeros(L, B, 2)
        reselections = 0
        if method.kind == "griffin":
            rest = None
            if n > 1:
                pos = (P + torch.arange(n - 1))[None].expand(B, n - 1)
                rest = model(cont[:, :-1], pos, k, v, zeros, all_logits=True).logits
        else:
            rules = [ReselectRule(**method.info.get("rule", {})) for _ in range(B)]
            logits, steps = first, []
            for t in range(n - 1):
                entropy, lse = cognitive_signals(logits)
                surprisal = lse - logits.gather(-1, cont[:, t:t + 1])[:, 0]
                for b in range(B):
                    if t + 1 < int(lens[b]) and rules[b].observe(float(surprisal[b]), float(entropy[b])):
                        reselections += 1
                        for m in mlps:
                            m.mask[b] = top_k_mask(m.sumsq[b:b + 1], keep)[0]
                o = model(cont[:, t:t + 1], torch.full((B, 1), P + t), k, v, zeros)
                k, v, logits = o.k_caches, o.v_caches, o.logits
                steps.append(logits)
            rest = torch.stack(steps, 1) if steps else None
    lps, greedy, per_tok = _gather(first, rest, cont, lens)
    return Scored(lps, greedy, per_tok, int((lens - 1).clamp(min=0).sum()),
                  selection_sparsity=1.0 - keep / width, reselections=reselections)
