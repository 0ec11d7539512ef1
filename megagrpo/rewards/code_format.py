"""Code format: the R1 conversation format with a fenced code block in the answer.

``get_code_format_reward(language)`` gives 1.0 to a completion that is exactly one
``<think>\\n...\\n</think>\\n<answer>\\n...\\n</answer>`` (trailing whitespace aside, each tag once:
the strict ``format`` reward) whose answer holds a fenced block opened by ```` ```<language> ````
and a line end, and closed by ```` ``` ````; else 0.0.

open-r1's ``code_format_reward`` matches with ``re.MULTILINE`` (text after ``</answer>`` passes,
as with its ``format``) and accepts any fence that *starts* with the language name
(```` ```pythonic ```` counts as Python); here the fence's language is the whole first word of
the fence line. open-r1 also reads a per-sample ``language`` column when one is passed; here
``code_language`` holds for every sample (the ``code`` rewards take the language of each row's
``verification_info``).
"""

from __future__ import annotations

import re

from megagrpo.rewards.format import _well_formed
from megagrpo.rewards.inputs import completion_texts

_ANSWER_RE = re.compile(r"\n</think>\n<answer>\n(.*?)\n</answer>\s*\Z", re.DOTALL)
_LANGUAGE_RE = re.compile(r"[A-Za-z0-9_+#.-]+")


def fenced_block_re(language: str) -> re.Pattern:
    """A fenced block in ``language``: group 1 is the code."""
    return re.compile(rf"```{re.escape(language)}[ \t]*\n(.*?)```", re.DOTALL)


def check_code_language(language) -> None:
    if not isinstance(language, str) or not _LANGUAGE_RE.fullmatch(language):
        raise ValueError(
            f"code_language={language!r}; expected the language name of a code fence, such as "
            "'python' or 'cpp' (letters, digits, _ + # . -)"
        )


def get_code_format_reward(language: str = "python"):
    """The code format reward for fenced blocks in ``language`` (``code_language``)."""
    check_code_language(language)
    block = fenced_block_re(language)

    def code_format_reward(completions, **columns) -> list[float]:
        out = []
        for text in completion_texts(completions):
            answer = _ANSWER_RE.search(text) if _well_formed(text) else None
            out.append(1.0 if answer and block.search(answer.group(1)) else 0.0)
        return out

    code_format_reward.__qualname__ = f"code_format_reward[{language}]"
    return code_format_reward
