"""Latency benchmark of generation (what ``clada-export bench`` runs): dense vs the static
profile vs the dynamic controller, per backend and batch size, in one process on the same
weights.

Each case generates ``new_tokens`` tokens from random prompts of ``prompt_len`` tokens
through the :class:`~clada_export.runtime.generator.Generator` (EOS ignored, greedy), the
controller in the loop for ``dynamic``. ``clada-export bench`` interleaves the cases
(:func:`run_bench_interleaved`): rounds in which every case runs a warm-up (graph capture,
compilation, allocation) and one timed generation, figures as medians over the rounds, so that
drift of the host or the GPU falls on every case alike. Timestamps are taken on
the host when each token reaches it, so per-token latency includes everything a user
waits for: the device step, sampling, and the controller.

Reported per case: time to first token (prefill + first sample), per-token latency
p50/p90/p99, tokens/s (all sequences), speedup of the p50 step over dense on the same
backend and batch, the MLP sparsity reached, and on the cuda backend the share of steps
that ran the SparseMLP kernel (the rest ran dense GEMMs: docs/gpu.md). The controller's
overhead is dynamic p50 over static p50, minus one, at the sparsity each reached.

Sparsity reached: on the cuda backend, measured on the device (1 - the fraction of MLP
weight bytes the kernel read, union over the batch, averaged over kernel steps); on the
other backends, what the controller chose (dynamic) or the profile's allocation (static).
"""

from __future__ import annotations

import math
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from clada_export.model.config import DecoderConfig
from clada_export.model.llama import Decoder
from clada_export.profile import SparsityProfile
from clada_export.runtime.backends import Backend

MODES = ("dense", "static", "dynamic")


def _cfg(model_type: str, vocab: int, hidden: int, inter: int, layers: int, heads: int, kv: int, qkv_bias: bool,
         tie: bool) -> DecoderConfig:
    return DecoderConfig(model_type=model_type, vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                         num_layers=layers, num_heads=heads, num_kv_heads=kv, head_dim=hidden // heads,
                         rms_norm_eps=1e-6, max_position_embeddings=8192, tie_word_embeddings=tie,
                         qkv_bias=qkv_bias, o_bias=False, qk_norm=False, sliding_window=None, act="silu")


# Published architectures (their config.json): shapes only, the weights are random.
SYNTHETIC = {
    "llama3-8b": (_cfg("llama", 128256, 4096, 14336, 32, 32, 8, False, False), 500000.0),
    "mistral-7b": (_cfg("mistral", 32768, 4096, 14336, 32, 32, 8, False, False), 1000000.0),
    "qwen2-7b": (_cfg("qwen2", 152064, 3584, 18944, 28, 28, 4, True, False), 1000000.0),
    "qwen2.5-1.5b": (_cfg("qwen2", 151936, 1536, 8960, 28, 12, 2, True, True), 1000000.0),
    "smollm2-135m": (_cfg("llama", 49152, 576, 1536, 30, 9, 3, False, True), 100000.0),  # the default model
}


@torch.no_grad()
def synthetic_model(cfg: DecoderConfig, rope_theta: float, dtype: torch.dtype, device: str | torch.device,
                    seed: int = 0) -> Decoder:
    """A decoder of this shape with random weights (normal, std 1/sqrt(fan_in); norms 1),
    built directly on the device."""
    inv_freq = 1.0 / (rope_theta ** (torch.arange(0, cfg.head_dim, 2).float() / cfg.head_dim))
    with torch.device("meta"):
        model = Decoder(cfg, inv_freq)
    model = model.to_empty(device=device).to(dtype)
    model.inv_freq = inv_freq.to(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, p in model.named_parameters():
        if "norm" in name:
            p.fill_(1.0)
        elif name.endswith("bias"):
            p.zero_()
        else:
            fan_in = p.shape[0] if name.endswith(("w_gate_t", "w_up_t", "w_down_t")) else p.shape[-1]
            p.normal_(0.0, 1.0 / math.sqrt(fan_in), generator=gen)
    return model.eval()


def synthetic_profile(model: Decoder, target: float, windows: int = 8, window_len: int = 64,
                      progress: bool = True) -> SparsityProfile:
    """A profile for ``model`` recorded on random tokens (calibrate's own tables), with a
    uniform allocation at ``target`` byte sparsity."""
    cfg = model.cfg
    ids = torch.randint(0, cfg.vocab_size, (windows, window_len), generator=torch.Generator().manual_seed(0))
    return uniform_profile(model, target, ids, progress=progress)


def uniform_profile(model: Decoder, target: float, ids: torch.Tensor, progress: bool = True) -> SparsityProfile:
    """A profile for ``model`` with calibrate's tables recorded on token windows ``ids [N, T]``
    and a uniform allocation at ``target`` byte sparsity (no error-controlled allocation:
    what the runtime's sparsity measurements need, in seconds)."""
    from clada_export.calibrate.tables import record_tables
    from clada_export.profile import model_fingerprint

    cfg = model.cfg
    t = record_tables(model, ids, batch_size=4, x_cache_rows=0, progress=progress)
    L = cfg.num_layers
    return SparsityProfile(
        fingerprint=model_fingerprint(dict(cfg.__dict__)), model_type=cfg.model_type, num_layers=L,
        hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size, levels=t.levels, t_in=t.t_in,
        t_mid=t.t_mid, calib_mean_abs=t.calib_mean_abs, target_sparsity=target, s_in=np.full(L, target),
        s_mid=np.full(L, target), method="uniform",
    )


@dataclass
class Case:
    backend: str
    mode: str
    batch: int
    ttft_ms: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    tokens_per_s: float
    sparsity: float
    kernel_steps: float | None = None
    gpu_ms: float | None = None
    speedup: float = float("nan")
    controller_us: float | None = None  # host time of one controller step (dynamic)


@dataclass
class BenchResult:
    device: str
    model: str
    dtype: str
    prompt_len: int
    new_tokens: int
    repeats: int
    cases: list[Case] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def controller_overhead(self) -> dict[tuple[str, int], float]:
        """(backend, batch) -> dynamic p50 / static p50 - 1."""
        p50 = {(c.backend, c.batch, c.mode): c.p50_ms for c in self.cases}
        return {(b, n): p50[(b, n, "dynamic")] / p50[(b, n, "static")] - 1
                for (b, n, m) in p50 if m == "dynamic" and (b, n, "static") in p50}

    def to_dict(self) -> dict:
        d = asdict(self)
        d["controller_overhead"] = [{"backend": b, "batch": n, "overhead": v}
                                    for (b, n), v in self.controller_overhead().items()]
        return d

    def markdown(self) -> str:
        lines = [
            f"# Generation benchmark on {self.device}",
            "",
            f"{self.model}, {self.dtype}; prompt {self.prompt_len} tokens, {self.new_tokens} new tokens per "
            f"sequence, {self.repeats} timed generations per case (the notes say how they were run); greedy, "
            "EOS ignored.",
            "Latency per token is host time between tokens (device step, sampling, controller); speedup is "
            "dense p50 / p50 on the same backend and batch.",
            "",
            "GPU ms: one replay of the step's CUDA graph alone (cuda backend; the kernel's or the dense graph, "
            "whichever most steps ran). Kernel steps: share of steps that ran the SparseMLP kernel (docs/gpu.md).",
            "",
            "| backend | B | mode | TTFT ms | p50 ms | p90 ms | p99 ms | GPU ms | tokens/s | speedup | sparsity | "
            "kernel steps |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for c in self.cases:
            ks = "" if c.kernel_steps is None else f"{c.kernel_steps * 100:.0f}%"
            sp = "" if math.isnan(c.sparsity) else f"{c.sparsity:.3f}"
            gpu = "" if c.gpu_ms is None else f"{c.gpu_ms:.3f}"
            lines.append(f"| {c.backend} | {c.batch} | {c.mode} | {c.ttft_ms:.2f} | {c.p50_ms:.3f} | {c.p90_ms:.3f} | "
                         f"{c.p99_ms:.3f} | {gpu} | {c.tokens_per_s:.1f} | {c.speedup:.2f} | {sp} | {ks} |")
        overhead = self.controller_overhead()
        if overhead:
            host = {(c.backend, c.batch): c.controller_us for c in self.cases if c.controller_us is not None}
            lines += ["", "Controller overhead (dynamic p50 / static p50 - 1): " + ", ".join(
                f"{b} B={n}: {v * 100:+.1f}%" for (b, n), v in overhead.items())]
            if host:
                lines += ["Controller host time per step (median over generations): " + ", ".join(
                    f"{b} B={n}: {us:.0f} us" for (b, n), us in host.items())]
        lines += [""] + [f"- {n}" for n in self.notes]
        return "\n".join(lines).rstrip() + "\n"

    def plot(self, path: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        backends = sorted({c.backend for c in self.cases})
        fig, axes = plt.subplots(1, len(backends), figsize=(5 * len(backends), 3.6), squeeze=False)
        for ax, backend in zip(axes[0], backends):
            for mode in MODES:
                cs = sorted((c for c in self.cases if c.backend == backend and c.mode == mode), key=lambda c: c.batch)
                if cs:
                    ax.plot([c.batch for c in cs], [c.tokens_per_s for c in cs], marker="o", label=mode)
            ax.set_xlabel("batch")
            ax.set_ylabel("tokens/s")
            ax.set_title(f"{backend}: {self.model}")
            ax.set_xscale("log", base=2)
            ax.grid(alpha=0.3)
            ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)

    def write(self, out_dir: Path) -> list[Path]:
        """bench.md, bench.json and bench.png in ``out_dir`` (each written whole, then renamed)."""
        from clada_export.atomic import write_json

        out_dir.mkdir(parents=True, exist_ok=True)
        md, js, png = out_dir / "bench.md", out_dir / "bench.json", out_dir / "bench.png"
        tmp = md.with_suffix(".md.tmp")
        tmp.write_text(self.markdown())
        tmp.replace(md)
        write_json(js, self.to_dict())
        tmp_png = out_dir / "bench.tmp.png"
        self.plot(tmp_png)
        tmp_png.replace(png)
        return [md, js, png]


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def run_case(backend: Backend, name: str, mode: str, batch: int, prompt_len: int, new_tokens: int, repeats: int,
             profile: SparsityProfile | None, vocab: int, seed: int = 0) -> Case:
    """Generate ``repeats + 1`` times (the first is a warm-up) and time the last ``repeats``."""
    from clada_export.runtime.controller import ControllerConfig, ThresholdController
    from clada_export.runtime.native_controller import make_controller
    from clada_export.runtime.generator import Generator

    controllers: list[ThresholdController] = []
    factory, static = None, None
    if mode == "static":
        static = profile.static_thresholds()
    elif mode == "dynamic":
        def factory(b: int) -> ThresholdController:
            controllers.append(make_controller(profile, ControllerConfig(), batch=b))
            return controllers[-1]
    gen = Generator(backend, eos_token_ids=(), controller_factory=factory, static_thresholds=static)
    rng = np.random.default_rng(seed)
    ttft, gaps, tps, chosen, fractions, kernel_share, variants, ctl = [], [], [], [], [], [], [], []
    for r in range(repeats + 1):
        prompts = rng.integers(0, vocab, (batch, prompt_len)).tolist()
        stamps: list[float] = []
        t0 = time.perf_counter()
        result = gen.generate(prompts, new_tokens, on_tokens=lambda ids: stamps.append(time.perf_counter()))
        graph = getattr(backend, "graph", None)
        if graph is not None:
            graph.finish()
        if r == 0:
            continue
        ttft.append(stamps[0] - t0)
        gaps += list(np.diff(stamps))
        tps.append(result.decode_tokens_per_second)
        if controllers:
            chosen.append(float(np.nanmean(controllers[-1].mean_sparsity)))
            ctl.append(result.controller_seconds / max(1, result.surprisal.shape[0] - 1))
        if graph is not None:
            fractions += graph.fractions
            if graph.variants:
                kernel_share.append(graph.variants.count("kernel") / len(graph.variants))
                variants += graph.variants
    if mode == "dense":
        sparsity = 0.0
    elif fractions:
        sparsity = 1.0 - float(np.mean(fractions))
    elif mode == "dynamic":
        sparsity = float(np.mean(chosen)) if chosen else float("nan")
    else:
        sparsity = profile.mean_byte_sparsity()
    gpu_ms = None
    if graph is not None and variants:
        gpu_ms = 1e3 * graph.time_replays(max(set(variants), key=variants.count))
    return Case(backend=name, mode=mode, batch=batch, ttft_ms=1e3 * float(np.median(ttft)),
                p50_ms=1e3 * _percentile(gaps, 50), p90_ms=1e3 * _percentile(gaps, 90),
                p99_ms=1e3 * _percentile(gaps, 99), tokens_per_s=float(np.median(tps)),
                sparsity=sparsity,
                kernel_steps=float(np.mean(kernel_share)) if kernel_share else None, gpu_ms=gpu_ms,
                controller_us=1e6 * float(np.median(ctl)) if ctl else None)


def run_bench(backends: dict[str, Callable[[str], Backend]], result: BenchResult, profile: SparsityProfile | None,
              batches: list[int], vocab: int, modes: tuple[str, ...] = MODES, progress: bool = True) -> BenchResult:
    """Every (backend, batch, mode) case into ``result``. ``backends[name](mode)`` returns the
    backend that runs ``mode`` (the cuda backend runs dense on cuBLAS with thresholds
    ignored, the others through the same graphs at zero thresholds)."""
    from tqdm import tqdm

    if profile is None and set(modes) - {"dense"}:
        raise ValueError("static and dynamic modes need a profile")
    todo = [(name, b, m) for name in backends for b in batches for m in modes]
    for name, batch, mode in tqdm(todo, desc="bench", unit="case", file=sys.stderr, disable=not progress):
        backend = backends[name](mode)
        result.cases.append(run_case(backend, name, mode, batch, result.prompt_len, result.new_tokens,
                                     result.repeats, profile, vocab))
    dense = {(c.backend, c.batch): c.p50_ms for c in result.cases if c.mode == "dense"}
    for c in result.cases:
        if (c.backend, c.batch) in dense:
            c.speedup = dense[(c.backend, c.batch)] / c.p50_ms
    return result


def weight_bytes(model: Decoder) -> int:
    """Bytes of weights one dense decode step reads: every parameter but the embedding
    table (only B rows of it are read), which counts once where lm_head shares it."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    if not model.cfg.tie_word_embeddings:
        total -= model.embed_tokens.weight.numel() * model.embed_tokens.weight.element_size()
    return total


def copy_bandwidth(device: str | torch.device = "cuda") -> float:
    """Device-to-device copy bandwidth (bytes read + written per second) of 1 GiB."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    dst.copy_(src)
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(10):
        dst.copy_(src)
    b.record()
    b.synchronize()
    return 2 * src.numel() * 10 / (a.elapsed_time(b) * 1e-3)


def dense_bandwidth_note(result: BenchResult, model: Decoder) -> None:
    """How close the dense GPU step comes to reading its weights at copy bandwidth."""
    nbytes, bw = weight_bytes(model), copy_bandwidth(model.embed_tokens.weight.device)
    for c in result.cases:
        if c.mode == "dense" and c.gpu_ms is not None and c.batch == 1:
            floor = nbytes / bw
            result.notes.append(f"dense step, B=1: {c.gpu_ms:.3f} ms on the GPU for {nbytes / 1e9:.2f} GB of weights; "
                                f"at the copy bandwidth measured in this run ({bw / 1e12:.2f} TB/s) that is "
                                f"{floor * 1e3:.3f} ms, so the dense step runs at {floor * 1e3 / c.gpu_ms:.0%} of it")


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return platform.processor() or platform.machine() or "CPU"


def _cuda_factory(sparse) -> Callable[[str], Backend]:
    """The dense cases run the same weights on cuBLAS with thresholds ignored."""
    from clada_export.runtime.backends import CudaBackend

    dense = CudaBackend(sparse.model, mlp="plain", compile=sparse.compile, path=sparse.path)
    return lambda mode: dense if mode == "dense" else sparse


def synthetic_backends(name: str, sparsity: float, dtype: str, compile: bool):
    """The cuda backend on a published model shape (:data:`SYNTHETIC`) with random weights and
    a profile recorded on random tokens: (factories, profile, model description, vocab, dtype)."""
    from clada_export.runtime.backends import CudaBackend

    cfg, theta = SYNTHETIC[name]
    model = synthetic_model(cfg, theta, getattr(torch, dtype), "cuda")
    profile = synthetic_profile(model, sparsity)
    note = f"{name} shape, random weights, profile on random tokens at {sparsity:.0%}"
    # the dense baseline is the fastest dense form: nn.Linear-layout copies (memory is no object here)
    return ({"cuda": _cuda_factory(CudaBackend(model, compile=compile, dense_layout="linear"))}, profile, note,
            cfg.vocab_size, dtype)


def export_backends(export_dir: Path, backends: list[str], dtype: str, compile: bool):
    """The named backends on an export (the checkpoint it came from for torch and cuda) and its
    profile, if any: (factories, profile, model description, vocab, dtype)."""
    from clada_export.errors import UserError
    from clada_export.export.onnx_export import read_export_profile, read_manifest
    from clada_export.model.loading import load_decoder
    from clada_export.runtime.backends import OnnxRuntimeBackend, TorchBackend, open_cuda_backend

    manifest = read_manifest(export_dir)
    profile = read_export_profile(export_dir)
    source = manifest.get("source")
    factories = {}
    for name in backends:
        if name == "onnxruntime":
            ort = OnnxRuntimeBackend(export_dir)
            factories[name] = lambda mode, b=ort: b
            continue
        if name == "tensorrt":
            from clada_export.runtime.tensorrt_backend import TensorRTBackend

            trt_backend = TensorRTBackend(export_dir)
            factories[name] = lambda mode, b=trt_backend: b
            continue
        if not source or not Path(source).is_dir():
            raise UserError(f"--backends {name} loads the checkpoint this export came from ({source}), which is not "
                            "there any more; use --backends onnxruntime or re-export")
        if name == "torch":
            model, _ = load_decoder(Path(source))
            torch_backend = TorchBackend(model, "cpu")
            # dense is torch's own GEMMs (the reference op), not the CPU kernel at zero thresholds
            dense_torch = TorchBackend(model, "cpu", mlp="reference")
            factories[name] = lambda mode, s=torch_backend, d=dense_torch: d if mode == "dense" else s
            if torch_backend.mlp_note:
                print(f"note: the torch backend runs the reference op: {torch_backend.mlp_note}", file=sys.stderr)
        else:
            factories[name] = _cuda_factory(open_cuda_backend(Path(source), dtype=dtype, compile=compile,
                                                              dense_layout="linear"))
    dtype = dtype if backends == ["cuda"] else f"{manifest.get('dtype', 'float32')} (cpu)"
    return factories, profile, f"export {export_dir.name}", manifest["config"]["vocab_size"], dtype


# ------------------------------------------------------------------ interleaved runs (what `clada-export bench` calls, CPU and GPU)
def run_bench_interleaved(backends: dict[str, Callable[[str], Backend]], result: BenchResult,
                          profile: SparsityProfile | None, batches: list[int], vocab: int, rounds: int,
                          modes: tuple[str, ...] = MODES, progress: bool = True, cpu: bool = True) -> BenchResult:
    """:func:`run_bench` in ``rounds`` passes over every case, one timed generation per case per
    pass, so that a change of load (a CPU shared with other work; on a GPU machine, the host's
    jitter, which on a launch-bound 2 ms step is larger than the controller) hits all cases
    alike, and ratios between cases hold. Each case's figures are medians over the rounds; on a
    CPU (``cpu``) the load average before and after goes into the notes."""
    import os
    from dataclasses import fields, replace

    load_before = os.getloadavg()
    per_round = []
    for r in range(rounds):
        one = replace(result, repeats=1, cases=[], notes=[])
        per_round.append(run_bench(backends, one, profile, batches, vocab, modes, progress=progress).cases)
    for group in zip(*per_round):
        merged = {}
        for f in fields(group[0]):
            values = [getattr(c, f.name) for c in group]
            numeric = all(isinstance(v, float) for v in values)
            merged[f.name] = float(np.median(values)) if numeric else values[0]
        result.cases.append(type(group[0])(**merged))
    load_after = os.getloadavg()
    how = (f"cases interleaved, {rounds} rounds of one timed generation each (after one warm-up), medians over "
           "rounds (speedup: of each round's dense p50 / p50)")
    if cpu:
        how = (f"CPU: {os.cpu_count()} cores; {how}; load average (1 min) {load_before[0]:.2f} before, "
               f"{load_after[0]:.2f} after")
    result.notes.append(how)
    if len({c.backend for c in result.cases}) > 1:
        fastest_dense_note(result)
    return result


def fastest_dense_note(result: BenchResult) -> None:
    """Each sparse case's tokens/s against the fastest dense case of any backend at its batch
    (the speedup column compares within one backend)."""
    for batch in sorted({c.batch for c in result.cases}):
        dense = [c for c in result.cases if c.batch == batch and c.mode == "dense"]
        if not dense:
            continue
        best = max(dense, key=lambda c: c.tokens_per_s)
        ratios = ", ".join(f"{c.backend} {c.mode} {c.tokens_per_s / best.tokens_per_s:.2f}x"
                           for c in result.cases if c.batch == batch and c.mode != "dense")
        result.notes.append(f"B={batch}: fastest dense path {best.backend} at {best.tokens_per_s:.1f} tokens/s; "
                            f"against it: {ratios}")

