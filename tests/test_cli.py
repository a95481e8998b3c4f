"""The export CLI: one-line errors with exit code 2, no partial output, `info`."""

import json
import shutil
import subprocess
import sys

import pytest

from clada_export.cli.main import main
from conftest import one_line_error, run_cli


def test_missing_checkpoint(tmp_path, capsys):
    code, _, err = run_cli(capsys, "export", str(tmp_path / "nope"), "-o", str(tmp_path / "out"))
    assert code == 2
    assert "does not exist" in one_line_error(err)
    assert not (tmp_path / "out").exists()


def test_not_a_checkpoint(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(capsys, "export", str(tmp_path / "empty"), "-o", str(tmp_path / "out"))
    assert code == 2 and "no config.json" in one_line_error(err)


def test_unsupported_architecture(tmp_path, capsys):
    from transformers import GPTJConfig

    GPTJConfig(n_layer=1, n_embd=32, n_head=2, vocab_size=64).save_pretrained(tmp_path / "gptj")
    code, _, err = run_cli(capsys, "export", str(tmp_path / "gptj"), "-o", str(tmp_path / "out"))
    line = one_line_error(err)
    assert code == 2 and "gptj" in line
    assert "gemma2, gemma3_text, gpt2, gpt_neox, llama, mistral, opt, phi3, qwen2, qwen3" in line
    assert not (tmp_path / "out").exists()


def test_weights_that_dont_match_config(tmp_path, capsys, tiny_checkpoints):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_checkpoints["llama"], bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["intermediate_size"] = 200
    (bad / "config.json").write_text(json.dumps(cfg))
    code, _, err = run_cli(capsys, "export", str(bad), "-o", str(tmp_path / "out"))
    line = one_line_error(err)
    assert code == 2 and "don't match config.json" in line and "w_gate_t" in line


def test_truncated_weights(tmp_path, capsys, tiny_checkpoints):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_checkpoints["llama"], bad)
    weights = next(bad.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:1000])
    code, _, err = run_cli(capsys, "export", str(bad), "-o", str(tmp_path / "out"))
    assert code == 2 and "damaged or truncated" in one_line_error(err)


def test_existing_output_needs_force(tmp_path, capsys, tiny_checkpoints):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    code, _, err = run_cli(capsys, "export", str(tiny_checkpoints["llama"]), "-o", str(out))
    assert code == 2 and "--force" in one_line_error(err)
    assert (out / "keep.txt").read_text() == "user data"
    # --force replaces only an earlier export (tests/test_user_safety.py), never this
    code, _, err = run_cli(capsys, "export", str(tiny_checkpoints["llama"]), "-o", str(out), "--force")
    assert code == 2 and "not a clada-export output" in one_line_error(err)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_failure_leaves_no_partial_output(tmp_path, capsys, tiny_checkpoints, monkeypatch):
    import clada_export.export.onnx_export as ox

    real = ox.trace_graph

    def fail_on_decode(model, graph, dtype):
        if graph == "decode":
            raise RuntimeError("simulated crash while tracing decode")
        return real(model, graph, dtype)

    monkeypatch.setattr(ox, "trace_graph", fail_on_decode)
    with pytest.raises(RuntimeError, match="simulated"):
        main(["export", str(tiny_checkpoints["llama"]), "-o", str(tmp_path / "out")])
    assert list(tmp_path.iterdir()) == []  # neither the output nor a temporary directory


def test_info_describes_an_export(tiny_export, capsys):
    code, out, _ = run_cli(capsys, "info", str(tiny_export))
    assert code == 0
    assert "[prefill]" in out and "[decode]" in out and "3 x clada::SparseMLP" in out
    assert "thresholds" in out and "entropy" in out and "act_stats" in out
    assert "sparsity profile: none" in out


def test_info_on_a_non_export(tmp_path, capsys):
    code, _, err = run_cli(capsys, "info", str(tmp_path))
    assert code == 2 and "not a clada-export output" in one_line_error(err)


def test_console_script_exit_code(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "clada_export.cli.main", "export", str(tmp_path / "x"),
                           "-o", str(tmp_path / "o")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "does not exist" in proc.stderr
