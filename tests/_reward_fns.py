"""Custom reward functions for the reward tests, imported by dotted path in spawned workers.

``adversarial`` misbehaves according to the completion's text: SLEEP hangs forever, SPAWN
starts a ``sleep`` process then hangs, EXIT kills its own process with ``os._exit``, SEGV
dereferences NULL through ctypes, RAISE raises, ALLOC asks for 64 GiB; any other text scores its
length in characters.
"""

from __future__ import annotations

import ctypes
import os
import time

from megagrpo.rewards.inputs import completion_texts


def adversarial(completions, **columns):
    out = []
    for text in completion_texts(completions):
        if "SPAWN" in text:  # start a grandchild, then hang
            import subprocess

            child = subprocess.Popen(["sleep", "1000"])
            with open(columns["pidfile"][0], "w") as f:
                f.write(str(child.pid))
            while True:
                time.sleep(3600)
        if "SLEEP" in text:
            while True:
                time.sleep(3600)
        if "EXIT" in text:
            os._exit(3)
        if "SEGV" in text:
            ctypes.string_at(0)
        if "RAISE" in text:
            raise RuntimeError("adversarial reward raised on purpose")
        if "ALLOC" in text:
            blob = bytearray(64 * 2**30)
            out.append(float(len(blob)))
            continue
        out.append(float(len(text)))
    return out


def constant_half(completions, **columns):
    return [0.5] * len(completions)


def wrong_length(completions, **columns):
    return [1.0] * (len(completions) + 1)


def none_for_odd_lengths(completions, **columns):
    return [None if len(t) % 2 else 1.0 for t in completion_texts(completions)]


NOT_CALLABLE = 3


_FRESH = iter(range(10**9))


def _signal_when_divisible_by(k: int, solution) -> list[float]:
    """Dynamic sampling's tests: a group has a reward spread exactly when its prompt's solution
    is a multiple of ``k``. Such completions score a number this process never gave before (so
    they differ within their group); the others all score 1.0 (zero std)."""
    return [float(next(_FRESH)) if int(s) % k == 0 else 1.0 for s in solution]


def signal_when_divisible_by_3(completions, solution, **columns):
    return _signal_when_divisible_by(3, solution)


def signal_when_divisible_by_5(completions, solution, **columns):
    return _signal_when_divisible_by(5, solution)
