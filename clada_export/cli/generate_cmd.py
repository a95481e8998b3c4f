"""``clada-export generate``: run an export with the CLADA controller in the loop."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from clada_export.errors import UserError
from clada_export.runtime import BACKENDS

def add_parsers(sub, _add_model_arg) -> None:
    p = sub.add_parser("generate", help="generate text from an export with dynamic CLADA thresholds")
    p.add_argument("export_dir", metavar="OUT", help="directory written by `clada-export export`")
    p.add_argument("--prompt", action="append", required=True,
                   help="prompt text; repeat for a batch of several prompts")
    p.add_argument("--backend", choices=BACKENDS, default="onnxruntime")
    p.add_argument("--device", default=None, help="torch backend device (default: cuda if available, else cpu)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--static", action="store_true", help="the profile's static thresholds, no controller")
    p.add_argument("--dense", action="store_true", help="zero thresholds (the dense model)")
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the tokenizer's chat template")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--controller", metavar="JSON", help="controller settings: a JSON object of ControllerConfig "
                                                        "fields to override (docs/controller.md)")
    p.add_argument("--trace", help="write the controller's decisions as JSONL here")
    p.add_argument("--plot", help="write a PNG of surprisal, entropy and chosen sparsity per token here")
    p.set_defaults(func=run_generate)


def load_tokenizer(export_dir: Path, manifest: dict):
    from transformers import AutoTokenizer

    if not manifest.get("tokenizer"):
        raise UserError(f"{export_dir} has no tokenizer; re-export from a checkpoint directory that has one")
    return AutoTokenizer.from_pretrained(export_dir / manifest["tokenizer"], local_files_only=True)


def run_generate(args: argparse.Namespace) -> None:
    from clada_export.export.onnx_export import read_manifest
    from clada_export.profile import SparsityProfile
    from clada_export.runtime.backends import open_backend
    from clada_export.runtime.controller import ThresholdController, load_controller_config
    from clada_export.runtime.generator import Generator
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
    tok = load_tokenizer(export_dir, manifest)
    texts = args.prompt
    if args.chat:
        texts = [tok.apply_chat_template([{"role": "user", "content": t}], tokenize=False, add_generation_prompt=True)
                 for t in texts]
    prompts = [tok(t, add_special_tokens=not args.chat)["input_ids"] for t in texts]
    if any(len(p) == 0 for p in prompts):
        raise UserError("a prompt is empty; give some text with --prompt")

    profile_path = export_dir / "profile.json"
    profile = SparsityProfile.load(profile_path) if profile_path.is_file() else None
    factory, static, mode = None, None, "dense"
    controllers: list[ThresholdController] = []
    if profile is None and not args.dense:
        print("note: this export has no sparsity profile, so it runs dense; "
              "export with --profile for CLADA thresholds", file=sys.stderr)
    elif profile is not None and not args.dense:
        if args.static:
            static, mode = profile.static_thresholds(), "static"
        else:
            def factory(batch: int) -> ThresholdController:
                controllers.append(ThresholdController(profile, controller_config, batch=batch, trace=args.trace))
                return controllers[-1]

            mode = "dynamic"

    eos = tok.eos_token_id
    eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
    backend = open_backend(args.backend, export_dir, manifest, device=args.device)
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

    sp = result.sparsity[~np.isnan(result.sparsity)]
    stats = [f"{result.new_tokens} tokens", f"decode {result.decode_tokens_per_second:.1f} tokens/s",
             f"backend {args.backend}", f"thresholds {mode}"]
    if mode == "dynamic" and sp.size:
        stats.append(f"mean MLP sparsity {sp.mean():.3f} (target {profile.target_sparsity:.2f})")
        stats.append(f"denser on {100 * result.denser.mean():.0f}% of steps")
    elif mode == "static":
        stats.append(f"MLP sparsity {profile.mean_byte_sparsity():.3f}")
    print("[" + ", ".join(stats) + "]", file=sys.stderr)
    if args.trace and mode != "dynamic":
        print("note: --trace records controller decisions; none were made in this mode", file=sys.stderr)
    if args.plot:
        plot_signals(result, Path(args.plot), title=texts[0][:60])
        print(f"wrote {args.plot}", file=sys.stderr)


def plot_signals(result, path: Path, title: str = "") -> None:
    """Surprisal, entropy and chosen sparsity per generated token (first sequence)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = np.arange(result.surprisal.shape[0])
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 5), sharex=True)
    ax1.plot(steps, result.surprisal[:, 0], label="surprisal (nats)", color="tab:red")
    ax1.plot(steps, result.entropy[:, 0], label="entropy (nats)", color="tab:blue")
    ax1.set_ylabel("cognitive load")
    ax1.legend(loc="upper right")
    ax1.set_title(f"CLADA signals per token: {title}")
    ax2.step(steps, result.sparsity[:, 0], where="post", color="tab:green", label="chosen MLP sparsity")
    dense = np.where(result.denser[:, 0])[0]
    ax2.scatter(dense, result.sparsity[dense, 0], color="tab:orange", s=14, zorder=3, label="went denser")
    ax2.set_ylabel("byte sparsity")
    ax2.set_xlabel("generated token")
    ax2.legend(loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
