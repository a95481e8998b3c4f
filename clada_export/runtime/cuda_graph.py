"""The torch backend's GPU decode path: the decode step captured once in a CUDA graph.

Weights are already in the kernel layout (the Decoder stores them so); every MLP runs
the SparseMLP CUDA kernel for its one-token rows; the KV cache is preallocated and
written in place; token ids, positions and the thresholds ``[L, B, 2]`` live in static
device buffers that are overwritten between replays, so one graph serves every
threshold the controller chooses.
"""

from __future__ import annotations

import torch

from clada_export.model.llama import Decoder, cognitive_signals


def use_decode_kernels(model: Decoder, enable: bool = True) -> None:
    """Route every MLP's decode steps through the CUDA kernel (or back to the reference)."""
    kernel = None
    if enable:
        from clada_export.ops.native import load_library, sparse_mlp_cuda

        load_library()  # the clear error (how to build it) now, not inside a capture
        kernel = sparse_mlp_cuda
    for layer in model.layers:
        layer.mlp.decode_kernel = kernel


class CudaGraphDecode:
    """``step(tokens [B], position [B], thresholds [L, B, 2]) -> (logits, entropy,
    logsumexp)``, replaying one captured graph. Outputs are static buffers: read them
    before the next step."""

    def __init__(self, model: Decoder, batch: int, max_len: int, k_caches: list[torch.Tensor],
                 v_caches: list[torch.Tensor], use_kernels: bool = True, compile: bool = False):
        """``use_kernels``: route the MLPs' decode steps through the SparseMLP CUDA
        kernel (False keeps the model's MLP routing as it is, e.g. a benchmark's dense
        baseline). ``compile``: torch.compile the step before capture (fuses the many
        small non-MLP kernels of each layer; the kernel stays an opaque custom op)."""
        dev = k_caches[0].device
        if dev.type != "cuda":
            raise ValueError("CudaGraphDecode needs the model and caches on a CUDA device")
        self.model = model
        for layer in model.layers:
            layer.self_attn.inplace_cache = True
        if use_kernels:
            use_decode_kernels(model)
        self.k, self.v = k_caches, v_caches
        L = model.cfg.num_layers
        self.tokens = torch.zeros(batch, 1, dtype=torch.long, device=dev)
        self.position = torch.zeros(batch, dtype=torch.long, device=dev)
        self.thresholds = torch.zeros(L, batch, 2, dtype=torch.float32, device=dev)
        self._step_fn = torch.compile(self._forward, dynamic=False) if compile else self._forward
        # warm up on a side stream (kernels load, workspaces allocate, compilation runs),
        # then capture
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side), torch.no_grad():
            for _ in range(3):
                self._step_fn()
        torch.cuda.current_stream(dev).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), torch.no_grad():
            self.logits, self.entropy, self.logsumexp = self._step_fn()

    def _forward(self):
        out = self.model(self.tokens, self.position[:, None], self.k, self.v, self.thresholds)
        entropy, lse = cognitive_signals(out.logits)
        return out.logits, entropy, lse

    def step(self, tokens: torch.Tensor, position: torch.Tensor, thresholds: torch.Tensor):
        self.tokens.copy_(tokens.reshape(-1, 1), non_blocking=True)
        self.position.copy_(position, non_blocking=True)
        self.thresholds.copy_(thresholds, non_blocking=True)
        self.graph.replay()
        return self.logits, self.entropy, self.logsumexp
