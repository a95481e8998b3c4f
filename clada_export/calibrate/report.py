"""An :class:`~clada_export.calibrate.evaluate.EvalResult` as a table, as eval.json and as
a plot of perplexity against sparsity (uniform vs greedy allocation)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from clada_export.atomic import replaced_file, write_json
from clada_export.calibrate.evaluate import EvalResult


def _pct(p: float, dense: float) -> str:
    return f"{100.0 * (p / dense - 1.0):+.1f}%"


def table(res: EvalResult) -> list[str]:
    """The lines ``clada-export eval`` prints."""
    dense_ppl = res.dense_perplexity
    lines = [f"perplexity on {res.tokens} tokens of {res.data} (windows of {res.window})"]
    if res.agreement_prompts:
        lines.append(f"agree: fraction of identical tokens in greedy {res.new_tokens}-token continuations of "
                     f"{res.agreement_prompts} prompts; prefix: fraction before the first difference")
    lines.append(f"{'row':<16} {'target':>7} {'reached':>8} {'ppl':>9} {'vs dense':>9} {'agree':>7} {'prefix':>7}")
    for r in res.rows:
        agree = "-" if r.get("agreement") is None else f"{r['agreement']:.3f}"
        prefix = "-" if r.get("agreement_prefix") is None else f"{r['agreement_prefix']:.3f}"
        lines.append(f"{r['name']:<16} {r['level']:>7.3f} {r['byte_sparsity']:>8.3f} {r['perplexity']:>9.3f} "
                     f"{_pct(r['perplexity'], dense_ppl):>9} {agree:>7} {prefix:>7}")
    d = res.dynamic
    if d:
        lines.append(f"dynamic vs static at the same mean sparsity (windows of {d['window']}, prefix {d['prefix']} "
                     f"dense; dense {d['dense']:.3f}):")
        for key in ("one_pass", "stepwise"):
            m = d[key]
            line = (f"  {key.replace('_', ' '):<9} {m['tokens']:>6} tokens: dynamic {m['dynamic']['perplexity']:.3f} "
                    f"at {m['dynamic']['byte_sparsity']:.4f}, static there {m['static_at_dynamic_sparsity']:.3f}; "
                    f"NLL difference {m['dynamic_minus_static_nll']:+.4f}")
            lo, hi = m["nll_difference_95ci"]
            ci = f"95% CI {lo:+.4f} .. {hi:+.4f}" if math.isfinite(lo) else "one window: no interval"
            lines.append(f"{line} ({ci})")
        c = d["modes_compared"]
        lines.append(f"  modes on the same {c['tokens']} tokens: dynamic step by step {c['dynamic_stepwise']:.3f}, "
                     f"one pass {c['dynamic_one_pass']:.3f}")
    return lines


def _clean(o: Any) -> Any:
    """Strict JSON: non-finite numbers become null, numpy scalars Python ones."""
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, dict):
        return {k: _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    if isinstance(o, np.generic):
        return _clean(o.item())
    return o


def save_json(res: EvalResult, path: Path) -> None:
    write_json(path, _clean(res.to_dict()))


def plot(res: EvalResult, path: Path) -> None:
    """Perplexity against target sparsity, uniform and greedy, the profile as a star."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dense = res.dense_perplexity
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=110)
    for method, style in (("uniform", "o--"), ("greedy", "s-")):
        pts = sorted((r["level"], r["perplexity"]) for r in res.rows if r["method"] == method and r["name"] != "profile")
        if pts:
            xs, ys = zip(*([(0.0, dense)] + pts))
            ax.plot(xs, ys, style, label=f"{method} allocation")
    for r in (r for r in res.rows if r["name"] == "profile"):
        ax.plot([r["level"]], [r["perplexity"]], "k*", markersize=12, label=f"profile ({r['method']})")
    ax.axhline(dense, color="gray", lw=0.8, ls=":", label=f"dense ({dense:.2f})")
    ax.set_xlabel("target sparsity (fraction of MLP weight bytes skipped)")
    ax.set_ylabel("perplexity")
    ax.set_yscale("log")
    ax.set_title(f"{Path(res.model).name}: {res.tokens} held-out tokens", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with replaced_file(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def plot_signals(result, path: Path, title: str = "") -> None:
    """Surprisal, entropy and chosen sparsity per generated token (first sequence)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from clada_export.atomic import replaced_file

    steps = np.arange(result.surprisal.shape[0])
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 5), sharex=True)
    ax1.plot(steps, result.surprisal[:, 0], label="surprisal (nats)", color="tab:red")
    ax1.plot(steps, result.entropy[:, 0], label="entropy (nats)", color="tab:blue")
    ax1.set_ylabel("cognitive load")
    ax1.legend(loc="upper right")
    ax1.set_title(f"CLADA signals per token: {title}")
    ax2.step(steps, result.sparsity[:, 0], where="post", color="tab:green", label="chosen MLP sparsity")
    dense = np.where(result.denser[:, 0])[0]
    ax2.scatter(dense, result.sparsity[dense, 0], color="tab:orange", s=14, zorder=3, label="went denser")
    ax2.set_ylabel("byte sparsity")
    ax2.set_xlabel("generated token")
    ax2.legend(loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with replaced_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
