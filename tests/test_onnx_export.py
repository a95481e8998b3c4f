"""The exported graphs: structure, ONNX checker, and parity with our torch model in ONNX Runtime."""

import numpy as np
import onnx
import pytest
import torch

from clada_export import contract as C
from clada_export.model.loading import load_decoder
from clada_export.runtime.backends import OnnxRuntimeBackend, TorchBackend
from clada_export.runtime.generator import Generator
from conftest import rel_err


def _mlp_quantile_thresholds(model, ids, q=0.45):
    """Per-layer (t_in, t_mid) at quantile q of |x| and |h| on a dense pass: about 45%
    of activations fall below each threshold."""
    acts = {}
    hooks = [layer.mlp.register_forward_hook(lambda m, args, out, i=i: acts.__setitem__(i, args[0]))
             for i, layer in enumerate(model.layers)]
    B, T = ids.shape
    k, v = model.new_cache(B, T)
    with torch.no_grad():
        model(ids, torch.arange(T)[None].expand(B, -1), k, v, torch.zeros(model.cfg.num_layers, B, 2))
    for h in hooks:
        h.remove()
    th = []
    for i, layer in enumerate(model.layers):
        x = acts[i]
        h = layer.mlp.intermediate(x)
        th.append([torch.quantile(x.abs().flatten(), q).item(), torch.quantile(h.abs().flatten(), q).item()])
    return torch.tensor(th)


def test_graph_structure(tiny_export):
    for graph in C.GRAPHS:
        full = onnx.load(str(tiny_export / f"{graph}.onnx"), load_external_data=False)
        plugin = onnx.load(str(tiny_export / f"{graph}.plugin.onnx"), load_external_data=False)
        nodes = [n for n in full.graph.node if n.domain == C.OP_DOMAIN]
        assert [n.op_type for n in nodes] == [C.OP_NAME] * 3
        assert {(f.domain, f.name) for f in full.functions} == {(C.OP_DOMAIN, C.OP_NAME)}
        assert not plugin.functions
        assert sum(n.domain == C.OP_DOMAIN for n in plugin.graph.node) == 3
        assert any(o.domain == C.OP_DOMAIN and o.version == C.OP_VERSION for o in full.opset_import)
        names = [i.name for i in full.graph.input]
        assert names[:3] == (["input_ids", "seq_lens", "thresholds"] if graph == C.PREFILL
                             else ["input_ids", "position", "thresholds"])
        assert names[3:5] == [C.past_key(0), C.past_value(0)]
        outs = [o.name for o in full.graph.output]
        assert outs[:3] == ["logits", "entropy", "logsumexp"]
        dims = [d.dim_param for d in full.graph.input[0].type.tensor_type.shape.dim]
        assert dims[0] == "batch" and (graph == C.DECODE or dims[1] == "seq")
        # weights live in the one shared external file
        assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in full.graph.initializer)
        onnx.checker.check_model(str(tiny_export / f"{graph}.onnx"), full_check=True)


@pytest.mark.parametrize("sparse", [False, True], ids=["zero-thresholds", "sparse-thresholds"])
def test_onnxruntime_matches_torch(tiny_export, tiny_checkpoints, sparse):
    model, _ = load_decoder(tiny_checkpoints["llama"])
    torch.manual_seed(0)
    B, T = 2, 11
    ids = torch.randint(0, model.cfg.vocab_size, (B, T))
    lens = torch.tensor([T, 7])
    L = model.cfg.num_layers
    per_layer = _mlp_quantile_thresholds(model, ids) if sparse else torch.zeros(L, 2)
    th = per_layer[:, None, :].expand(L, B, 2).contiguous()
    if sparse:  # different thresholds per sequence: row 1 a little sparser
        th[:, 1] *= 1.2

    ref, ort_ = TorchBackend(model), OnnxRuntimeBackend(tiny_export)
    for be in (ref, ort_):
        be.start(B, 32)
    a, b = ref.prefill(ids, lens, th), ort_.prefill(ids, lens, th)
    assert rel_err(b.logits, a.logits) <= 1e-4
    assert rel_err(b.act_stats, a.act_stats) <= 1e-5
    assert torch.allclose(b.entropy, a.entropy, atol=1e-5, rtol=0)
    assert torch.allclose(b.logsumexp, a.logsumexp, atol=1e-5, rtol=0)
    tok = a.logits.argmax(-1)
    for step in range(4):
        pos = lens + step
        a, b = ref.decode(tok, pos, th), ort_.decode(tok, pos, th)
        assert rel_err(b.logits, a.logits) <= 1e-4, f"decode step {step}"
        assert torch.allclose(b.entropy, a.entropy, atol=1e-5, rtol=0)
        assert torch.allclose(b.logsumexp, a.logsumexp, atol=1e-5, rtol=0)
        tok = a.logits.argmax(-1)
    if sparse:
        # the thresholds really are sparse: 30-60% of MLP inputs below t_in
        with torch.no_grad():
            frac = [(layer_x.abs() < t).float().mean().item()
                    for layer_x, t in zip(_collect_mlp_inputs(model, ids), per_layer[:, 0])]
        assert all(0.3 <= f <= 0.6 for f in frac), frac


def _collect_mlp_inputs(model, ids):
    acts = []
    hooks = [layer.mlp.register_forward_hook(lambda m, args, out: acts.append(args[0])) for layer in model.layers]
    B, T = ids.shape
    k, v = model.new_cache(B, T)
    model(ids, torch.arange(T)[None].expand(B, -1), k, v, torch.zeros(model.cfg.num_layers, B, 2))
    for h in hooks:
        h.remove()
    return acts


def test_32_greedy_tokens_identical(tiny_export, tiny_checkpoints):
    model, _ = load_decoder(tiny_checkpoints["llama"])
    torch.manual_seed(5)
    prompts = [torch.randint(0, 320, (9,)).tolist(), torch.randint(0, 320, (4,)).tolist()]
    static = _mlp_quantile_thresholds(model, torch.tensor([prompts[0]])).numpy()
    results = [Generator(be, static_thresholds=static).generate(prompts, 32)
               for be in (TorchBackend(model), OnnxRuntimeBackend(tiny_export))]
    assert results[0].tokens == results[1].tokens
    assert all(len(t) == 32 for t in results[0].tokens)
