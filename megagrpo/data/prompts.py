"""Prompts: open-r1's conversation format, chat templates, length limits.

Each row becomes a chat conversation in a ``prompt`` column (the system prompt, then the user's
problem), the columns the reward functions read (``solution``, ...) are kept as they are, and the
rest are dropped. ``tokenize_prompts`` renders the chat template (the tokenizer's, or the
recipe's ``chat_template``) with the generation prompt and keeps the token ids; prompts longer than
``max_prompt_length`` tokens are skipped and counted, or raise, never cut mid-text.
``prepare_source`` does all of it for one loaded source, after the row checks of
``megagrpo.data.rows``, so that every dropped or bad row is named in its own file.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from megagrpo.data.errors import DataError
from megagrpo.data.rows import (
    FIRST_ROWS,
    SkippedRows,
    drop_or_raise,
    find_bad_rows,
    prompt_problem,
    solution_problem,
)


class PromptError(DataError):
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


def _conversation(value, system_prompt: str | None, column: str, where: str) -> list[dict]:
    problem = prompt_problem(value, column)
    if problem:
        raise PromptError(f"{where}: {problem[1]}")
    if isinstance(value, str):
        messages = [{"role": "user", "content": value}]
    else:
        messages = [{"role": m["role"], "content": m["content"]} for m in value]
    if system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}] + messages
    return messages


def check_columns(present: list[str], fmt: PromptFormat, name: str) -> None:
    needed = [fmt.prompt_column] + [c for c in fmt.reward_columns if c != fmt.prompt_column]
    missing = [c for c in needed if c not in present]
    if missing:
        what = "dataset_prompt_column" if fmt.prompt_column in missing else "reward column"
        raise PromptError(
            f"{name}: column(s) {missing} not found ({what}); columns present: {present}"
        )


def format_conversations(ds, fmt: PromptFormat, *, name: str = "dataset"):
    """Add the ``prompt`` conversation column, keep reward columns, drop everything else."""
    present = list(ds.column_names)
    check_columns(present, fmt, name)
    keep = set(fmt.reward_columns)

    def convert(batch, indices):
        return {
            "prompt": [
                _conversation(v, fmt.system_prompt, fmt.prompt_column, f"{name}: row {i} (0-based)")
                for v, i in zip(batch[fmt.prompt_column], indices)
            ]
        }

    drop = [c for c in present if c not in keep]
    return ds.map(convert, batched=True, with_indices=True, remove_columns=drop)


def encode_conversation(tokenizer, conversation: list[dict], template: str) -> list[int]:
    """The token ids of a conversation rendered with the generation prompt."""
    ids = tokenizer.apply_chat_template(
        conversation, chat_template=template, add_generation_prompt=True, tokenize=True
    )
    return list(ids["input_ids"]) if isinstance(ids, dict) or hasattr(ids, "keys") else list(ids)


def chat_template_of(tokenizer, chat_template: str | None, name: str) -> str:
    template = chat_template or getattr(tokenizer, "chat_template", None)
    if not template:
        raise PromptError(
            f"{name}: the tokenizer has no chat template and the recipe sets no chat_template"
        )
    return template


@dataclass(frozen=True)
class TokenizedPrompts:
    dataset: object
    """The dataset with ``prompt_ids`` added."""
    too_long: list[int]
    """Rows of the input dropped for exceeding max_prompt_length."""

    @property
    def skipped(self) -> int:
        return len(self.too_long)


def tokenize_prompts(
    ds,
    tokenizer,
    fmt: PromptFormat,
    *,
    chat_template: str | None = None,
    name: str = "dataset",
    where: Callable[[int], str] | None = None,
) -> TokenizedPrompts:
    """Render the chat template with the generation prompt and tokenize every prompt;
    ``where(row)`` names a row of ``ds`` in messages (default: ``name: row r (0-based)``)."""
    template = chat_template_of(tokenizer, chat_template, name)
    if fmt.long_prompts not in ("skip", "error"):
        raise PromptError(f"long_prompts={fmt.long_prompts!r}; expected 'skip' or 'error'")

    def encode(batch):
        ids = [encode_conversation(tokenizer, conv, template) for conv in batch["prompt"]]
        return {"prompt_ids": ids, "prompt_length": [len(x) for x in ids]}

    ds = ds.map(encode, batched=True)
    limit = fmt.max_prompt_length
    if limit is None:
        return TokenizedPrompts(ds, [])
    too_long = [i for i, n in enumerate(ds["prompt_length"]) if n > limit]
    if too_long and fmt.long_prompts == "error":
        where = where or (lambda i: f"{name}: row {i} (0-based)")
        raise PromptError(
            f"{where(too_long[0])}: prompt of {ds[too_long[0]]['prompt_length']} tokens; "
            f"{len(too_long)} prompt(s) exceed max_prompt_length={limit} tokens (raise it, or "
            "set long_prompts: skip to drop them)"
        )
    if too_long:
        drop = set(too_long)
        ds = ds.select([i for i in range(len(ds)) if i not in drop])
    return TokenizedPrompts(ds, too_long)


def prepare_source(
    source,
    tokenizer,
    fmt: PromptFormat,
    skipped: SkippedRows,
    *,
    chat_template: str | None = None,
    on_bad_rows: str = "error",
    solution_column: str | None = None,
    row_checks: dict | None = None,
):
    """A loaded ``megagrpo.data.sources.Source`` -> its checked, formatted, tokenized rows.

    Bad rows raise or are dropped (``on_bad_rows``; the solution is checked when
    ``solution_column`` is given, and the columns of ``row_checks``, see ``find_bad_rows``), then
    too-long prompts (``fmt.long_prompts``); what is dropped
    is counted in ``skipped`` with where the rows live."""
    ds = source.dataset
    check_columns(list(ds.column_names), fmt, source.locate.name)
    bad = find_bad_rows(ds, fmt.prompt_column, solution_column, row_checks)
    kept, ds = drop_or_raise(ds, bad, source.where, on_bad_rows, skipped)
    where = lambda i: source.where(kept[i])
    out = tokenize_prompts(
        format_conversations(ds, fmt, name=source.locate.name),
        tokenizer,
        fmt,
        chat_template=chat_template,
        name=source.locate.name,
        where=where,
    )
    if out.too_long:
        skipped.add(
            "prompt_too_long", len(out.too_long), [where(i) for i in out.too_long[:FIRST_ROWS]]
        )
    return out.dataset


def prepare_row(
    row: dict,
    tokenizer,
    fmt: PromptFormat,
    template: str,
    solution_column=None,
    row_checks: dict | None = None,
):
    """One row read by the streaming reader -> its prompt row (``prompt``, ``prompt_ids``,
    ``prompt_length`` and the reward columns), or ``(reason, message)`` when it is bad or its
    prompt is over ``max_prompt_length`` (reason ``prompt_too_long``): the checks and the
    tokenization of ``prepare_source``, one row at a time."""
    problem = prompt_problem(row.get(fmt.prompt_column), fmt.prompt_column)
    if problem is None and solution_column:
        problem = solution_problem(row.get(solution_column), solution_column)
    for name, check in (row_checks or {}).items():  # as find_bad_rows
        problem = problem or check(row.get(name), name)
    if problem:
        return problem
    conversation = _conversation(row[fmt.prompt_column], fmt.system_prompt, fmt.prompt_column, "")
    ids = encode_conversation(tokenizer, conversation, template)
    limit = fmt.max_prompt_length
    if limit is not None and len(ids) > limit:
        return "prompt_too_long", (
            f"prompt of {len(ids)} tokens exceeds max_prompt_length={limit} tokens (raise it, or "
            "set long_prompts: skip to drop such prompts)"
        )
    out = {"prompt": conversation, "prompt_ids": ids, "prompt_length": len(ids)}
    out.update({c: row.get(c) for c in fmt.reward_columns})
    return out
