"""The model cache: GGUF checkpoints converted once into ordinary checkpoint directories.

An entry (``<cache>/models/<NAME>``) is only ever visible complete:

* it is built in a temporary directory beside it, ``.<NAME>.clada-tmp-<pid>``
  (``clada_export/atomic.py``, the one definition of atomic output), and renamed into
  place at the end; a conversion interrupted by SIGINT (or SIGTERM under the CLI)
  removes its temporary directory, and one killed harder (SIGKILL, power loss) leaves
  one that the next conversion to the same cache recognises by its name (its process
  is gone) and removes;
* it holds a manifest (inside the marker file ``clada-export-source.json``): every
  file's size and sha256. Each use checks that every file is there with its size, and
  the small files (config, tokenizer) against their hash; the weights' hashes are
  checked by ``clada-export models verify NAME`` (hashing gigabytes on every use would
  cost seconds to minutes). A damaged entry is one line naming the rebuild command.

Cache root: ``$CLADA_EXPORT_CACHE`` when set, else ``$XDG_CACHE_HOME/clada-export``
(``~/.cache/clada-export``).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable

from clada_export.atomic import remove_stale, staging_dir
from clada_export.errors import UserError

MARKER = "clada-export-source.json"
# Bump when the conversion's output changes, so that old caches are rebuilt.
# 2: the marker holds a manifest of every file's size and sha256.
FORMAT_VERSION = 2
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
# Files up to this size are hashed on every use; larger ones (the weights) by `models verify`.
HASH_ON_USE_BYTES = 16 * 2**20


def cache_root() -> Path:
    """Root of clada-export's cache: ``$CLADA_EXPORT_CACHE`` or ``~/.cache/clada-export``."""
    env = os.environ.get("CLADA_EXPORT_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "clada-export"


def entry_dir(name: str) -> Path:
    """Where the converted checkpoint ``name`` lives (it may not exist yet)."""
    return cache_root() / "models" / name


def sha256_file(path: Path, chunk: int = 8 * 2**20, progress: Callable[[int], None] | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
            if progress is not None:
                progress(len(block))
    return h.hexdigest()


def is_complete_checkpoint(path: Path, model_type: str | None = None) -> bool:
    """The structure of a finished entry: config.json (of ``model_type`` when given),
    non-empty ``*.safetensors``, tokenizer files and our marker of the current format.
    (Its manifest is checked by :func:`check_entry`.)"""
    if not path.is_dir():
        return False
    try:
        config = json.loads((path / "config.json").read_text())
        marker = json.loads((path / MARKER).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(config, dict) or not isinstance(marker, dict):
        return False
    if model_type is not None and config.get("model_type") != model_type:
        return False
    if marker.get("format_version") != FORMAT_VERSION:
        return False
    if not any(f.stat().st_size > 0 for f in path.glob("*.safetensors")):
        return False
    return all((path / name).is_file() for name in TOKENIZER_FILES)


def write_manifest(path: Path, marker: dict) -> None:
    """Write the marker with the manifest of every other file in ``path`` (last: its
    presence says the entry is complete)."""
    umask = os.umask(0)
    os.umask(umask)
    files = {}
    for f in sorted(p for p in path.iterdir() if p.is_file() and p.name != MARKER):
        f.chmod(0o666 & ~umask)  # safetensors writes 0600; the cache is ordinary files under the user's umask
        files[f.name] = {"bytes": f.stat().st_size, "sha256": sha256_file(f)}
    marker = dict(marker, format_version=FORMAT_VERSION, files=files)
    (path / MARKER).write_text(json.dumps(marker, indent=2) + "\n")


def check_entry(path: Path, rebuild_hint: str, full: bool = False,
                progress: Callable[[int], None] | None = None) -> None:
    """Raise a one-line UserError if the entry's files differ from its manifest: a file
    missing, of another size, or (small files always, every file with ``full``) of
    another sha256."""
    try:
        marker = json.loads((path / MARKER).read_text())
        files = marker["files"]
        if not isinstance(files, dict) or not files:
            raise ValueError("empty manifest")
        for fname, rec in files.items():
            if not isinstance(rec, dict) or not isinstance(rec.get("bytes"), int) or not isinstance(rec.get("sha256"), str):
                raise ValueError(f"bad record for {fname}")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"the cached model {path} has no valid manifest ({MARKER}: {e}); rebuild it: "
                        f"`{rebuild_hint}`") from None
    for fname, rec in files.items():
        f = path / fname
        if not f.is_file():
            raise UserError(f"the cached model {path} is damaged: {fname} is missing; rebuild it: `{rebuild_hint}`")
        size = f.stat().st_size
        if size != rec["bytes"]:
            raise UserError(f"the cached model {path} is damaged: {fname} has {size} bytes, the manifest says "
                            f"{rec['bytes']}; rebuild it: `{rebuild_hint}`")
        if full or size <= HASH_ON_USE_BYTES:
            if sha256_file(f, progress=progress) != rec["sha256"]:
                raise UserError(f"the cached model {path} is damaged: {fname} does not match its sha256 in the "
                                f"manifest; rebuild it: `{rebuild_hint}`")


def build_entry(target: Path, build: Callable[[Path], dict], force: bool = False) -> Path:
    """Build the entry ``target`` atomically (``atomic.staging_dir``): ``build(tmp)`` writes
    the checkpoint into a fresh ``.<NAME>.clada-tmp-<pid>`` beside it and returns the
    marker's fields; the manifest is written last, then the directory takes ``target``'s
    name (an old, damaged, or with ``force`` any entry is replaced only then). Temporaries
    of conversions that died are removed first."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the model cache {target.parent} ({e}); set CLADA_EXPORT_CACHE "
                        "to a writable directory") from None
    parent = target.parent.resolve()
    # only entries of this cache's models directory are ever replaced
    with staging_dir(target, force=True, is_ours=lambda p: p.resolve().parent == parent,
                     what="a clada-export model cache entry", flag="cache entry") as tmp:
        write_manifest(tmp, build(tmp))
    return target
