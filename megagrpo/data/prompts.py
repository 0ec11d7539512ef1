"""Prompts: open-r1's conversation format, chat templates, length limits.

Each row becomes a chat conversation in a ``prompt`` column (the system prompt, then the user's
problem), the columns the reward functions read (``solution``, ...) are kept as they are, and the
rest are dropped. ``tokenize_prompts`` renders the chat template (the tokenizer's, or the
recipe's ``chat_template``) with the generation prompt and keeps the token ids; prompts longer than
``max_prompt_length`` tokens are skipped and counted, or raise, never cut mid-text.
"""

from __future__ import annotations

from dataclasses import dataclass, field


class PromptError(ValueError):
    """A dataset that does not fit the prompt format; the message names the column."""


@dataclass(frozen=True)
class PromptFormat:
    """How dataset rows become prompts."""

    prompt_column: str = "problem"
    """Column with the problem text, or with a list of chat messages."""
    system_prompt: str | None = None
    """System message put first in every conversation (None: none)."""
    reward_columns: list[str] = field(default_factory=lambda: ["solution"])
    """Columns the reward functions read; they must exist and are kept."""
    max_prompt_length: int | None = None
    """Longest prompt in tokens (chat template included); None: no limit."""
    long_prompts: str = "skip"
    """``skip`` (count and drop) or ``error`` for prompts over max_prompt_length."""


def _conversation(value, system_prompt: str | None, column: str, row: int) -> list[dict]:
    if isinstance(value, str):
        messages = [{"role": "user", "content": value}]
    elif isinstance(value, list) and all(isinstance(m, dict) and "role" in m for m in value):
        messages = [{"role": m["role"], "content": m.get("content", "")} for m in value]
    else:
        raise PromptError(
            f"row {row}: column '{column}' holds {type(value).__name__}; expected a string or "
            "a list of chat messages"
        )
    if system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}] + messages
    return messages


def format_conversations(ds, fmt: PromptFormat, *, name: str = "dataset"):
    """Add the ``prompt`` conversation column, keep reward columns, drop everything else."""
    present = list(ds.column_names)
    needed = [fmt.prompt_column] + [c for c in fmt.reward_columns if c != fmt.prompt_column]
    missing = [c for c in needed if c not in present]
    if missing:
        what = "dataset_prompt_column" if fmt.prompt_column in missing else "reward column"
        raise PromptError(
            f"{name}: column(s) {missing} not found ({what}); columns present: {present}"
        )
    keep = set(fmt.reward_columns)

    def convert(batch, indices):
        return {
            "prompt": [
                _conversation(v, fmt.system_prompt, fmt.prompt_column, i)
                for v, i in zip(batch[fmt.prompt_column], indices)
            ]
        }

    drop = [c for c in present if c not in keep]
    return ds.map(convert, batched=True, with_indices=True, remove_columns=drop)


@dataclass(frozen=True)
class TokenizedPrompts:
    dataset: object
    """The dataset with ``prompt_ids`` added."""
    skipped: int
    """Prompts dropped for exceeding max_prompt_length."""


def tokenize_prompts(
    ds, tokenizer, fmt: PromptFormat, *, chat_template: str | None = None, name: str = "dataset"
) -> TokenizedPrompts:
    """Render the chat template with the generation prompt and tokenize every prompt."""
    template = chat_template or getattr(tokenizer, "chat_template", None)
    if not template:
        raise PromptError(
            f"{name}: the tokenizer has no chat template and the recipe sets no chat_template"
        )
    if fmt.long_prompts not in ("skip", "error"):
        raise PromptError(f"long_prompts={fmt.long_prompts!r}; expected 'skip' or 'error'")

    def encode(batch):
        ids = [
            tokenizer.apply_chat_template(
                conv, chat_template=template, add_generation_prompt=True, tokenize=True
            )
            for conv in batch["prompt"]
        ]
        ids = [
            list(x["input_ids"]) if isinstance(x, dict) or hasattr(x, "keys") else list(x)
            for x in ids
        ]
        return {"prompt_ids": ids, "prompt_length": [len(x) for x in ids]}

    ds = ds.map(encode, batched=True)
    limit = fmt.max_prompt_length
    if limit is None:
        return TokenizedPrompts(ds, 0)
    too_long = [i for i, n in enumerate(ds["prompt_length"]) if n > limit]
    if too_long and fmt.long_prompts == "error":
        raise PromptError(
            f"{name}: {len(too_long)} prompt(s) exceed max_prompt_length={limit} tokens "
            f"(first: row {too_long[0]}, {ds[too_long[0]]['prompt_length']} tokens)"
        )
    if too_long:
        drop = set(too_long)
        ds = ds.select([i for i in range(len(ds)) if i not in drop])
    return TokenizedPrompts(ds, len(too_long))
