"""Length-shaped rewards, all counting the completion's length in tokens (``completion_ids``).

- ``get_cosine_scaled_reward``: correctness scaled by a cosine of the length (Yeo et al. 2025):
  short correct answers earn most, short wrong answers are punished most.
- ``len_reward``: Kimi 1.5's length reward, relative to the shortest and longest completion of
  the same prompt.
- ``get_soft_overlong_punishment``: DAPO's linear penalty over the last ``soft_punish_cache``
  tokens before ``max_completion_len``, -1 beyond it.

open-r1 measures cosine and len lengths in characters (``len(content)``) and lets the cosine
progress exceed 1 (past ``max_len`` the cosine swings back up, so very long answers get better
rewards again); here every length is in tokens and the progress is clamped to [0, 1]. Correctness
comes from ``math_accuracy.is_correct``: an unparseable gold answer scores ``None``, as in
accuracy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from megagrpo.rewards.inputs import column, completion_texts, token_lengths
from megagrpo.rewards.math_accuracy import accuracy_reward


def _correctness(completions, columns: dict, fn_name: str) -> list[bool | None]:
    from megagrpo.rewards.math_accuracy import is_correct

    golds = column(columns, "solution", len(completions), fn_name)
    return [is_correct(text, gold) for text, gold in zip(completion_texts(completions), golds)]


def get_cosine_scaled_reward(
    min_value_wrong: float = 0.0,
    max_value_wrong: float = -0.5,
    min_value_correct: float = 0.5,
    max_value_correct: float = 1.0,
    max_len: int = 1000,
):
    """Cosine-scaled correctness. At length 0 a correct answer earns ``max_value_correct`` and a
    wrong one ``min_value_wrong``; at ``max_len`` tokens and beyond, ``min_value_correct`` and
    ``max_value_wrong`` (open-r1's names, which read "value at the short end" for wrong answers).
    """
    if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1:
        raise ValueError(f"cosine_max_len={max_len!r} must be an integer >= 1")
    for name, v in (
        ("cosine_min_value_wrong", min_value_wrong),
        ("cosine_max_value_wrong", max_value_wrong),
        ("cosine_min_value_correct", min_value_correct),
        ("cosine_max_value_correct", max_value_correct),
    ):
        if not math.isfinite(v):
            raise ValueError(f"{name}={v} must be finite")

    def cosine_scaled_reward(completions, **columns) -> list[float | None]:
        correct = _correctness(completions, columns, "cosine")
        lengths = token_lengths(columns, len(completions), "cosine")
        out: list[float | None] = []
        for ok, n_tokens in zip(correct, lengths):
            if ok is None:
                out.append(None)
                continue
            progress = min(1.0, n_tokens / max_len)
            cosine = math.cos(progress * math.pi)
            # Value at length 0 ("start") and at max_len ("end").
            start, end = (
                (max_value_correct, min_value_correct) if ok else (min_value_wrong, max_value_wrong)
            )
            out.append(end + 0.5 * (start - end) * (1.0 + cosine))
        return out

    cosine_scaled_reward.__qualname__ = "cosine_scaled_reward"
    return cosine_scaled_reward


def len_from_correctness(
    correct: Sequence[float | None], lengths: Sequence[int], group_size: int | None = None
) -> list[float | None]:
    """Kimi 1.5 length reward from per-completion correctness (1.0 / 0.0 / None) and lengths.

    Within each group of ``group_size`` consecutive completions (one prompt's generations; None:
    the whole list is one group), with lambda = 0.5 - (len - min_len) / (max_len - min_len): a
    correct completion earns lambda, a wrong one min(0, lambda), an unscorable one None. When all
    lengths of a group are equal every scorable completion earns 0.0.
    """
    n = len(lengths)
    if len(correct) != n:
        raise ValueError(f"len reward: {len(correct)} correctness values for {n} lengths")
    size = n if group_size is None else group_size
    if n and (size < 1 or n % size):
        raise ValueError(f"len reward: {n} completions are not whole groups of {size}")
    out: list[float | None] = []
    for start in range(0, n, max(size, 1)):
        group = lengths[start : start + size]
        lo, hi = min(group), max(group)
        for ok, length in zip(correct[start : start + size], group):
            if ok is None or (isinstance(ok, float) and math.isnan(ok)):
                out.append(None)
            elif hi == lo:
                out.append(0.0)
            else:
                lam = 0.5 - (length - lo) / (hi - lo)
                out.append(lam if ok else min(0.0, lam))
    return out


def len_reward(completions, **columns) -> list[float | None]:
    """Kimi 1.5 length reward over the completions of one call (one group).

    The reward pool groups by prompt instead (``num_generations``): see ``len_from_correctness``.
    """
    correct = accuracy_reward(completions, **columns)
    lengths = token_lengths(columns, len(completions), "length")
    return len_from_correctness(correct, lengths)


def get_soft_overlong_punishment(max_completion_len: int = 16384, soft_punish_cache: int = 4096):
    """DAPO's soft overlong punishment: 0 up to ``max_completion_len - soft_punish_cache`` tokens,
    then linear down to -1 at ``max_completion_len``, -1 beyond."""
    if isinstance(max_completion_len, bool) or not isinstance(max_completion_len, int):
        raise ValueError(f"max_completion_len={max_completion_len!r} must be an integer")
    if max_completion_len < 1:
        raise ValueError(f"max_completion_len={max_completion_len} must be >= 1")
    if not (0 <= soft_punish_cache < max_completion_len):
        raise ValueError(
            f"soft_punish_cache={soft_punish_cache} must be in [0, max_completion_len="
            f"{max_completion_len})"
        )
    free = max_completion_len - soft_punish_cache

    def soft_overlong_punishment(completions, **columns) -> list[float]:
        out: list[float] = []
        for n_tokens in token_lengths(columns, len(completions), "soft_overlong_punishment"):
            if n_tokens <= free:
                out.append(0.0)
            elif n_tokens <= max_completion_len:
                out.append((free - n_tokens) / soft_punish_cache)
            else:
                out.append(-1.0)
        return out

    soft_overlong_punishment.__qualname__ = "soft_overlong_punishment"
    return soft_overlong_punishment


def combine_len(correct: Sequence[float | None], columns: dict, group_size: int | None):
    """The reward pool's second stage of ``length``: correctness per sample -> Kimi reward."""
    lengths = token_lengths(columns, len(correct), "length")
    return len_from_correctness(correct, lengths, group_size)
