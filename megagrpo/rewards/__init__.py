"""Reward functions (open-r1's, with its defects fixed), their registry, and the reward pool.

Every reward function has the open-r1 / TRL signature ``fn(completions, **columns) -> list[float |
None]``: ``completions`` are chat-message lists (``[{"role": "assistant", "content": ...}]``) or
plain strings, dataset columns arrive as lists (``solution``, ...) together with
``completion_ids`` (token ids, used for every length). ``None`` means "cannot score".

The package imports nothing heavy: math-verify is imported on the first accuracy call, the pool's
multiprocessing machinery when a pool is built. See ``docs/rewards.md``.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "accuracy_reward": "megagrpo.rewards.math_accuracy",
    "format_reward": "megagrpo.rewards.format",
    "tag_count_reward": "megagrpo.rewards.format",
    "reasoning_steps_reward": "megagrpo.rewards.reasoning",
    "get_cosine_scaled_reward": "megagrpo.rewards.length",
    "len_reward": "megagrpo.rewards.length",
    "get_soft_overlong_punishment": "megagrpo.rewards.length",
    "get_repetition_penalty_reward": "megagrpo.rewards.repetition",
    "get_code_format_reward": "megagrpo.rewards.code_format",
    "get_code_reward": "megagrpo.rewards.code_execution",
    "SandboxConfig": "megagrpo.rewards.sandbox",
    "run_programs": "megagrpo.rewards.sandbox",
    "RewardFunction": "megagrpo.rewards.registry",
    "build_reward_functions": "megagrpo.rewards.registry",
    "reward_function": "megagrpo.rewards.registry",
    "RewardPool": "megagrpo.rewards.pool",
    "RewardPoolConfig": "megagrpo.rewards.pool",
    "RewardScores": "megagrpo.rewards.scores",
    "score_serial": "megagrpo.rewards.scores",
    "reward_metrics": "megagrpo.rewards.metrics",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'megagrpo.rewards' has no attribute {name!r}")
