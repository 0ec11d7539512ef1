"""Format rewards for the R1 conversation format
``<think>\\n...\\n</think>\\n<answer>\\n...\\n</answer>``.

``format_reward`` is strict where open-r1's is not: open-r1 matches with ``re.MULTILINE``, so its
``$`` accepts any line end and a completion with a second block (or any text) after the first
``</answer>`` passes. Here the completion must end at ``</answer>`` (trailing whitespace aside)
and every tag occurs exactly once.

``tag_count_reward`` is open-r1's partial credit: 0.25 for each of the four tag markers that occurs
exactly once.
"""

from __future__ import annotations

import re

from megagrpo.rewards.inputs import completion_texts

_FORMAT_RE = re.compile(r"<think>\n.*?\n</think>\n<answer>\n.*?\n</answer>\s*", re.DOTALL)
_TAGS = ("<think>", "</think>", "<answer>", "</answer>")


def _well_formed(text: str) -> bool:
    return _FORMAT_RE.fullmatch(text) is not None and all(text.count(t) == 1 for t in _TAGS)


def format_reward(completions, **columns) -> list[float]:
    """1.0 if the completion is exactly one think block then one answer block, else 0.0."""
    return [1.0 if _well_formed(text) else 0.0 for text in completion_texts(completions)]


_TAG_MARKERS = ("<think>\n", "\n</think>\n", "\n<answer>\n", "\n</answer>")


def tag_count_reward(completions, **columns) -> list[float]:
    """0.25 per tag marker (``<think>\\n``, ``\\n</think>\\n``, ``\\n<answer>\\n``,
    ``\\n</answer>``) that occurs exactly once."""
    return [
        0.25 * sum(text.count(marker) == 1 for marker in _TAG_MARKERS)
        for text in completion_texts(completions)
    ]
