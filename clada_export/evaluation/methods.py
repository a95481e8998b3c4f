"""The sparsity methods compared side by side, each as it would run at generation time.

Every method scores a context and its continuations the same way
(:func:`clada_export.evaluation.scoring.score_continuations`): the context is prefilled
dense, as our runtime's ``Generator`` prefills (Griffin needs the dense prompt anyway),
and each continuation token is a decode step at the method's sparsity. The protocol is
teacher-forced: the true continuation tokens are fed.

* ``dense`` -- zero thresholds.
* ``uniform`` -- static thresholds, every layer at the same input and intermediate
  sparsity (``s_in = s_mid = level``).
* ``teal`` -- static thresholds with TEAL's block-wise greedy allocation (Liu et al.,
  2024, ``FasterDecoding/TEAL`` ``teal/greedyopt.py``), in our own code
  (:func:`teal_lookup`): every layer at the same byte sparsity; within a layer, starting
  dense, repeatedly raise the input (W_gate + W_up, weight 2) or the intermediate
  (W_down, weight 1) sparsity by one step of equal byte gain, whichever gives the
  smaller error of the layer's output (the L2 norm of its difference from dense per
  token, averaged over the last quarter of each sequence's positions).
* ``greedy`` -- static thresholds, our greedy KL allocation across layers
  (``calibrate/allocation.py``).
* ``griffin`` -- Griffin (Dong et al., 2024): per sequence, per layer, the top-k
  neurons of the FFN by the prompt's activations (each token's intermediate activation
  vector normalised to unit L2 norm, then each neuron's L2 norm over the prompt's
  tokens); k = (1 - level) * FFN width; the MLP sliced to those neurons for the whole
  generation (exactly ``level`` of the MLP's weight bytes skipped).
* ``clada_ref`` -- the rule of the CLADA reference code (``Oldify/CLADA``
  ``src/clada/clada.py``): Griffin's selection, re-selected from the activations of the
  whole sequence so far whenever a token's surprisal and entropy both exceed their
  70th percentile over the last 10 tokens (percentiles refreshed every 10 tokens, once
  more than 10 tokens are known). Two departures, both fixing evident bugs of that
  code: neurons are ranked by the FFN's intermediate activations (their code ranks the
  MLP input's hidden dimensions and uses those indices as FFN neurons), and the
  statistics keep accumulating while the sliced MLP runs (their hook sits on the
  replaced module and stops firing). On task continuations (a few tokens) the rule
  never fires, so it equals Griffin there; on perplexity windows it does.
* ``dynamic`` -- ours: the greedy allocation's profile driven by the runtime's
  ``ThresholdController`` (prefix scale from the prompt's activation statistics, token
  level from surprisal and entropy), exactly the thresholds the runtime would use.

Griffin and the re-selection rule are neuron selections, not thresholds: they run a
masked MLP (``MaskedMLP``) in place of the SparseMLP op; the threshold methods run
the reference op through our decoder.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

from clada_export.profile import byte_sparsity, input_byte_weight

METHOD_NAMES = ("dense", "uniform", "teal", "greedy", "griffin", "clada_ref", "dynamic")
STATIC_METHODS = ("dense", "uniform", "teal", "greedy")


# -- TEAL's block-wise greedy allocation ------------------------------------------------------
@dataclass
class TealLookup:
    """Per layer, the greedy path of (s_in, s_mid) from dense: ``byte [S]`` the byte
    sparsity after each move (shared by all layers: every move gains the same bytes),
    ``s_in``/``s_mid`` ``[L, S]``; ``error [L, S]`` the layer's output error there."""

    byte: np.ndarray
    s_in: np.ndarray
    s_mid: np.ndarray
    error: np.ndarray

    def at(self, level: float) -> tuple[np.ndarray, np.ndarray]:
        """``s_in [L]``, ``s_mid [L]`` with every layer at byte sparsity ``level``
        (linear between the two moves around it)."""
        if not 0.0 <= level <= self.byte[-1] + 1e-9:
            raise ValueError(f"level {level} is beyond the lookup's {self.byte[-1]:.3f}")
        s_in = np.array([np.interp(level, self.byte, row) for row in self.s_in])
        s_mid = np.array([np.interp(level, self.byte, row) for row in self.s_mid])
        return s_in, s_mid

    def to_dict(self) -> dict:
        return {k: getattr(self, k).tolist() for k in ("byte", "s_in", "s_mid", "error")}

    @classmethod
    def from_dict(cls, d: dict) -> "TealLookup":
        return cls(*(np.asarray(d[k], dtype=np.float64) for k in ("byte", "s_in", "s_mid", "error")))


def teal_greedy_layer(error_of, max_byte: float, step: float, top: float, gated: bool = True
                      ) -> tuple[list, list, list]:
    """TEAL's greedy for one block with two "projections": the input (weight 2 in the
    gated MLP: it skips W_gate and W_up; 1 in the plain one) and the intermediate (weight
    1). Each move raises one of them so that the byte sparsity (``profile.byte_sparsity``)
    gains ``step`` (TEAL's ``base_step_size / weight``), choosing the one whose output
    error ``error_of(s_in, s_mid)`` is smaller; a projection at ``top`` is not raised
    further."""
    w = input_byte_weight(gated)
    d_in, d_mid = step * (w + 1.0) / w, step * (w + 1.0)
    s_in, s_mid = 0.0, 0.0
    path_in, path_mid, path_err = [0.0], [0.0], [float(error_of(0.0, 0.0))]
    n_moves = int(round(max_byte / step))
    for _ in range(n_moves):
        cands = []
        if s_in + d_in <= top + 1e-9:
            cands.append((s_in + d_in, s_mid))
        if s_mid + d_mid <= top + 1e-9:
            cands.append((s_in, s_mid + d_mid))
        if not cands:
            break
        errs = [float(error_of(a, b)) for a, b in cands]
        i = int(np.argmin(errs))
        s_in, s_mid = cands[i]
        path_in.append(s_in)
        path_mid.append(s_mid)
        path_err.append(errs[i])
    return path_in, path_mid, path_err


def teal_lookup(model, x_cache: list[torch.Tensor], thresholds_of, max_byte: float = 0.6, step: float = 0.025,
                top: float = 0.9, progress: bool = True) -> TealLookup:
    """The TEAL lookup of every layer. ``x_cache[l] [N, hidden]``: MLP inputs of layer l
    (from the last quarter of calibration sequences, as TEAL measures); ``thresholds_of(l,
    s_in, s_mid) -> (t_in, t_mid)`` from the calibration tables."""
    L = len(model.layers)
    rows_in, rows_mid, rows_err = [], [], []
    with torch.inference_mode():
        for l in tqdm(range(L), desc="teal: block-wise greedy", unit="layer", file=sys.stderr,
                      disable=not progress, leave=False):
            mlp = model.layers[l].mlp
            x = x_cache[l][None].float().to(next(mlp.parameters()).device)  # the cache is kept on the host
            ref = mlp(x, torch.zeros(1, 2))

            def error_of(a: float, b: float, mlp=mlp, x=x, ref=ref, l=l) -> float:
                t = torch.tensor([thresholds_of(l, a, b)], dtype=torch.float32)
                return float(torch.linalg.vector_norm(mlp(x, t) - ref, dim=-1).mean())

            a, b, e = teal_greedy_layer(error_of, max_byte, step, top, model.cfg.gated_mlp)
            rows_in.append(a)
            rows_mid.append(b)
            rows_err.append(e)
    S = min(len(r) for r in rows_in)
    byte = np.arange(S) * step
    return TealLookup(byte, np.array([r[:S] for r in rows_in]), np.array([r[:S] for r in rows_mid]),
                      np.array([r[:S] for r in rows_err]))


def collect_mlp_inputs(model, windows: torch.Tensor, rows: int = 64, last_fraction: float = 0.25,
                       seed: int = 0) -> list[torch.Tensor]:
    """Per layer, ``rows`` MLP inputs drawn (seeded) from the last ``last_fraction`` of the
    positions of ``windows [N, T]`` (one dense pass)."""
    L = len(model.layers)
    N, T = windows.shape
    start = int(T * (1 - last_fraction))
    got: list[list[torch.Tensor]] = [[] for _ in range(L)]
    handles = []
    for i, layer in enumerate(model.layers):
        def hook(module, args, i=i):
            got[i].append(args[0][:, start:].reshape(-1, args[0].shape[-1]).detach().float().cpu())
        handles.append(layer.mlp.register_forward_pre_hook(hook))
    try:
        with torch.inference_mode():
            k, v = model.new_cache(N, T)
            model(windows, torch.arange(T)[None].expand(N, T), k, v, torch.zeros(L, N, 2))
    finally:
        for h in handles:
            h.remove()
    gen = torch.Generator().manual_seed(seed)
    out = []
    for parts in got:
        x = torch.cat(parts)
        out.append(x[torch.randperm(x.shape[0], generator=gen, device="cpu")[:rows]])
    return out


# -- neuron selection (Griffin, the CLADA reference rule) -------------------------------------
def griffin_scores(h: torch.Tensor) -> torch.Tensor:
    """Griffin's neuron statistic of intermediate activations ``h [B, T, F]``: each
    token's row normalised to unit L2 norm, then the L2 norm over tokens: ``[B, F]``."""
    hn = h / torch.linalg.vector_norm(h, dim=-1, keepdim=True).clamp_min(1e-12)
    return torch.linalg.vector_norm(hn, dim=1)


def top_k_mask(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Boolean ``[B, F]`` with the ``keep`` highest scores of each row set."""
    idx = torch.topk(scores, keep, dim=-1).indices
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, idx, True)


class MaskedMLP(nn.Module):
    """A layer's gated MLP restricted to selected neurons, ``mask`` per sequence ``[B, F]``
    or per token ``[B, T, F]`` (None: all): ``y = (h * mask) W_down`` -- the same values
    as slicing the three matrices to the selected neurons (per token: each position as
    its own decode step would slice them). With ``record`` it also accumulates each
    sequence's Griffin statistic (sum over tokens of the squared, row-normalised dense
    activations) for re-selection; with ``record_tokens`` it keeps that statistic's
    per-token terms ``tok_sq [B, T, F]`` instead (the teacher-forced re-selection
    replay sums them causally)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.mask: torch.Tensor | None = None
        self.record = False
        self.record_tokens = False
        self.sumsq: torch.Tensor | None = None  # [B, F]
        self.tok_sq: torch.Tensor | None = None  # [B, T, F]

    def forward(self, x: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
        m = self.inner
        h = m.intermediate(x)  # either form of the MLP
        if self.record or self.record_tokens:
            hn = h / torch.linalg.vector_norm(h, dim=-1, keepdim=True).clamp_min(1e-12)
            sq = hn.float() ** 2
            if self.record_tokens:
                self.tok_sq = sq
            else:
                add = sq.sum(dim=1)
                self.sumsq = add if self.sumsq is None else self.sumsq + add
        if self.mask is not None:
            mask = self.mask if self.mask.dim() == 3 else self.mask[:, None, :]
            h = h * mask.to(h.dtype)
        return m.output(h)


@contextlib.contextmanager
def masked_mlps(model) -> Iterator[list[MaskedMLP]]:
    """Swap every layer's MLP for a :class:`MaskedMLP` around it (restored on exit)."""
    originals = [layer.mlp for layer in model.layers]
    wrappers = [MaskedMLP(m) for m in originals]
    try:
        for layer, w in zip(model.layers, wrappers):
            layer.mlp = w
        yield wrappers
    finally:
        for layer, m in zip(model.layers, originals):
            layer.mlp = m


@dataclass
class ReselectRule:
    """The CLADA reference code's trigger, per sequence: ``window`` (their
    ``update_window``, 10) and ``percentile`` (their surprisal/entropy thresholds, 0.7)."""

    window: int = 10
    percentile: float = 0.7
    history_u: list[float] = field(default_factory=list)
    history_e: list[float] = field(default_factory=list)
    thr_u: float = 0.0
    thr_e: float = 0.0
    fired: int = 0

    def observe(self, u: float, e: float) -> bool:
        """Signals of generated token i (0-based) -> whether to re-select now."""
        i = len(self.history_u)
        self.history_u.append(u)
        self.history_e.append(e)
        if i % self.window == 0 and i > 0:
            w = min(len(self.history_u), self.window)
            if w > 5:
                self.thr_u = float(np.percentile(self.history_u[-w:], self.percentile * 100))
                self.thr_e = float(np.percentile(self.history_e[-w:], self.percentile * 100))
        fire = len(self.history_u) > self.window and u > self.thr_u and e > self.thr_e
        self.fired += int(fire)
        return fire


# -- the method objects the scorer runs -------------------------------------------------------
@dataclass
class Method:
    """``kind``: static (``thresholds [L, 2]``), griffin, clada_ref or dynamic
    (``profile`` + controller ``config``). ``level``: the target mean byte sparsity
    (None for dense)."""

    name: str
    level: float | None
    kind: str
    thresholds: np.ndarray | None = None
    profile: object = None
    config: object = None
    info: dict = field(default_factory=dict)

    @property
    def key(self) -> str:
        return self.name if self.level is None else f"{self.name}-{self.level:.2f}"

    @property
    def stepwise(self) -> bool:
        """The method reacts to each token: scored by the causal fixed point (or step by
        step), see ``scoring``."""
        return self.kind in ("clada_ref", "dynamic")

    def keep(self, width: int) -> int:
        return max(1, int(round((1.0 - float(self.level)) * width)))


def static_method(name: str, level: float | None, thresholds: np.ndarray | None, info: dict | None = None) -> Method:
    return Method(name, level, "static", thresholds=None if thresholds is None else np.asarray(thresholds, np.float32),
                  info=dict(info or {}))


def allocation_info(s_in: np.ndarray, s_mid: np.ndarray, gated: bool = True) -> dict:
    return {"s_in": np.round(s_in, 4).tolist(), "s_mid": np.round(s_mid, 4).tolist(),
            "calibrated_byte_sparsity": float(np.mean(byte_sparsity(s_in, s_mid, gated)))}
