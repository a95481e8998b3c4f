"""The Polygraphy recipe of docs/tensorrt.md: ONNX Runtime against TensorRT with the SparseMLP
plugin. Its feed is checked everywhere (ONNX Runtime runs it); the comparison itself runs
only where TensorRT, Polygraphy, a CUDA GPU and the self-registering plugin library exist."""

from __future__ import annotations

import importlib.util
import shlex
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from clada_export import contract as C
from clada_export.export import polygraphy_check

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("graph", C.GRAPHS)
def test_feed_runs_in_onnxruntime(tiny_export, graph):
    feeds = polygraphy_check.feed(tiny_export, graph, batch=2, max_len=24, seq=5)
    session = ort.InferenceSession(str(tiny_export / f"{graph}.onnx"), providers=["CPUExecutionProvider"])
    assert sorted(feeds) == sorted(i.name for i in session.get_inputs())
    logits = session.run(["logits"], feeds)[0]
    assert logits.shape == (2, 320) and np.isfinite(logits).all()
    if graph == C.DECODE:
        assert (feeds["position"] >= 5).all() and (feeds["position"] < 24).all()


def test_docs_show_the_command_this_module_runs():
    doc = (REPO / "docs" / "tensorrt.md").read_text()
    assert "python -m clada_export.export.polygraphy_check" in doc
    # the flags the doc's example shows are the ones command() builds
    shown = next(line for line in doc.splitlines() if line.startswith("polygraphy run "))
    built = polygraphy_check.command(Path("out16"), "decode", Path("out16/polygraphy_decode_inputs.json"),
                                     {"input_ids": (1, 1)}, Path("plugins/build/libclada_trt_plugin_static.so"),
                                     "float16")
    assert [a for a in shlex.split(shown) if a.startswith("--")] == [a for a in built if a.startswith("--")]


def _skip_reason() -> str | None:
    if importlib.util.find_spec("tensorrt") is None:
        return "TensorRT (`import tensorrt`) is not installed; TensorRT-RTX has no plugin layers"
    if importlib.util.find_spec("polygraphy") is None:
        return "Polygraphy is not installed (pip install polygraphy)"
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU"
    from clada_export.export.tensorrt import find_plugin_library

    lib = find_plugin_library()
    if lib is None or not lib.with_name(polygraphy_check.STATIC_PLUGIN_NAME).is_file():
        return f"{polygraphy_check.STATIC_PLUGIN_NAME} not built (plugins/tensorrt/README.md)"
    return None


@pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or "")
def test_onnxruntime_and_tensorrt_agree_with_the_plugin(tiny_checkpoints, tmp_path):
    from clada_export.export.onnx_export import export_onnx
    from clada_export.model.loading import load_decoder

    model, hf = load_decoder(tiny_checkpoints["llama"])
    out = tmp_path / "out16"
    export_onnx(model, hf, out, model_dir=tiny_checkpoints["llama"], dtype="float16")
    for graph in C.GRAPHS:
        assert polygraphy_check.main([str(out), "--graph", graph, "--run"]) == 0
