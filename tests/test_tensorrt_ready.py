"""The exported graphs parse and build in TensorRT (TensorRT-RTX ahead of time on a CPU machine),
with the I/O contract's names, types and the requested optimization profile; ``clada-export
build`` writes the engines and engines.json.

On a machine without a GPU an engine cannot be deserialized (TensorRT needs the device), so
the engine's content is checked in two ways: the network TensorRT built from (its inputs and
outputs, types, profile) against ``contract.py``, and the serialized plan, which must name
every I/O tensor. Where the engine deserializes (real TensorRT on a GPU), its own I/O is
checked too.
"""

import json
import re
import shutil

import pytest

from clada_export import contract as C
from clada_export.errors import UserError
from clada_export.export.tensorrt import (ENGINES_FILE, build_engine, check_precision, import_tensorrt,
                                          is_rtx, read_engines)
from conftest import one_line_error, run_cli

try:
    trt = import_tensorrt()
except UserError as e:  # pragma: no cover - CI installs the trt-check extra
    pytest.skip(f"neither tensorrt nor tensorrt_rtx importable ({e}); pip install -e .[trt-check]",
                allow_module_level=True)

RANGES = {"batch": (1, 2, 4), "seq": (1, 8, 32), "max_len": (8, 32, 64)}
TRT_DTYPES = {"int64": "INT64", "float32": "FLOAT", "float16": "HALF"}


def _contract(graph, manifest):
    cfg = manifest["config"]
    args = (graph, cfg["num_layers"], cfg["num_kv_heads"], cfg["head_dim"])
    return C.graph_inputs(*args, manifest["dtype"]), C.graph_outputs(*args, cfg["vocab_size"], manifest["dtype"])


def _expected_profile(spec, which):
    return tuple(d if isinstance(d, int) else RANGES[d][which] for d in spec.shape)


def _plan_names(blob: bytes) -> set[str]:
    return {m.decode() for m in re.findall(rb"(?:past|present)_(?:key|value)\.\d+|[a-z_]+", blob)}


def _deserialized_io(blob):
    """{name: (is_input, dtype name, shape)} of the engine, or None where it cannot be loaded here."""
    if is_rtx(trt):
        return None  # RTX engines need an RTX GPU to deserialize
    try:
        import torch
        if not torch.cuda.is_available():
            return None
    except ImportError:
        return None
    engine = trt.Runtime(trt.Logger(trt.Logger.ERROR)).deserialize_cuda_engine(blob)
    assert engine is not None
    out = {}
    for i in range(engine.num_io_tensors):
        n = engine.get_tensor_name(i)
        out[n] = (engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT, engine.get_tensor_dtype(n).name,
                  tuple(engine.get_tensor_shape(n)))
    return out


@pytest.mark.parametrize("graph", C.GRAPHS)
def test_graph_builds_with_the_contract_io_and_profile(tiny_export, graph):
    from clada_export.export.onnx_export import read_manifest

    manifest = read_manifest(tiny_export)
    inputs, outputs = _contract(graph, manifest)
    io = []
    blob = build_engine(tiny_export / f"{graph}.onnx", graph, ranges=RANGES, trt=trt, io=io)
    built_in = [t for t in io if t.is_input]
    built_out = [t for t in io if not t.is_input]
    assert [t.name for t in built_in] == [s.name for s in inputs]
    assert [t.name for t in built_out] == [s.name for s in outputs]
    for t, spec in zip(built_in + built_out, inputs + outputs):
        assert t.dtype == TRT_DTYPES[spec.dtype], (t.name, t.dtype)
        assert t.shape == tuple(d if isinstance(d, int) else -1 for d in spec.shape), (t.name, t.shape)
    for t, spec in zip(built_in, inputs):
        assert t.profile == tuple(_expected_profile(spec, w) for w in range(3)), (t.name, t.profile)
    # the plan itself names every I/O tensor (TensorRT binds by these names at run time)
    missing = {s.name for s in inputs + outputs} - _plan_names(blob)
    assert not missing, f"not in the serialized engine: {sorted(missing)}"
    io_loaded = _deserialized_io(blob)
    if io_loaded is not None:
        assert set(io_loaded) == {s.name for s in inputs + outputs}
        for t in io:
            assert io_loaded[t.name][:2] == (t.is_input, t.dtype)


def test_plugin_variant_needs_the_plugin(tiny_export):
    """Without function bodies and without the plugin library, the parser must fail and
    say which op it lacks: the node really is left for the plugin."""
    with pytest.raises(UserError, match="SparseMLP"):
        build_engine(tiny_export / "decode.plugin.onnx", C.DECODE, trt=trt)


def test_build_command_writes_engines_and_their_description(tiny_export, tmp_path, capsys):
    out = tmp_path / "export"
    shutil.copytree(tiny_export, out)
    cache = tmp_path / "timing.cache"
    code, stdout, err = run_cli(capsys, "build", out, "--max-batch", 3, "--max-seq", 40, "--timing-cache", cache)
    assert code == 0, err
    engines = read_engines(out)
    assert engines["tensorrt"].startswith(trt.__name__)
    for graph in C.GRAPHS:
        e = engines["engines"][graph]
        assert (out / e["file"]).is_file() and e["file"] in stdout
        assert e["precision"] == "fp32" and e["plugin"] is False  # float32 export; RTX has no plugins
        assert e["ranges"] == {"batch": [1, 1, 3], "seq": [1, 40, 40], "max_len": [16, 40, 40]}
        cache_in = next(t for t in e["io"] if t["name"] == C.past_key(0))
        assert cache_in["profile"][2] == [3, 2, 40, 16]
    if is_rtx(trt):  # TensorRT-RTX has no timing cache, and says so
        assert not cache.exists() and "no timing cache" in stdout
    else:
        assert cache.is_file() and cache.stat().st_size > 0
    before = (out / ENGINES_FILE).read_text()

    # a second build refuses to replace them without --force, and leaves them as they were
    code, _, err = run_cli(capsys, "build", out)
    assert code == 2 and "--force" in one_line_error(err)
    assert (out / ENGINES_FILE).read_text() == before


@pytest.mark.parametrize("argv, message", [
    (["--max-batch", "0"], "--max-batch must be >= 1"),
    (["--precision", "bf16"], "bf16"),
])
def test_build_command_errors(tiny_export, tmp_path, capsys, argv, message):
    out = tmp_path / "export"
    shutil.copytree(tiny_export, out)
    code, _, err = run_cli(capsys, "build", out, *argv)
    if argv[1] == "bf16" and hasattr(trt.BuilderFlag, "BF16"):
        pytest.skip(f"{trt.__name__} still builds weakly typed bf16")
    assert code == 2 and message in one_line_error(err)
    assert not (out / ENGINES_FILE).exists() and not list(out.glob("*.engine"))


def test_build_command_rejects_a_non_export(tmp_path, capsys):
    code, _, err = run_cli(capsys, "build", tmp_path)
    assert code == 2 and "not a clada-export output" in one_line_error(err)


def test_precision_follows_the_export():
    assert check_precision("fp32", "float32", trt) is True
    assert check_precision("fp16", "float16", trt) is True
    with pytest.raises(UserError, match="export again with `clada-export export --dtype float32`"):
        check_precision("fp32", "float16", trt)


def test_export_engine_flag_still_builds(tiny_checkpoints, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "export", tiny_checkpoints["llama"], "-o", out, "--engine")
    assert code == 0, err
    engines = json.loads((out / ENGINES_FILE).read_text())
    assert set(engines["engines"]) == set(C.GRAPHS)
    for e in engines["engines"].values():
        assert (out / e["file"]).is_file()


@pytest.mark.parametrize("family", ["gpt2", "opt"])
def test_plain_mlp_export_builds(family, tmp_path):
    """The plain SparseMLP form (gated=0, six inputs; GELU-tanh for GPT-2, ReLU for OPT)
    with learned positions and LayerNorm parses and builds like the gated one."""
    from clada_export.export.onnx_export import export_onnx
    from clada_export.model.loading import load_decoder
    from conftest import make_checkpoint
    from test_families import _configs

    ckpt = make_checkpoint(_configs()[family], tmp_path / family)
    model, hf = load_decoder(ckpt)
    export_onnx(model, hf, tmp_path / "out", model_dir=ckpt)
    io = []
    blob = build_engine(tmp_path / "out" / f"{C.DECODE}.onnx", C.DECODE, ranges=RANGES, trt=trt, io=io)
    assert blob and {t.name for t in io if t.is_input} >= {"input_ids", "thresholds"}
