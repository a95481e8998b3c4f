"""The GPU decode path: one decode step captured in a CUDA graph, replayed per token.

:class:`DecodePath` is a separate object that holds what it converted from a
:class:`~clada_export.model.llama.Decoder` (the model itself is never modified): q/k/v
weights concatenated once for one projection GEMV per layer, and, for the dense fallback
where it measures faster (``dense_layout``), each MLP's gate/up weights as one
``nn.Linear``-layout matrix and its down weights in ``nn.Linear`` layout: a second copy of
the MLP weights. Otherwise the dense GEMMs, like the SparseMLP kernel, read the model's own
``w_*_t`` parameters. A decode step is: embedding; per layer RMSNorm, the q/k/v
GEMV, the fused decode attention kernel (RoPE, cache write in place, attention), o_proj,
RMSNorm, the MLP; final norm, lm_head, entropy and logsumexp.

:class:`CudaGraphDecode` holds one batch shape: the KV cache, static input buffers
(token ids, positions, thresholds ``[L, B, 2]`` overwritten between replays, so one graph
serves every threshold the controller picks) and the captured graphs, one per MLP variant.
Each graph also computes the greedy pick and its signals (token id, entropy, logsumexp, the
picked logit) and the host gets those four numbers per sequence with one copy into pinned
memory; inputs go in through pinned staging buffers with asynchronous copies, so a step
costs the host no synchronous transfer besides the one read of its result.

MLP variants:

- ``kernel``: the SparseMLP CUDA kernel, which also counts the weight rows it read;
- ``dense``: the same op (thresholds applied) as cuBLAS GEMMs on the dense copies, with the
  thresholds applied by two elementwise kernels (clada_mask_input, clada_gate_mask);
- ``plain``: dense GEMMs with thresholds ignored (only the benchmark's dense baseline).

Never slower than dense (docs/gpu.md): at capture, the MLP time of one step is measured
for the kernel reading no rows and all rows, and for the dense GEMMs. Before each step,
the kernel is predicted to take ``fixed + (full - fixed) * f``, where ``f`` is the fraction
of MLP weight bytes the kernel read in its last step (union over the batch, counted on the
device); the step runs the kernel when that beats the dense time, else the dense graph.
While on the dense graph, every ``PROBE_EVERY``-th step runs the kernel again to re-measure
``f``.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from clada_export.model.llama import Decoder, cognitive_signals
from clada_export.ops.sparse_mlp import activation

MLP_VARIANTS = ("kernel", "dense", "plain")
PROBE_EVERY = 32
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


class DecodePathUnsupported(ValueError):
    """The model's shape, dtype or device is outside what the GPU decode path handles."""


@dataclass
class _LayerWeights:
    qkv_weight: torch.Tensor
    qkv_bias: torch.Tensor | None
    gate_up: torch.Tensor | None  # [2 * inter, hidden], dense fallback only
    down: torch.Tensor | None  # [hidden, inter]


DENSE_LAYOUTS = ("auto", "linear", "kernel")
# the kernel's layout serves the dense GEMMs too when they are at most this much slower there
LAYOUT_TOLERANCE = 1.02


class DecodePath:
    """The converted weights and the one-token decode step of ``model`` (CUDA, bf16/fp16).

    ``dense_layout``: what the dense GEMMs read. ``"linear"``: a copy of each MLP's weights in
    ``nn.Linear`` layout (gate and up as one matrix: one GEMM); ``"kernel"``: the model's own
    input-major weights, the kernel's layout (two GEMMs and a concatenation for gate/up, no
    second copy of the MLP weights); ``"auto"``: time both on the first layer, at batch 1 and 8,
    and take the kernel's layout unless it is more than 2% slower (``layout_times`` keeps the
    measurement). The benchmark's dense baseline asks for ``"linear"``."""

    def __init__(self, model: Decoder, dense_fallback: bool = True, dense_layout: str = "auto"):
        from clada_export.ops.native import MAX_HIDDEN, decode_attention_supported, load_library

        cfg = model.cfg
        # the step below is the Llama layout; a family's extra parts must not be dropped silently
        extras = cfg.llama_layout_differences()
        if extras:
            raise DecodePathUnsupported(f"the GPU decode path runs the Llama layout (Llama, Mistral, Qwen2, Qwen3); "
                                        f"this {cfg.model_type} model also needs {', '.join(extras)}")
        weight = model.embed_tokens.weight
        if weight.device.type != "cuda":
            raise DecodePathUnsupported(f"the GPU decode path needs the model on a CUDA device, not {weight.device}")
        if weight.dtype not in DTYPES.values():
            raise DecodePathUnsupported(f"the GPU decode path runs bfloat16 or float16 weights, not {weight.dtype}")
        load_library()  # the clear error (how to build it) now, not inside a capture
        if not decode_attention_supported(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, weight.dtype):
            raise DecodePathUnsupported(f"the decode attention kernel does not support {cfg.num_heads} heads, "
                                        f"{cfg.num_kv_heads} KV heads of dimension {cfg.head_dim}")
        if cfg.hidden_size > MAX_HIDDEN or cfg.hidden_size % 8 or cfg.intermediate_size % 8:
            raise DecodePathUnsupported(f"the SparseMLP kernel needs hidden <= {MAX_HIDDEN} and sizes that are "
                                        f"multiples of 8; this model has {cfg.hidden_size}, {cfg.intermediate_size}")
        self.model = model
        self.cfg = cfg
        self.dtype = weight.dtype
        self.device = weight.device
        self.dense_fallback = dense_fallback
        if dense_layout not in DENSE_LAYOUTS:
            raise ValueError(f"dense_layout must be one of {DENSE_LAYOUTS}, got {dense_layout!r}")
        self.inv_freq = model.inv_freq.float()
        d = cfg.head_dim
        self.qkv_sizes = (cfg.num_heads * d, cfg.num_kv_heads * d, cfg.num_kv_heads * d)
        self.layers: list[_LayerWeights] = []
        self.layout_times: dict[str, float] = {}
        if dense_fallback and dense_layout == "auto":
            dense_layout = self._measure_layouts()
        self.dense_layout = dense_layout if dense_fallback else None
        copies = self.dense_layout == "linear"
        with torch.no_grad():
            for layer in model.layers:
                a, m = layer.self_attn, layer.mlp
                projs = (a.q_proj, a.k_proj, a.v_proj)
                self.layers.append(_LayerWeights(
                    qkv_weight=torch.cat([p.weight for p in projs]),
                    qkv_bias=torch.cat([p.bias for p in projs]) if cfg.qkv_bias else None,
                    gate_up=torch.cat([m.w_gate_t.t(), m.w_up_t.t()]).contiguous() if copies else None,
                    down=m.w_down_t.t().contiguous() if copies else None,
                ))

    @torch.no_grad()
    def _measure_layouts(self) -> str:
        """Time the first layer's dense MLP (the op's dense form) in both layouts, batch 1 and 8."""
        from clada_export.ops.native import gate_mask, mask_input

        m = self.model.layers[0].mlp
        gate_up = torch.cat([m.w_gate_t.t(), m.w_up_t.t()]).contiguous()
        down = m.w_down_t.t().contiguous()
        worst = 0.0
        for batch in (1, 8):
            x = torch.randn(batch, self.cfg.hidden_size, device=self.device,
                            generator=torch.Generator(device=self.device).manual_seed(0)).to(self.dtype)
            thr = torch.zeros(batch, 2, device=self.device)
            t_lin = _time_graph(lambda: F.linear(gate_mask(F.linear(mask_input(x, thr), gate_up), thr, m.act), down))
            t_ker = _time_graph(lambda: _dense_kernel_layout(m, x, thr))
            self.layout_times[f"linear B={batch}"], self.layout_times[f"kernel B={batch}"] = t_lin, t_ker
            worst = max(worst, t_ker / t_lin)
        del gate_up, down
        return "kernel" if worst <= LAYOUT_TOLERANCE else "linear"

    def _mlp(self, i: int, x: torch.Tensor, thresholds: torch.Tensor, variant: str,
             row_counts: torch.Tensor | None) -> torch.Tensor:
        from clada_export.ops.native import gate_mask, mask_input, sparse_mlp_cuda_counted

        mlp, w = self.model.layers[i].mlp, self.layers[i]
        if variant == "kernel":
            return sparse_mlp_cuda_counted(x, mlp.w_gate_t, mlp.w_up_t, mlp.w_down_t, thresholds, mlp.act,
                                           row_counts[i])
        if self.dense_layout is None:
            raise DecodePathUnsupported("this DecodePath was built without the dense fallback")
        if self.dense_layout == "kernel":
            if variant == "dense":
                return _dense_kernel_layout(mlp, x, thresholds)
            return (activation(x @ mlp.w_gate_t, mlp.act) * (x @ mlp.w_up_t)) @ mlp.w_down_t
        if variant == "dense":  # the op itself, its thresholds applied around cuBLAS GEMMs
            return F.linear(gate_mask(F.linear(mask_input(x, thresholds), w.gate_up), thresholds, mlp.act), w.down)
        gate, up = F.linear(x, w.gate_up).chunk(2, dim=-1)
        return F.linear(activation(gate, mlp.act) * up, w.down)

    def step(self, tokens: torch.Tensor, position: torch.Tensor, k_caches: list[torch.Tensor],
             v_caches: list[torch.Tensor], thresholds: torch.Tensor, variant: str = "kernel",
             row_counts: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One decode step for ``tokens [B]`` at cache slot ``position [B]``; the caches are
        written in place. ``thresholds [L, B, 2]`` float32; ``row_counts [L, 2]`` int32
        (``kernel`` only) receives the weight rows each layer's kernel read. Returns
        ``(logits [B, vocab] float32, entropy [B], logsumexp [B])``."""
        from clada_export.ops.native import decode_attention_cuda

        model, cfg = self.model, self.cfg
        B = tokens.shape[0]
        d = cfg.head_dim
        x = model.embed_tokens(tokens)  # [B, hidden]
        for i, layer in enumerate(model.layers):
            a, w = layer.self_attn, self.layers[i]
            q, k, v = F.linear(layer.input_layernorm(x), w.qkv_weight, w.qkv_bias).split(self.qkv_sizes, dim=-1)
            if cfg.qk_norm:
                q = a.q_norm(q.reshape(B, cfg.num_heads, d)).reshape(B, -1)
                k = a.k_norm(k.reshape(B, cfg.num_kv_heads, d)).reshape(B, -1)
            out = decode_attention_cuda(q, k, v, position, k_caches[i], v_caches[i], self.inv_freq,
                                        rope_scale=model.rope_scaling, window=cfg.sliding_window or 0,
                                        scale=d ** -0.5)
            x = x + a.o_proj(out)
            x = x + self._mlp(i, layer.post_attention_layernorm(x), thresholds[i], variant, row_counts)
        logits = model.lm_head(model.norm(x)).float()
        entropy, lse = cognitive_signals(logits)
        return logits, entropy, lse


def _dense_kernel_layout(mlp, x: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """The op around cuBLAS GEMMs on the model's own input-major weights (no copies)."""
    from clada_export.ops.native import gate_mask, mask_input

    xs = mask_input(x, thresholds)
    gate_up = torch.cat((xs @ mlp.w_gate_t, xs @ mlp.w_up_t), dim=-1)
    return gate_mask(gate_up, thresholds, mlp.act) @ mlp.w_down_t


@dataclass
class DenseRule:
    """The MLP time of one decode step (all layers, seconds) measured at capture: the kernel
    reading no weight rows (``kernel_fixed``) and all of them (``kernel_full``), and the dense
    GEMMs (``dense``). The kernel's time is close to linear in the fraction of weight bytes
    it reads (benchmarks/results)."""

    kernel_fixed: float
    kernel_full: float
    dense: float

    def kernel_time(self, fraction: float) -> float:
        return self.kernel_fixed + (self.kernel_full - self.kernel_fixed) * fraction

    def use_kernel(self, fraction: float) -> bool:
        return self.kernel_time(fraction) < self.dense

    @property
    def crossover(self) -> float:
        """The fraction of weight bytes read above which the dense GEMMs are faster."""
        span = self.kernel_full - self.kernel_fixed
        return 1.0 if span <= 0 else min(1.0, max(0.0, (self.dense - self.kernel_fixed) / span))


def _time_graph(fn, repeats: int = 7) -> float:
    """Median seconds of one replay of ``fn`` captured in a CUDA graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    return median_replay_seconds(graph, repeats)


def median_replay_seconds(graph: torch.cuda.CUDAGraph, repeats: int) -> float:
    """Median seconds of one replay of a captured ``graph`` over ``repeats`` timed replays."""
    times = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e-3)
    return statistics.median(times)


@torch.no_grad()
def measure_dense_rule(path: DecodePath, batch: int) -> DenseRule:
    """Time every layer's MLP once for ``batch`` random rows: kernel with infinite
    thresholds (reads nothing), kernel with zero thresholds (reads everything), dense."""
    cfg, dev = path.cfg, path.device
    gen = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(batch, cfg.hidden_size, device=dev, generator=gen).to(path.dtype)
    counts = torch.zeros(cfg.num_layers, 2, dtype=torch.int32, device=dev)
    zero = torch.zeros(batch, 2, device=dev)
    inf = torch.full((batch, 2), float("inf"), device=dev)

    def run(variant: str, thr: torch.Tensor):
        return lambda: [path._mlp(i, x, thr, variant, counts) for i in range(cfg.num_layers)]

    return DenseRule(kernel_fixed=_time_graph(run("kernel", inf)), kernel_full=_time_graph(run("kernel", zero)),
                     dense=_time_graph(run("dense", zero)))


class CudaGraphDecode:
    """One batch shape of a :class:`DecodePath`: ``step(tokens [B], position [B],
    thresholds [L, B, 2]) -> (logits, entropy, logsumexp)`` replays a captured graph.
    Outputs are static buffers: read them before the next step.

    ``mlp``: ``"auto"`` (kernel or dense per step, the rule above; needs the dense
    fallback), or one of :data:`MLP_VARIANTS` for every step. ``compile``: torch.compile the
    step before capture (fuses the small elementwise kernels; the CUDA kernels stay opaque
    custom ops)."""

    def __init__(self, path: DecodePath, batch: int, max_len: int, mlp: str = "auto", compile: bool = False):
        if mlp != "auto" and mlp not in MLP_VARIANTS:
            raise ValueError(f"mlp must be 'auto' or one of {MLP_VARIANTS}, got {mlp!r}")
        if mlp == "auto" and path.dense_layout is None:
            mlp = "kernel"
        cfg, dev = path.cfg, path.device
        self.path, self.batch, self.max_len, self.mlp = path, batch, max_len, mlp
        shape = (batch, cfg.num_kv_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=path.dtype, device=dev) for _ in range(cfg.num_layers)]
        self.v = [torch.zeros(shape, dtype=path.dtype, device=dev) for _ in range(cfg.num_layers)]
        self.tokens = torch.zeros(batch, dtype=torch.long, device=dev)
        self.position = torch.zeros(batch, dtype=torch.long, device=dev)
        self.thresholds = torch.zeros(cfg.num_layers, batch, 2, dtype=torch.float32, device=dev)
        self.row_counts = torch.zeros(cfg.num_layers, 2, dtype=torch.int32, device=dev)
        # the counts come back without a sync of their own: copied after the replay into
        # pinned memory, read before the next step (the caller has synced on its outputs)
        self._counts_host = torch.zeros(cfg.num_layers, 2, dtype=torch.int32, pin_memory=True)
        self._counts_ready = torch.cuda.Event()
        # fraction of the MLP weight bytes read = counts . weights (per layer, input rows read
        # twice (gate, up) of 3 matrices, down rows once), on a numpy view of the pinned buffer:
        # on a small model's 2 ms step, the same arithmetic in torch CPU ops cost 1-2% of the step
        L = cfg.num_layers
        self._counts_np = self._counts_host.numpy().reshape(-1)
        self._count_weights = np.tile([2.0 / (3 * cfg.hidden_size * L), 1.0 / (3 * cfg.intermediate_size * L)], L)
        # inputs staged in pinned memory and copied asynchronously; `_inputs_read` marks when
        # the copies have read the staging buffers (before the next step overwrites them)
        self._stage = {"tokens": torch.zeros(batch, dtype=torch.long, pin_memory=True),
                       "position": torch.zeros(batch, dtype=torch.long, pin_memory=True),
                       "thresholds": torch.zeros(cfg.num_layers, batch, 2, dtype=torch.float32, pin_memory=True)}
        self._inputs_read = torch.cuda.Event()
        self._greedy_host = torch.zeros(batch, 4, dtype=torch.float64, pin_memory=True)
        self._greedy_ready = torch.cuda.Event()
        self._compile = compile
        self._pool = torch.cuda.graph_pool_handle()
        self._graphs: dict[str, tuple[torch.cuda.CUDAGraph, tuple]] = {}
        self.rule = measure_dense_rule(path, batch) if mlp == "auto" else None
        for variant in (("kernel", "dense") if mlp == "auto" else (mlp,)):
            self._capture(variant)
        self.reset()

    def reset(self) -> None:
        """Zero the caches and forget the measured sparsity (a new generation)."""
        for t in (*self.k, *self.v):
            t.zero_()
        self._fraction: float | None = None
        self._since_kernel = 0
        self._counts_pending = False
        self.fractions: list[float] = []
        """Per kernel step, the fraction of MLP weight bytes read (union over the batch)."""
        self.variants: list[str] = []
        """The MLP variant each step ran."""

    def _capture(self, variant: str) -> None:
        def forward():
            if variant == "kernel":
                self.row_counts.zero_()
            logits, entropy, lse = self.path.step(self.tokens, self.position, self.k, self.v, self.thresholds,
                                                  variant, self.row_counts)
            picked = logits.argmax(dim=-1)
            greedy = torch.stack((picked.double(), entropy.double(), lse.double(),
                                  logits.gather(1, picked[:, None])[:, 0].double()), dim=1)
            return logits, entropy, lse, greedy

        fn = torch.compile(forward, dynamic=False) if self._compile else forward
        dev = self.path.device
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side), torch.no_grad():
            for _ in range(3):  # kernels load, workspaces allocate, compilation runs
                fn()
        torch.cuda.current_stream(dev).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool), torch.no_grad():
            outputs = fn()
        self._graphs[variant] = (graph, outputs)

    def _read_counts(self) -> None:
        self._counts_ready.synchronize()
        self._fraction = float(self._counts_np @ self._count_weights)
        self.fractions.append(self._fraction)
        self._counts_pending = False

    def choose(self) -> str:
        """The MLP variant the next step runs."""
        if self.mlp != "auto":
            return self.mlp
        if self._fraction is None or self._since_kernel >= PROBE_EVERY:
            return "kernel"
        return "kernel" if self.rule.use_kernel(self._fraction) else "dense"

    def step(self, tokens: torch.Tensor, position: torch.Tensor, thresholds: torch.Tensor):
        """Inputs on the host or the device; they are copied into the graph's buffers (host
        inputs through the pinned staging buffers: the caller may reuse its tensors at once).
        Returns ``(logits, entropy, logsumexp)``, static buffers; :meth:`greedy` waits for the
        step and returns its greedy pick."""
        if self._counts_pending:
            self._read_counts()
        variant = self.choose()
        self._inputs_read.synchronize()  # the last step's copies are done with the staging buffers
        for name, buf, src in (("tokens", self.tokens, tokens.reshape(-1)), ("position", self.position, position),
                               ("thresholds", self.thresholds, thresholds)):
            if src.is_cuda:
                buf.copy_(src, non_blocking=True)
            else:
                self._stage[name].copy_(src)
                buf.copy_(self._stage[name], non_blocking=True)
        self._inputs_read.record()
        graph, outputs = self._graphs[variant]
        graph.replay()
        self._greedy_host.copy_(outputs[3], non_blocking=True)
        self._greedy_ready.record()
        self.variants.append(variant)
        if variant == "kernel":
            self._counts_host.copy_(self.row_counts, non_blocking=True)
            self._counts_ready.record()
            self._counts_pending, self._since_kernel = True, 0
        else:
            self._since_kernel += 1
        return outputs[:3]

    def greedy(self) -> np.ndarray:
        """``float64 [B, 4]`` of the last step: the greedy pick (argmax of the logits), the
        entropy and logsumexp, and the picked token's logit (waits for the step)."""
        self._greedy_ready.synchronize()
        return self._greedy_host.numpy().copy()

    def time_replays(self, variant: str, repeats: int = 20) -> float:
        """Median seconds of one replay of ``variant``'s graph on its current buffers (the
        device's share of a step, without the host's; rewrites the last step's cache slot)."""
        graph, _ = self._graphs[variant]
        return median_replay_seconds(graph, repeats)

    def finish(self) -> None:
        """Read the last step's row counts (call after the last step of a generation)."""
        if self._counts_pending:
            self._read_counts()
