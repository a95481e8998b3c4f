"""Write ``interp_golden.json``: threshold-table interpolation inputs and their exact
outputs, which the Python (``clada_export.profile.interp_rows``) and the C++
(``clada::Profile::interp``) interpolations must both reproduce bit for bit
(``tests/test_controller.py``, CTest ``interp_golden``).

The expected values come from ``numpy.interp``, the arithmetic both implementations
promise. Run from the repository root only to add cases:
``python tests/data/make_interp_golden.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parent / "interp_golden.json"


def group(name: str, levels: np.ndarray, table: np.ndarray, rng: np.random.Generator) -> dict:
    L, S = table.shape
    queries = [
        np.full(L, levels[0] - 0.25), np.full(L, levels[0]), np.full(L, levels[-1]), np.full(L, levels[-1] + 0.5),
        levels[np.arange(L) % S],                               # exactly on a level
        levels[(np.arange(L) + 1) % S],
        0.5 * (levels[np.arange(L) % (S - 1)] + levels[np.arange(L) % (S - 1) + 1]),  # midpoints
        np.nextafter(levels[np.arange(L) % S], np.inf),        # one ulp past a level
        np.nextafter(levels[np.arange(L) % S], -np.inf),       # one ulp before
    ]
    queries += [rng.uniform(levels[0] - 0.05, levels[-1] + 0.05, size=L) for _ in range(12)]
    x = np.stack(queries)
    expected = np.array([[np.interp(xk[l], levels, table[l]) for l in range(L)] for xk in x])
    return {"name": name, "levels": levels.tolist(), "table": table.tolist(), "x": x.tolist(),
            "expected": expected.tolist()}


def main() -> None:
    rng = np.random.default_rng(2026)
    levels = np.round(np.arange(20) * 0.05, 2)  # the profile's default levels
    q = -np.log1p(-levels)
    uniform = np.stack([b * q for b in (0.7, 1.0, 1.3, 2.1)])
    odd_levels = np.array([0.0, 0.1, 0.15, 0.4, 0.41, 0.7, 0.9])  # uneven spacing
    flat = np.array([[0.0, 0.2, 0.2, 0.2, 0.5, 0.9, 1.7],       # flat stretch
                     [0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1],       # constant row
                     [1e-8, 3e-8, 1e-7, 0.3, 0.30000001, 2.0, 1e3]])  # wide dynamic range
    doc = {
        "about": "inputs and numpy.interp's exact outputs for clada_export.profile.interp_rows and "
                 "clada::Profile::interp; written by make_interp_golden.py",
        "groups": [group("default levels", levels, uniform, rng), group("uneven levels", odd_levels, flat, rng)],
    }
    OUT.write_text(json.dumps(doc, indent=1, allow_nan=False) + "\n")
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
