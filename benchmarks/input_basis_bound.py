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

Prints one table (mean over layers) and writes nothing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clada_export.cli.calibrate_cmd import calibration_windows, load_tokenizer  # noqa: E402
from clada_export.model.loading import load_decoder, resolve_model_dir  # noqa: E402
from clada_export.ops.sparse_mlp import sparse_mlp_op  # noqa: E402

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", help="checkpoint directory (default: the default model)")
    ap.add_argument("--tokens", type=int, default=4096, help="calibration tokens (3/4 fit the bases, 1/4 measure)")
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


if __name__ == "__main__":
    main()
