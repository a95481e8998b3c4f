"""Diagnostic (GPU): how far bf16 decode is from the float32 model with thresholds, with and
without the CUDA kernel, in the scenario of tests/test_gpu_decode.py (small random Llama,
thresholds = prompt statistics x 2 x sparsity, teacher-forced on the float32 picks).

If the bf16 reference path (no kernel) is as far from float32 as the kernel path, the
distance comes from bf16 rounding moving activations across thresholds, not from the kernel.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def rel(a, b):
    a, b = a.double(), b.double()
    e = float((a - b).norm() / b.norm())
    return e if e == e else float("inf")


def main() -> None:
    from transformers import AutoModelForCausalLM, LlamaConfig

    from clada_export.model.loading import load_decoder
    from clada_export.runtime.backends import TorchBackend

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.05)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "llama"
        model.save_pretrained(path)
        ref_model, _ = load_decoder(path, dtype=torch.float32, device="cuda")
        eager_model, _ = load_decoder(path, dtype=torch.bfloat16, device="cuda")
        graph_model, _ = load_decoder(path, dtype=torch.bfloat16, device="cuda")
    backends = {
        "fp32 ref": TorchBackend(ref_model, "cuda"),
        "bf16 ref (eager, reference op)": TorchBackend(eager_model, "cuda"),
        "bf16 graph (kernel)": TorchBackend(graph_model, "cuda", cuda_graph=True),
    }
    B, T, L = 2, 12, ref_model.cfg.num_layers
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 512, (B, T), generator=g)
    lens = torch.tensor([T, 9])
    for sparsity in (0.0, 0.25, 0.5):
        for be in backends.values():
            be.start(B, 64)
        zeros = torch.zeros(L, B, 2)
        outs = {k: be.prefill(ids, lens, zeros) for k, be in backends.items()}
        a = outs["fp32 ref"]
        th = (a.act_stats * (2 * sparsity)).float().cpu() if sparsity else zeros
        tok = a.logits.argmax(-1).cpu()
        worst = {k: 0.0 for k in backends if k != "fp32 ref"}
        worst["kernel vs bf16 ref"] = 0.0
        for step in range(8):
            pos = lens + step
            outs = {k: be.decode(tok, pos, th) for k, be in backends.items()}
            ref = outs["fp32 ref"].logits
            for k in backends:
                if k != "fp32 ref":
                    worst[k] = max(worst[k], rel(outs[k].logits, ref))
            worst["kernel vs bf16 ref"] = max(worst["kernel vs bf16 ref"],
                                              rel(outs["bf16 graph (kernel)"].logits,
                                                  outs["bf16 ref (eager, reference op)"].logits))
            tok = ref.argmax(-1).cpu()
        print(f"sparsity {sparsity}: worst rel err of logits over 8 decode steps: " +
              ", ".join(f"{k}: {v:.3e}" for k, v in worst.items()), flush=True)


if __name__ == "__main__":
    main()
