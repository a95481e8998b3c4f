"""Task scoring (evaluation/tasks.py, evaluation/scoring.py) on a tiny random Llama:
continuations scored from the context's cache equal a full forward pass of context +
continuation; multiple choice and LAMBADA's last word; the seeded subset; the sweep's
saved results resume; the report renders from saved JSON alone."""

from __future__ import annotations

import gzip
import json
import math

import numpy as np
import pytest
import torch

from clada_export.evaluation import tasks as T
from clada_export.evaluation.methods import static_method
from clada_export.evaluation.scoring import score_continuations


@pytest.fixture(scope="module")
def tiny(tiny_checkpoints):
    from clada_export.model.loading import load_decoder

    model, _ = load_decoder(tiny_checkpoints["llama"])
    return model.eval()


def _full_logprobs(model, ids: list[int], start: int, thresholds=None) -> np.ndarray:
    """log p(ids[t] | ids[:t]) for t >= start, from one teacher-forced pass (the reference)."""
    L = model.cfg.num_layers
    x = torch.tensor([ids])
    k, v = model.new_cache(1, len(ids))
    thr = torch.zeros(L, 1, 2) if thresholds is None else torch.as_tensor(thresholds)[:, None].float()
    with torch.no_grad():
        lg = model(x, torch.arange(len(ids))[None], k, v, thr, all_logits=True).logits[0]
    lp = torch.log_softmax(lg.float(), -1)
    return np.array([float(lp[t - 1, ids[t]]) for t in range(start, len(ids))])


def test_choices_from_the_context_cache_equal_a_full_pass(tiny):
    ctx = [5, 17, 33, 2, 9, 100]
    conts = [[4, 8, 15], [16, 23], [42], [7, 7, 7, 7]]
    s = score_continuations(tiny, static_method("dense", None, None), ctx, conts)
    for c, lp, per in zip(conts, s.logprobs, s.token_logprobs):
        ref = _full_logprobs(tiny, ctx + c, len(ctx))
        np.testing.assert_allclose(per, ref, rtol=1e-4, atol=1e-4)
        assert lp == pytest.approx(ref.sum(), abs=1e-3)
    assert s.steps == 4 * 3  # padded batch: every continuation runs max_len - 1 decode positions


def test_static_thresholds_apply_to_the_continuation_only(tiny):
    L = tiny.cfg.num_layers
    thr = np.full((L, 2), 0.05, np.float32)
    ctx, cont = [5, 17, 33, 2], [4, 8, 15, 16]
    s = score_continuations(tiny, static_method("uniform", 0.4, thr), ctx, [cont])
    # reference: dense context, then each continuation token as a sparse decode step
    k, v = tiny.new_cache(1, len(ctx) + len(cont))
    with torch.no_grad():
        out = tiny(torch.tensor([ctx]), torch.arange(len(ctx))[None], k, v, torch.zeros(L, 1, 2))
        lps = [float(torch.log_softmax(out.logits[0], -1)[cont[0]])]
        k, v = out.k_caches, out.v_caches
        for t in range(len(cont) - 1):
            o = tiny(torch.tensor([[cont[t]]]), torch.tensor([[len(ctx) + t]]), k, v, torch.as_tensor(thr)[:, None])
            k, v = o.k_caches, o.v_caches
            lps.append(float(torch.log_softmax(o.logits[0], -1)[cont[t + 1]]))
    np.testing.assert_allclose(s.token_logprobs[0], lps, rtol=1e-4, atol=1e-4)
    dense = score_continuations(tiny, static_method("dense", None, None), ctx, [cont])
    assert s.token_logprobs[0][0] == pytest.approx(dense.token_logprobs[0][0], abs=1e-6)  # prefill is dense
    assert not np.allclose(s.token_logprobs[0][1:], dense.token_logprobs[0][1:], atol=1e-4)


def test_hand_made_multiple_choice_item(tiny):
    ctx = [11, 12, 13]
    conts = [[20, 21], [30], [40, 41, 42]]
    s = score_continuations(tiny, static_method("dense", None, None), ctx, conts)
    texts = ["ab", "c", "defghi"]  # the continuations' characters, for the per-character norm
    raw = T.choose("acc_raw", s.logprobs, s.greedy, texts)
    norm = T.choose("acc_per_char", s.logprobs, s.greedy, texts)
    assert raw == int(np.argmax(s.logprobs))
    assert norm == int(np.argmax(np.array(s.logprobs) / np.array([2, 1, 6])))
    # a choice the model is sure of wins: the greedy continuation itself
    greedy = _greedy(tiny, ctx, 3)
    s2 = score_continuations(tiny, static_method("dense", None, None), ctx, [greedy, [299, 298, 297]])
    assert T.choose("acc_raw", s2.logprobs, s2.greedy, ["x", "y"]) == 0


def _greedy(model, ctx: list[int], n: int) -> list[int]:
    ids = list(ctx)
    for _ in range(n):
        L = model.cfg.num_layers
        k, v = model.new_cache(1, len(ids))
        with torch.no_grad():
            lg = model(torch.tensor([ids]), torch.arange(len(ids))[None], k, v, torch.zeros(L, 1, 2)).logits
        ids.append(int(lg[0].argmax()))
    return ids[len(ctx):]


def test_lambada_last_word_is_right_only_when_every_token_is_greedy(tiny):
    ctx = [3, 14, 15, 92, 65]
    word = _greedy(tiny, ctx, 2)
    s = score_continuations(tiny, static_method("dense", None, None), ctx, [word])
    assert T.choose("last_word", s.logprobs, s.greedy, ["w"]) is True
    wrong = [word[0], (word[1] + 1) % tiny.cfg.vocab_size]
    s = score_continuations(tiny, static_method("dense", None, None), ctx, [wrong])
    assert T.choose("last_word", s.logprobs, s.greedy, ["w"]) is False


def _write_task(root, directory: str, rows: list[dict], config: dict) -> None:
    d = root / directory
    d.mkdir(parents=True)
    with gzip.open(d / "requests.jsonl.gz", "wt") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    (d / "config.json").write_text(json.dumps(config))


def _rows(n_docs: int, n_choices: int, offset: int | None = None) -> list[dict]:
    rows = []
    for d in range(n_docs):
        for i in range(n_choices):
            rows.append({"doc_id": d, "idx": i, "label": d % n_choices,
                         "request": {"context": f"Q{d}", "continuation": f" a{i}"}})
    if offset is not None:  # unconditional requests, another metric: ignored
        rows.append({"doc_id": offset, "idx": 0, "label": 0, "request": {"context": "Answer:", "continuation": " x"}})
    return rows


def test_load_task_seeded_subset_gold_and_metric(tmp_path):
    _write_task(tmp_path, "hellaswag/rc_0shot", _rows(30, 4, offset=1000000),
                {"task_config": {"primary_metric": "acc_per_char", "metric_kwargs": {"uncond_docid_offset": 1000000}}})
    full = T.load_task("hellaswag", root=tmp_path)
    assert len(full) == 30 and all(len(it.requests) == 4 for it in full)
    assert full[7].gold == 3 and full[7].requests[2] == ("Q7", " a2") and full[7].metric == "acc_per_char"
    a = T.load_task("hellaswag", limit=10, seed=5, root=tmp_path)
    b = T.load_task("hellaswag", limit=10, seed=5, root=tmp_path)
    c = T.load_task("hellaswag", limit=10, seed=6, root=tmp_path)
    assert [i.doc_id for i in a] == [i.doc_id for i in b] == sorted(i.doc_id for i in a)
    assert [i.doc_id for i in a] != [i.doc_id for i in c]
    _write_task(tmp_path, "lambada/bpb_0shot", _rows(5, 1), {"task_config": {"primary_metric": "logits_per_byte"}})
    lam = T.load_task("lambada", root=tmp_path)
    assert lam[0].metric == "last_word" and lam[0].gold == 0


class _CharTokenizer:
    """One token per character: enough to check lm-eval's split."""
    bos_token_id = None
    eos_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}


def test_encode_pair_moves_the_contexts_trailing_space():
    ctx, cont = T.encode_pair(_CharTokenizer(), "Answer: ", "yes")
    assert ctx == [ord(c) for c in "Answer:"] and cont == [ord(c) for c in " yes"]


def test_accuracy_and_standard_error():
    acc, se = T.accuracy([1, 0, 1, 1])
    assert acc == 0.75 and se == pytest.approx(math.sqrt(0.75 * 0.25 / 3))
    assert T.parse_tasks("all") == list(T.TASKS) and T.parse_tasks("piqa,boolq") == ["piqa", "boolq"]
    assert T.parse_tasks("none") == []  # perplexity only; a later run with tasks resumes the results
    from clada_export.errors import UserError

    with pytest.raises(UserError, match="unknown task 'mmlu'"):
        T.parse_tasks("piqa,mmlu")
