"""The torch backend's GPU decode path: the decode step captured once in a CUDA graph.

Weights are already in the kernel layout (the Decoder stores them so); every MLP runs
the SparseMLP CUDA kernel for its one-token rows; every attention runs its q/k/v
projections as one GEMV, and RoPE, cache write and attention as one fused decode
attention kernel; the KV cache is preallocated and written in place; token ids,
positions and the thresholds ``[L, B, 2]`` live in static device buffers that are
overwritten between replays, so one graph serves every threshold the controller chooses.
"""

from __future__ import annotations

import functools

import torch

from clada_export.model.llama import Decoder, cognitive_signals


def use_decode_kernels(model: Decoder, enable: bool = True, attention: bool = True) -> None:
    """Route every decode step's MLPs through the SparseMLP CUDA kernel and, with
    ``attention``, its attention through the fused decode attention
    (``use_decode_attention``); or back to the reference."""
    kernel = None
    if enable:
        from clada_export.ops.native import load_library, sparse_mlp_cuda

        load_library()  # the clear error (how to build it) now, not inside a capture
        kernel = sparse_mlp_cuda
    for layer in model.layers:
        layer.mlp.decode_kernel = kernel
    if attention:
        use_decode_attention(model, enable)


def use_decode_attention(model: Decoder, enable: bool = True) -> bool:
    """Run one-token attention steps as one GEMV over concatenated q/k/v weights and the
    fused decode attention kernel, where the kernel supports the model's attention shape
    and dtype; returns whether it does. ``enable=False`` restores the reference attention
    (the q/k/v weights stay concatenated: same values, same math)."""
    kernel = None
    if enable:
        from clada_export.ops.native import decode_attention_cuda, decode_attention_supported

        cfg = model.cfg
        dtype = model.embed_tokens.weight.dtype
        if decode_attention_supported(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, dtype):
            # The kernel computes RoPE itself, from the model's own frequencies and scaling
            # (float32: a model cast with .to(dtype) holds them rounded to that dtype, and
            # its forward multiplies them in float32 as they are).
            kernel = functools.partial(decode_attention_cuda, inv_freq=model.inv_freq.float(),
                                       rope_scale=model.rope_scaling)
    for layer in model.layers:
        if kernel is not None:
            layer.self_attn.fuse_qkv()
        layer.self_attn.decode_attention = kernel
    return kernel is not None


class CudaGraphDecode:
    """``step(tokens [B], position [B], thresholds [L, B, 2]) -> (logits, entropy,
    logsumexp)``, replaying one captured graph. Outputs are static buffers: read them
    before the next step."""

    def __init__(self, model: Decoder, batch: int, max_len: int, k_caches: list[torch.Tensor],
                 v_caches: list[torch.Tensor], use_kernels: bool = True, compile: bool = False,
                 fused_attention: bool = True):
        """``use_kernels``: route the MLPs' decode steps through the SparseMLP CUDA
        kernel (False keeps the model's MLP routing as it is, e.g. a benchmark's dense
        baseline). ``compile``: torch.compile the step before capture (fuses the small
        elementwise kernels of each layer; the kernels stay opaque custom ops).
        ``fused_attention``: one q/k/v GEMV and the fused decode attention kernel where
        the model's shape allows (False keeps the model's attention routing as it is)."""
        dev = k_caches[0].device
        if dev.type != "cuda":
            raise ValueError("CudaGraphDecode needs the model and caches on a CUDA device")
        self.model = model
        for layer in model.layers:
            layer.self_attn.inplace_cache = True
        if use_kernels:
            use_decode_kernels(model, attention=False)
        if fused_attention:
            use_decode_attention(model)
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
