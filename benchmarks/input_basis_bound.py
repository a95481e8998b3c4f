"""How much could a better basis for the MLP input buy at the same sparsity?

The SparseMLP op zeroes the small entries of the MLP input ``x`` as it comes. An
equivalent model can present ``x`` in another basis first and fold the inverse into the
weights: a per-channel scale folded into the RMSNorm weight and W_gate/W_up (WINA-style:
threshold |x_j| * ||W_j||), one orthogonal rotation of the whole residual stream
(QuaRot-style: the rotation passes through every RMSNorm and folds into every weight), or
a rotation per layer (PCA of that layer's ``x``), which folds into nothing and costs an
extra hidden x hidden matrix per layer (reported as a share of the MLP's weight bytes).

For each, on held-out calibration rows of every layer, the relative squared error of the
MLP output (the reference op, float64, intermediate dense) at the same input sparsity:
the error that the calibration's KL model turns into KL (allocation.py). Run on the
default model:

    python benchmarks/input_basis_bound.py [MODEL] [--tokens 4096]

Prints one table (mean over layers) and writes nothing. ``--end-to-end`` also builds the
globally rotated model (equivalent to the original: the rotated normalised residual,
times a per-layer scale, feeds the MLP, whose input weights absorb the inverse), calibrates
both models as ``clada-export calibrate`` does, and prints their perplexity on held-out
evaluation text at greedy allocations of 40% and 50% (about 10 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from clada_export.calibrate.allocation import run_calibration
from clada_export.calibrate.quality import perplexity
from clada_export.data import calibration_windows, evaluation_windows
from clada_export.model.loading import load_decoder, load_tokenizer, resolve_model_dir
from clada_export.ops.sparse_mlp import sparse_mlp_op

LEVELS = (0.3, 0.4, 0.5)


def mlp_inputs(model, windows: torch.Tensor, batch: int = 4) -> list[torch.Tensor]:
    """Every layer's MLP input over the windows, ``[tokens, hidden]`` float64."""
    L = model.cfg.num_layers
    rows: list[list[torch.Tensor]] = [[] for _ in range(L)]
    hooks = [layer.mlp.register_forward_pre_hook(
        lambda m, a, i=i: rows[i].append(a[0].reshape(-1, a[0].shape[-1]).double()))
        for i, layer in enumerate(model.layers)]
    try:
        with torch.inference_mode():
            for s in range(0, windows.shape[0], batch):
                ids = windows[s:s + batch]
                B, T = ids.shape
                k, v = model.new_cache(B, T)
                model(ids, torch.arange(T)[None].expand(B, T), k, v, torch.zeros(L, B, 2))
    finally:
        for h in hooks:
            h.remove()
    return [torch.cat(r) for r in rows]


def keep_largest(y: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Zero the fraction ``sparsity`` of entries of smallest magnitude (one threshold for all)."""
    t = y.abs().flatten().kthvalue(max(1, int(sparsity * y.numel()))).values
    return y * (y.abs() > t)


class RotatedMLPInput(torch.nn.Module):
    """Stands in for a layer's post-attention RMSNorm: ``rmsnorm(r) @ Q * scale``. With the
    residual stream stored rotated by Q this is an RMSNorm whose weight is ``scale``; here
    the residual stays as it is, so the rotation is applied in place (same numbers)."""

    def __init__(self, eps: float, q: torch.Tensor, scale: torch.Tensor):
        super().__init__()
        self.eps = eps
        self.register_buffer("q", q.float())
        self.register_buffer("scale", scale.float())

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        rf = r.float()
        n = rf * torch.rsqrt(rf.pow(2).mean(-1, keepdim=True) + self.eps)
        return ((n @ self.q) * self.scale).to(r.dtype)


def rotate_mlp_inputs(model, q: torch.Tensor) -> None:
    """Make every MLP see its input in the basis ``q`` (times a WINA-style per-channel
    scale) and fold the inverse into W_gate/W_up: the model computes the same function."""
    with torch.no_grad():
        for layer in model.layers:
            norm, m = layer.post_attention_layernorm, layer.mlp
            gamma = norm.weight.detach().double()
            folded = [(q.T @ (gamma[:, None] * w.detach().double())) for w in (m.w_gate_t, m.w_up_t)]
            scale = torch.cat(folded, 1).norm(dim=1)
            for w, f in zip((m.w_gate_t, m.w_up_t), folded):
                w.copy_((f / scale[:, None]).to(w.dtype))
            layer.post_attention_layernorm = RotatedMLPInput(norm.eps, q, scale)


def end_to_end(plain, model_dir: Path, q: torch.Tensor, eval_tokens: int) -> None:
    tok = load_tokenizer(model_dir)
    table_w, held_w, _ = calibration_windows(tok, None, 4096, 512)
    windows, eval_source = evaluation_windows(tok, None, eval_tokens, 512)
    print(f"\nperplexity on {windows.numel()} tokens of {eval_source}, greedy allocations "
          f"(calibrated on each model as `clada-export calibrate` does)")
    print(f"{'model':<18}{'dense':>8}" + "".join(f"{f'{t:.0%} target':>22}" for t in (0.4, 0.5)))
    dense_ppl = {}
    for name in ("plain", "global rotation"):
        if name == "plain":
            model = plain
        else:
            model, _ = load_decoder(model_dir)
            model.eval()
            rotate_mlp_inputs(model, q)
        dense = perplexity(model, windows, None, measure_sparsity=False, desc=f"{name}: dense")
        dense_ppl[name] = dense.perplexity
        if abs(dense.perplexity / dense_ppl["plain"] - 1.0) > 1e-4:
            sys.exit(f"the rotation changed the dense model: perplexity {dense.perplexity:.4f} vs "
                     f"{dense_ppl['plain']:.4f}; it must be an equivalent transform")
        cal = run_calibration(model, table_w, held_w)
        cells = []
        for target in (0.4, 0.5):
            r = perplexity(model, windows, cal.thresholds(*cal.allocate(target, "greedy")[:2]),
                           desc=f"{name}: {target:.0%}")
            cells.append(f"{r.perplexity:>9.3f} at {r.byte_sparsity:.3f}")
        print(f"{name:<18}{dense.perplexity:>8.3f}" + "".join(f"{c:>22}" for c in cells), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", help="checkpoint directory (default: the default model)")
    ap.add_argument("--tokens", type=int, default=4096, help="calibration tokens (3/4 fit the bases, 1/4 measure)")
    ap.add_argument("--end-to-end", action="store_true",
                    help="also calibrate the globally rotated model and compare perplexity at 40%% and 50%%")
    ap.add_argument("--eval-tokens", type=int, default=20480, help="evaluation tokens for --end-to-end")
    args = ap.parse_args()

    model_dir = resolve_model_dir(args.model)
    model, _ = load_decoder(model_dir)
    model.eval()
    windows, _, source = calibration_windows(load_tokenizer(model_dir), None, args.tokens, 128)
    X = mlp_inputs(model, windows)
    n = X[0].shape[0]
    fit, test = slice(0, 3 * n // 4), slice(3 * n // 4, n)
    L, H, inter = model.cfg.num_layers, model.cfg.hidden_size, model.cfg.intermediate_size
    gammas = [layer.post_attention_layernorm.weight.detach().double() for layer in model.layers]
    # One rotation for the residual stream: PCA of the normalised residual (x / gamma) pooled
    # over layers; each layer then scales its rotated input WINA-style (its new norm weight).
    pooled = sum((X[i][fit] / gammas[i]).T @ (X[i][fit] / gammas[i]) for i in range(L))
    q_global = torch.linalg.eigh(pooled).eigenvectors

    errors = {name: {s: [] for s in LEVELS} for name in ("magnitude", "wina", "global rotation", "per-layer rotation")}
    zero = torch.zeros(1, 2, dtype=torch.float64)
    for i, layer in enumerate(model.layers):
        m = layer.mlp
        wg, wu, wd = (w.detach().double() for w in (m.w_gate_t, m.w_up_t, m.w_down_t))
        w_in = torch.cat([wg, wu], 1)  # [hidden, 2 inter]: row j is what x_j multiplies

        def out(x):
            return sparse_mlp_op(x[None], wg, wu, wd, zero, m.act)[0]

        x = X[i][test]
        ref = out(x)
        ref_sq = float((ref ** 2).sum())
        q_layer = torch.linalg.eigh(X[i][fit].T @ X[i][fit]).eigenvectors
        scale = w_in.norm(dim=1)
        g_scale = (q_global.T @ (gammas[i][:, None] * w_in)).norm(dim=1)
        for s in LEVELS:
            candidates = {
                "magnitude": keep_largest(x, s),
                "wina": keep_largest(x * scale, s) / scale,
                "global rotation": (keep_largest((x / gammas[i]) @ q_global * g_scale, s) / g_scale) @ q_global.T
                * gammas[i],
                "per-layer rotation": keep_largest(x @ q_layer, s) @ q_layer.T,
            }
            for name, xs in candidates.items():
                errors[name][s].append(float(((out(xs) - ref) ** 2).sum()) / ref_sq)

    extra = H * H / (3 * H * inter)
    print(f"MLP output relative squared error at input sparsity s (intermediate dense), mean over {L} layers;")
    print(f"{n - 3 * n // 4} held-out rows per layer of {source}")
    print(f"{'input basis':<20}" + "".join(f"{f's = {s:.1f}':>12}" for s in LEVELS) + "   extra weight bytes")
    base = {s: np.mean(errors["magnitude"][s]) for s in LEVELS}
    for name, per_level in errors.items():
        cells = "".join(f"{np.mean(per_level[s]):>8.4f} {base[s] / np.mean(per_level[s]):>3.1f}x" for s in LEVELS)
        cost = f"+{100 * extra:.1f}% of the MLP" if name == "per-layer rotation" else "none"
        print(f"{name:<20}{cells}   {cost}")
    print("(Nx: error of plain magnitude thresholding / this basis's error)")
    if args.end_to_end:
        end_to_end(model, model_dir, q_global, args.eval_tokens)


if __name__ == "__main__":
    main()
