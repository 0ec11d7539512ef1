"""repetition_language: en splits on whitespace, zh segments Chinese words with jieba (issue 15
item 1); open-r1's cases and mixed text, against hand-counted n-grams."""

from __future__ import annotations

import pytest

from megagrpo.rewards.repetition import get_repetition_penalty_reward
from megagrpo.rewards.words import split_words


def _score(text, n=2, language="zh"):
    return get_repetition_penalty_reward(n, -1.0, language)([[{"content": text}]])[0]


def test_open_r1_full_repetition_with_language():
    # open-r1 tests/test_rewards.py::test_full_repetition_with_language
    assert _score("that that that that that", language="en") == -0.75
    # 这个 x5: 4 bigrams, 1 distinct
    assert _score("这个这个这个这个这个") == -0.75
    assert _score("这个这个这个这个这个", language="en") == 0.0  # one "word" without segmentation


def test_zh_segments_mixed_text_and_drops_whitespace():
    # 我 / 喜欢 / python / 我 / 喜欢 / python: 5 bigrams, 3 distinct -> 1 - 3/5
    assert split_words("我喜欢Python我喜欢Python", "zh") == ["我", "喜欢", "python"] * 2
    assert _score("我喜欢Python我喜欢Python") == pytest.approx(-0.4)
    # spaces are not words (open-r1 keeps jieba's " " tokens): 3 bigrams, 2 distinct
    assert _score("hello world hello world") == pytest.approx(-1 / 3)
    assert _score("hello world hello world", language="en") == pytest.approx(-1 / 3)
    # punctuation tokens count: 今天天气 很 好 ， 今天天气 很 好 。 -> 7 bigrams, 5 distinct
    assert _score("今天天气很好，今天天气很好。") == pytest.approx(-2 / 7)
    # trigrams of the same: 6, 5 distinct (今天天气 很 好 repeats once)
    assert _score("今天天气很好，今天天气很好。", n=3) == pytest.approx(-1 / 6)
    assert _score("") == 0.0 and _score("你好", n=3) == 0.0  # fewer words than n


def test_bad_language_names_the_field():
    with pytest.raises(ValueError, match=r"repetition_language='fr'; expected one of en, zh"):
        get_repetition_penalty_reward(3, -1.0, "fr")


def test_recipe_key_reaches_the_reward():
    from megagrpo.config.script_args import GRPOScriptArguments
    from megagrpo.rewards.registry import reward_function

    s = GRPOScriptArguments(repetition_language="zh", repetition_n_grams=2)
    fn = reward_function("repetition_penalty", s)
    assert fn.kwargs["language"] == "zh"
    assert fn([[{"content": "这个这个这个这个这个"}]]) == [-0.75]
