"""Issue 12: never lose a user's data, one clear line for every bad input.

Each numbered case of the issue has a test here: `--force` replaces only our own
outputs and never the current directory; a SIGTERM'd export leaves nothing behind and
the next run clears what a SIGKILL'd one left; malformed files are one line; prompts
are checked; messages name the flag given; outputs follow the umask.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from clada_export import contract as C
from clada_export.atomic import TMP_TAG, remove_stale, write_json
from conftest import one_line_error, run_cli


def _screen(text: str) -> list[str]:
    """The non-blank lines ``text`` leaves on a terminal: a carriage return moves back to the
    line's start and later characters overwrite (how a progress bar redraws and clears)."""
    lines = []
    for raw in text.split("\n"):
        buf: list[str] = []
        col = 0
        for ch in raw:
            if ch == "\r":
                col = 0
                continue
            if col < len(buf):
                buf[col] = ch
            else:
                buf.append(ch)
            col += 1
        if "".join(buf).strip():
            lines.append("".join(buf).strip())
    return lines


def _only_line(err: str) -> str:
    """stderr must leave exactly one line on screen (no progress-bar residue): that line."""
    lines = _screen(err)
    assert len(lines) == 1, err
    return lines[0]


def _listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


# -- case 1 and 2: --force --------------------------------------------------------------------
def test_force_refuses_the_current_directory_and_its_parents(tmp_path, capsys, monkeypatch, tiny_checkpoints):
    work = tmp_path / "work" / "here"
    work.mkdir(parents=True)
    (work / "notes.txt").write_text("mine")
    (work / C.MANIFEST).write_text(json.dumps({"format": "clada-export"}))  # even one that looks like ours
    monkeypatch.chdir(work)
    before = _listing(tmp_path)
    for target in (".", "..", str(work)):
        code, _, err = run_cli(capsys, "export", tiny_checkpoints["llama"], "-o", target, "--force")
        line = _only_line(err)
        assert code == 2 and ("current directory" in line or "parent of the current directory" in line), line
    assert _listing(tmp_path) == before


def test_force_refuses_home_and_root(tmp_path, capsys, monkeypatch, tiny_checkpoints):
    home = tmp_path / "home"
    home.mkdir()
    (home / "thesis.tex").write_text("years of work")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(capsys, "export", tiny_checkpoints["llama"], "-o", home, "--force")
    assert code == 2 and "home directory" in _only_line(err)
    code, _, err = run_cli(capsys, "export", tiny_checkpoints["llama"], "-o", "/", "--force")
    assert code == 2 and "filesystem root" in _only_line(err)
    assert (home / "thesis.tex").read_text() == "years of work"


def test_force_refuses_a_directory_that_is_not_an_export(tmp_path, capsys, tiny_checkpoints):
    user = tmp_path / "userdir"
    user.mkdir()
    (user / "important.txt").write_text("keep me")
    code, _, err = run_cli(capsys, "export", tiny_checkpoints["llama"], "-o", user, "--force")
    line = _only_line(err)
    assert code == 2 and "not a clada-export output" in line and "--force will not replace it" in line
    assert _listing(tmp_path) == ["userdir", "userdir/important.txt"]


def test_force_replaces_an_export_and_nothing_beside_it(tmp_path, capsys, tiny_checkpoints, tiny_export):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(tiny_export, out)
    (tmp_path / "beside.txt").write_text("mine")
    (out / "stale_extra.bin").write_text("from an older export")
    code, stdout, _ = run_cli(capsys, "export", tiny_checkpoints["qwen2"], "-o", out, "--force")
    assert code == 0 and "wrote" in stdout
    assert json.loads((out / C.MANIFEST).read_text())["model_type"] == "qwen2"
    assert not (out / "stale_extra.bin").exists()
    assert _listing(tmp_path) == ["beside.txt", "out", *sorted(f"out/{p}" for p in _listing(out))]


# -- case 3: a killed export leaves nothing -----------------------------------------------------
def _kill_when(proc: subprocess.Popen, ready, timeout: float = 240.0) -> bool:
    """SIGTERM ``proc`` as soon as ``ready()``; False if it ended first."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            return False
        if ready():
            proc.send_signal(signal.SIGTERM)
            return True
        time.sleep(0.01)
    proc.kill()
    raise AssertionError("the export never reached the point to kill it at")


def test_sigterm_during_export_leaves_no_partial_output(tmp_path, tiny_checkpoints, tiny_export):
    """SIGTERM at two points (checkpoint loaded and the staging directory just made; the
    prefill graph written while replacing an export with --force): nothing of the new
    export stays, the user's files beside it are untouched, the replaced export is whole."""
    import shutil

    def staged(root: Path, name: str) -> list[Path]:
        return list(root.glob(f".{name}{TMP_TAG}*"))

    points = {
        "staging made": lambda root: bool(staged(root, "out")),
        "replacing an export, prefill written": lambda root: any((s / "prefill.plugin.onnx").exists()
                                                                for s in staged(root, "out")),
    }
    runs = {}
    for i, point in enumerate(points):  # both at once: each waits mostly on tracing
        root = tmp_path / f"run{i}"
        root.mkdir()
        (root / "user.txt").write_text("user data")
        args = [sys.executable, "-m", "clada_export.cli.main", "export", str(tiny_checkpoints["llama"]), "-o", "out"]
        if point.startswith("replacing"):
            shutil.copytree(tiny_export, root / "out")
            args.append("--force")
        before = {p: (root / p).read_bytes() for p in _listing(root) if (root / p).is_file()}
        proc = subprocess.Popen(args, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        runs[point] = (root, proc, before)
    for point, (root, proc, before) in runs.items():
        assert _kill_when(proc, lambda: points[point](root)), f"export finished before {point}"
    for point, (root, proc, before) in runs.items():
        _, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 128 + signal.SIGTERM, (point, stderr)
        assert stderr.strip().splitlines()[-1] == "terminated", (point, stderr)
        after = {p: (root / p).read_bytes() for p in _listing(root) if (root / p).is_file()}
        assert after == before, (point, sorted(set(after) ^ set(before)))
        assert not any(TMP_TAG in p for p in _listing(root)), point


def test_next_run_removes_what_a_dead_run_left(tmp_path):
    from clada_export.atomic import staging_dir

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".out{TMP_TAG}{dead.pid}"
    (stale / "sub").mkdir(parents=True)
    (stale / "weights.data").write_bytes(b"\0" * 1000)
    stale_file = tmp_path / f".out.json{TMP_TAG}{dead.pid}"
    stale_file.write_text("{")
    live = tmp_path / f".out{TMP_TAG}{os.getppid()}"  # a live process's: may still be writing
    live.mkdir()
    with staging_dir(tmp_path / "out") as tmp:  # what export, eval and calibrate outputs go through
        (tmp / "x").write_text("new")
    write_json(tmp_path / "out.json", {})
    assert not stale.exists() and not stale_file.exists() and live.is_dir()
    assert (tmp_path / "out" / "x").read_text() == "new"


def test_an_output_moved_aside_by_a_dead_run_is_put_back(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    aside = tmp_path / f".out{TMP_TAG}{dead.pid}-old"  # killed between the two renames of a swap
    aside.mkdir()
    (aside / C.MANIFEST).write_text("{}")
    remove_stale(tmp_path / "out")
    assert (tmp_path / "out" / C.MANIFEST).is_file() and not aside.exists()


def test_failed_export_into_new_parents_leaves_no_directories(tmp_path, capsys, tiny_checkpoints, tiny_profile):
    profile = tmp_path / "p.json"
    tiny_profile.save(profile)
    # the profile is for the llama: exporting the mistral with it fails inside the export
    code, _, err = run_cli(capsys, "export", tiny_checkpoints["mistral"], "--profile", profile,
                           "-o", tmp_path / "a" / "b" / "out")
    assert code == 2 and "another model" in _only_line(err)  # and no progress-bar residue (case 7)
    assert _listing(tmp_path) == ["p.json"]


# -- case 4: malformed files are one line ----------------------------------------------------------
@pytest.mark.parametrize("content, field", [
    ("[1, 2, 3]", "holds a JSON list"),
    (None, "field t_in"),  # a non-numeric threshold
    ("{\"format\": \"clada-profile\", \"version\": 1", "not readable JSON"),
])
def test_malformed_profile_is_one_line(tmp_path, capsys, tiny_checkpoints, tiny_profile, content, field):
    path = tmp_path / "p.json"
    if content is None:
        d = tiny_profile.to_dict()
        d["t_in"][1][2] = "0.5x"
        content = json.dumps(d)
    path.write_text(content)
    code, _, err = run_cli(capsys, "export", tiny_checkpoints["llama"], "--profile", path, "-o", tmp_path / "out")
    line = _only_line(err)
    assert code == 2 and str(path) in line and field in line, line
    assert _listing(tmp_path) == ["p.json"]


def test_generate_on_a_corrupt_manifest_is_one_line(tmp_path, capsys, tiny_export):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(tiny_export, out)
    text = (out / C.MANIFEST).read_text()
    (out / C.MANIFEST).write_text(text[: len(text) // 2])
    code, _, err = run_cli(capsys, "generate", out, "--prompt", "w5")
    line = _only_line(err)
    assert code == 2 and C.MANIFEST in line and "not readable JSON" in line


# -- case 5 and 6: prompts -----------------------------------------------------------------------
def test_whitespace_prompt_is_refused(capsys, tiny_chat_export):
    for prompt in (" ", "\n\t "):
        code, _, err = run_cli(capsys, "generate", tiny_chat_export, "--prompt", prompt)
        assert code == 2 and "empty or only whitespace" in _only_line(err)


def test_prompt_beyond_the_context_is_refused_or_truncated(capsys, tiny_chat_export):
    # the tiny model's context is 256 positions
    long_prompt = " ".join(f"w{2 + i % 8}" for i in range(250))  # single-digit words: one token each
    code, _, err = run_cli(capsys, "generate", tiny_chat_export, "--prompt", long_prompt, "--max-new-tokens", 8)
    line = _only_line(err)
    assert code == 2 and "250 tokens" in line and "(256 tokens)" in line and "--truncate-prompt" in line
    code, _, err = run_cli(capsys, "generate", tiny_chat_export, "--prompt", "w5", "--max-new-tokens", 256)
    assert code == 2 and "leaves no room" in _only_line(err)
    code, out, err = run_cli(capsys, "generate", tiny_chat_export, "--prompt", long_prompt, "--max-new-tokens", 8,
                             "--truncate-prompt", "--dense")
    assert code == 0 and "cut to their last 248 tokens" in err


def test_long_prefill_says_so(capsys, tiny_chat_export, monkeypatch):
    import clada_export.cli.generate_cmd as g

    monkeypatch.setattr(g, "LONG_PREFILL_TOKENS", 100)
    code, _, err = run_cli(capsys, "generate", tiny_chat_export, "--prompt", " ".join(["w7"] * 120),
                           "--max-new-tokens", 2, "--dense")
    assert code == 0 and "prefilling 120 prompt tokens" in err


# -- case 7: messages name the flag that was given -----------------------------------------------
def test_eval_levels_names_levels(capsys, tmp_path):
    code, _, err = run_cli(capsys, "eval", tmp_path / "missing", "--levels", "0.3", "1.5")
    line = _only_line(err)
    assert code == 2 and "--levels must be in (0, 1)" in line and "--target-sparsity" not in line


def test_unsupported_architecture_comes_before_the_tokenizer(tmp_path, capsys):
    from transformers import GPTJConfig

    GPTJConfig(n_layer=1, n_embd=32, n_head=2, vocab_size=64).save_pretrained(tmp_path / "gptj")
    capsys.readouterr()
    code, _, err = run_cli(capsys, "calibrate", tmp_path / "gptj", "--target-sparsity", "0.5",
                           "-o", tmp_path / "p.json")
    line = _only_line(err)
    assert code == 2 and "'gptj' is not supported" in line and "tokenizer" not in line


# -- case 8: the umask ---------------------------------------------------------------------------------
@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_outputs_follow_the_umask(tmp_path, tiny_profile, umask):
    old = os.umask(umask)
    try:
        tiny_profile.save(tmp_path / "profile.json")
        write_json(tmp_path / "eval.json", {"a": 1})
    finally:
        os.umask(old)
    for name in ("profile.json", "eval.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask, name
    assert _listing(tmp_path) == ["eval.json", "profile.json"]
