"""Every reward function against hand-computed values, edges included (no pool here)."""

from __future__ import annotations

import math

import pytest

from megagrpo.rewards.format import format_reward, tag_count_reward
from megagrpo.rewards.length import (
    get_cosine_scaled_reward,
    get_soft_overlong_punishment,
    len_from_correctness,
    len_reward,
)
from megagrpo.rewards.math_accuracy import accuracy_reward
from megagrpo.rewards.reasoning import reasoning_steps_reward
from megagrpo.rewards.repetition import get_repetition_penalty_reward


def chat(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def r1(answer: str, think: str = "Let me think.") -> str:
    return f"<think>\n{think}\n</think>\n<answer>\n{answer}\n</answer>"


# ----------------------------------------------------------------------------------- accuracy
ACCURACY_CASES = [
    # (completion, gold, expected)
    (r1("$\\boxed{42}$"), "42", 1.0),  # boxed, R1 format
    ("The final answer is $42$.", "$42$", 1.0),  # unboxed LaTeX answer
    (r1("42"), "42", 0.0),  # bare number: open-r1's completion parsing wants LaTeX
    (r1("$\\boxed{43}$"), "42", 0.0),  # wrong
    ("$\\boxed{0.5}$", "$\\frac{1}{2}$", 1.0),  # decimal against fraction
    ("$\\boxed{\\frac{1}{2}}$", "0.5", 1.0),  # fraction against decimal
    ("$\\boxed{\\frac{1}{3}}$", "$0.333$", 0.0),  # 0.333 is not 1/3 at 6 digits
    ("$\\boxed{\\{3, 2, 1\\}}$", "$\\{1,2,3\\}$", 1.0),  # sets: order-free
    ("$\\boxed{\\{1, 2\\}}$", "$\\{1,2,3\\}$", 0.0),
    ("$\\boxed{(0,1]}$", "$(0,1]$", 1.0),  # intervals
    ("$\\boxed{[0,1]}$", "$(0,1]$", 0.0),  # closed end differs
    ("$\\boxed{50\\%}$", "$50\\%$", 1.0),  # percentages
    ("$\\boxed{0.5}$", "$50\\%$", 1.0),  # math-verify: a percent gold also takes its fraction
    ("$\\boxed{5\\text{ cm}}$", "$5$", 1.0),  # units are dropped
    ("$\\boxed{π}$", "$\\pi$", 1.0),  # unicode pi
    ("$\\boxed{５}$", "$5$", 0.0),  # full-width digit is not parsed as 5
    ("$\\boxed{\\sqrt2}$", "$\\sqrt{2}$", 0.0),  # malformed operators rejected (open-r1)
    ("$\\boxed{3}$ and $\\boxed{4}$", "$3$", 0.0),  # two boxed answers read as {3, 4}
    ("", "$3$", 0.0),  # empty completion
    ("$\\boxed{3", "$3$", 0.0),  # unclosed box
    ("$\\boxed{1}$", "hello world", None),  # unparseable gold: cannot score
    ("$\\boxed{1}$", "", None),  # empty gold
    ("$\\boxed{1}$", "\\frac12", None),  # gold LaTeX without delimiters does not parse
]


@pytest.mark.parametrize("completion,gold,expected", ACCURACY_CASES)
def test_accuracy_hand_computed(completion, gold, expected):
    assert accuracy_reward([chat(completion)], solution=[gold]) == [expected]


def test_accuracy_gold_is_the_first_argument_of_verify():
    # math-verify is asymmetric for intervals vs inequalities: a gold interval does not accept an
    # inequality, a gold inequality accepts the interval. open-r1's old order flips both.
    assert accuracy_reward(["$\\boxed{0<x\\le 1}$"], solution=["$(0,1]$"]) == [0.0]
    assert accuracy_reward(["$\\boxed{(0,1]}$"], solution=["$0<x\\le 1$"]) == [1.0]


def test_accuracy_inputs():
    # plain strings, chat messages, the last of several messages, None content
    msgs = [
        {"role": "assistant", "content": "draft"},
        {"role": "assistant", "content": "$\\boxed{7}$"},
    ]
    got = accuracy_reward(
        ["$\\boxed{7}$", chat("$\\boxed{7}$"), msgs, chat(None)], solution=["7"] * 4
    )
    assert got == [1.0, 1.0, 1.0, 0.0]
    assert accuracy_reward(["$\\boxed{7}$"], solution=[7]) == [
        1.0
    ]  # a numeric gold is read as text
    with pytest.raises(ValueError, match="needs the dataset column 'solution'"):
        accuracy_reward(["x"])
    with pytest.raises(ValueError, match="'solution' has 1 entries for 2 completions"):
        accuracy_reward(["x", "y"], solution=["1"])
    with pytest.raises(TypeError, match="a completion must be a string or a list of chat messages"):
        accuracy_reward([42], solution=["1"])


# ----------------------------------------------------------------------------------- format
FORMAT_CASES = [
    (r1("42"), 1.0),
    (r1("42") + "\n", 1.0),  # trailing whitespace is not text
    (r1("42") + "\nSo the answer is 42.", 0.0),  # text after </answer> (open-r1: 1.0)
    (r1("1") + "\n" + "<answer>\n2\n</answer>", 0.0),  # second answer block (open-r1: 1.0)
    ("<answer>\n42\n</answer>", 0.0),  # missing think
    ("<think>\nhmm\n</think>", 0.0),  # missing answer
    ("<think>hmm</think>\n<answer>\n42\n</answer>", 0.0),  # no newline inside think
    ("", 0.0),  # empty
    (r1("√2 ≈ 1.414", think="思考: ∑ 1/n²"), 1.0),  # unicode
    (r1("42", think="a <think> b"), 0.0),  # doubled <think>
    ("Sure! " + r1("42"), 0.0),  # text before <think>
    (r1("", think=""), 1.0),  # empty blocks are still the format
]


@pytest.mark.parametrize("completion,expected", FORMAT_CASES)
def test_format_hand_computed(completion, expected):
    assert format_reward([chat(completion)]) == [expected]
    assert format_reward([completion]) == [expected]


TAG_CASES = [
    (r1("42"), 1.0),
    ("", 0.0),
    ("<think>\nonly the start", 0.25),
    ("<think>\na\n</think>\n<think>\nb\n</think>\n<answer>\nc\n</answer>", 0.5),  # doubled think
    ("<think>a</think><answer>b</answer>", 0.0),  # no newlines
    ("<think>\nx\n</think>\n<answer>\ny</answer>", 0.75),  # no newline before </answer>
    (r1("√2", think="思考"), 1.0),  # unicode
    (r1("1") + "\n" + r1("2"), 0.0),  # everything twice
    ("\n<answer>\n42\n</answer>", 0.5),
]


@pytest.mark.parametrize("completion,expected", TAG_CASES)
def test_tag_count_hand_computed(completion, expected):
    assert tag_count_reward([chat(completion)]) == [expected]


# ----------------------------------------------------------------------------------- reasoning
REASONING_CASES = [
    ("Step 1: a. Step 2: b. Step 3: c.", 1.0),
    ("1. a\n2. b", 2 / 3),
    ("Intro line.\n1. a\n2. b\n3. c", 1.0),  # numbered items after the first line (open-r1: 0)
    ("First, x. Second, y.", 2 / 3),
    ("", 0.0),
    ("- a\n- b\n* c", 1.0),  # bullets, the first line's included
    ("  1. indented item", 1 / 3),
    ("see item 1. here", 0.0),  # a number mid-line is not an item
    ("第一步\n1. ∑ 的计算", 1 / 3),  # unicode
    ("Step 1: a\nStep 2: b\nNext, c\nFinally, d\n1. e", 1.0),  # capped at 1
]


@pytest.mark.parametrize("completion,expected", REASONING_CASES)
def test_reasoning_steps_hand_computed(completion, expected):
    assert reasoning_steps_reward([chat(completion)]) == [pytest.approx(expected)]


# ----------------------------------------------------------------------------------- cosine
C = math.cos(math.pi / 4)
COSINE_CASES = [
    # (correct?, tokens, expected) with open-r1's defaults (0.0, -0.5, 0.5, 1.0, 1000)
    (True, 0, 1.0),
    (True, 250, 0.5 + 0.25 * (1 + C)),
    (True, 500, 0.75),
    (True, 1000, 0.5),
    (True, 5000, 0.5),  # progress clamped at 1 (open-r1's character count would swing back up)
    (False, 0, 0.0),
    (False, 250, -0.5 + 0.25 * (1 + C)),
    (False, 500, -0.25),
    (False, 1000, -0.5),
    (False, 3000, -0.5),
]


@pytest.mark.parametrize("correct,tokens,expected", COSINE_CASES)
def test_cosine_hand_computed(correct, tokens, expected):
    fn = get_cosine_scaled_reward()
    text = "$\\boxed{7}$" if correct else "$\\boxed{8}$"
    got = fn([chat(text)], solution=["7"], completion_ids=[[1] * tokens])
    assert got == [pytest.approx(expected, abs=1e-12)]


def test_cosine_lengths_are_tokens_and_edges():
    fn = get_cosine_scaled_reward(-1.0, -0.5, 0.5, 1.0, max_len=10)  # open-r1's signature order
    long_text = "$\\boxed{7}$" + " padding" * 200  # 1600+ characters, 5 tokens
    assert fn([long_text], solution=["7"], completion_ids=[[0] * 5]) == [pytest.approx(0.75)]
    assert fn([""], solution=["7"], completion_ids=[[]]) == [-1.0]  # empty, wrong, length 0
    assert fn(["$\\boxed{7}$"], solution=["no gold here"], completion_ids=[[0]]) == [None]
    with pytest.raises(ValueError, match="needs the dataset column 'completion_ids'"):
        fn(["x"], solution=["7"])
    with pytest.raises(ValueError, match="cosine_max_len=0 must be an integer >= 1"):
        get_cosine_scaled_reward(max_len=0)
    with pytest.raises(ValueError, match="cosine_max_value_wrong=nan must be finite"):
        get_cosine_scaled_reward(max_value_wrong=float("nan"))


# ----------------------------------------------------------------------------------- len
def test_len_hand_computed():
    # lengths 10, 20, 30 -> lambda 0.5, 0.0, -0.5
    assert len_from_correctness([1.0, 1.0, 1.0], [10, 20, 30]) == [0.5, 0.0, -0.5]
    assert len_from_correctness([0.0, 0.0, 0.0], [10, 20, 30]) == [0.0, 0.0, -0.5]
    assert len_from_correctness([1.0, 0.0, None], [10, 20, 30]) == [0.5, 0.0, None]
    assert len_from_correctness([1.0, 0.0], [7, 7]) == [0.0, 0.0]  # all lengths equal
    assert len_from_correctness([1.0, 0.0, 1.0], [0, 40, 10]) == [0.5, -0.5, 0.25]
    assert len_from_correctness([], []) == []
    # two groups of two: min/max per prompt (Kimi), not over the batch
    assert len_from_correctness([1.0, 1.0, 1.0, 0.0], [10, 20, 100, 300], group_size=2) == [
        0.5,
        -0.5,
        0.5,
        -0.5,
    ]
    assert len_from_correctness([1.0, 1.0, 1.0, 0.0], [10, 20, 100, 300]) == pytest.approx(
        [0.5, 0.5 - 10 / 290, 0.5 - 90 / 290, min(0.0, 0.5 - 290 / 290)]
    )
    with pytest.raises(ValueError, match="not whole groups of 3"):
        len_from_correctness([1.0] * 4, [1] * 4, group_size=3)


def test_len_reward_end_to_end():
    comps = [chat("$\\boxed{7}$"), chat("$\\boxed{7}$ " * 3), chat("$\\boxed{8}$"), chat("x")]
    ids = [[0] * 10, [0] * 30, [0] * 20, [0] * 30]
    got = len_reward(comps, solution=["7", "7", "7", "not a gold"], completion_ids=ids)
    assert got == [0.5, -0.5, 0.0, None]


# ----------------------------------------------------------------------------------- repetition
REPETITION_CASES = [
    # (text, n, max_penalty, expected)
    ("", 3, -1.0, 0.0),
    ("a b", 3, -1.0, 0.0),  # fewer words than n
    ("a b c", 3, -1.0, 0.0),
    ("a b c a b c a b c", 3, -1.0, -(1 - 3 / 7)),
    ("the the the the the", 3, -1.0, -(1 - 1 / 3)),
    ("A B C a b c", 3, -1.0, -0.25),  # lower-cased
    ("日 本 語 日 本 語", 3, -1.0, -0.25),  # unicode words
    ("a b a b", 2, -0.5, -0.5 * (1 / 3)),
    ("a b a b", 2, 0.0, 0.0),
    ("x  y\n\tx y", 1, -1.0, -0.5),  # any whitespace separates words
]


@pytest.mark.parametrize("text,n,penalty,expected", REPETITION_CASES)
def test_repetition_hand_computed(text, n, penalty, expected):
    fn = get_repetition_penalty_reward(n, penalty)
    assert fn([chat(text)]) == [pytest.approx(expected)]


def test_repetition_config_errors():
    with pytest.raises(ValueError, match=r"repetition_max_penalty=0.5 must be <= 0"):
        get_repetition_penalty_reward(3, 0.5)
    with pytest.raises(ValueError, match=r"repetition_n_grams=0 must be an integer >= 1"):
        get_repetition_penalty_reward(0, -1.0)


# ----------------------------------------------------------------------------------- overlong
OVERLONG_CASES = [
    # (L_max, L_cache, tokens, expected)
    (10, 4, 0, 0.0),
    (10, 4, 6, 0.0),
    (10, 4, 7, -0.25),
    (10, 4, 8, -0.5),
    (10, 4, 9, -0.75),
    (10, 4, 10, -1.0),
    (10, 4, 11, -1.0),
    (16384, 4096, 12288, 0.0),
    (16384, 4096, 14336, -0.5),
    (10, 0, 10, 0.0),  # no cache: a hard cut
    (10, 0, 11, -1.0),
]


@pytest.mark.parametrize("lmax,cache,tokens,expected", OVERLONG_CASES)
def test_soft_overlong_hand_computed(lmax, cache, tokens, expected):
    fn = get_soft_overlong_punishment(lmax, cache)
    assert fn([chat("whatever")], completion_ids=[[1] * tokens]) == [expected]


def test_soft_overlong_errors():
    with pytest.raises(
        ValueError, match=r"soft_punish_cache=10 must be in \[0, max_completion_len=10\)"
    ):
        get_soft_overlong_punishment(10, 10)
    with pytest.raises(ValueError, match="needs the dataset column 'completion_ids'"):
        get_soft_overlong_punishment(10, 4)(["x"])
