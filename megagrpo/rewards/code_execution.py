"""Code execution rewards: run the completion's program on the row's test cases.

The program is the last fenced ```` ```python ```` block of the completion (open-r1's
``extract_code``). Test cases come from the ``verification_info`` column, open-r1's shape::

    {"language": "python",
     "test_cases": [{"input": "1 2\\n", "output": "3\\n", "type": "stdin_stdout"}]}

(a dict, or the same as a JSON string). Each test case runs the program in the local sandbox
(``sandbox.py``) with the input on stdin; it passes when the program exits 0 within the limits
and its stdout equals the expected output line by line, each line stripped of surrounding
whitespace, trailing empty lines ignored.

- ``code`` (``code_reward``): by ``code_eval_scoring_mode``: ``partial`` (default) the fraction
  of test cases passed (open-r1's ``code_reward``); ``pass_fail`` 1.0 if all pass, else 0.0;
  ``weighted_sum`` pass_fail + 0.1 x fraction (open-r1's codeforces scoring).
- ``binary_code`` (``binary_code_reward``): 1.0 if all pass, else 0.0, whatever the mode.

A completion without a Python block scores 0.0 (nothing is run). Test cases run
``code_eval_test_batch_size`` at a time, concurrently (less than 1: all at once); when the score
can only be 0 after a failed batch (``pass_fail``, ``binary_code``), the rest is not run.

Differences from open-r1: open-r1 compares ``zip(output_lines, expected_lines)``, so a program
that prints only the first of several expected lines (or nothing but a matching first line)
passes; here the number of lines must match too. open-r1 runs every program on a remote E2B or
Morph sandbox; here only the local one exists (``code_provider: local``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from megagrpo.rewards.code_format import fenced_block_re
from megagrpo.rewards.inputs import column, completion_texts
from megagrpo.rewards.sandbox import SandboxConfig, run_programs, sandbox_features

PROVIDERS = ("local", "e2b", "morph")
SCORING_MODES = ("partial", "pass_fail", "weighted_sum")
#: Languages the local sandbox runs (``verification_info["language"]``).
RUNNABLE_LANGUAGES = ("python",)
COLUMN = "verification_info"


@dataclass(frozen=True)
class TestCase:
    input: str
    output: str


def extract_code(text: str, language: str = "python") -> str | None:
    """The last fenced block in ``language`` of ``text``, or None when there is none."""
    blocks = fenced_block_re(language).findall(text)
    return blocks[-1] if blocks else None


def _problem(value) -> str | None:
    """What is wrong with a ``verification_info`` value, or None when it is usable."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as e:
            return f"is a string that is not valid JSON ({e})"
    if not isinstance(value, dict):
        return f"holds {type(value).__name__}; expected {{'language': ..., 'test_cases': [...]}}"
    language = value.get("language")
    if not isinstance(language, str):
        return (
            "has no 'language' string (open-r1's shape: {'language': 'python', 'test_cases': "
            "[...]})"
        )
    if language.lower() not in RUNNABLE_LANGUAGES:
        return (
            f"has language {language!r}: the local code sandbox runs "
            f"{', '.join(RUNNABLE_LANGUAGES)} programs only"
        )
    cases = value.get("test_cases")
    if not isinstance(cases, list) or not cases:
        return "has no 'test_cases' list with at least one {'input': str, 'output': str}"
    for k, case in enumerate(cases):
        if not isinstance(case, dict):
            what = type(case).__name__
            return f"test_cases[{k}] holds {what}; expected {{'input': str, 'output': str}}"
        for key in ("input", "output"):
            if not isinstance(case.get(key), str):
                got = "missing" if case.get(key) is None else type(case[key]).__name__
                return f"test_cases[{k}]['{key}'] is {got}; expected a string"
        kind = case.get("type", "stdin_stdout")
        if kind not in (None, "stdin_stdout"):
            return f"test_cases[{k}] has type {kind!r}; only 'stdin_stdout' tests can be run"
    return None


def verification_problem(value, column_name: str = COLUMN) -> tuple[str, str] | None:
    """``(reason, message)`` for a dataset row check (``megagrpo.data.rows``), or None."""
    problem = _problem(value)
    return None if problem is None else ("verification_info", f"column {column_name!r} {problem}")


def parse_verification_info(value, where: str = COLUMN) -> list[TestCase]:
    """The test cases of one ``verification_info`` value; ValueError naming ``where`` if bad."""
    problem = _problem(value)
    if problem is not None:
        raise ValueError(f"{where} {problem}")
    if isinstance(value, str):
        value = json.loads(value)
    return [TestCase(c["input"], c["output"]) for c in value["test_cases"]]


def _lines(text: str) -> list[str]:
    lines = [line.strip() for line in text.strip().split("\n")]
    return lines if lines != [""] else []


def outputs_match(actual: str, expected: str) -> bool:
    """Line by line, each line stripped, trailing empty lines ignored, same number of lines."""
    return _lines(actual) == _lines(expected)


def _batches(cases: list, size: int):
    size = size if size >= 1 else len(cases)
    for s in range(0, len(cases), size):
        yield cases[s : s + size]


def score_program(code: str, cases, sandbox: SandboxConfig, mode: str, batch_size: int) -> float:
    """The score of ``code`` on ``cases`` under scoring ``mode``."""
    passed = 0
    for batch in _batches(list(cases), batch_size):
        results = run_programs([(code, c.input) for c in batch], sandbox)
        ok = [
            r.status == "ok" and outputs_match(r.stdout, c.output) for r, c in zip(results, batch)
        ]
        passed += sum(ok)
        if mode == "pass_fail" and not all(ok):
            return 0.0
    fraction = passed / len(cases)
    all_passed = 1.0 if passed == len(cases) else 0.0
    if mode == "partial":
        return fraction
    if mode == "pass_fail":
        return all_passed
    return all_passed + 0.1 * fraction


def _check(provider, mode, batch_size) -> None:
    if provider != "local":
        raise ValueError(
            f"code_provider={provider!r}: megagrpo runs programs in its local sandbox only (E2B "
            "and Morph sandboxes are remote services it does not call); set code_provider: local"
        )
    if mode not in SCORING_MODES:
        raise ValueError(
            f"code_eval_scoring_mode={mode!r}; expected one of {', '.join(SCORING_MODES)}"
        )
    if isinstance(batch_size, bool) or not isinstance(batch_size, int):
        raise ValueError(f"code_eval_test_batch_size={batch_size!r}; expected an integer")


def get_code_reward(
    provider: str = "local",
    scoring_mode: str = "partial",
    test_batch_size: int = 1,
    binary: bool = False,
    **sandbox,
):
    """The ``code`` reward (``binary``: ``binary_code``); ``sandbox``: ``SandboxConfig`` fields."""
    _check(provider, scoring_mode, test_batch_size)
    config = SandboxConfig(**sandbox)
    if config.strict:
        sandbox_features(strict=True)  # SandboxUnavailable now, where the reward is built
    mode = "pass_fail" if binary else scoring_mode
    name = "binary_code_reward" if binary else "code_reward"

    def reward(completions, **columns) -> list[float]:
        texts = completion_texts(completions)
        infos = column(columns, COLUMN, len(texts), name)
        out = []
        for i, (text, info) in enumerate(zip(texts, infos)):
            cases = parse_verification_info(info, f"{COLUMN} of sample {i}")
            code = extract_code(text, "python")
            out.append(
                0.0 if code is None else score_program(code, cases, config, mode, test_batch_size)
            )
        return out

    reward.__name__ = name
    reward.__qualname__ = f"{name}[{mode}]"
    return reward
