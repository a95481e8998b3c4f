"""What the dynamic controller's signals correlate with, on perplexity windows.

Per decode step t the controller reads the surprisal and entropy of token t and sets the
thresholds of the step that predicts token t + 1. If the signals are to help, they
should mark the steps where static sparsity does the most damage: NLL(static, t + 1) -
NLL(dense, t + 1). This module measures that (Spearman correlation over all steps), and
per controller state (normal / denser / sparser) the static damage and the dynamic
controller's NLL against static at the same steps.

``python -m clada_export.evaluation.signals MODEL SWEEP_DIR [--windows N] [--level S]``
(``MODEL``: ``default`` or a named model; ``SWEEP_DIR``: a sweep directory whose
``calibration/profile-S.json`` holds the profile) prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch


def _ranks(x: np.ndarray) -> np.ndarray:
    return np.argsort(np.argsort(x, kind="stable"), kind="stable").astype(np.float64)


def spearman(x: np.ndarray, y: np.ndarray, permutations: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Spearman's rho (Pearson on ranks; the signals are continuous, so ties are rare) and
    a two-sided permutation p-value."""
    rx, ry = _ranks(x), _ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = float(np.sqrt((rx ** 2).sum() * (ry ** 2).sum()))
    rho = float((rx * ry).sum() / denom)
    rng = np.random.default_rng(seed)
    null = np.array([(rx * rng.permutation(ry)).sum() / denom for _ in range(permutations)])
    return rho, float((np.sum(np.abs(null) >= abs(rho)) + 1) / (permutations + 1))


def signal_damage(model, profile, windows: torch.Tensor, level: float, prefix: int = 32) -> dict:
    """The correlation summary over ``windows [N, T]`` (first ``prefix`` tokens dense)."""
    from clada_export.calibrate.allocation import calibration_from_profile
    from clada_export.evaluation.methods import Method, static_method
    from clada_export.evaluation.scoring import score_continuations
    from clada_export.runtime.controller import ControllerConfig

    cal = calibration_from_profile(profile)
    s_in, s_mid, _ = cal.allocate(level, "greedy")
    static = static_method("greedy", level, cal.thresholds(s_in, s_mid))
    dense = static_method("dense", None, None)
    dyn = Method("dynamic", level, "dynamic", profile=profile, config=ControllerConfig())
    u, e, dmg, dd, states, per_window = [], [], [], [], [], []
    for w in range(windows.shape[0]):
        ids = windows[w].tolist()
        ctx, cont = ids[:prefix], [ids[prefix:]]
        dn, st, dy = (score_continuations(model, m, ctx, cont, trace=m is dyn) for m in (dense, static, dyn))
        u.append([r["surprisal"] for r in dy.trace])
        e.append([r["entropy"] for r in dy.trace])
        states.append([r["state"] for r in dy.trace])
        dmg.append(st.token_logprobs[0][1:] * -1.0 + dn.token_logprobs[0][1:])
        dd.append(dy.token_logprobs[0][1:] * -1.0 + st.token_logprobs[0][1:])
        per_window.append({k: float(-s.token_logprobs[0].astype(np.float64).mean())
                           for k, s in (("dense", dn), ("static", st), ("dynamic", dy))})
    u, e, dmg, dd = (np.concatenate([np.asarray(x, np.float64) for x in a]) for a in (u, e, dmg, dd))
    states = np.concatenate([np.asarray(s) for s in states])
    out = {"level": level, "windows": int(windows.shape[0]), "steps": int(u.size), "nll_per_window": per_window}
    for name, x in (("surprisal", u), ("entropy", e)):
        rho, pval = spearman(x, dmg)
        out[f"spearman_{name}_vs_static_damage"] = {"rho": rho, "p_permutation": pval}
    out["per_state"] = {s: {"steps": int((states == s).sum()),
                            "static_damage": float(dmg[states == s].mean()) if (states == s).any() else None,
                            "dynamic_minus_static": float(dd[states == s].mean()) if (states == s).any() else None}
                        for s in ("normal", "denser", "sparser")}
    return out


def main(argv: list[str] | None = None) -> None:
    from clada_export.data import evaluation_windows
    from clada_export.model.loading import load_decoder, load_tokenizer
    from clada_export.model.registry import resolve_model
    from clada_export.profile import SparsityProfile

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    p.add_argument("sweep_dir")
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--level", type=float, default=0.4)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    d = resolve_model(None if a.model == "default" else a.model)
    model, _ = load_decoder(d)
    model.eval()
    windows, _ = evaluation_windows(load_tokenizer(d), None, a.windows * 256, 256)
    profile = SparsityProfile.load(Path(a.sweep_dir) / "calibration" / f"profile-{a.level:.2f}.json")
    print(json.dumps(signal_damage(model, profile, windows, a.level), indent=1))


if __name__ == "__main__":
    main()
