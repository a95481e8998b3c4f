"""Named models (model/registry.py) and the model cache (model/cache.py): the GGUF's hash
check, atomic conversion into the cache, the manifest checked on use, stale temporaries.
Nothing here downloads or loads a real model: the GGUF parts are small files of our own
and the conversion is replaced by a function that writes a checkpoint-shaped directory."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from clada_export.errors import UserError
from clada_export.model import cache, registry


def _fake_spec(tmp_path: Path, parts: list[bytes], sha: str | None = None) -> tuple[registry.ModelSpec, list[Path]]:
    files = []
    for i, data in enumerate(parts):
        f = tmp_path / f"part{i:02d}.bin"
        f.write_bytes(data)
        files.append(f)
    whole = b"".join(parts)
    spec = dataclasses.replace(
        registry.QWEN25_CODER_15B, name="toy-model", checkpoint_name="Toy-Model",
        parts=tuple(registry.Part(f"toy-part{i}", "1.0", f"toy_part{i}", f"data/part{i:02d}.bin")
                    for i in range(len(parts))),
        size=len(whole), sha256=sha or hashlib.sha256(whole).hexdigest())
    return spec, files


def _fake_convert(gguf: Path, out: Path, checks, hint, progress) -> dict:
    """What convert_gguf leaves behind, in miniature (the GGUF's bytes as the weights)."""
    (out / "config.json").write_text(json.dumps({"model_type": checks.model_type}))
    (out / "model.safetensors").write_bytes(gguf.read_bytes())
    for name in cache.TOKENIZER_FILES:
        (out / name).write_text("{}")
    return {"config": {"model_type": checks.model_type}}


@pytest.fixture
def toy(tmp_path, monkeypatch):
    monkeypatch.setenv("CLADA_EXPORT_CACHE", str(tmp_path / "cache"))
    parts_dir = tmp_path / "site"
    parts_dir.mkdir()
    spec, files = _fake_spec(parts_dir, [b"GGUF" + b"a" * 60, b"b" * 50, b"c" * 7])
    monkeypatch.setattr(registry, "_part_path", lambda part: files[[p.distribution for p in spec.parts]
                                                                    .index(part.distribution)])
    monkeypatch.setattr(registry, "convert_gguf", _fake_convert)
    return spec, files


def test_parts_are_joined_in_order_and_checked(toy, tmp_path):
    spec, files = toy
    out = tmp_path / "joined"
    out.mkdir()
    gguf = registry.assemble_gguf(spec, registry.part_paths(spec), out, progress=False)
    assert gguf.read_bytes() == b"".join(f.read_bytes() for f in files)


def test_a_corrupted_part_fails_the_hash_check_in_one_line(toy, tmp_path):
    spec, files = toy
    data = bytearray(files[1].read_bytes())
    data[3] ^= 1  # same size, one bit flipped
    files[1].write_bytes(bytes(data))
    out = tmp_path / "joined"
    out.mkdir()
    with pytest.raises(UserError) as err:
        registry.assemble_gguf(spec, registry.part_paths(spec), out, progress=False)
    msg = str(err.value)
    assert "sha256" in msg and "--force-reinstall" in msg and "\n" not in msg


def test_a_truncated_part_is_refused_before_joining(toy):
    spec, files = toy
    files[2].write_bytes(b"c" * 6)
    with pytest.raises(UserError, match="expected"):
        registry.part_paths(spec)


def test_conversion_is_atomic_and_leaves_a_manifest(toy):
    spec, _ = toy
    path = registry.model_dir(spec, progress=False)
    assert path == cache.entry_dir("Toy-Model")
    marker = json.loads((path / cache.MARKER).read_text())
    assert marker["format_version"] == cache.FORMAT_VERSION
    assert set(marker["files"]) == {"config.json", "model.safetensors", *cache.TOKENIZER_FILES}
    assert marker["source"]["sha256"] == spec.sha256
    assert not (path / ".parts").exists()
    # nothing but the entry beside it: no temporary, no joined GGUF
    assert [p.name for p in path.parent.iterdir()] == ["Toy-Model"]
    cache.check_entry(path, "rebuild", full=True)  # every file matches its manifest


def test_a_failed_conversion_leaves_nothing_visible(toy, monkeypatch):
    spec, _ = toy

    def broken(gguf, out, checks, hint, progress):
        (out / "config.json").write_text("{}")
        raise RuntimeError("conversion crashed halfway")

    monkeypatch.setattr(registry, "convert_gguf", broken)
    with pytest.raises(UserError, match="conversion crashed halfway"):
        registry.model_dir(spec, progress=False)
    models = cache.entry_dir("Toy-Model").parent
    assert not any(models.iterdir())


def test_a_damaged_entry_is_one_line_naming_the_rebuild(toy):
    spec, _ = toy
    path = registry.model_dir(spec, progress=False)
    (path / "tokenizer.json").write_text("[]")  # same size, other bytes: small files are hashed on use
    with pytest.raises(UserError) as err:
        registry.model_dir(spec, progress=False)
    msg = str(err.value)
    assert "tokenizer.json" in msg and "models get toy-model --force" in msg and "\n" not in msg
    (path / "model.safetensors").write_bytes(b"x")  # a different size is caught for any file
    with pytest.raises(UserError, match="model.safetensors has 1 bytes"):
        cache.check_entry(path, "rebuild")
    # --force rebuilds it, replacing the damaged entry only once the new one is complete
    registry.model_dir(spec, progress=False, force=True)
    cache.check_entry(path, "rebuild", full=True)


def test_stale_temporary_of_a_dead_conversion_is_removed(toy):
    spec, _ = toy
    models = cache.entry_dir("Toy-Model").parent
    models.mkdir(parents=True)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale = models / f".Toy-Model.clada-tmp-{dead}"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    live = models / f".Toy-Model.clada-tmp-{os.getppid()}"  # a live process's: kept
    live.mkdir()
    registry.model_dir(spec, progress=False)
    assert not stale.exists() and live.exists()


def test_names_resolve_wherever_model_is_taken(toy, tmp_path, monkeypatch):
    spec, _ = toy
    monkeypatch.setitem(registry.MODELS, spec.name, spec)
    assert registry.resolve_model("toy-model") == cache.entry_dir("Toy-Model")
    assert registry.resolve_model("TOY-MODEL") == cache.entry_dir("Toy-Model")
    ckpt = tmp_path / "toy-model"  # an existing directory of that name wins
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    assert registry.resolve_model("toy-model") == Path("toy-model")
    with pytest.raises(UserError, match="known: "):
        registry.get_spec("no-such-model")


def test_a_missing_model_names_the_get_command(toy, monkeypatch):
    spec, _ = toy
    monkeypatch.setattr(registry, "_part_path", lambda part: None)
    with pytest.raises(UserError) as err:
        registry.model_dir(spec, progress=False)
    assert "clada-export models get toy-model" in str(err.value)


def test_registry_facts_match_the_issue():
    q = registry.get_spec("qwen2.5-coder-1.5b")
    assert len(q.parts) == 22 and q.parts[0].relpath == "data/part01.bin" and q.parts[-1].relpath == "data/part22.bin"
    assert q.size == 1_117_320_768
    assert q.sha256 == "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"
    assert "Apache-2.0" in q.license and "no licence" in q.license and "never redistribute" in q.license
    assert registry.DEFAULT.name == "smollm2-135m" and registry.DEFAULT.default


def test_models_list_cli_runs():
    from clada_export.cli.main import main

    assert main(["models", "list"]) == 0
    assert main(["models", "get", "no-such-model"]) == 2


def test_a_given_gguf_is_checked_converted_and_left_in_place(toy, tmp_path, monkeypatch):
    spec, files = toy
    monkeypatch.setattr(registry, "install_parts", lambda *a: pytest.fail("--gguf must install nothing"))
    monkeypatch.setattr(registry, "get_spec", lambda name: spec)
    given = tmp_path / "elsewhere" / "toy.gguf"
    given.parent.mkdir()
    given.write_bytes(b"".join(f.read_bytes() for f in files))
    path = registry.get_model("toy-model", progress=False, gguf=given)
    assert (path / "model.safetensors").read_bytes() == given.read_bytes()
    assert given.is_file() and sorted(p.name for p in given.parent.iterdir()) == ["toy.gguf"]
    marker = json.loads((path / cache.MARKER).read_text())
    assert marker["source"]["given_file"] == str(given.resolve()) and marker["source"]["sha256"] == spec.sha256


def test_a_given_gguf_of_the_wrong_size_or_hash_is_one_line(toy, tmp_path):
    spec, files = toy
    given = tmp_path / "toy.gguf"
    given.write_bytes(b"GGUF" + b"x" * 10)
    with pytest.raises(UserError, match="bytes") as err:
        registry.model_dir(spec, progress=False, gguf=given)
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="no such file"):
        registry.model_dir(spec, progress=False, gguf=tmp_path / "missing.gguf")
    data = bytearray(b"".join(f.read_bytes() for f in files))
    data[10] ^= 1
    given.write_bytes(bytes(data))
    with pytest.raises(UserError, match="sha256") as err:
        registry.model_dir(spec, progress=False, gguf=given)
    assert "--gguf" in str(err.value) and "\n" not in str(err.value)
    assert given.is_file() and not registry.is_converted(spec)
