"""N-gram repetition penalty (Yeo et al. 2025, "Demystifying Long CoT", appendix C.2).

Reward = max_penalty x (1 - distinct n-grams / n-grams), over the completion's lower-cased words
(``language``: ``en`` splits on whitespace, ``zh`` segments with jieba, see ``words.py``); 0.0 for
a completion with fewer than n words. As open-r1's.
"""

from __future__ import annotations

from megagrpo.rewards.inputs import completion_texts
from megagrpo.rewards.words import check_language, split_words


def repetition_fraction(text: str, ngram_size: int, language: str = "en") -> float:
    """1 - distinct/total word n-grams; 0.0 when the text has fewer than ``ngram_size`` words."""
    words = split_words(text, language)
    total = len(words) - ngram_size + 1
    if total <= 0:
        return 0.0
    distinct = {tuple(words[i : i + ngram_size]) for i in range(total)}
    return 1.0 - len(distinct) / total


def get_repetition_penalty_reward(
    ngram_size: int = 3, max_penalty: float = -1.0, language: str = "en"
):
    """The repetition penalty reward for ``ngram_size``-grams of ``language`` words, at most
    ``max_penalty`` (<= 0)."""
    if isinstance(ngram_size, bool) or not isinstance(ngram_size, int) or ngram_size < 1:
        raise ValueError(f"repetition_n_grams={ngram_size!r} must be an integer >= 1")
    if not max_penalty <= 0:
        raise ValueError(f"repetition_max_penalty={max_penalty} must be <= 0 (it is a penalty)")
    check_language(language)
    if language != "en":
        split_words("", language)  # import the segmenter now, in the process that builds this

    def repetition_penalty_reward(completions, **columns) -> list[float]:
        return [
            max_penalty * repetition_fraction(text, ngram_size, language) + 0.0  # + 0.0: no -0.0
            for text in completion_texts(completions)
        ]

    repetition_penalty_reward.__qualname__ = f"repetition_penalty_reward[n={ngram_size},{language}]"
    return repetition_penalty_reward
