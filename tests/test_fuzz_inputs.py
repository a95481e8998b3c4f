"""Fuzzing what the CLI reads (issue 12): mutated profiles, export manifests and controller
configs. Every input either loads into a valid object or is refused with exit code 2 and
one line naming the file (and the field, for a field's mutation); never a traceback, and
nothing is left on disk. Each test prints how many inputs it tried (``pytest -s``)."""

from __future__ import annotations

import copy
import json
import math
import os
import random
import shutil
from pathlib import Path

import numpy as np
import pytest

from clada_export import contract as C
from clada_export.errors import UserError
from conftest import run_cli

# what a field is replaced by: wrong types, non-finite, out-of-range and boundary values
REPLACEMENTS = {
    "null": None, "string": "x", "empty list": [], "object": {"a": 1}, "NaN": math.nan, "infinity": math.inf,
    "negative": -1, "zero": 0, "fraction": 0.5, "bool": True, "huge": 10 ** 30, "nested list": [[1, 2], [3]],
}
DELETE = object()


def _paths(obj, prefix=(), depth=3):
    """Key paths into a JSON object: every key, and the first and last element of lists,
    down to ``depth``."""
    if depth == 0:
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield prefix + (k,)
            yield from _paths(v, prefix + (k,), depth - 1)
    elif isinstance(obj, list) and obj:
        for i in sorted({0, len(obj) - 1}):
            yield prefix + (i,)
            yield from _paths(obj[i], prefix + (i,), depth - 1)


def _mutations(base: dict, skip: tuple[str, ...] = (), depth: int = 3):
    """(description, top-level field or None, file text) for every field mutation of
    ``base`` and a set of whole-file corruptions."""
    for path in _paths(base, depth=depth):
        if path[0] in skip:
            continue
        for name, value in [("deleted", DELETE), *REPLACEMENTS.items()]:
            d = copy.deepcopy(base)
            parent = d
            for key in path[:-1]:
                parent = parent[key]
            if value is DELETE:
                if isinstance(parent, list):
                    parent.pop(path[-1])
                else:
                    del parent[path[-1]]
            else:
                parent[path[-1]] = copy.deepcopy(value)
            yield f"{'.'.join(map(str, path))} {name}", str(path[0]), json.dumps(d)  # NaN -> a NaN literal
    text = json.dumps(base, indent=1)
    rng = random.Random(0)
    for cut in sorted(rng.sample(range(1, len(text)), 12)):
        yield f"truncated at {cut}", None, text[:cut]
    for name, content in (("empty", ""), ("a list", "[1, 2]"), ("a string", '"profile"'), ("null", "null"),
                          ("a number", "3"), ("garbage", "\x00\x01 not json"), ("deep nesting", "[" * 100_000)):
        yield f"file is {name}", None, content


def _check_refusal(code: int, err: str, path: Path, field: str | None, what: str) -> str:
    lines = [l for l in err.splitlines() if l.strip()]
    assert code == 2 and len(lines) == 1, (what, err)
    assert str(path) in lines[0], (what, lines[0])
    if field is not None:
        assert field in lines[0], (what, lines[0])
    return lines[0]


def test_fuzzed_profiles(tmp_path, capsys, tiny_profile):
    """Each mutated profile goes to `export --profile`: refused with one line naming the
    file and field, or loaded into a profile whose thresholds are finite and >= 0."""
    from clada_export.profile import SparsityProfile

    base = tiny_profile.to_dict()
    base["calibration"] = {"data": "text.txt", "seconds": {"total": 1.0}}
    work = tmp_path / "work"
    work.mkdir()
    path = work / "profile.json"
    tried = refused = 0
    for what, field, text in _mutations(base, skip=("calibration",)):
        path.write_bytes(text.encode("utf-8", "surrogatepass"))
        try:
            profile = SparsityProfile.load(path)
        except UserError:
            profile = None
        # the model is checked after the profile: a profile that loads reaches that error
        code, _, err = run_cli(capsys, "export", tmp_path / "no-model", "--profile", path, "-o", work / "out")
        if profile is None:
            _check_refusal(code, err, path, field, what)
            refused += 1
        else:
            assert code == 2 and "does not exist" in err, (what, err)
            thr = profile.static_thresholds()
            assert thr.shape == (profile.num_layers, 2) and np.isfinite(thr).all() and (thr >= 0).all(), what
        assert sorted(p.name for p in work.iterdir()) == ["profile.json"], what
        tried += 1
    print(f"fuzzed profiles: {tried} inputs, {refused} refused with one line, {tried - refused} valid")
    assert tried > 300 and refused > 250


def _accepted(load, source) -> bool:
    """Whether ``load(source)`` takes the input: False when it refuses it with a UserError
    (any other exception propagates)."""
    try:
        load(source)
    except UserError:
        return False
    return True


def _manifest_copy(export: Path, dest: Path) -> Path:
    """``export`` with its files linked, not copied, so the manifest can be rewritten."""
    dest.mkdir()
    for p in export.iterdir():
        if p.name != C.MANIFEST:
            (dest / p.name).symlink_to(p)
    return dest / C.MANIFEST


def test_fuzzed_manifests(tmp_path, capsys, tiny_chat_export):
    """Each mutated manifest goes to `info`, and to `generate` when it is refused (a sample
    of those that load also runs `generate`, end to end)."""
    from clada_export.export.onnx_export import read_manifest

    base = json.loads((tiny_chat_export / C.MANIFEST).read_text())
    out = tmp_path / "export"
    path = _manifest_copy(tiny_chat_export, out)
    before = sorted([C.MANIFEST, *(p.name for p in out.iterdir())])
    tried = refused = generated = 0
    rng = random.Random(1)
    for what, field, text in _mutations(base, skip=("hf_config",), depth=3):
        path.write_text(text, encoding="utf-8")
        valid = _accepted(read_manifest, out)
        code, stdout, err = run_cli(capsys, "info", out)
        if not valid:
            _check_refusal(code, err, path, field, what)
            code, _, err = run_cli(capsys, "generate", out, "--prompt", "w5 w6", "--max-new-tokens", 1)
            _check_refusal(code, err, path, field, what)
            refused += 1
        else:
            assert code == 0, (what, err)
            if rng.random() < 0.05:
                code, _, err = run_cli(capsys, "generate", out, "--prompt", "w5 w6", "--max-new-tokens", 2)
                assert code in (0, 2), (what, err)
                if code == 2:
                    assert len([l for l in err.splitlines() if "error:" in l]) == 1, (what, err)
                generated += 1
        assert sorted(p.name for p in out.iterdir()) == before, what
        tried += 1
    print(f"fuzzed manifests: {tried} inputs, {refused} refused with one line, {tried - refused} valid "
          f"({generated} of them also through generate)")
    assert tried > 300 and refused > 200


def test_fuzzed_controller_configs(tmp_path, capsys, tiny_chat_export):
    """Each mutated controller config goes to `generate --controller`: refused with one
    line, or (a sample of those that load) a generation that runs."""
    from clada_export.runtime.controller import ControllerConfig, load_controller_config

    base = ControllerConfig().to_dict()
    path = tmp_path / "controller.json"
    tried = refused = generated = 0
    rng = random.Random(2)
    for what, field, text in _mutations(base):
        path.write_text(text, encoding="utf-8")
        valid = _accepted(load_controller_config, path)
        tried += 1
        if valid and rng.random() > 0.08:
            continue
        code, _, err = run_cli(capsys, "generate", tiny_chat_export, "--prompt", "w5 w6 w7", "--max-new-tokens", 3,
                               "--controller", path)
        if valid:  # it may still be refused once the profile is known (bounds vs target): one line
            assert code == 0 or (code == 2 and len(err.strip().splitlines()) == 1), (what, err)
            generated += 1
        else:
            _check_refusal(code, err, path, field, what)
            refused += 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["controller.json"]
    print(f"fuzzed controller configs: {tried} inputs, {refused} refused with one line, {tried - refused} valid "
          f"({generated} of them through generate)")
    assert tried > 200 and refused > 150
