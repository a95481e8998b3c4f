"""Tracing the decoder into the ``prefill`` and ``decode`` ONNX graphs.

Each MLP becomes one ``clada::SparseMLP`` node (gated, or with ``gated=0`` the plain form's
six inputs). Every graph is written twice:
``<graph>.onnx`` carries the op's ONNX function body (ONNX Runtime and any runtime
without our plugin run it), ``<graph>.plugin.onnx`` has no body, for TensorRT with the
SparseMLP plugin loaded. All four files share one external weights file.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from clada_export import contract as C
from clada_export.atomic import check_replaceable, staging_dir
from clada_export.errors import UserError
from clada_export.export.graphs import DecodeGraph, PrefillGraph
from clada_export.model.config import hf_dict_value
from clada_export.model.llama import Decoder
from clada_export.validate import Fields, read_json_object
from clada_export.ops.onnx_function import (ACTIVATION_ATTRIBUTE, GATED_ATTRIBUTE, plain_sparse_mlp_translation,
                                            sparse_mlp_function_proto, sparse_mlp_translation)

MANIFEST_FORMAT = "clada-export"
MANIFEST_VERSION = 1
WEIGHTS_FILE = "weights.data"
TOKENIZER_DIR = "tokenizer"
_DTYPES = {"float32": torch.float32, "float16": torch.float16}
_ALIGN = 64
_EXTERNAL_MIN_BYTES = 1024


def _nbytes(tensor: onnx.TensorProto) -> int:
    n = int(np.prod(tensor.dims)) if tensor.dims else 1
    return n * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize


def _example_inputs(model: Decoder, graph: str, dtype: torch.dtype) -> tuple:
    # batch 2 and distinct small sizes, so torch.export specializes none of the dynamic dims
    cfg, B, T, max_len = model.cfg, 2, 5, 16
    k, v = model.new_cache(B, max_len, dtype=dtype)
    caches = [t for pair in zip(k, v) for t in pair]
    thresholds = torch.zeros(cfg.num_layers, B, 2)
    if graph == C.PREFILL:
        return (torch.randint(0, cfg.vocab_size, (B, T)), torch.tensor([T, T - 2]), thresholds, *caches)
    return (torch.randint(0, cfg.vocab_size, (B, 1)), torch.tensor([T, T - 2]), thresholds, *caches)


def _dynamic_shapes(specs: list[C.TensorSpec]) -> tuple:
    dims = {
        "batch": torch.export.Dim("batch", min=1, max=1024),
        "seq": torch.export.Dim("seq", min=1, max=1 << 17),
        "max_len": torch.export.Dim("max_len", min=2, max=1 << 17),
    }
    per_input = [{i: dims[d] for i, d in enumerate(s.shape) if isinstance(d, str)} for s in specs]
    return (per_input[0], per_input[1], per_input[2], tuple(per_input[3:]))


def trace_graph(model: Decoder, graph: str, dtype: torch.dtype = torch.float32) -> onnx.ModelProto:
    """One graph as an in-memory ONNX model (weights inline), SparseMLP bodies attached."""
    cfg = model.cfg
    cache_dtype = str(dtype).removeprefix("torch.")
    ins = C.graph_inputs(graph, cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, cache_dtype)
    outs = C.graph_outputs(graph, cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size, cache_dtype)
    wrapper = PrefillGraph(model) if graph == C.PREFILL else DecodeGraph(model)
    with warnings.catch_warnings(), _quiet_exporter():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            wrapper,
            _example_inputs(model, graph, dtype),
            input_names=[s.name for s in ins],
            output_names=[s.name for s in outs],
            dynamic_shapes=_dynamic_shapes(ins),
            dynamo=True,
            opset_version=18,
            custom_translation_table={torch.ops.clada.sparse_mlp.default: sparse_mlp_translation,
                                      torch.ops.clada.sparse_mlp_plain.default: plain_sparse_mlp_translation},
            optimize=True,
            verbose=False,
        )
    proto = program.model_proto
    # one body serves every node, so every node must carry the model's activation and form
    nodes = [node for node in proto.graph.node if node.domain == C.OP_DOMAIN and node.op_type == C.OP_NAME]
    acts = {a.s.decode() for node in nodes for a in node.attribute if a.name == ACTIVATION_ATTRIBUTE}
    if acts != {cfg.act}:
        raise RuntimeError(f"SparseMLP nodes carry activations {sorted(acts)}, the model's is {cfg.act}")
    gated = {next((a.i for a in node.attribute if a.name == GATED_ATTRIBUTE), 1) for node in nodes}
    if gated != {int(cfg.gated_mlp)} or {len(node.input) for node in nodes} != {5 if cfg.gated_mlp else 6}:
        raise RuntimeError(f"SparseMLP nodes carry gated={sorted(gated)}, the model's MLP is "
                           f"{'gated' if cfg.gated_mlp else 'plain'}")
    proto.functions.append(sparse_mlp_function_proto(cfg.act, cfg.gated_mlp))
    proto.graph.name = graph
    return proto


class _quiet_exporter:
    """torch.onnx prints progress lines and registry warnings; we show our own progress."""

    def __enter__(self):
        self._level = logging.getLogger("torch.onnx").level
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        self._devnull = open(os.devnull, "w")
        import contextlib

        self._redirect = contextlib.redirect_stdout(self._devnull)
        self._redirect.__enter__()
        return self

    def __exit__(self, *exc):
        self._redirect.__exit__(*exc)
        self._devnull.close()
        logging.getLogger("torch.onnx").setLevel(self._level)
        return False


def without_function_bodies(model: onnx.ModelProto) -> onnx.ModelProto:
    """The TensorRT-plugin variant: SparseMLP nodes stay, their ONNX body goes."""
    variant = copy.deepcopy(model)
    keep = [f for f in variant.functions if not (f.domain == C.OP_DOMAIN and f.name == C.OP_NAME)]
    del variant.functions[:]
    variant.functions.extend(keep)
    return variant


class SharedWeights:
    """Writes initializers into one external data file shared by several graphs: equal
    bytes are stored once, whatever name each graph's exporter gave them (constant
    folding names transposed weights differently in each graph)."""

    def __init__(self, path: Path):
        self.path = path
        self._file = open(path, "wb")
        self._by_digest: dict[str, tuple[int, int]] = {}

    def externalize(self, model: onnx.ModelProto) -> None:
        for tensor in model.graph.initializer:
            if _nbytes(tensor) < _EXTERNAL_MIN_BYTES:
                continue  # small constants stay inline: shape inference reads them
            raw = tensor.raw_data or onnx.numpy_helper.to_array(tensor).tobytes()
            digest = hashlib.sha1(raw).hexdigest()
            entry = self._by_digest.get(digest)
            if entry is None:
                self._file.write(b"\0" * ((-self._file.tell()) % _ALIGN))
                entry = (self._file.tell(), len(raw))
                self._file.write(raw)
                self._by_digest[digest] = entry
            for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
                tensor.ClearField(field)
            del tensor.external_data[:]
            tensor.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (("location", self.path.name), ("offset", str(entry[0])), ("length", str(entry[1]))):
                kv = tensor.external_data.add()
                kv.key, kv.value = key, value

    def close(self) -> None:
        self._file.close()


def _set_metadata(model: onnx.ModelProto, meta: dict[str, str]) -> None:
    for key, value in meta.items():
        prop = model.metadata_props.add()
        prop.key, prop.value = key, value


def is_export_dir(path: Path) -> bool:
    """Whether ``path`` holds an export we wrote (its manifest says so): the only kind of
    directory ``export --force`` replaces."""
    try:
        d = json.loads((Path(path) / C.MANIFEST).read_text())
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(d, dict) and d.get("format") == MANIFEST_FORMAT


def check_output_dir(out_dir: Path, force: bool) -> None:
    """UserError unless ``out_dir`` is new, or (``force``) an earlier export to replace."""
    check_replaceable(Path(out_dir), force, is_export_dir, f"a clada-export output (no {C.MANIFEST})")


def export_onnx(
    model: Decoder,
    hf_config: Any,
    out_dir: Path,
    model_dir: Path | None = None,
    profile: Any | None = None,
    dtype: str = "float32",
    force: bool = False,
    on_step: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Write both graphs, both variants, shared weights, the tokenizer and a manifest
    into ``out_dir``. Everything is built in a temporary directory beside it and renamed
    at the end, so a failure leaves no partial export. Returns the manifest."""
    out_dir = Path(out_dir)
    if dtype not in _DTYPES:
        raise UserError(f"--dtype {dtype} is not supported; choose one of {', '.join(_DTYPES)}")
    check_output_dir(out_dir, force)
    step = on_step or (lambda _msg: None)
    torch_dtype = _DTYPES[dtype]
    model = model.to(torch_dtype)
    model.inv_freq = model.inv_freq.float()
    cfg = model.cfg
    with staging_dir(out_dir, force, is_export_dir, f"a clada-export output (no {C.MANIFEST})") as tmp:
        meta = {}
        default_thresholds = np.zeros((cfg.num_layers, 2), dtype=np.float32)
        if profile is not None:
            profile.check_matches(hf_config.to_dict(), source="--profile")
            default_thresholds = profile.static_thresholds().astype(np.float32)
            meta[C.META_PROFILE] = json.dumps(profile.to_dict())
            np.save(tmp / C.DEFAULT_THRESHOLDS_FILE, default_thresholds)
        meta[C.META_DEFAULT_THRESHOLDS] = json.dumps(default_thresholds.tolist())

        weights = SharedWeights(tmp / WEIGHTS_FILE)
        files: dict[str, dict[str, str]] = {}
        for graph in C.GRAPHS:
            step(f"tracing {graph} graph")
            with torch.no_grad():
                proto = trace_graph(model, graph, torch_dtype)
            _set_metadata(proto, meta)
            step(f"checking and writing {graph} graph")
            weights.externalize(proto)
            plugin = without_function_bodies(proto)
            onnx.save_model(proto, tmp / f"{graph}.onnx")
            onnx.save_model(plugin, tmp / f"{graph}.plugin.onnx")
            files[graph] = {"onnx": f"{graph}.onnx", "plugin_onnx": f"{graph}.plugin.onnx"}
        weights.close()
        for graph in C.GRAPHS:
            # full check (shape inference included), reading the shared external weights
            onnx.checker.check_model(str(tmp / files[graph]["onnx"]), full_check=True)

        if model_dir is not None:
            step("copying tokenizer")
            _copy_tokenizer(model_dir, tmp / TOKENIZER_DIR)
        manifest = {
            "format": MANIFEST_FORMAT,
            "version": MANIFEST_VERSION,
            "model_type": cfg.model_type,
            "source": None if model_dir is None else str(Path(model_dir).resolve()),
            "dtype": dtype,
            "config": {k: v for k, v in vars(cfg).items()},
            "hf_config": hf_config.to_dict(),
            "graphs": files,
            "weights": WEIGHTS_FILE,
            "tokenizer": TOKENIZER_DIR if model_dir is not None else None,
            "op": {"domain": C.OP_DOMAIN, "name": C.OP_NAME, "version": C.OP_VERSION},
            "profile": None if profile is None else {
                "target_sparsity": profile.target_sparsity,
                "mean_byte_sparsity": profile.mean_byte_sparsity(),
                "kl": profile.kl,
                "method": profile.method,
                "file": C.DEFAULT_THRESHOLDS_FILE,
            },
        }
        if profile is not None:
            profile.save(tmp / "profile.json")
        (tmp / C.MANIFEST).write_text(json.dumps(manifest, indent=1, default=str))
    return manifest


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                    "vocab.json", "merges.txt", "generation_config.json", "chat_template.jinja")


def _copy_tokenizer(model_dir: Path, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for name in _TOKENIZER_FILES:
        if (model_dir / name).is_file():
            shutil.copy2(model_dir / name, dest / name)
    if (model_dir / "config.json").is_file():
        shutil.copy2(model_dir / "config.json", dest / "config.json")


def read_export_profile(export_dir: Path):
    """The sparsity profile an export carries (``profile.json``), or None when it has none."""
    from clada_export.profile import SparsityProfile

    path = Path(export_dir) / "profile.json"
    return SparsityProfile.load(path) if path.is_file() else None


def read_manifest(export_dir: Path) -> dict[str, Any]:
    """The export's manifest (``clada_export.json``), every field the toolchain reads checked
    (types, ranges, file names that stay inside the directory); a malformed one is a
    one-line UserError naming the file and the field. Returns the JSON object."""
    export_dir = Path(export_dir)
    path = export_dir / C.MANIFEST
    if not path.is_file():
        raise UserError(f"{export_dir} is not a clada-export output (no {C.MANIFEST}); "
                        "create one with `clada-export export MODEL -o DIR`")
    fix = f"re-export with `clada-export export MODEL -o {export_dir} --force`"
    d = read_json_object(path, "export manifest", fix)
    f = Fields(d, str(path), fix)
    f.str("format", choices=(MANIFEST_FORMAT,))
    if f.int("version") != MANIFEST_VERSION:
        raise f.fail("version", f"is {d['version']}, this clada-export reads version {MANIFEST_VERSION}")
    f.str("model_type")
    f.str("source", optional=True)
    f.str("dtype", choices=tuple(_DTYPES))
    cfg = f.obj("config")
    hf = f.obj("hf_config")
    # the decoder config was derived from hf_config at export time: they must still agree
    # (hf_config's keys read under the family's own names: GPT-2's n_embd, OPT's ffn_dim, ...)
    def hf_int(key: str) -> int:
        value = hf_dict_value(hf.d, key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise hf.fail(key, f"must be an integer >= 1, got {value!r}")
        return value

    for key, hf_key in (("vocab_size", "vocab_size"), ("hidden_size", "hidden_size"),
                        ("intermediate_size", "intermediate_size"), ("num_layers", "num_hidden_layers"),
                        ("num_heads", "num_attention_heads"), ("num_kv_heads", "num_key_value_heads"),
                        ("head_dim", "head_dim"), ("max_position_embeddings", "max_position_embeddings")):
        value = cfg.int(key, lo=1)
        if key == "head_dim":
            expect = hf.d.get("head_dim") or (hf_int("hidden_size") // hf_int("num_attention_heads"))
        elif key == "num_kv_heads":
            expect = hf.d.get("num_key_value_heads") or hf_int("num_attention_heads")
        else:
            expect = hf_int(hf_key)
        if value != expect:
            raise cfg.fail(key, f"is {value} but hf_config.{hf_key} is {expect}")
    graphs = f.obj("graphs")
    for graph in C.GRAPHS:
        g = graphs.obj(graph)
        g.file_name("onnx", export_dir)
        g.file_name("plugin_onnx", export_dir)
    f.file_name("weights", export_dir)
    if d.get("tokenizer") is not None:
        f.file_name("tokenizer", export_dir)
    f.int("max_len", default=None, lo=2, optional=True)
    prof = f.obj("profile", default=None, optional=True)
    if prof is not None:
        prof.float("target_sparsity", lo=0.0, hi=1.0)
        prof.float("mean_byte_sparsity", lo=0.0, hi=1.0)
        prof.float("kl", default=None, optional=True)
        prof.str("method")
        prof.file_name("file", export_dir)
    return d
