"""The sparsity profile: CLADA's offline level, written by ``calibrate``, read by
``export`` (ONNX metadata, default thresholds) and by the runtime's controller.

A profile holds, per layer, quantile tables of the MLP input magnitude |x| and of the
intermediate magnitude |h| on calibration text (``t_in[l, k]`` is the threshold that
zeroes a fraction ``levels[k]`` of |x|), the calibration text's mean magnitudes (the
reference for the sequence level's prefix shift), and an allocation: per-layer input
and intermediate sparsity that meets a global target.

Sparsity unit: the fraction of MLP weight bytes skipped. For a gated MLP, W_gate and
W_up (2/3 of the bytes) are skipped by input sparsity and W_down (1/3) by intermediate
sparsity, so a layer's byte sparsity is ``(2 * s_in + s_mid) / 3``; for a plain MLP
(GPT-2, OPT, GPT-NeoX), W1 and W2 are half each: ``(s_in + s_mid) / 2`` (biases are not
counted). :func:`byte_sparsity` is the one definition; a profile records its form
(``gated_mlp``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, field
from dataclasses import fields as dataclass_fields
from pathlib import Path
from typing import Any

import numpy as np

from clada_export.atomic import write_json
from clada_export.errors import UserError
from clada_export.validate import Fields, read_json_object

FORMAT = "clada-profile"
VERSION = 1
METHODS = ("greedy", "uniform")  # how a profile's sparsity is allocated over layers
_FIX = "re-run `clada-export calibrate`"
_SHAPE_FROM = "num_layers and the length of levels"
_ARRAYS = ("levels", "t_in", "t_mid", "calib_mean_abs", "s_in", "s_mid")


def _array_spec(L: int, S: int) -> list[tuple[str, tuple[int, ...], float | None, float | None]]:
    """(field, shape, lowest, highest) of each array but ``levels``: thresholds and mean
    magnitudes are magnitudes (>= 0), sparsities are fractions."""
    return [("t_in", (L, S), 0.0, None), ("t_mid", (L, S), 0.0, None), ("calib_mean_abs", (L, 2), 0.0, None),
            ("s_in", (L,), 0.0, 1.0), ("s_mid", (L,), 0.0, 1.0)]


def _levels(f: Fields) -> np.ndarray:
    levels = f.array("levels", (None,), lo=0.0, hi=1.0)
    if levels.shape[0] < 2 or not (np.diff(levels) > 0).all():
        raise f.fail("levels", "must hold at least 2 strictly increasing sparsity levels")
    return levels


def input_byte_weight(gated: bool = True) -> float:
    """MLP weight bytes an input channel skips, in units of those an intermediate channel
    skips: a gated MLP's ``x_i`` skips a row of W_gate and of W_up against one row of W_down
    for ``h_j`` (2); a plain MLP's a row of W1 against one of W2 (1)."""
    return 2.0 if gated else 1.0


def _bool(f: Fields, d: dict[str, Any], name: str, default: bool) -> bool:
    value = d.get(name, default)
    if not isinstance(value, bool):
        raise f.fail(name, f"must be true or false, got {value!r}")
    return value


def byte_sparsity(s_in: np.ndarray | float, s_mid: np.ndarray | float, gated: bool = True) -> np.ndarray | float:
    """Fraction of an MLP's weight bytes skipped at input/intermediate sparsity:
    ``(2 s_in + s_mid) / 3`` gated, ``(s_in + s_mid) / 2`` plain."""
    w = input_byte_weight(gated)
    return (w * np.asarray(s_in) + np.asarray(s_mid)) / (w + 1.0)


def interp_rows(x: np.ndarray, levels: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Row-wise linear interpolation: ``out[..., l] = interp(x[..., l], levels, table[..., l, :])``
    with exactly the arithmetic of ``numpy.interp`` (and so of
    ``SparsityProfile.thresholds_at``): below/at the first level -> first entry, at or
    above the last -> last entry, exactly on a level -> that entry, else
    ``slope * (x - levels[j]) + table[j]`` with ``slope = (table[j+1] - table[j]) /
    (levels[j+1] - levels[j])`` and ``levels[j] <= x < levels[j+1]``.
    Shapes: x [..., L], levels [S], table [..., L, S]; leading dimensions broadcast (the
    controller interpolates every sequence's input and intermediate rows in one call)."""
    S = levels.shape[0]
    j = np.clip(np.searchsorted(levels, x, side="right") - 1, 0, S - 2)
    rows = np.arange(math.prod(table.shape[:-1])).reshape(table.shape[:-1])  # broadcasts against j
    flat = table.reshape(-1, S)
    lj, lj1 = levels[j], levels[j + 1]
    fj, fj1 = flat[rows, j], flat[rows, j + 1]
    slope = (fj1 - fj) / (lj1 - lj)
    out = slope * (x - lj) + fj
    out = np.where(x == lj, fj, out)
    out = np.where(x <= levels[0], table[..., 0], out)
    out = np.where(x >= levels[-1], table[..., -1], out)
    return out


def table_thresholds(levels: np.ndarray, t_in: np.ndarray, t_mid: np.ndarray, s_in: np.ndarray,
                     s_mid: np.ndarray) -> np.ndarray:
    """Threshold pairs ``[L, 2]`` that reach sparsities ``s_in``/``s_mid`` ``[L]``: linear
    interpolation in each layer's table ``t_in``/``t_mid [L, S]`` over ``levels [S]``,
    clipped to the table's ends."""
    levels = np.asarray(levels, dtype=np.float64)
    L = len(t_in)
    s_in = np.broadcast_to(np.asarray(s_in, dtype=np.float64), (L,))
    s_mid = np.broadcast_to(np.asarray(s_mid, dtype=np.float64), (L,))
    return np.stack([interp_rows(s_in, levels, np.asarray(t_in, dtype=np.float64)),
                     interp_rows(s_mid, levels, np.asarray(t_mid, dtype=np.float64))], axis=1)


def model_fingerprint(config: dict[str, Any]) -> str:
    """Hash of the architecture-defining config keys (not of paths or dtypes)."""
    keys = (
        "model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
        "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size",
        "rms_norm_eps", "rope_theta", "hidden_act", "tie_word_embeddings",
    )
    from clada_export.model.config import hf_dict_value

    # read under the family's own names where it has them (GPT-2's n_embd, ...): the same
    # value as config.get(k) for every config that uses these names
    canon = json.dumps({k: hf_dict_value(config, k) for k in keys}, sort_keys=True)
    return hashlib.sha256(canon.encode()).hexdigest()[:16]


@dataclass
class SparsityProfile:
    """Per-layer threshold tables and their allocation. Shapes: ``levels [S]``,
    ``t_in``/``t_mid`` ``[L, S]`` (same units as the activations), ``calib_mean_abs``
    ``[L, 2]`` (mean |x|, mean |h| on calibration text), ``s_in``/``s_mid`` ``[L]``."""

    fingerprint: str
    model_type: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    levels: np.ndarray
    t_in: np.ndarray
    t_mid: np.ndarray
    calib_mean_abs: np.ndarray
    target_sparsity: float
    s_in: np.ndarray
    s_mid: np.ndarray
    kl: float | None = None
    method: str = "greedy"
    calibration: dict[str, Any] = field(default_factory=dict)
    gated_mlp: bool = True  # the MLP's form, which weighs s_in against s_mid (byte_sparsity)

    def __post_init__(self) -> None:
        # the checks a profile file gets (from_dict), so tables built in code meet them too
        f = Fields({k: getattr(self, k) for k in _ARRAYS}, "profile", _FIX)
        L = self.num_layers
        self.levels = _levels(f)
        for name, shape, lo, hi in _array_spec(L, self.levels.shape[0]):
            setattr(self, name, f.array(name, shape, lo=lo, hi=hi, shape_from=_SHAPE_FROM))

    # -- thresholds -------------------------------------------------------------
    def thresholds_at(self, s_in: np.ndarray, s_mid: np.ndarray) -> np.ndarray:
        """Per-layer threshold pairs ``[L, 2]`` reaching sparsities ``s_in``/``s_mid``
        ``[L]`` on calibration text (see :func:`table_thresholds`)."""
        return table_thresholds(self.levels, self.t_in, self.t_mid, s_in, s_mid)

    def static_thresholds(self) -> np.ndarray:
        """Thresholds ``[L, 2]`` of the allocation (what ``--static`` runs)."""
        return self.thresholds_at(self.s_in, self.s_mid)

    def mean_byte_sparsity(self) -> float:
        return float(np.mean(byte_sparsity(self.s_in, self.s_mid, self.gated_mlp)))

    # -- I/O ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k, v in list(d.items()):
            if isinstance(v, np.ndarray):
                d[k] = v.tolist()
        return {"format": FORMAT, "version": VERSION, **d}

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "profile") -> "SparsityProfile":
        """A profile from its JSON object, every field checked (type, shape, finiteness,
        range); a malformed one is a UserError naming ``source`` and the field."""
        if not isinstance(d, dict):
            raise UserError(f"{source} holds a JSON {type(d).__name__}, not a profile object; {_FIX}")
        f = Fields(d, source, _FIX)
        if d.get("format") != FORMAT:
            raise UserError(f"{source} is not a clada sparsity profile (no \"format\": \"{FORMAT}\")")
        if d.get("version") != VERSION:
            raise UserError(
                f"{source} has profile version {d.get('version')}, this clada-export reads version {VERSION}; "
                "re-run `clada-export calibrate`"
            )
        f.check_keys({"format", "version", *(x.name for x in dataclass_fields(cls))})
        L = f.int("num_layers", lo=1)
        levels = _levels(f)
        arrays = {name: f.array(name, shape, lo=lo, hi=hi, shape_from=_SHAPE_FROM)
                  for name, shape, lo, hi in _array_spec(L, len(levels))}
        calibration = f.obj("calibration", default={})
        return cls(
            fingerprint=f.str("fingerprint"), model_type=f.str("model_type"), num_layers=L,
            hidden_size=f.int("hidden_size", lo=1), intermediate_size=f.int("intermediate_size", lo=1),
            levels=levels, **arrays, target_sparsity=f.float("target_sparsity", lo=0.0, hi=1.0),
            kl=f.float("kl", default=None, optional=True), method=f.str("method", default="greedy"),
            calibration=calibration.d, gated_mlp=_bool(f, d, "gated_mlp", True),
        )

    def save(self, path: str | os.PathLike) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "SparsityProfile":
        path = Path(path)
        d = read_json_object(path, "profile", f"make one with `clada-export calibrate MODEL -o {path}`")
        return cls.from_dict(d, source=f"profile {path}")

    def check_matches(self, config: dict[str, Any], source: str = "profile") -> None:
        fp = model_fingerprint(config)
        if fp != self.fingerprint:
            raise UserError(
                f"{source} was calibrated for another model ({self.model_type}, {self.num_layers} layers, "
                f"hidden {self.hidden_size}; fingerprint {self.fingerprint}) but this model is "
                f"{config.get('model_type')}, {config.get('num_hidden_layers')} layers, hidden "
                f"{config.get('hidden_size')} (fingerprint {fp}); calibrate this model with `clada-export calibrate`"
            )
