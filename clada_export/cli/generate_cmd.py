"""``clada-export generate``: run an export with the CLADA controller in the loop."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from clada_export.errors import UserError
from clada_export.runtime import BACKENDS

DTYPES = ("bfloat16", "float16", "float32")
# a prefill at least this long says so first: on a CPU it can take a while
LONG_PREFILL_TOKENS = 1024


def add_parsers(sub, _add_model_arg) -> None:
    p = sub.add_parser(
        "generate", help="generate text from an export with dynamic CLADA thresholds",
        description="Stream text from an export with the CLADA threshold controller in the loop (or the "
                    "profile's static thresholds, or dense), then print tokens/s, mean MLP sparsity and how "
                    "often the controller went denser.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("export_dir", metavar="OUT", help="directory written by `clada-export export`")
    p.add_argument("--prompt", action="append", required=True,
                   help="prompt text; repeat for a batch of several prompts")
    p.add_argument("--backend", choices=BACKENDS, default=None,
                   help="what runs the graphs (default: when the export's checkpoint is there, cuda on an NVIDIA "
                        "GPU with the kernel library built; on a CPU, torch (which decodes through the SparseMLP "
                        "kernel) or onnxruntime, whichever decodes faster over a few timed steps; without the "
                        "checkpoint, onnxruntime)")
    p.add_argument("--device", default=None,
                   help="device of backends that load the checkpoint (default: cuda if available, else cpu)")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="compute dtype of backends that load the checkpoint (default: the backend's own)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads of the torch backend (default: torch's, or 1 when the CPU is already busy: "
                        "docs/cpu.md)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate per prompt, at most")
    p.add_argument("--truncate-prompt", action="store_true",
                   help="drop a prompt's oldest tokens when prompt + --max-new-tokens exceeds the model's context "
                        "(without it, such a prompt is refused)")
    p.add_argument("--static", action="store_true", help="the profile's static thresholds, no controller")
    p.add_argument("--dense", action="store_true", help="zero thresholds (the dense model)")
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the tokenizer's chat template")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens; 0 = all")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass; 1 = all")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampler")
    p.add_argument("--controller", metavar="JSON", help="controller settings: a JSON object of ControllerConfig "
                                                        "fields to override (docs/controller.md)")
    p.add_argument("--no-dense-baseline", action="store_true",
                   help="skip the two short runs on the same backend (32 tokens each, EOS ignored: dense, then "
                        "these thresholds) whose tokens/s and ratio are printed beside the generation's")
    p.add_argument("--trace", help="write the controller's decisions as JSONL here")
    p.add_argument("--plot", help="write a PNG of surprisal, entropy and chosen sparsity per token here")
    p.set_defaults(func=run_generate)


def run_generate(args: argparse.Namespace) -> None:
    from clada_export.export.onnx_export import read_export_profile, read_manifest
    from clada_export.prompts import encode_prompts, eos_token_ids, fit_prompts, load_export_tokenizer
    from clada_export.runtime.backends import default_backend, open_backend
    from clada_export.runtime.choose_backend import choose_faster, onnx_graphs_present
    from clada_export.runtime.controller import load_controller_config
    from clada_export.runtime.generator import Generator, summary_stats, threshold_mode
    from clada_export.runtime.sampling import SamplingConfig

    export_dir = Path(args.export_dir)
    manifest = read_manifest(export_dir)
    if args.max_new_tokens < 1:
        raise UserError("--max-new-tokens must be at least 1")
    try:
        sampling = SamplingConfig(args.temperature, args.top_k, args.top_p, args.seed)
    except ValueError as e:
        raise UserError(str(e)) from None
    controller_config = load_controller_config(args.controller)
    tok = load_export_tokenizer(export_dir, manifest)
    texts, prompts = encode_prompts(tok, args.prompt, args.chat)
    prompts = fit_prompts(prompts, args.max_new_tokens, manifest, args.truncate_prompt)

    profile = read_export_profile(export_dir)
    if profile is None and not args.dense:
        print("note: this export has no sparsity profile, so it runs dense; "
              "export with --profile for CLADA thresholds", file=sys.stderr)
    factory, static, mode, controllers = threshold_mode(profile, args.dense, args.static, controller_config, args.trace)
    eos_ids = eos_token_ids(tok)
    named = args.backend is not None
    if not named:
        args.backend, note = default_backend(manifest, args.device)
        if note:
            print(f"note: {note}", file=sys.stderr)
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads must be at least 1, got {args.threads}")
    backend = open_backend(args.backend, export_dir, manifest, device=args.device, dtype=args.dtype)
    threads_note = None
    if args.backend == "torch" and backend.device.type == "cpu":
        import torch

        from clada_export.runtime.cpu_mlp import decode_threads

        threads, threads_note = decode_threads(args.threads)
        previous_threads = torch.get_num_threads()
        torch.set_num_threads(threads)
        if not named and onnx_graphs_present(export_dir, manifest):
            # on a CPU torch (with the SparseMLP kernel) and onnxruntime both run this export:
            # time a few decode steps of each and keep the faster (runtime/choose_backend.py)
            from clada_export.runtime.backends import OnnxRuntimeBackend

            start = (profile.static_thresholds() if profile is not None and not args.dense
                     else np.zeros((backend.num_layers, 2), np.float32))
            held = [backend]
            backend = None
            choice = choose_faster({"torch": held.pop, "onnxruntime": lambda: OnnxRuntimeBackend(export_dir)},
                                   prompts, start)
            for name, why in choice.failed.items():
                print(f"note: the {name} backend did not run here ({why})", file=sys.stderr)
            print(choice.line(), file=sys.stderr)
            args.backend, backend = choice.name, choice.backend
            del choice
            if args.backend != "torch":
                torch.set_num_threads(previous_threads)
    if threads_note and args.backend == "torch":
        print(f"note: {threads_note}", file=sys.stderr)
    if getattr(backend, "mlp_note", None):
        gpu = "; --backend cuda runs the GPU kernels" if backend.device.type == "cuda" else ""
        print(f"note: the torch backend decodes with the reference op (dense products, then masks), so sparsity "
              f"saves no time here: {backend.mlp_note}{gpu}", file=sys.stderr)
    gen = Generator(backend, eos_token_ids=eos_ids, controller_factory=factory, static_thresholds=static)

    stream = len(prompts) == 1
    printed = {"text": ""}

    def on_tokens(ids: np.ndarray) -> None:
        if not stream or ids[0] < 0 or ids[0] in eos_ids:
            return
        on_tokens.ids.append(int(ids[0]))
        text = tok.decode(on_tokens.ids, skip_special_tokens=True)
        sys.stdout.write(text[len(printed["text"]):])
        sys.stdout.flush()
        printed["text"] = text

    on_tokens.ids = []
    n_prompt = sum(len(p) for p in prompts)
    if n_prompt >= LONG_PREFILL_TOKENS:
        print(f"prefilling {n_prompt} prompt tokens on {args.backend}...", file=sys.stderr, flush=True)
    if stream:
        sys.stdout.write(texts[0] if not args.chat else "")
    result = gen.generate(prompts, args.max_new_tokens, sampling, on_tokens=on_tokens)
    for controller in controllers:
        controller.close()
    if stream:
        sys.stdout.write("\n")
    else:
        for text, ids in zip(texts, result.tokens):
            print(f"--- {text!r}\n{tok.decode(ids, skip_special_tokens=True)}")

    stats = summary_stats(result, args.backend, mode, profile)
    if mode != "dense" and not args.no_dense_baseline:
        from clada_export.runtime.baseline import compare_with_dense

        # the same thresholds without a trace: the generation's own trace stays as written
        factory2, _, _, controllers2 = threshold_mode(profile, args.dense, args.static, controller_config, None)
        try:
            comparison = compare_with_dense(
                Generator(backend, controller_factory=factory2, static_thresholds=static), prompts,
                args.max_new_tokens)
        finally:
            for controller in controllers2:
                controller.close()
        if comparison is not None:
            why = " (onnxruntime computes the MLP dense, then masks)" if args.backend == "onnxruntime" else ""
            stats.insert(2, comparison.line() + why)
    if args.backend == "torch" and backend.device.type == "cpu":
        torch.set_num_threads(previous_threads)  # main() may be called again in this process (tests)
    print("[" + ", ".join(stats) + "]", file=sys.stderr)
    if args.trace and mode != "dynamic":
        print("note: --trace records controller decisions; none were made in this mode", file=sys.stderr)
    if args.plot:
        from clada_export.calibrate.report import plot_signals

        plot_signals(result, Path(args.plot), title=texts[0][:60])
        print(f"wrote {args.plot}", file=sys.stderr)
