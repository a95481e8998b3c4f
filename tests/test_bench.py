"""``clada-export bench`` on the CPU (onnxruntime and torch backends, tiny random model)."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import one_line_error, run_cli


def test_bench_cpu_writes_tables_json_and_plot(tiny_chat_export, tmp_path, capsys):
    out = tmp_path / "bench"
    code, stdout, err = run_cli(capsys, "bench", tiny_chat_export, "--batches", "1", "2", "--prompt-len", "6",
                                "--new-tokens", "4", "--repeats", "1", "-o", out, "--backends", "onnxruntime", "torch")
    assert code == 0, err
    data = json.loads((out / "bench.json").read_text())
    cases = {(c["backend"], c["batch"], c["mode"]): c for c in data["cases"]}
    assert set(cases) == {(b, n, m) for b in ("onnxruntime", "torch") for n in (1, 2)
                          for m in ("dense", "static", "dynamic")}
    for (backend, batch, mode), c in cases.items():
        assert 0 < c["p50_ms"] <= c["p90_ms"] <= c["p99_ms"], c
        assert c["ttft_ms"] > 0 and c["tokens_per_s"] > 0
        dense = cases[(backend, batch, "dense")]
        assert c["speedup"] == pytest.approx(dense["p50_ms"] / c["p50_ms"])
        if mode == "dense":
            assert c["sparsity"] == 0.0
        else:  # the tiny profile's uniform 50% allocation, as chosen (static) or steered (dynamic)
            assert 0.3 < c["sparsity"] < 0.7, c
    assert {(o["backend"], o["batch"]) for o in data["controller_overhead"]} == {
        (b, n) for b in ("onnxruntime", "torch") for n in (1, 2)}
    table = (out / "bench.md").read_text()
    assert table in stdout
    assert sum(line.startswith("| torch | 2 | ") for line in table.splitlines()) == 3
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message a machine without a GPU gives")
def test_bench_synthetic_needs_a_gpu(tmp_path, capsys):
    code, _, err = run_cli(capsys, "bench", "--synthetic", "llama3-8b", "-o", tmp_path / "b")
    assert code == 2
    assert "GPU" in one_line_error(err)
    assert not (tmp_path / "b").exists()


def test_bench_rejects_bad_input(tiny_chat_export, tmp_path, capsys):
    for argv, flag in ((["--batches", "9"], "--batches"), (["--new-tokens", "1"], "--new-tokens"),
                       (["--synthetic", "llama3-8b"], "one of them")):
        code, _, err = run_cli(capsys, "bench", tiny_chat_export, *argv, "-o", tmp_path / "b")
        assert code == 2 and flag in one_line_error(err)
    assert not (tmp_path / "b").exists()


def test_synthetic_names_match_the_library():
    from clada_export.cli.bench_cmd import SYNTHETIC_NAMES
    from clada_export.runtime.bench import SYNTHETIC

    assert SYNTHETIC_NAMES == tuple(SYNTHETIC)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message a machine without a GPU gives")
def test_generate_cuda_backend_without_a_gpu_is_one_line(tiny_chat_export, capsys):
    code, _, err = run_cli(capsys, "generate", tiny_chat_export, "--backend", "cuda", "--prompt", "w5")
    assert code == 2
    line = one_line_error(err)
    assert "GPU" in line and "--backend torch" in line


def test_decode_path_refuses_what_it_does_not_run():
    """The GPU decode step is the Llama layout: a model whose config asks for more (Gemma's
    sandwich norms and soft-caps, say) is refused with the fields named, before anything
    touches a GPU, instead of being decoded without them."""
    import dataclasses
    from types import SimpleNamespace

    from clada_export.runtime.bench import SYNTHETIC
    from clada_export.runtime.cuda_graph import DecodePath, DecodePathUnsupported

    cfg = dataclasses.replace(SYNTHETIC["smollm2-135m"][0], model_type="gemma2", sandwich_norms=True,
                              attn_softcap=50.0, norm_offset=1.0)
    with pytest.raises(DecodePathUnsupported, match="this gemma2 model also needs .*sandwich_norms"):
        DecodePath(SimpleNamespace(cfg=cfg))


def test_default_backend_follows_what_is_there(tmp_path, monkeypatch):
    """generate's default backend: onnxruntime without the checkpoint, torch on a CPU, cuda on
    a GPU with the kernel library, torch with a note naming the build when the library is missing."""
    import torch

    from clada_export.ops import native
    from clada_export.runtime.backends import default_backend

    assert default_backend({"source": str(tmp_path / "gone")}) == ("onnxruntime", None)
    manifest = {"source": str(tmp_path)}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert default_backend(manifest) == ("torch", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert default_backend(manifest, device="cpu") == ("torch", None)
    monkeypatch.setattr(native, "load_library", lambda: None)
    assert default_backend(manifest) == ("cuda", None)

    def missing():
        raise native.NativeKernelsUnavailable("libclada_kernels.so not found; build it with: pip install -e .")

    monkeypatch.setattr(native, "load_library", missing)
    name, note = default_backend(manifest)
    assert name == "torch" and "pip install -e ." in note
