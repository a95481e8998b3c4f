"""Prompts for generation: the export's tokenizer, and fitting prompts into the context
(the export's KV cache or the model's window), refused or cut from the left."""

from __future__ import annotations

import sys
from pathlib import Path

from clada_export.errors import UserError


def context_limit(manifest: dict) -> tuple[int, str]:
    """The most tokens (prompt + generated) one sequence may hold, and what sets it: the
    export's cache (``max_len``) if it has a fixed one, else the model's context window."""
    if manifest.get("max_len"):
        return int(manifest["max_len"]), "the export's KV cache"
    return int(manifest["config"]["max_position_embeddings"]), "the model's context window"


def fit_prompts(prompts: list[list[int]], max_new_tokens: int, manifest: dict, truncate: bool) -> list[list[int]]:
    """Prompts that leave room for ``max_new_tokens``: UserError for a longer one, or with
    ``truncate`` its oldest tokens dropped."""
    limit, what = context_limit(manifest)
    if max_new_tokens >= limit:
        raise UserError(f"--max-new-tokens {max_new_tokens} leaves no room for a prompt in {what} of {limit} "
                        f"tokens; ask for fewer than {limit}")
    room = limit - max_new_tokens
    longest = max(len(p) for p in prompts)
    if longest > room and not truncate:
        raise UserError(f"a prompt of {longest} tokens + --max-new-tokens {max_new_tokens} exceeds {what} "
                        f"({limit} tokens); shorten the prompt, lower --max-new-tokens, or pass "
                        f"--truncate-prompt to keep its last {room} tokens")
    if longest > room:
        print(f"note: prompts cut to their last {room} tokens (--truncate-prompt)", file=sys.stderr)
    return [p[-room:] for p in prompts]


def load_export_tokenizer(export_dir: Path, manifest: dict):
    """The tokenizer an export carries (copied from its checkpoint)."""
    from transformers import AutoTokenizer

    if not manifest.get("tokenizer"):
        raise UserError(f"{export_dir} has no tokenizer; re-export from a checkpoint directory that has one")
    return AutoTokenizer.from_pretrained(export_dir / manifest["tokenizer"], local_files_only=True)


def encode_prompts(tok, texts: list[str], chat: bool) -> tuple[list[str], list[list[int]]]:
    """The prompts' token ids (and their texts, wrapped in the chat template when ``chat``);
    refuses an empty prompt."""
    if any(not t.strip() for t in texts):
        raise UserError("a --prompt is empty or only whitespace; give some text")
    if chat:
        texts = [tok.apply_chat_template([{"role": "user", "content": t}], tokenize=False, add_generation_prompt=True)
                 for t in texts]
    prompts = [tok(t, add_special_tokens=not chat)["input_ids"] for t in texts]
    if any(len(p) == 0 for p in prompts):
        raise UserError("a --prompt tokenizes to no tokens; give some text")
    return texts, prompts


def eos_token_ids(tok) -> list[int]:
    """The tokenizer's end-of-sequence ids as a list (none, one or several)."""
    eos = tok.eos_token_id
    return [eos] if isinstance(eos, int) else list(eos or [])
