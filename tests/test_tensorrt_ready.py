"""The exported graphs parse and build in TensorRT (TensorRT-RTX ahead of time on a CPU machine)."""

import pytest

from clada_export import contract as C
from clada_export.export.tensorrt import build_engine, import_tensorrt
from clada_export.errors import UserError

try:
    trt = import_tensorrt()
except UserError as e:  # pragma: no cover - CI installs the trt-check extra
    pytest.skip(f"neither tensorrt nor tensorrt_rtx importable ({e}); pip install -e .[trt-check]",
                allow_module_level=True)


@pytest.mark.parametrize("graph", C.GRAPHS)
def test_graph_parses_and_builds(tiny_export, graph):
    ranges = {"batch": (1, 2, 4), "seq": (1, 8, 32), "max_len": (8, 32, 64)}
    blob = build_engine(tiny_export / f"{graph}.onnx", graph, ranges=ranges, trt=trt)
    assert len(blob) > 10_000


def test_plugin_variant_needs_the_plugin(tiny_export):
    """Without function bodies and without the plugin library, the parser must fail and
    say which op it lacks: the node really is left for the plugin."""
    with pytest.raises(UserError, match="SparseMLP"):
        build_engine(tiny_export / "decode.plugin.onnx", C.DECODE, trt=trt)
