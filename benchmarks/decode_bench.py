"""End-to-end decode benchmark: a Llama-3-8B-shaped decoder with random bf16 weights built on
the GPU; tokens/s of one decode step captured in a CUDA graph, dense MLP vs the CUDA
SparseMLP kernel at 50% MLP sparsity, same harness, same run.

The step is the runtime's own GPU path (clada_export/runtime/cuda_graph.py): one decode
step captured in a CUDA graph, the static KV cache written in place, token ids,
positions and thresholds ``[layers, B, 2]`` copied into the graph's buffers before each
replay (alternating between two calibrated threshold sets, as the CLADA controller
would), so one graph serves every threshold. The next token is the argmax, on device.
Every variant runs the same non-MLP code: q/k/v as one GEMV and the fused decode
attention kernel (RoPE, cache write, attention), torch.compile'd or not as the row says.

MLP variants (all on the same model and weights):
- dense: ``F.linear`` on nn.Linear-layout copies of the MLP weights (cuBLAS; the faster
  dense layout in benchmarks/kernel_bench.py), thresholds ignored;
- kernel 0%: the CUDA kernel with zero thresholds (dense work through the sparse kernel);
- kernel s%: the CUDA kernel with per-layer thresholds calibrated for s% sparsity of |x|
  and |h| on this model's own activations.

Prints a table last; writes it to $OUT/decode_bench.md if OUT is set.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from clada_export.model.config import DecoderConfig  # noqa: E402
from clada_export.model.llama import Decoder  # noqa: E402
from clada_export.ops.native import sparse_mlp_cuda  # noqa: E402
from clada_export.runtime.cuda_graph import CudaGraphDecode  # noqa: E402

LLAMA3_8B = DecoderConfig(
    model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
    num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5, max_position_embeddings=8192,
    tie_word_embeddings=False, qkv_bias=False, o_bias=False, qk_norm=False, sliding_window=None, act="silu",
)


def build_model(cfg: DecoderConfig, dtype: torch.dtype, layers: int | None = None) -> Decoder:
    if layers is not None:
        cfg = DecoderConfig(**{**cfg.__dict__, "num_layers": layers})
    inv_freq = 1.0 / (500000.0 ** (torch.arange(0, cfg.head_dim, 2).float() / cfg.head_dim))
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = Decoder(cfg, inv_freq)
    finally:
        torch.set_default_dtype(prev)
    model = model.to_empty(device="cuda")
    model.inv_freq = inv_freq.cuda()
    gen = torch.Generator(device="cuda").manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                fan_in = p.shape[0] if name.endswith(("w_gate_t", "w_up_t", "w_down_t")) else p.shape[-1]
                p.normal_(0.0, 1.0 / math.sqrt(fan_in), generator=gen)
    return model.eval()


def dense_decode_mlp(model: Decoder):
    """The dense baseline: each MLP as cuBLAS GEMVs on nn.Linear-layout copies of its
    weights (the faster dense layout, see kernel_bench.py), thresholds ignored. Returned
    as per-layer ``decode_kernel`` callables, the hook the CUDA kernel uses too."""
    fns = []
    for layer in model.layers:
        wg, wu, wd = (w.detach().t().contiguous() for w in (layer.mlp.w_gate_t, layer.mlp.w_up_t, layer.mlp.w_down_t))
        fns.append(lambda x, _g, _u, _d, _t, _a, wg=wg, wu=wu, wd=wd:
                   F.linear(F.silu(F.linear(x, wg)) * F.linear(x, wu), wd))
    return fns


@torch.no_grad()
def calibrate(model: Decoder, sparsity: float, batch: int, prompt_len: int = 32) -> torch.Tensor:
    """Per-layer thresholds ``[L, B, 2]`` at the given quantile of |x| and |h| of the MLP
    inputs of a random prompt (dense run)."""
    cfg = model.cfg
    inputs: dict[int, torch.Tensor] = {}
    hooks = [layer.mlp.register_forward_pre_hook(lambda m, a, i=i: inputs.__setitem__(i, a[0].detach()))
             for i, layer in enumerate(model.layers)]
    ids = torch.randint(0, cfg.vocab_size, (1, prompt_len), device="cuda")
    pos = torch.arange(prompt_len, device="cuda")[None]
    kc, vc = model.new_cache(1, prompt_len)
    model(ids, pos, kc, vc, torch.zeros(cfg.num_layers, 1, 2, device="cuda"))
    for h in hooks:
        h.remove()
    thr = torch.zeros(cfg.num_layers, batch, 2, device="cuda")
    for i, layer in enumerate(model.layers):
        x = inputs[i].float()
        t_in = torch.quantile(x.abs().flatten(), sparsity)
        xs = torch.where(x.abs() > t_in, x, torch.zeros_like(x)).to(inputs[i].dtype)
        h = layer.mlp.intermediate(xs).float().abs()
        t_mid = torch.quantile(h.flatten(), sparsity)
        thr[i, :, 0] = t_in
        thr[i, :, 1] = t_mid
    return thr


@torch.no_grad()
def time_decode(model: Decoder, batch: int, thresholds: list[torch.Tensor], steps: int, repeats: int,
                max_len: int, start: int = 8, compile: bool = False) -> float:
    """Median seconds per decode step of the runtime's GPU path (CudaGraphDecode: static
    cache written in place, thresholds copied into the graph's buffer before each
    replay), with the MLP routing the caller set on the model."""
    cfg = model.cfg
    if compile:
        torch._dynamo.reset()
    kc, vc = model.new_cache(batch, max_len)
    graph = CudaGraphDecode(model, batch, max_len, kc, vc, use_kernels=False, compile=compile)
    tok = torch.randint(0, cfg.vocab_size, (batch,), device="cuda")
    times = []
    for _ in range(repeats):
        pos = torch.full((batch,), start, dtype=torch.long, device="cuda")
        graph.step(tok, pos, thresholds[0])  # warm
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for k in range(steps):
            logits, _, _ = graph.step(tok, pos, thresholds[k % len(thresholds)])
            tok = logits.argmax(-1)
            pos += 1
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e-3 / steps)
        assert int(pos.max()) < max_len
    del graph
    for layer in model.layers:
        layer.self_attn.inplace_cache = False
    return statistics.median(times)


def set_mlp(model: Decoder, fns) -> None:
    """Per-layer decode MLP: a list of callables, one callable for all, or None (reference op)."""
    for i, layer in enumerate(model.layers):
        layer.mlp.decode_kernel = fns[i] if isinstance(fns, list) else fns


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", nargs="*", type=int, default=[1, 4])
    ap.add_argument("--sparsity", nargs="*", type=float, default=[0.5, 0.7])
    ap.add_argument("--layers", type=int, default=None, help="fewer layers (quick checks)")
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--compile-batches", nargs="*", type=int, default=[1],
                    help="also time the torch.compile'd model (captured the same way) at these batches")
    args = ap.parse_args()

    dtype = torch.bfloat16
    model = build_model(LLAMA3_8B, dtype, args.layers)
    cfg = model.cfg
    nparams = sum(p.numel() for p in model.parameters())
    gpu = torch.cuda.get_device_name()
    print(f"# {gpu}: Llama-3-8B-shaped decoder, {cfg.num_layers} layers, {nparams/1e9:.2f} B params, bf16", flush=True)

    rows = []
    variants = [(b, False) for b in args.batches] + [(b, True) for b in args.compile_batches]
    for batch, compiled in variants:
        tag = " [compiled]" if compiled else ""
        sparsities = args.sparsity if not compiled else args.sparsity[:1]
        zero = torch.zeros(cfg.num_layers, batch, 2, device="cuda")
        # dense baseline: cuBLAS on nn.Linear-layout copies
        dense_fns = dense_decode_mlp(model)
        set_mlp(model, dense_fns)
        t_dense = time_decode(model, batch, [zero], args.steps, args.repeats, args.max_len, compile=compiled)
        del dense_fns
        set_mlp(model, None)
        torch.cuda.empty_cache()
        rows.append(("dense (cuBLAS MLP)" + tag, batch, 0.0, t_dense))
        print(f"B={batch}{tag} dense: {t_dense*1e3:.3f} ms/step, {batch/t_dense:.1f} tok/s", flush=True)
        thr_sets = {}
        for s in sparsities:
            base_thr = calibrate(model, s, batch)
            # two threshold sets around the calibrated one, swapped in place every step
            thr_sets[s] = [base_thr, base_thr * 1.02]
        set_mlp(model, sparse_mlp_cuda)
        if not compiled:
            t0 = time_decode(model, batch, [zero], args.steps, args.repeats, args.max_len, compile=compiled)
            rows.append(("kernel, 0% (zero thresholds)" + tag, batch, 0.0, t0))
            print(f"B={batch}{tag} kernel 0%: {t0*1e3:.3f} ms/step", flush=True)
        for s in sparsities:
            t = time_decode(model, batch, thr_sets[s], args.steps, args.repeats, args.max_len, compile=compiled)
            rows.append((f"kernel, {s*100:.0f}% MLP sparsity" + tag, batch, s, t))
            print(f"B={batch}{tag} kernel {s*100:.0f}%: {t*1e3:.3f} ms/step", flush=True)
        set_mlp(model, None)

    lines = [
        f"# Decode benchmark on {gpu}",
        "",
        f"Llama-3-8B-shaped decoder ({cfg.num_layers} layers, random bf16 weights), one decode step per "
        f"CUDA-graph replay, KV cache {args.max_len} slots, thresholds rewritten in place between replays; "
        f"median of {args.repeats} x {args.steps} steps.",
        "",
        "| MLP | B | ms/step | tokens/s | speedup vs dense |",
        "|---|---|---|---|---|",
    ]
    dense = {(b, "[compiled]" in name): t for name, b, s, t in rows if name.startswith("dense")}
    for name, b, s, t in rows:
        lines.append(f"| {name} | {b} | {t*1e3:.3f} | {b/t:.1f} | {dense[(b, '[compiled]' in name)]/t:.2f} |")
    text = "\n".join(lines) + "\n"
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "decode_bench.md").write_text(text)
    print()
    print(text)


if __name__ == "__main__":
    main()
