"""Checking what we read from a file before anything uses it.

Every file the toolchain reads (profiles, export manifests, ...) goes through a
:class:`Fields` reader: each accessor checks one field's type, shape and range and
raises a one-line :class:`UserError` naming the file, the field and the fix, so a
malformed file never reaches an op or a kernel as a traceback.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from clada_export.errors import UserError

_MISSING = object()


def read_json_object(path: str | os.PathLike, what: str, fix: str) -> dict[str, Any]:
    """The JSON object in ``path``; UserError naming ``what`` (e.g. "profile") if the file
    is missing, unreadable, not JSON or not an object. ``fix`` ends each message."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} {path} does not exist; {fix}")
    try:
        # NaN and Infinity literals parse; the field that holds one refuses it by name
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{what} {path} is not readable JSON ({msg}); {fix}") from None
    if not isinstance(d, dict):
        raise UserError(f"{what} {path} holds a JSON {type(d).__name__}, not an object; {fix}")
    return d


class Fields:
    """Typed access to the fields of one JSON object read from ``source``."""

    def __init__(self, d: dict[str, Any], source: str, fix: str, prefix: str = ""):
        self.d, self.source, self.fix, self.prefix = d, source, fix, prefix

    def fail(self, name: str, problem: str) -> UserError:
        return UserError(f"{self.source}: field {self.prefix}{name} {problem}; {self.fix}")

    def _get(self, name: str, default: Any) -> Any:
        if name in self.d:
            return self.d[name]
        if default is _MISSING:
            raise self.fail(name, "is missing")
        return default

    def check_keys(self, known: set[str]) -> None:
        unknown = sorted(set(self.d) - known)
        if unknown:
            raise self.fail(unknown[0], f"is unknown (known fields: {', '.join(sorted(known))})")

    def str(self, name: str, default: Any = _MISSING, choices: tuple[str, ...] | None = None,
            optional: bool = False) -> str | None:
        v = self._get(name, default)
        if v is None and optional:
            return None
        if not isinstance(v, str):
            raise self.fail(name, f"must be a string, got {_show(v)}")
        if choices is not None and v not in choices:
            raise self.fail(name, f"must be one of {', '.join(choices)}, got {v!r}")
        return v

    def int(self, name: str, default: Any = _MISSING, lo: int | None = None, optional: bool = False) -> int | None:
        v = self._get(name, default)
        if v is None and optional:
            return None
        if isinstance(v, bool) or not isinstance(v, int):
            raise self.fail(name, f"must be an integer, got {_show(v)}")
        if lo is not None and v < lo:
            raise self.fail(name, f"must be >= {lo}, got {v}")
        return v

    def float(self, name: str, default: Any = _MISSING, lo: float | None = None, hi: float | None = None,
              optional: bool = False) -> float | None:
        v = self._get(name, default)
        if v is None and optional:
            return None
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise self.fail(name, f"must be a finite number, got {_show(v)}")
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            raise self.fail(name, f"must be in [{lo}, {hi}], got {v}")
        return float(v)

    def obj(self, name: str, default: Any = _MISSING, optional: bool = False) -> "Fields | None":
        v = self._get(name, default)
        if v is None and optional:
            return None
        if not isinstance(v, dict):
            raise self.fail(name, f"must be a JSON object, got {_show(v)}")
        return Fields(v, self.source, self.fix, prefix=f"{self.prefix}{name}.")

    def array(self, name: str, shape: tuple[int | None, ...], lo: float | None = None, hi: float | None = None,
              shape_from: str = "") -> np.ndarray:
        """A float64 array of ``shape`` (None: any length), all finite and within [lo, hi].
        ``shape_from`` names the fields the shape comes from, for the message."""
        v = self._get(name, _MISSING)
        try:
            a = np.asarray(v, dtype=np.float64)
        except (TypeError, ValueError):
            raise self.fail(name, f"must be a {len(shape)}-d array of numbers{_of(shape)}") from None
        if a.ndim != len(shape) or any(want is not None and got != want for got, want in zip(a.shape, shape)):
            want = ", ".join("n" if n is None else str(n) for n in shape)
            raise self.fail(name, f"has shape {list(a.shape)}, expected [{want}]"
                                  + (f" (from {shape_from})" if shape_from else ""))
        if not np.isfinite(a).all():
            raise self.fail(name, "holds a value that is not finite (NaN or infinity)")
        if lo is not None and (a < lo).any():
            raise self.fail(name, f"holds {a.min():g}, below the smallest allowed value {lo:g}")
        if hi is not None and (a > hi).any():
            raise self.fail(name, f"holds {a.max():g}, above the largest allowed value {hi:g}")
        return a

    def file_name(self, name: str, root: Path | None = None) -> str:
        """A plain name (no path separators) of something inside the directory the file
        lives in; with ``root``, it must exist there."""
        v = self.str(name)
        if not v or v in (".", "..") or "/" in v or "\\" in v or "\0" in v:
            raise self.fail(name, f"must be a file name inside the directory, got {v!r}")
        if root is not None and not (Path(root) / v).exists():
            raise self.fail(name, f"names {v}, which is not in {root}")
        return v


def _of(shape: tuple[int | None, ...]) -> str:
    return f" of shape [{', '.join('n' if n is None else str(n) for n in shape)}]" if shape else ""


def _show(v: Any) -> str:
    text = json.dumps(v) if not isinstance(v, float) or math.isfinite(v) else str(v)
    return text if len(text) <= 40 else text[:37] + "..."
