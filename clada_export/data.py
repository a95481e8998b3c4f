"""Calibration and evaluation text, and turning text into fixed-size token windows.

Both texts ship inside the package (``clada_export/texts/``), so every machine that
installs clada-export has them, byte for byte the same: nothing to download, no
system package needed. They are English prose from the Python documentation
(PSF License 2.0, see ``texts/README.md`` and ``texts/LICENSE-PSF.txt``), reduced to
prose (code, doctests, grammar and tables removed):

- calibration: the HOWTOs (functional programming, logging, regular expressions,
  Unicode, sockets, sorting, descriptors, enum, annotations, porting), about 52k
  SmolLM2 tokens;
- evaluation (held out): the tutorial and the FAQ, about 71k SmolLM2 tokens.

The two come from different documents and share no 13-word sequence. A user's own
text goes through the same functions (``--data FILE``).
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import Iterable, Sequence

from clada_export.errors import UserError

TEXTS_DIR = Path(__file__).resolve().parent / "texts"
CALIBRATION_FILES = ("python-docs-calibration.txt",)
EVALUATION_FILES = ("python-docs-evaluation.txt",)
# Held-out evaluation needs at least this many tokens for a perplexity worth reporting.
MIN_EVALUATION_TOKENS = 20_000


def _shipped(names: Sequence[str], role: str) -> list[Path]:
    paths = [TEXTS_DIR / name for name in names]
    for path in paths:
        if not path.is_file():
            raise UserError(f"the {role} text {path} that ships with clada-export is missing; reinstall "
                            "the package (pip install -e .), or pass your own text file with --data")
    return paths


def _assert_disjoint(calibration: Iterable[Path], evaluation: Iterable[Path]) -> None:
    cal = {os.path.realpath(p) for p in calibration}
    shared = sorted(p for p in (os.path.realpath(e) for e in evaluation) if p in cal)
    if shared:
        raise AssertionError(f"calibration and evaluation text must be disjoint; both use {shared}")


def calibration_text_sources() -> list[Path]:
    """The files of the default calibration text, in order."""
    paths = _shipped(CALIBRATION_FILES, "calibration")
    _assert_disjoint(paths, [TEXTS_DIR / n for n in EVALUATION_FILES])
    return paths


def evaluation_text_sources() -> list[Path]:
    """The files of the default held-out evaluation text, in order (disjoint from calibration)."""
    paths = _shipped(EVALUATION_FILES, "evaluation")
    _assert_disjoint([TEXTS_DIR / n for n in CALIBRATION_FILES], paths)
    return paths


def _describe(paths: Sequence[Path]) -> str:
    return str(paths[0]) if len(paths) == 1 else f"{paths[0]} (+{len(paths) - 1} more files)"


def load_text(paths: Path | str | Sequence[Path | str]) -> str:
    """The files' text (UTF-8; ``.gz`` is decompressed), joined by blank lines.

    UserError for a file that is missing, not a file, not UTF-8 text, or empty.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    paths = [Path(p) for p in paths]
    if not paths:
        raise UserError("no text file given; pass a UTF-8 text file with --data")
    parts = []
    for path in paths:
        if not path.exists():
            raise UserError(f"data file {path} does not exist; pass an existing UTF-8 text file with --data")
        if not path.is_file():
            raise UserError(f"data file {path} is not a file; pass a UTF-8 text file with --data")
        try:
            raw = path.read_bytes()
            if path.suffix == ".gz":
                raw = gzip.decompress(raw)
            text = raw.decode("utf-8")
        except (OSError, EOFError, gzip.BadGzipFile) as e:
            raise UserError(f"data file {path} cannot be read ({e})") from None
        except UnicodeDecodeError as e:
            raise UserError(f"data file {path} is not UTF-8 text ({e.reason} at byte {e.start}); "
                            "pass a UTF-8 text file with --data") from None
        if not text.strip():
            raise UserError(f"data file {path} is empty; it must hold text (English prose) to "
                            "tokenize, thousands of tokens of it")
        parts.append(text.strip("\n"))
    return "\n\n".join(parts) + "\n"


def leading_bos(tokenizer) -> list[int]:
    """``[bos_id]`` when the tokenizer's own encoding starts with BOS (Gemma, Llama 2/3):
    such a model was trained always seeing it first, and scoring text without it
    measures something else (Gemma 3 270M: perplexity 51 without, 20 with). ``[]`` for
    tokenizers that add none (SmolLM2, Qwen2.5)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return []
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return [int(bos)] if ids and ids[0] == bos else []


def text_tokens_per_window(tokenizer, window: int) -> int:
    """How many text tokens one window of ``window`` holds (one less with a leading BOS)."""
    return window - len(leading_bos(tokenizer))


def token_windows(tokenizer, text: str, n_tokens: int, window: int, *, start: int = 0,
                  source: str | None = None):
    """``[n_windows, window]`` token windows of the text as a LongTensor, ``n_windows =
    n_tokens // window`` (a partial window is dropped): consecutive slices of the text's
    tokens from ``start`` (tokenized without special tokens), each led by BOS when the
    tokenizer puts one first (:func:`leading_bos`), as the model saw text in training.
    UserError if the text holds too few tokens; ``source`` names it in the message.
    """
    import torch

    if window < 1:
        raise UserError(f"the window must be at least 1 token, got {window}")
    if n_tokens < window:
        raise UserError(f"{n_tokens} tokens are less than one window of {window} tokens; "
                        f"ask for at least {window}")
    if start < 0:
        raise UserError(f"the start offset must be >= 0, got {start}")
    bos = leading_bos(tokenizer)
    body = window - len(bos)
    if body < 1:
        raise UserError(f"a window of {window} token(s) holds only the BOS token; ask for windows of at least 2")
    n_windows = n_tokens // window
    needed = start + n_windows * body
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) < needed:
        what = source or "the text"
        usable = max(0, (len(ids) - start) // body * window)
        hint = (f"ask for {usable} tokens or fewer, or give a longer file" if usable >= window
                else "give a longer file")
        raise UserError(f"{what} is too short: it holds {len(ids)} tokens, and {needed} are needed "
                        f"({n_windows} windows of {window} tokens" + (" with BOS first" if bos else "")
                        + (f" after skipping {start}" if start else "") + f"); {hint}")
    text_part = torch.tensor(ids[start:needed], dtype=torch.long).view(n_windows, body)
    if not bos:
        return text_part
    return torch.cat([torch.full((n_windows, 1), bos[0], dtype=torch.long), text_part], dim=1)


def load_windows(tokenizer, paths: Path | str | Sequence[Path | str], n_tokens: int, window: int,
                 *, start: int = 0):
    """load_text + token_windows, with the file names in any error message."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    paths = [Path(p) for p in paths]
    text = load_text(paths)
    return token_windows(tokenizer, text, n_tokens, window, start=start, source=_describe(paths))


# Windows of the calibration text: the tables' and, right after them, the held-out ones
# on which KL against the dense model is measured (disjoint).
CALIB_WINDOW = 256
HELDOUT_WINDOW = 128


def _sources(paths, role: str) -> list[Path]:
    if paths is None:
        return calibration_text_sources() if role == "calibration" else evaluation_text_sources()
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    return [Path(p) for p in paths]


def calibration_windows(tokenizer, paths, tokens: int, heldout: int):
    """Table windows ``[tokens // 256, 256]`` and held-out windows ``[heldout // 128, 128]``
    that follow them in the text, and a description of the text. ``paths`` None: the
    shipped calibration text."""
    import torch

    if tokens < CALIB_WINDOW:
        raise UserError(f"{tokens} calibration tokens are less than one window of {CALIB_WINDOW}; "
                        f"ask for at least {CALIB_WINDOW} (4096 recommended)")
    if heldout < HELDOUT_WINDOW:
        raise UserError(f"{heldout} held-out tokens are less than one window of {HELDOUT_WINDOW}; "
                        f"ask for at least {HELDOUT_WINDOW}")
    paths = _sources(paths, "calibration")
    text, source = load_text(paths), _describe(paths)
    t_used = tokens // CALIB_WINDOW * CALIB_WINDOW
    h_used = heldout // HELDOUT_WINDOW * HELDOUT_WINDOW
    what = f"calibration text {source} ({t_used} tokens for the tables + {h_used} for the held-out KL windows)"
    # both from one text, the held-out windows right after the tables' text tokens
    table = token_windows(tokenizer, text, t_used, CALIB_WINDOW, source=what)
    start = table.shape[0] * text_tokens_per_window(tokenizer, CALIB_WINDOW)
    held = token_windows(tokenizer, text, h_used, HELDOUT_WINDOW, start=start, source=what)
    return table, held, source


def evaluation_windows(tokenizer, paths, tokens: int, window: int):
    """``[tokens // window, window]`` windows of the evaluation text (``paths`` None: the
    shipped held-out text) and a description of it."""
    paths = _sources(paths, "evaluation")
    return load_windows(tokenizer, paths, tokens, window), _describe(paths)
