"""Splitting text into words, per language, for the n-gram rewards.

- ``en``: lower-cased, split on whitespace (open-r1's).
- ``zh``: segmented into words by jieba (the library open-r1 uses), lower-cased, whitespace
  tokens dropped. Chinese has no spaces between words, so a whitespace split sees a whole
  sentence as one word; jieba's dictionary + HMM segmentation finds the words, and it keeps
  runs of Latin letters and digits together, so mixed Chinese/English text works too.
  open-r1 keeps jieba's whitespace tokens as words (``"a b"`` -> ``a``, `` ``, ``b``), so spaces
  there count inside n-grams; here they do not. Punctuation tokens are kept, as open-r1 does.

jieba is imported on the first ``zh`` split; its dictionary loads then (about a second).
"""

from __future__ import annotations

import functools

LANGUAGES = ("en", "zh")


@functools.lru_cache(maxsize=1)
def _jieba():
    import logging
    import warnings

    with warnings.catch_warnings():
        # jieba 0.42 imports setuptools' deprecated pkg_resources when it is installed
        warnings.filterwarnings("ignore", message=".*pkg_resources.*")
        import jieba

    jieba.setLogLevel(logging.WARNING)  # no "Building prefix dict..." on stderr
    jieba.initialize()
    return jieba


def split_words(text: str, language: str = "en") -> list[str]:
    """The words of ``text`` in ``language`` (``en`` or ``zh``), lower-cased."""
    if language == "en":
        return text.lower().split()
    if language == "zh":
        return [w for w in _jieba().lcut(text.lower()) if w.strip()]
    raise ValueError(f"language={language!r}: word splitting is implemented for {LANGUAGES}")


def check_language(language, field: str = "repetition_language") -> None:
    if language not in LANGUAGES:
        raise ValueError(f"{field}={language!r}; expected one of {', '.join(LANGUAGES)}")
