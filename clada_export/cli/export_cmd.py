"""``clada-export export`` and ``clada-export info``."""

from __future__ import annotations

import argparse
from pathlib import Path

from clada_export import contract as C


def add_parsers(sub, add_model_arg) -> None:
    p = sub.add_parser(
        "export", help="trace a checkpoint into prefill/decode ONNX graphs (+ TensorRT engines)",
        description="Trace MODEL into `prefill` and `decode` ONNX graphs in which every MLP is one "
                    "clada::SparseMLP op (plus .plugin.onnx variants for the TensorRT plugin), with the "
                    "profile's thresholds as defaults. The output is built beside OUT and appears whole.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_arg(p)
    p.add_argument("-o", "--output", required=True, metavar="OUT",
                   help="output directory (must not exist unless --force)")
    p.add_argument("--profile", help="sparsity profile from `clada-export calibrate` (embedded in the graphs; "
                                     "without one the export runs dense)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16"], help="weights and activations")
    p.add_argument("--force", action="store_true",
                   help="replace OUT if it is an earlier clada-export output (never any other directory)")
    p.add_argument("--engine", action="store_true",
                   help="also build TensorRT engines (needs tensorrt, or tensorrt_rtx for an ahead-of-time build)")
    p.set_defaults(func=run_export)

    p = sub.add_parser("info", help="print what an export directory holds",
                       description="Print an export's model, graphs (inputs, outputs, SparseMLP nodes), weights, "
                                   "engines and sparsity profile.")
    p.add_argument("export_dir", metavar="OUT", help="directory written by `clada-export export`")
    p.set_defaults(func=run_info)


def run_export(args: argparse.Namespace) -> None:
    from clada_export.export.onnx_export import check_output_dir, export_onnx
    from clada_export.model.loading import load_decoder, resolve_model_dir
    from clada_export.profile import SparsityProfile
    from clada_export.progress import Progress

    out = Path(args.output)
    check_output_dir(out, args.force)  # fail before the slow part
    profile = SparsityProfile.load(args.profile) if args.profile else None
    model_dir = resolve_model_dir(args.model)
    steps = ["load"] + [f"{g}:{s}" for g in C.GRAPHS for s in ("trace", "write")] + ["tokenizer"]
    if args.engine:
        steps += [f"engine:{g}" for g in C.GRAPHS]
    with Progress(total=len(steps), desc="export", unit="step") as bar:
        bar.set_postfix_str("loading checkpoint")
        model, hf_config = load_decoder(model_dir)
        bar.update()

        def on_step(msg: str) -> None:
            bar.set_postfix_str(msg)
            if not msg.startswith("tracing"):
                bar.update()

        manifest = export_onnx(model, hf_config, out, model_dir=model_dir, profile=profile,
                               dtype=args.dtype, force=args.force, on_step=on_step)
        if args.engine:
            from clada_export.export.tensorrt import build_engines

            build_engines(out, on_step=lambda msg: (bar.set_postfix_str(msg), bar.update()))
        bar.update(bar.total - bar.n)
    print(f"wrote {out}: {', '.join(manifest['graphs'])} graphs "
          f"({manifest['config']['num_layers']} SparseMLP nodes each)")


def run_info(args: argparse.Namespace) -> None:
    import onnx

    from clada_export.export.onnx_export import read_manifest

    out = Path(args.export_dir)
    manifest = read_manifest(out)
    cfg = manifest["config"]
    print(f"{out}: {manifest['model_type']} ({cfg['num_layers']} layers, hidden {cfg['hidden_size']}, "
          f"intermediate {cfg['intermediate_size']}, vocab {cfg['vocab_size']}), dtype {manifest['dtype']}")
    weights = out / manifest["weights"]
    if weights.exists():
        print(f"weights: {manifest['weights']} ({weights.stat().st_size / 2**20:.1f} MiB, shared by all graphs)")
    for graph, files in manifest["graphs"].items():
        path = out / files["onnx"]
        model = onnx.load(str(path), load_external_data=False)
        n_sparse = sum(1 for n in model.graph.node if n.domain == C.OP_DOMAIN and n.op_type == C.OP_NAME)
        print(f"\n[{graph}] {files['onnx']} (+ {files['plugin_onnx']} without function bodies): "
              f"{len(model.graph.node)} nodes, {n_sparse} x {C.OP_DOMAIN}::{C.OP_NAME}")
        for kind, values in (("in ", model.graph.input), ("out", model.graph.output)):
            shown = [v for v in values if not v.name.startswith(("past_", "present_"))]
            for v in shown:
                dims = [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
                dtype = onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type)
                print(f"  {kind} {v.name:<12} {str(dtype):<8} {dims}")
            caches = [v for v in values if v.name.startswith(("past_", "present_"))]
            if caches:
                dims = [d.dim_param or d.dim_value for d in caches[0].type.tensor_type.shape.dim]
                # e.g. "past_key.* past_value.*": keys and values alike, one per layer
                names = " ".join(dict.fromkeys(v.name.split(".")[0] + ".*" for v in caches))
                print(f"  {kind} {len(caches)} KV cache tensors ({names}) {dims}")
    for name in sorted(out.glob("*.engine")):
        print(f"\nengine: {name.name} ({name.stat().st_size / 2**20:.1f} MiB)")
    prof = manifest.get("profile")
    if prof:
        kl = "n/a" if prof.get("kl") is None else f"{prof['kl']:.4f}"
        print(f"\nsparsity profile: target {prof['target_sparsity']:.2f}, mean MLP byte sparsity "
              f"{prof['mean_byte_sparsity']:.3f}, KL vs dense {kl} ({prof['method']}); default thresholds in "
              f"{prof['file']}")
    else:
        print("\nsparsity profile: none (thresholds default to 0: dense); add one with --profile")
