"""CLADA's threshold controller: the sequence level (prefix, "N400") and the token
level (local, "P600") of the threshold hierarchy (docs/design.md, docs/controller.md).

The controller turns per-step signals into per-layer, per-sequence thresholds, the
engine input ``thresholds float32 [L, B, 2]`` (``[..., 0]`` for the MLP input |x|,
``[..., 1]`` for the intermediate |h|).

* :meth:`ThresholdController.begin` takes the prefill graph's ``act_stats [L, B, 2]``
  (mean |x|, mean |h| over each prompt's valid tokens) and fixes a per-layer,
  per-sequence scale ``prompt_mean_abs / calib_mean_abs`` (clamped) that multiplies
  every threshold of that generation.
* :meth:`ThresholdController.step` takes the surprisal and entropy (nats) of the
  step just decoded and returns the thresholds for the next decode step (the typed
  :class:`Decision` behind them is in :attr:`ThresholdController.last_decisions`): a percentile
  rank of the signals within a recent window gives a load in [0, 1]; a small state
  machine with hysteresis (normal / denser / sparser) turns it into an offset of the
  target byte sparsity; a budget repays the difference between the target and the
  realized sparsity so that a generation's mean stays at the target.

Sparsity unit: fraction of MLP weight bytes skipped, ``(2 * s_in + s_mid) / 3`` per
layer for the gated MLP and ``(s_in + s_mid) / 2`` for the plain one, averaged over layers
(``clada_export.profile.byte_sparsity``).

Determinism: all arithmetic is float64, element-wise numpy operations (exactly
rounded, like scalar C++) and sums in layer order written as explicit loops, so that
the C++ header ``runtime/include/clada/controller.hpp`` reproduces every decision bit
for bit. Changing any formula here means changing it there too; the replay tests
(``tests/test_controller.py``) hold the two together, and a test compares the C++
defaults with :class:`ControllerConfig`'s field by field.

Traces (JSON lines, strict JSON: NaN and infinities as the strings ``"NaN"``,
``"Infinity"``, ``"-Infinity"``) are written only when asked for (``trace=``), and
records are kept in memory only with ``keep_records=True``.
"""

from __future__ import annotations

import json
import math
import os
import weakref
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import IO, Any, Iterable, Literal, Sequence

import numpy as np

from clada_export import atomic
from clada_export.errors import UserError
from clada_export.profile import SparsityProfile, interp_rows
from clada_export.validate import Fields

TRACE_FORMAT = "clada-controller-trace"
TRACE_VERSION = 2  # 2: NaN and infinities as strings, so that traces are strict JSON

NORMAL, DENSER, SPARSER = 0, 1, 2
STATE_NAMES = ("normal", "denser", "sparser")

# Bounds used when ControllerConfig.min_sparsity / max_sparsity are None.
DEFAULT_BELOW = 0.20
DEFAULT_ABOVE = 0.15


def _param(default: Any, doc: str) -> Any:
    """A ControllerConfig field: its default and its meaning, the one place both are
    written (``config_table`` renders them for docs/controller.md)."""
    return field(default=default, metadata={"doc": doc})


@dataclass
class ControllerConfig:
    """Parameters of the token level, the budget and the sequence level. Sparsities are
    byte sparsities (fractions of MLP weight bytes skipped); loads are percentile ranks
    in [0, 1]; counts are decode steps. Each field's meaning is in its ``doc`` metadata
    (``config_table()``, the table in docs/controller.md); the C++ struct
    ``clada::ControllerConfig`` has the same fields and defaults (checked by a test)."""

    window: int = _param(16, "earlier steps kept per sequence for the ranks")
    min_history: int = _param(16, "warm-up: values needed before the load is defined (<= window)")
    high: float = _param(0.95, "enter `denser` when load >= high")
    high_margin: float = _param(0.1, "stay `denser` while load >= high - high_margin")
    low: float = _param(0.4, "a step with load <= low is easy")
    easy_steps: int = _param(2, "consecutive easy steps that enter `sparser`")
    low_margin: float = _param(0.2, "stay `sparser` while load <= low + low_margin")
    dense_offset: float = _param(0.10, "`denser` targets target - dense_offset (byte sparsity)")
    sparse_offset: float = _param(0.05, "`sparser` targets target + sparse_offset")
    min_sparsity: float | None = _param(None, f"lower bound of a step's target; None = max(levels[0], target - {DEFAULT_BELOW})")
    max_sparsity: float | None = _param(None, f"upper bound; None = min(levels[-1], target + {DEFAULT_ABOVE})")
    payback_steps: int = _param(16, "the budget adds debt / payback_steps to each step's target ...")
    max_correction: float = _param(0.15, "... clipped to +-max_correction; debt = sum of (target - realized)")
    target: float | None = _param(None, "the generation's mean byte sparsity; None = the allocation's "
                                        "(exactly what static thresholds realize)")
    scale_min: float = _param(0.5, "lower clamp of the prefix scale")
    scale_max: float = _param(2.0, "upper clamp of the prefix scale")
    prefix_strength: float = _param(1.0, "scale = 1 + prefix_strength * (prompt_mean / calib_mean - 1); "
                                         "0 disables the sequence level")
    trace_thresholds: bool = _param(False, "also write every step's full `[L, 2]` thresholds into the trace "
                                           "(large; the replay tests use it)")

    def validate(self) -> None:
        """Raise UserError naming the first bad field."""
        def bad(msg: str) -> None:
            raise UserError(f"controller config: {msg}")

        for f in fields(self):
            _check_type(f.name, _FIELD_KINDS[f.name], getattr(self, f.name))
            if _FIELD_KINDS[f.name] == "int" and abs(getattr(self, f.name)) > _INT_MAX:
                bad(f"{f.name} must be at most {_INT_MAX} (a C++ int), got {_short(getattr(self, f.name))}")
        if self.window < 1:
            bad(f"window must be a positive integer, got {self.window}")
        if not 1 <= self.min_history <= self.window:
            bad(f"min_history must be an integer in [1, window={self.window}], got {self.min_history}")
        if self.easy_steps < 1:
            bad(f"easy_steps must be a positive integer, got {self.easy_steps}")
        if self.payback_steps < 1:
            bad(f"payback_steps must be a positive integer, got {self.payback_steps}")
        if not 0.0 <= self.low < self.high <= 1.0:
            bad(f"need 0 <= low < high <= 1, got low={self.low}, high={self.high}")
        for name in ("high_margin", "low_margin", "dense_offset", "sparse_offset", "max_correction", "prefix_strength"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0.0):
                bad(f"{name} must be a finite number >= 0, got {v}")
        for name in ("min_sparsity", "max_sparsity", "target"):
            v = getattr(self, name)
            if v is not None and not (math.isfinite(v) and 0.0 <= v <= 1.0):
                bad(f"{name} must be null or a finite byte sparsity in [0, 1], got {v}")
        if not 0.0 < self.scale_min <= 1.0 <= self.scale_max:
            bad(f"need 0 < scale_min <= 1 <= scale_max, got [{self.scale_min}, {self.scale_max}]")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ControllerConfig":
        """Fields not named keep their defaults; unknown keys and values of the wrong type
        raise UserError naming the field. Integral numbers are accepted for integer fields
        (16.0 -> 16), integers for float fields."""
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise UserError(f"controller config has unknown keys {unknown}; known keys: {known}")
        return cls(**{k: _check_type(k, _FIELD_KINDS[k], v) for k, v in d.items()})


Kind = Literal["int", "float", "float | None", "bool"]
_FIELD_KINDS: dict[str, Kind] = {f.name: f.type for f in fields(ControllerConfig)}  # type: ignore[misc]


_INT_MAX = 2**31 - 1  # the C++ controller's int fields


def _short(v: Any) -> str:
    """``repr(v)``, cut to one short line for an error message."""
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."


def _check_type(name: str, kind: Kind, v: Any) -> Any:
    """``v`` as field ``name`` holds it (int, float, None or bool), or UserError."""
    number = isinstance(v, (int, float)) and not isinstance(v, bool)
    if kind == "bool" and isinstance(v, bool):
        return v
    if kind == "int" and (isinstance(v, int) and number or isinstance(v, float) and v.is_integer()):
        return int(v)
    if kind == "float | None" and v is None:
        return None
    if kind in ("float", "float | None") and number:
        try:
            return float(v)
        except OverflowError:
            raise UserError(f"controller config: {name} must be a number within float range, got {_short(v)}") from None
    want = {"int": "an integer", "float": "a number", "float | None": "a number or null",
            "bool": "true or false"}[kind]
    raise UserError(f"controller config: {name} must be {want}, got {_short(v)}")


def config_table() -> str:
    """The parameter table of docs/controller.md, from the fields' defaults and docs
    (``python -c "from clada_export.runtime.controller import config_table; print(config_table())"``)."""
    rows = ["| name | default | meaning |", "|---|---|---|"]
    for f in fields(ControllerConfig):
        rows.append(f"| `{f.name}` | {f.default!r} | {f.metadata['doc']} |")
    return "\n".join(rows)


def load_controller_config(path: str | os.PathLike | None) -> ControllerConfig:
    """A :class:`ControllerConfig` from a JSON object of field overrides (the defaults
    for ``None``), validated; errors name the file and the field."""
    if path is None:
        return ControllerConfig()
    try:
        d = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"controller config {path} does not exist; pass a JSON file such as "
                        '{"dense_offset": 0.05, "prefix_strength": 0}') from None
    except (OSError, ValueError, RecursionError) as e:  # ValueError: bad JSON, bad UTF-8, a huge integer
        raise UserError(f"controller config {path} is not readable JSON ({type(e).__name__}: {e})") from None
    if not isinstance(d, dict):
        raise UserError(f"controller config {path} must hold a JSON object of ControllerConfig fields")
    try:
        cfg = ControllerConfig.from_dict(d)
        cfg.validate()
    except UserError as e:
        raise UserError(f"{path}: {e}") from None
    return cfg


def _rank(v: float, hist: Sequence[float]) -> float:
    """Percentile rank of ``v`` in ``hist``: ``(count(h < v) + 0.5 * count(h == v)) / n``;
    0.5 for NaN."""
    if v != v:
        return 0.5
    less = 0
    eq = 0
    for h in hist:
        if h < v:
            less += 1
        elif h == v:
            eq += 1
    return (float(less) + 0.5 * float(eq)) / float(len(hist))


def _seq_mean(values: Iterable[float], n: int) -> float:
    """Sum in order, then divide: the one summation order both implementations use."""
    acc = 0.0
    for v in values:
        acc += v
    return acc / n


@dataclass(frozen=True, slots=True)
class Decision:
    """One decision of the token level: the thresholds chosen at step ``step`` for
    sequence ``seq`` (used by the decode step after it). The C++ counterpart is
    ``clada::StepRecord``; a trace's step record is :meth:`record`."""

    step: int
    seq: int
    token: int | None         # the picked id, when the caller passed tokens
    surprisal: float          # nats, of the token just picked
    entropy: float            # nats, of the distribution it was picked from
    load: float | None        # percentile-rank load in [0, 1]; None during warm-up
    state: str                # "normal", "denser" or "sparser"
    target: float             # the step's target byte sparsity s_t
    realized: float           # byte sparsity of the clipped per-layer levels
    debt: float               # the budget's debt after this step
    t_in_mean: float          # mean over layers of the float64 thresholds
    t_mid_mean: float

    def record(self) -> dict[str, Any]:
        """The trace's ``step`` record (docs/controller.md, "Traces")."""
        return {"event": "step", **{f.name: getattr(self, f.name) for f in fields(self)}}


class ThresholdController:
    """Per-sequence threshold control for a batch of ``batch`` generations.

    Usage per generation::

        ctl = ThresholdController(profile, ControllerConfig(), batch=B)
        thr = ctl.begin(act_stats)            # [L, B, 2] float32; act_stats [L, B, 2] or None
        for each decode step:
            token = sample(logits)            # surprisal/entropy of this pick, nats, [B]
            thr = ctl.step(surprisal, entropy, tokens=token)   # thresholds for the next step
            logits = decode(token, thr)

    Every array returned by :meth:`step` is assumed to be used for exactly one decode
    step: its realized sparsity enters the budget. :meth:`begin` resets all per-sequence
    state (a controller can be reused across generations of the same batch size).
    :attr:`last_decisions` holds the typed decisions of the latest step; nothing else
    is kept per step unless a trace is asked for.
    """

    def __init__(
        self,
        profile: SparsityProfile,
        config: ControllerConfig | None = None,
        batch: int = 1,
        trace: str | os.PathLike | IO[str] | None = None,
        keep_records: bool = False,
    ) -> None:
        """``trace``: a path (written line-buffered to a temporary beside it, renamed
        into place by :meth:`close` or a clean exit of the context manager; removed on an
        exception, :meth:`abort` or, never closed, at exit) or an open text file; every trace record is written there as
        one JSON line as soon as it is made. ``keep_records``: also keep them in
        :attr:`records` (tests, replay). Without either, no record is built."""
        self.profile = profile
        self.config = config if config is not None else ControllerConfig()
        self.config.validate()
        if int(batch) != batch or batch < 1:
            raise UserError(f"controller batch must be a positive integer, got {batch}")
        self.batch = int(batch)
        p = profile
        self.L = int(p.num_layers)
        self.levels = np.asarray(p.levels, dtype=np.float64)
        if self.levels.shape[0] < 2 or not np.all(np.diff(self.levels) > 0):
            raise UserError("profile levels must be at least 2 strictly increasing values; re-run `clada-export calibrate`")
        self.t_in = np.asarray(p.t_in, dtype=np.float64)
        self.t_mid = np.asarray(p.t_mid, dtype=np.float64)
        self._tables = np.stack([self.t_in, self.t_mid])[:, None]  # [2, 1, L, S] for _step_batch
        self.calib = np.asarray(p.calib_mean_abs, dtype=np.float64)
        self.a_in = np.asarray(p.s_in, dtype=np.float64)
        self.a_mid = np.asarray(p.s_mid, dtype=np.float64)
        # how s_in weighs against s_mid in byte sparsity (2 gated, 1 plain): exactly 2.0 and
        # 3.0 in the gated sums, so their rounding is the C++ controller's
        self.w_in = 2.0 if getattr(p, "gated_mlp", True) else 1.0
        self.lo = float(self.levels[0])
        self.hi = float(self.levels[-1])

        c = self.config
        if c.target is None:
            _, _, self.target = self._levels_at(0.0)
        else:
            self.target = float(c.target)
        self.min_sparsity = max(self.lo, self.target - DEFAULT_BELOW) if c.min_sparsity is None else float(c.min_sparsity)
        self.max_sparsity = min(self.hi, self.target + DEFAULT_ABOVE) if c.max_sparsity is None else float(c.max_sparsity)
        if not (self.lo <= self.target <= self.hi):
            raise UserError(f"controller target {self.target} is outside the profile's levels [{self.lo}, {self.hi}]")
        if not (self.min_sparsity <= self.target <= self.max_sparsity):
            raise UserError(
                f"controller bounds [{self.min_sparsity}, {self.max_sparsity}] do not contain the target {self.target}"
            )
        self._high_exit = c.high - c.high_margin
        self._low_exit = c.low + c.low_margin

        self.records: list[dict[str, Any]] = []
        """Trace records, oldest first, with ``keep_records=True`` (else empty): one
        ``config`` record, then per generation one ``begin`` record and one ``step``
        record per (step, active sequence)."""
        self._keep_records = bool(keep_records)
        self._trace_file: IO[str] | None = None
        self._own_trace = False
        self._trace_target: Path | None = None
        self._trace_tmp: Path | None = None
        self._trace_cleanup: weakref.finalize | None = None
        if trace is not None:
            if hasattr(trace, "write"):
                self._trace_file = trace  # type: ignore[assignment]
            else:
                # written beside the target under a temporary name and renamed into place by
                # close(), so a killed run never leaves half a trace where the user looks
                target = Path(trace)
                atomic.remove_stale(target)
                tmp = atomic.temp_path(target)
                try:
                    self._trace_file = open(tmp, "w", buffering=1)  # line-buffered: complete lines on disk
                except OSError as e:
                    raise UserError(f"cannot write the controller trace {target} ({e.strerror or e}); "
                                    "choose a writable --trace path") from None
                self._own_trace = True
                self._trace_target, self._trace_tmp = target, tmp
                # never closed (an exception, SIGTERM or Ctrl-C unwinding past the caller):
                # the temporary goes at garbage collection or interpreter exit
                self._trace_cleanup = weakref.finalize(self, _discard_trace, self._trace_file, tmp)
        self._tracing = self._keep_records or self._trace_file is not None
        if self._tracing:
            self._emit(self._config_record())
        self._begun = False
        self._reset(None)

    # -- public API -----------------------------------------------------------------
    def begin(self, act_stats: np.ndarray | None = None) -> np.ndarray:
        """Start a generation. ``act_stats [L, B, 2]``: mean |x| and mean |h| of each
        layer's MLP input / intermediate over each prompt's valid tokens (same units as
        the profile's ``calib_mean_abs``), or None for no prefix shift. Returns the
        thresholds ``float32 [L, B, 2]`` at the target sparsity with the prefix scale
        applied (not counted in the budget)."""
        self._reset(act_stats)
        if self._tracing:
            self._emit(self._begin_record(act_stats))
        self._begun = True
        return self._last.copy()

    def step(
        self,
        surprisal: np.ndarray,
        entropy: np.ndarray,
        tokens: np.ndarray | Sequence[int] | None = None,
        active: np.ndarray | Sequence[bool] | None = None,
    ) -> np.ndarray:
        """One decode step's signals -> the next decode step's thresholds.

        ``surprisal [B]``: -log p (nats) of the token just picked; ``entropy [B]``:
        entropy (nats) of the distribution it was picked from; ``tokens [B]``: the
        picked ids (kept in the decision and the trace); ``active [B]`` bool: sequences
        still generating (inactive ones keep their state and previous thresholds, make
        no decision and write no record).
        Returns ``float32 [L, B, 2]``."""
        if not self._begun:
            self.begin(None)
        B = self.batch
        u = np.asarray(surprisal, dtype=np.float64).reshape(-1)
        e = np.asarray(entropy, dtype=np.float64).reshape(-1)
        if u.shape != (B,) or e.shape != (B,):
            raise ValueError(f"surprisal and entropy must have shape [{B}], got {u.shape} and {e.shape}")
        tok = None if tokens is None else [int(t) for t in np.asarray(tokens).reshape(-1)]
        if tok is not None and len(tok) != B:
            raise ValueError(f"tokens must have shape [{B}], got {len(tok)}")
        act = [True] * B if active is None else [bool(a) for a in np.asarray(active).reshape(-1)]
        if len(act) != B:
            raise ValueError(f"active must have shape [{B}], got {len(act)}")
        t = self._step_index
        self.last_decisions = [None] * B
        idx = [b for b in range(B) if act[b]]
        if idx:
            decisions = self._step_batch(idx, [float(u[b]) for b in idx], [float(e[b]) for b in idx],
                                         [None if tok is None else tok[b] for b in idx], t)
            for b, d in zip(idx, decisions):
                self.last_decisions[b] = d
        self._step_index += 1
        return self._last.copy()

    def step_summary(self) -> tuple[np.ndarray, np.ndarray]:
        """The last step's realized byte sparsity ``float64 [B]`` (NaN where the sequence
        was inactive) and whether each sequence is `denser` ``bool [B]``."""
        d = self.last_decisions
        return (np.array([np.nan if x is None else x.realized for x in d], dtype=np.float64),
                np.array([x is not None and x.state == STATE_NAMES[DENSER] for x in d], dtype=bool))

    def static_thresholds(self, batch: int | None = None) -> np.ndarray:
        """The allocation's thresholds, no prefix shift, no token control:
        ``float32 [L, batch, 2]`` (``batch`` defaults to the controller's)."""
        B = self.batch if batch is None else int(batch)
        ci, cm, _ = self._levels_at(0.0)
        thr = np.stack([interp_rows(ci, self.levels, self.t_in), interp_rows(cm, self.levels, self.t_mid)], axis=1)
        return np.repeat(thr[:, None, :], B, axis=1).astype(np.float32)

    @property
    def mean_sparsity(self) -> np.ndarray:
        """Mean realized byte sparsity per sequence over this generation's steps
        ``float64 [B]`` (NaN before the first step)."""
        n = np.asarray(self._n_steps, dtype=np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(n > 0, np.asarray(self._sum_realized) / np.maximum(n, 1), np.nan)

    @property
    def denser_steps(self) -> np.ndarray:
        """Steps per sequence whose thresholds were chosen in the ``denser`` state, int [B]."""
        return np.asarray(self._n_denser, dtype=np.int64)

    @property
    def sparser_steps(self) -> np.ndarray:
        """Steps per sequence chosen in the ``sparser`` state, int [B]."""
        return np.asarray(self._n_sparser, dtype=np.int64)

    @property
    def steps(self) -> np.ndarray:
        """Steps per sequence counted in this generation (active ones only), int [B]."""
        return np.asarray(self._n_steps, dtype=np.int64)

    @property
    def states(self) -> list[str]:
        """Current state name per sequence."""
        return [STATE_NAMES[s] for s in self._state]

    @property
    def scale(self) -> np.ndarray:
        """The sequence-level scale of this generation, float64 [L, B, 2]."""
        return self._scale.copy()

    def step_records(self) -> list[dict[str, Any]]:
        """The kept ``step`` records (needs ``keep_records=True``)."""
        if not self._keep_records:
            raise RuntimeError("this controller keeps no records; construct it with keep_records=True")
        return [r for r in self.records if r["event"] == "step"]

    def close(self) -> None:
        """Finish the trace: flush it (a file object given as ``trace``) or close it and
        rename it into place (a path)."""
        f = self._release_trace()
        if f is None:
            return
        assert self._trace_target is not None
        try:
            f.close()
            os.replace(self._trace_tmp, self._trace_target)
        except BaseException as e:
            _discard_trace(f, self._trace_tmp)
            if isinstance(e, OSError):
                raise UserError(f"cannot write the controller trace {self._trace_target} "
                                f"({e.strerror or e}); choose a writable --trace path") from None
            raise

    def abort(self) -> None:
        """Drop an unfinished trace: a path's temporary file is removed, the target left
        as it was."""
        f = self._release_trace()
        if f is not None:
            _discard_trace(f, self._trace_tmp)

    def _release_trace(self):
        """Detach the open trace: a caller's file object is flushed and left to the caller
        (``None``); our own temporary file is returned for ``close`` to rename or ``abort``
        to discard."""
        if self._trace_file is None:
            return None
        f, self._trace_file = self._trace_file, None
        if not self._own_trace:
            f.flush()
            return None
        assert self._trace_tmp is not None
        if self._trace_cleanup is not None:
            self._trace_cleanup.detach()
        return f

    def __enter__(self) -> "ThresholdController":
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    # -- internals ------------------------------------------------------------------
    def _levels_at(self, shift: float) -> tuple[np.ndarray, np.ndarray, float]:
        """Allocation shifted by ``shift`` and clipped to the table's levels, and the
        realized byte sparsity: mean over layers of (w * s_in + s_mid) / (w + 1), w = 2 for
        the gated MLP and 1 for the plain one (``profile.byte_sparsity``)."""
        ci = np.minimum(np.maximum(self.a_in + shift, self.lo), self.hi)
        cm = np.minimum(np.maximum(self.a_mid + shift, self.lo), self.hi)
        per_layer = (self.w_in * ci + cm) / (self.w_in + 1.0)
        return ci, cm, _seq_mean(per_layer.tolist(), self.L)

    def _reset(self, act_stats: np.ndarray | None) -> None:
        """Clear all per-sequence state, fix the prefix scale."""
        L, B = self.L, self.batch
        scale = np.ones((L, B, 2), dtype=np.float64)
        if act_stats is not None:
            a = np.asarray(act_stats, dtype=np.float64)
            if a.shape != (L, B, 2):
                raise ValueError(f"act_stats must have shape [{L}, {B}, 2], got {list(a.shape)}")
            for l in range(L):
                for b in range(B):
                    for k in range(2):
                        scale[l, b, k] = self._scale_of(float(a[l, b, k]), float(self.calib[l, k]))
        self._scale = scale
        self._hist_u: list[list[float]] = [[] for _ in range(B)]
        self._hist_e: list[list[float]] = [[] for _ in range(B)]
        self._state = [NORMAL] * B
        self._easy_run = [0] * B
        self._debt = [0.0] * B
        self._sum_realized = [0.0] * B
        self._n_steps = [0] * B
        self._n_denser = [0] * B
        self._n_sparser = [0] * B
        self._step_index = 0
        self.last_decisions: list[Decision | None] = [None] * B
        """The decisions of the latest :meth:`step`, one per sequence (None where the
        sequence was not active, and before the first step)."""
        ci, cm, _ = self._levels_at(0.0)
        base = np.stack([interp_rows(ci, self.levels, self.t_in), interp_rows(cm, self.levels, self.t_mid)], axis=1)
        self._last = (base[:, None, :] * scale).astype(np.float32)

    def _begin_record(self, act_stats: np.ndarray | None) -> dict[str, Any]:
        L, B = self.L, self.batch
        return {
            "event": "begin",
            "act_stats": None if act_stats is None else np.asarray(act_stats, dtype=np.float64).tolist(),
            "scale_in_mean": [_seq_mean(self._scale[:, b, 0].tolist(), L) for b in range(B)],
            "scale_mid_mean": [_seq_mean(self._scale[:, b, 1].tolist(), L) for b in range(B)],
        }

    def _scale_of(self, prompt_mean: float, calib_mean: float) -> float:
        c = self.config
        if not (math.isfinite(prompt_mean) and math.isfinite(calib_mean)) or prompt_mean < 0.0 or calib_mean <= 0.0:
            return 1.0
        ratio = prompt_mean / calib_mean
        s = 1.0 + c.prefix_strength * (ratio - 1.0)
        return min(max(s, c.scale_min), c.scale_max)

    def _token_level(self, b: int, u: float, e: float) -> tuple[float | None, int, float]:
        """Steps 1-3 for sequence ``b``: the load, the state, and the step's target s_t."""
        c = self.config
        hu, he = self._hist_u[b], self._hist_e[b]
        # 1. load: percentile rank of this step's signals among the earlier ones
        load: float | None = None
        if len(hu) >= c.min_history and len(he) >= c.min_history:
            load = max(_rank(u, hu), _rank(e, he))
        for hist, v in ((hu, u), (he, e)):
            if v == v:  # NaN never enters the window
                hist.append(v)
                if len(hist) > c.window:
                    del hist[0]
        # 2. state machine with hysteresis (warm-up: no load, state unchanged = normal)
        if load is not None:
            self._easy_run[b] = self._easy_run[b] + 1 if load <= c.low else 0
            st = self._state[b]
            if load >= c.high:
                st = DENSER
            elif st == DENSER and load >= self._high_exit:
                st = DENSER
            elif self._easy_run[b] >= c.easy_steps:
                st = SPARSER
            elif st == SPARSER and load <= self._low_exit:
                st = SPARSER
            else:
                st = NORMAL
            self._state[b] = st
        st = self._state[b]
        offset = -c.dense_offset if st == DENSER else (c.sparse_offset if st == SPARSER else 0.0)
        # 3. budget: repay the debt gradually
        corr = self._debt[b] / float(c.payback_steps)
        corr = min(max(corr, -c.max_correction), c.max_correction)
        s_t = self.target + offset + corr
        return load, st, min(max(s_t, self.min_sparsity), self.max_sparsity)

    def _step_batch(self, idx: list[int], u: list[float], e: list[float], tokens: list[int | None],
                    t: int) -> list[Decision]:
        """One step of the sequences ``idx``: the token level per sequence (scalar state
        machines), then step 4 -- levels, realized sparsity, thresholds -- for all of them in
        one set of array operations (the per-sequence loop over numpy calls was most of a
        step's host time; every element's arithmetic, and each sum's order, is unchanged)."""
        token_level = [self._token_level(b, ub, eb) for b, ub, eb in zip(idx, u, e)]
        s_t = np.array([s for _, _, s in token_level])
        # 4. per-layer levels -> thresholds, times the prefix scale: arrays [2 (in, mid), A, L]
        shift = (s_t - self.target)[:, None]
        ci = np.minimum(np.maximum(self.a_in + shift, self.lo), self.hi)
        cm = np.minimum(np.maximum(self.a_mid + shift, self.lo), self.hi)
        # sequential sums (cumsum), the order _seq_mean and the C++ controller use
        realized = np.cumsum((self.w_in * ci + cm) / (self.w_in + 1.0), axis=1)[:, -1] / self.L
        thr = interp_rows(np.stack([ci, cm]), self.levels, self._tables) * self._scale[:, idx, :].transpose(2, 1, 0)
        self._last[:, idx, :] = thr.transpose(2, 1, 0).astype(np.float32)
        means = np.cumsum(thr, axis=2)[:, :, -1] / self.L
        decisions = []
        for a, b in enumerate(idx):
            load, st, s = token_level[a]
            r = float(realized[a])
            self._debt[b] = self._debt[b] + (self.target - r)
            self._sum_realized[b] += r
            self._n_steps[b] += 1
            self._n_denser[b] += st == DENSER
            self._n_sparser[b] += st == SPARSER
            d = Decision(step=t, seq=b, token=tokens[a], surprisal=u[a], entropy=e[a], load=load,
                         state=STATE_NAMES[st], target=s, realized=r, debt=self._debt[b],
                         t_in_mean=float(means[0, a]), t_mid_mean=float(means[1, a]))
            if self._tracing:
                rec = d.record()
                if self.config.trace_thresholds:
                    rec["thresholds"] = self._last[:, b, :].astype(np.float64).tolist()
                self._emit(rec)
            decisions.append(d)
        return decisions

    def _config_record(self) -> dict[str, Any]:
        return {
            "event": "config",
            "format": TRACE_FORMAT,
            "version": TRACE_VERSION,
            "batch": self.batch,
            "num_layers": self.L,
            "num_levels": int(self.levels.shape[0]),
            "profile_fingerprint": self.profile.fingerprint,
            "target": self.target,
            "min_sparsity": self.min_sparsity,
            "max_sparsity": self.max_sparsity,
            "config": self.config.to_dict(),
        }

    def _emit(self, rec: dict[str, Any]) -> None:
        if self._keep_records:
            self.records.append(rec)
        if self._trace_file is not None:
            self._trace_file.write(json.dumps(_strict(rec), allow_nan=False) + "\n")


def _discard_trace(f: IO[str], tmp: Path) -> None:
    """Close ``f`` and remove the temporary trace ``tmp`` (never the target)."""
    try:
        f.close()
    except OSError:
        pass
    try:
        tmp.unlink()
    except FileNotFoundError:
        pass


# -- trace files: strict JSON ----------------------------------------------------------
_NONFINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}
_STRING_KEYS = {"event", "format", "profile_fingerprint", "state"}  # string fields, never numbers


def _strict(v: Any) -> Any:
    """``v`` with NaN and infinities as the strings "NaN", "Infinity", "-Infinity"."""
    if isinstance(v, float) and not math.isfinite(v):
        return "NaN" if v != v else ("Infinity" if v > 0 else "-Infinity")
    if isinstance(v, dict):
        return {k: _strict(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_strict(x) for x in v]
    return v


def _numbers(v: Any, key: str | None = None) -> Any:
    """The inverse of :func:`_strict` on a parsed record."""
    if isinstance(v, str):
        return v if key in _STRING_KEYS else _NONFINITE.get(v, v)
    if isinstance(v, dict):
        return {k: _numbers(x, k) for k, x in v.items()}
    if isinstance(v, list):
        return [_numbers(x, key) for x in v]
    return v


# -- trace replay ------------------------------------------------------------------------
_TRACE_FIX = "record the trace again with `clada-export generate --trace`"
_CONFIG_KEYS = {"event", "format", "version", "batch", "num_layers", "num_levels", "profile_fingerprint",
                "target", "min_sparsity", "max_sparsity", "config"}
_BEGIN_KEYS = {"event", "act_stats", "scale_in_mean", "scale_mid_mean"}
_STEP_KEYS = {"event", *(f.name for f in fields(Decision)), "thresholds"}
_TOKEN_MAX = 2**63 - 1


def _read_trace_lines(path: str | os.PathLike) -> list[tuple[str, dict[str, Any]]]:
    """``(where, record)`` for each non-blank line of a JSONL trace; ``where`` is
    ``"<path> line <n>"``. Any unreadable line is a one-line UserError naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        raise UserError(f"controller trace {path} does not exist; {_TRACE_FIX}") from None
    except (OSError, UnicodeDecodeError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"controller trace {path} is not readable ({msg}); {_TRACE_FIX}") from None
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path} line {n}"
        try:
            rec = json.loads(line)
        except (ValueError, RecursionError) as e:  # JSONDecodeError, a huge integer, deep nesting
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise UserError(f"{where} is not valid JSON ({msg}); {_TRACE_FIX}") from None
        if not isinstance(rec, dict):
            raise UserError(f"{where} holds a JSON {type(rec).__name__}, not a trace record object; {_TRACE_FIX}")
        out.append((where, _numbers(rec)))
    return out


def read_trace(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All records of a JSONL trace (NaN and infinities back as floats); a line that is
    not a JSON object is a UserError naming the file and the line. The records' fields
    are checked by :func:`replay_trace`."""
    return [rec for _, rec in _read_trace_lines(path)]


def _signal(r: Fields, name: str) -> float:
    """A surprisal or entropy: any number, NaN and infinities included (the controller
    takes them: NaN never enters the window), within float range."""
    v = r._get(name, None)
    if name not in r.d:
        raise r.fail(name, "is missing")
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise r.fail(name, f"must be a number (or \"NaN\", \"Infinity\", \"-Infinity\"), got {_short(v)}")
    try:
        return float(v)
    except OverflowError:
        raise r.fail(name, f"must be a number within float range, got {_short(v)}") from None


def _act_stats(r: Fields, L: int, B: int) -> np.ndarray:
    """A begin record's ``act_stats``: numbers of shape ``[L, B, 2]``. NaN and infinities
    pass (the controller gives such an entry the scale 1, as it did when recording)."""
    v = r._get("act_stats", None)
    stack = [v]
    while stack:  # no bools or strings hidden among the numbers (numpy would take them)
        x = stack.pop()
        if isinstance(x, list):
            stack.extend(x)
        elif isinstance(x, bool) or not isinstance(x, (int, float)):
            raise r.fail("act_stats", f"must be null or a 3-d array of numbers of shape [{L}, {B}, 2], "
                                      f"holds {_short(x)}")
    try:
        a = np.asarray(v, dtype=np.float64)
    except (TypeError, ValueError, OverflowError):
        raise r.fail("act_stats", f"must be null or a 3-d array of numbers of shape [{L}, {B}, 2]") from None
    if a.shape != (L, B, 2):
        raise r.fail("act_stats", f"has shape {list(a.shape)}, expected [{L}, {B}, 2] (from num_layers, batch)")
    return a


def replay_trace(
    profile: SparsityProfile, trace: str | os.PathLike | list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Feed a recorded trace's inputs (act_stats, surprisal, entropy, tokens, which
    sequences were active at each step) through a fresh controller built from the
    trace's config record; return the new records (compare them with
    :func:`compare_traces`). Every record is checked before use: a malformed one is a
    one-line UserError naming the file (or "trace") and the line and field."""
    if isinstance(trace, list):
        lines = [(f"trace record {i + 1}", r) for i, r in enumerate(trace)]
        name = "trace"
    else:
        lines = _read_trace_lines(trace)
        name = str(trace)
    for where, r in lines:
        if not isinstance(r, dict):
            raise UserError(f"{where} is a {type(r).__name__}, not a trace record object; {_TRACE_FIX}")
    if not lines:
        raise UserError(f"{name} is empty, not a controller trace; {_TRACE_FIX}")
    where, head_rec = lines[0]
    head = Fields(head_rec, where, _TRACE_FIX)
    if head_rec.get("event") != "config" or head_rec.get("format") != TRACE_FORMAT:
        raise UserError(f"{name} is not a controller trace (its first record is not a {TRACE_FORMAT} config "
                        f"record); {_TRACE_FIX}")
    version = head_rec.get("version")
    if isinstance(version, bool) or version != TRACE_VERSION:
        raise UserError(f"{where}: controller trace version {_short(version)}, this reads {TRACE_VERSION}; "
                        "record it again")
    head.check_keys(_CONFIG_KEYS)
    B = head.int("batch", lo=1)
    num_layers = head.int("num_layers", lo=1)
    num_levels = head.int("num_levels", lo=1)
    assert B is not None and num_layers is not None and num_levels is not None
    if B > _INT_MAX:
        raise head.fail("batch", f"must be at most {_INT_MAX}, got {B}")
    if num_layers != profile.num_layers or num_levels != len(profile.levels):
        raise UserError(f"{where}: controller trace was recorded with another profile (num_layers {num_layers}, "
                        f"num_levels {num_levels}; the profile has {profile.num_layers} and "
                        f"{len(profile.levels)})")
    cfg = head.obj("config")
    assert cfg is not None
    try:
        config = ControllerConfig.from_dict(cfg.d)
        config.validate()
        ctl = ThresholdController(profile, config, batch=B, keep_records=True)
    except UserError as e:
        raise UserError(f"{where}: field config: {e}") from None

    L = profile.num_layers
    max_step = len(lines)  # each step with an active sequence writes at least one record
    i = 1
    while i < len(lines):
        where, r = lines[i]
        f = Fields(r, where, _TRACE_FIX)
        event = f.str("event", choices=("begin", "step"))
        if event == "begin":
            f.check_keys(_BEGIN_KEYS)
            act = None if r.get("act_stats", 0) is None else _act_stats(f, L, B)
            ctl.begin(act)
            i += 1
            continue
        t = f.int("step", lo=0)
        assert t is not None
        if t > max_step:
            raise f.fail("step", f"must be at most {max_step} (the trace's record count), got {t}")
        if t < ctl._step_index:
            raise f.fail("step", f"goes back to {t} after step {ctl._step_index - 1} without a begin record")
        u = np.zeros(B)
        e = np.zeros(B)
        tok: list[int] = [0] * B
        has_tok = True
        active = np.zeros(B, dtype=bool)
        while i < len(lines):
            where, r = lines[i]
            g = Fields(r, where, _TRACE_FIX)
            if g.str("event", choices=("begin", "step")) != "step" or g.int("step", lo=0) != t:
                break
            g.check_keys(_STEP_KEYS)
            b = g.int("seq", lo=0)
            assert b is not None
            if b >= B:
                raise g.fail("seq", f"must be in [0, batch={B}), got {b}")
            if active[b]:
                raise g.fail("seq", f"repeats sequence {b} within step {t}")
            u[b], e[b], active[b] = _signal(g, "surprisal"), _signal(g, "entropy"), True
            token = g.int("token", optional=True)
            if token is None:
                has_tok = False
            else:
                if not -_TOKEN_MAX <= token <= _TOKEN_MAX:
                    raise g.fail("token", f"must be a 64-bit integer, got {_short(token)}")
                tok[b] = token
            i += 1
        while ctl._step_index < t:  # steps where no sequence was active
            ctl.step(np.zeros(B), np.zeros(B), active=np.zeros(B, dtype=bool))
        ctl.step(u, e, tokens=tok if has_tok else None, active=active)
    return ctl.records


def _num_equal(a: Any, b: Any, rtol: float) -> bool:
    if a is None or b is None:
        return a is None and b is None
    if isinstance(a, list) or isinstance(b, list):
        return isinstance(a, list) and isinstance(b, list) and len(a) == len(b) and all(
            _num_equal(x, y, rtol) for x, y in zip(a, b)
        )
    if isinstance(a, str) or isinstance(b, str):
        return a == b
    a, b = float(a), float(b)
    if a != a or b != b:
        return a != a and b != b
    if a == b:
        return True
    return abs(a - b) <= rtol * max(abs(a), abs(b))


def compare_traces(a: list[dict[str, Any]], b: list[dict[str, Any]], rtol: float = 0.0) -> list[str]:
    """Differences between two record lists (empty = identical decisions). Numbers
    are compared exactly (``rtol=0``) or to a relative tolerance; states, events,
    steps and sequence ids exactly."""
    diffs: list[str] = []
    if len(a) != len(b):
        diffs.append(f"record count {len(a)} != {len(b)}")
    for i, (ra, rb) in enumerate(zip(a, b)):
        keys = sorted(set(ra) | set(rb))
        for k in keys:
            if k in ("config", "format", "profile_fingerprint"):
                if ra.get(k) != rb.get(k):
                    diffs.append(f"record {i} ({ra.get('event')}): {k} differs")
                continue
            if not _num_equal(ra.get(k), rb.get(k), rtol):
                diffs.append(f"record {i} ({ra.get('event')} step {ra.get('step')} seq {ra.get('seq')}): "
                             f"{k} {ra.get(k)!r} != {rb.get(k)!r}")
        if len(diffs) > 20:
            break
    return diffs
