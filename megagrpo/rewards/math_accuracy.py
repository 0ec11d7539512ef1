"""Accuracy: does the completion's final answer equal the gold answer (math-verify)?

open-r1's ``accuracy_reward`` with its defects fixed (see docs/rewards.md):

- the gold answer is the first argument of ``verify`` (math-verify's comparison is not
  symmetric: intervals, sets and inequalities are read relative to the gold);
- a gold answer that does not parse scores ``None`` ("cannot score"), never 1.0;
- a math-verify timeout scores ``None``; any other failure while checking the completion scores
  0.0 (the completion is what failed, as open-r1 does).

math-verify's own timeouts use ``signal.alarm``, which works only on a process's main thread. They
are used as a first, cheap line of defence when this runs on the main thread (as it does inside a
reward-pool worker) and switched off elsewhere; the reward pool's kill is the guarantee.
"""

from __future__ import annotations

import functools
import threading

from megagrpo.rewards.inputs import column, completion_texts

#: Seconds math-verify may spend parsing one text or comparing one pair (whole seconds:
#: ``signal.alarm``). ``configure_math_timeout`` changes it (the pool sets it from
#: reward_timeout_seconds in every worker).
_MATH_TIMEOUT_SECONDS = 5


def configure_math_timeout(seconds: int | None) -> None:
    """Set math-verify's per-operation alarm (``None`` or 0 switches it off)."""
    global _MATH_TIMEOUT_SECONDS
    _MATH_TIMEOUT_SECONDS = int(seconds) if seconds else 0
    _is_correct_cached.cache_clear()


def _alarm_seconds() -> int | None:
    """math-verify's timeout argument: the configured seconds on the main thread, else None."""
    if _MATH_TIMEOUT_SECONDS > 0 and threading.current_thread() is threading.main_thread():
        return _MATH_TIMEOUT_SECONDS
    return None


@functools.lru_cache(maxsize=1)
def _answer_config():
    """open-r1's completion parsing: LaTeX only, boxed first, well-formed operators only."""
    from latex2sympy2_extended import NormalizationConfig
    from math_verify import LatexExtractionConfig

    return [
        LatexExtractionConfig(
            normalization_config=NormalizationConfig(
                nits=False,
                malformed_operators=False,
                basic_latex=True,
                boxed="all",
                units=True,
            ),
            boxed_match_priority=0,
            try_extract_without_anchor=False,
        )
    ]


@functools.lru_cache(maxsize=1024)
def parse_gold(gold: str):
    """math-verify's parse of a gold answer (LaTeX, then plain expressions); [] if unparseable.

    Raises math-verify's TimeoutException when the alarm fires.
    """
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    return parse(
        gold,
        extraction_config=[LatexExtractionConfig(), ExprExtractionConfig()],
        extraction_mode="first_match",
        parsing_timeout=_alarm_seconds(),
        raise_on_error=True,
    )


def is_correct(content: str, gold) -> bool | None:
    """True/False when the completion's answer does/does not equal the gold; None if unscorable."""
    if not isinstance(gold, str):
        gold = "" if gold is None else str(gold)
    return _is_correct_cached(content, gold)


@functools.lru_cache(maxsize=512)
def _is_correct_cached(content: str, gold: str) -> bool | None:
    # Cached so that accuracy, cosine and len scoring the same sample verify it once.
    from math_verify import parse, verify
    from math_verify.errors import TimeoutException

    try:
        gold_parsed = parse_gold(gold)
    except TimeoutException:
        return None
    except Exception:
        gold_parsed = []
    if not gold_parsed:
        return None
    try:
        answer_parsed = parse(
            content,
            extraction_config=_answer_config(),
            extraction_mode="first_match",
            parsing_timeout=_alarm_seconds(),
            raise_on_error=True,
        )
        return bool(
            verify(
                gold_parsed, answer_parsed, timeout_seconds=_alarm_seconds(), raise_on_error=True
            )
        )
    except TimeoutException:
        return None
    except Exception:
        return False


def warm_up() -> None:
    """Build math-verify's grammars and sympy's caches now rather than on the first real sample."""
    is_correct("$\\frac{1}{2}$", "0.5")
    _is_correct_cached.cache_clear()


def accuracy_reward(completions, solution=None, **columns) -> list[float | None]:
    """1.0 if the completion's answer equals ``solution``, 0.0 if not, None if unscorable."""
    golds = column({"solution": solution}, "solution", len(completions), "accuracy")
    out: list[float | None] = []
    for content, gold in zip(completion_texts(completions), golds):
        ok = is_correct(content, gold)
        out.append(None if ok is None else float(ok))
    return out
