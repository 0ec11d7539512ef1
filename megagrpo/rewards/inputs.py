"""How a reward function reads its inputs: completion text, gold answers, token lengths.

Completions come in TRL's two shapes: a plain string (standard format) or a list of chat
messages (conversational format, ``[{"role": "assistant", "content": "..."}]``). The scored text
is the content of the last message, which for the usual one-message completion is open-r1's
``completion[0]["content"]``.
"""

from __future__ import annotations

from collections.abc import Sequence


def completion_text(completion) -> str:
    """The text a reward scores: the string itself, or the last chat message's content."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        completion = [completion]
    if isinstance(completion, (list, tuple)):
        if not completion:
            return ""
        message = completion[-1]
        if isinstance(message, dict) and "content" in message:
            content = message["content"]
            return "" if content is None else str(content)
    raise TypeError(
        "a completion must be a string or a list of chat messages "
        f"[{{'role': ..., 'content': ...}}], got {type(completion).__name__}: {completion!r:.80}"
    )


def completion_texts(completions: Sequence) -> list[str]:
    return [completion_text(c) for c in completions]


def column(columns: dict, name: str, n: int, fn_name: str) -> list:
    """Column ``name`` as a list of ``n`` entries, or a ValueError that says which is missing."""
    if name not in columns or columns[name] is None:
        raise ValueError(
            f"reward function {fn_name} needs the dataset column {name!r} (a list with one entry "
            f"per completion); the columns passed were {sorted(columns)}"
        )
    values = list(columns[name])
    if len(values) != n:
        raise ValueError(
            f"reward function {fn_name}: column {name!r} has {len(values)} entries for "
            f"{n} completions"
        )
    return values


def token_lengths(columns: dict, n: int, fn_name: str) -> list[int]:
    """Completion lengths in tokens, from the ``completion_ids`` column."""
    return [len(ids) for ids in column(columns, "completion_ids", n, fn_name)]
