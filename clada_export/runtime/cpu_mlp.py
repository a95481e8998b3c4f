"""The torch backend's CPU fast path: a view of a Decoder whose MLPs run the CPU SparseMLP
kernel (``clada::sparse_mlp_cpu``, plugins/cpu).

:func:`with_cpu_mlp` returns a new Decoder object that shares every parameter with the
model it was made from; only its MLP modules differ. The model itself is not modified, so
the exporter, calibration and other backends keep seeing the reference op.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from clada_export.model.llama import Decoder, SparseMLP
from clada_export.ops.cpu_kernel import MAX_ROWS, load_library, sparse_mlp_cpu_op


class CpuSparseMLP(nn.Module):
    """One layer's SparseMLP through the CPU kernel, on the weights of ``mlp``. The kernel
    adds the weight rows it reads to ``row_counts`` (int64 ``[2]``: gate/up rows, down rows)."""

    def __init__(self, mlp: SparseMLP, row_counts: torch.Tensor):
        super().__init__()
        self.mlp = mlp
        self.row_counts = row_counts

    def forward(self, x: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
        if x.numel() // x.shape[-1] > MAX_ROWS:
            # A prefill (or a batch over 8): with this many token rows the union of kept rows
            # is nearly every row, and the reference op's GEMMs are the faster way to read them.
            return self.mlp(x, thresholds)
        m = self.mlp
        return sparse_mlp_cpu_op(x, m.w_gate_t, m.w_up_t, m.w_down_t, thresholds, m.act, self.row_counts)

    def intermediate(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp.intermediate(x)

    def magnitudes(self, x: torch.Tensor, t_in: torch.Tensor | float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        return self.mlp.magnitudes(x, t_in)


def _shallow(module: nn.Module) -> nn.Module:
    # a new module object with its own submodule table; parameters and buffers are shared
    clone = copy.copy(module)
    clone.__dict__["_modules"] = dict(module._modules)
    return clone


def with_cpu_mlp(model: Decoder, row_counts: torch.Tensor) -> Decoder:
    """A Decoder sharing ``model``'s weights whose MLPs run the CPU kernel. Raises
    :class:`~clada_export.ops.cpu_kernel.CpuKernelUnavailable` when the library is missing,
    ValueError for a model the kernel does not run (not float32 on the CPU, or a plain MLP)."""
    if not model.cfg.gated_mlp:
        raise ValueError(f"the CPU SparseMLP kernel runs gated MLPs; this {model.cfg.model_type} model's MLP is plain")
    load_library()
    weight = model.layers[0].mlp.w_gate_t
    if weight.dtype != torch.float32 or weight.device.type != "cpu":
        raise ValueError(f"the CPU SparseMLP kernel runs float32 weights on the CPU, not {weight.dtype} on "
                         f"{weight.device}")
    fast = _shallow(model)
    blocks = []
    for block in model.layers:
        b = _shallow(block)
        b.mlp = CpuSparseMLP(block.mlp, row_counts)
        blocks.append(b)
    fast.layers = nn.ModuleList(blocks)
    return fast


def decode_threads(requested: int | None) -> tuple[int, str | None]:
    """torch's intra-op threads for decoding on the CPU, and a note when the rule below
    chose them. ``requested`` wins; otherwise torch's own count, except on a machine whose
    1-minute load average is at least its core count: one thread. An OpenMP team waits at
    every op for its slowest thread, and on a busy 2-core machine that thread is often not
    running: measured there (load 5-6), 2 threads decoded at 1.7 tokens/s, 1 thread at 7.2
    dense and 8.9 through the kernel (docs/cpu.md)."""
    import os

    if requested is not None:
        return requested, None
    cores, load = os.cpu_count() or 1, os.getloadavg()[0]
    threads = torch.get_num_threads()
    if threads > 1 and load >= cores:
        return 1, (f"the CPU is busy (load average {load:.1f} on {cores} cores), so decoding runs on 1 thread, "
                   f"not {threads}; --threads sets it")
    return threads, None
