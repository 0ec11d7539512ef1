"""From a recipe's ``reward_funcs`` / ``reward_weights`` to the reward functions to run.

A ``RewardFunction`` is a picklable description (a dotted path plus factory arguments), so the
same function can be built inside spawned reward-pool workers. ``reward_funcs`` entries are the
registry names of ``megagrpo.config.script_args.REWARD_FUNCS``, open-r1's function names as
aliases, or a custom function ``pkg.module:fn`` with the reward signature.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from typing import Any

from megagrpo.config.script_args import REWARD_ALIASES


def _code_kwargs(s, binary: bool) -> dict:
    """Factory arguments of the code rewards (``code_execution.get_code_reward``)."""
    return {
        "provider": s.code_provider,
        "scoring_mode": s.code_eval_scoring_mode,
        "test_batch_size": s.code_eval_test_batch_size,
        "binary": binary,
        "timeout_seconds": s.code_timeout_seconds,
        "cpu_seconds": s.code_cpu_seconds,
        "memory_mb": s.code_memory_mb,
        "max_output_bytes": s.code_max_output_bytes,
        "strict": s.code_sandbox_strict,
    }


#: registry name -> (metric name, dotted path, factory kwargs from script args or None, combine).
#: The metric name is open-r1's function name, which TRL uses for ``rewards/<name>/mean``.
_BUILTINS: dict[str, tuple[str, str, Any, str | None]] = {
    "accuracy": ("accuracy_reward", "megagrpo.rewards.math_accuracy:accuracy_reward", None, None),
    "format": ("format_reward", "megagrpo.rewards.format:format_reward", None, None),
    "tag_count": ("tag_count_reward", "megagrpo.rewards.format:tag_count_reward", None, None),
    "reasoning_steps": (
        "reasoning_steps_reward",
        "megagrpo.rewards.reasoning:reasoning_steps_reward",
        None,
        None,
    ),
    "cosine": (
        "cosine_scaled_reward",
        "megagrpo.rewards.length:get_cosine_scaled_reward",
        lambda s: {
            "min_value_wrong": s.cosine_min_value_wrong,
            "max_value_wrong": s.cosine_max_value_wrong,
            "min_value_correct": s.cosine_min_value_correct,
            "max_value_correct": s.cosine_max_value_correct,
            "max_len": s.cosine_max_len,
        },
        None,
    ),
    "repetition_penalty": (
        "repetition_penalty_reward",
        "megagrpo.rewards.repetition:get_repetition_penalty_reward",
        lambda s: {
            "ngram_size": s.repetition_n_grams,
            "max_penalty": s.repetition_max_penalty,
            "language": s.repetition_language,
        },
        None,
    ),
    "code_format": (
        "code_format_reward",
        "megagrpo.rewards.code_format:get_code_format_reward",
        lambda s: {"language": s.code_language},
        None,
    ),
    "code": (
        "code_reward",
        "megagrpo.rewards.code_execution:get_code_reward",
        lambda s: _code_kwargs(s, binary=False),
        None,
    ),
    "binary_code": (
        "binary_code_reward",
        "megagrpo.rewards.code_execution:get_code_reward",
        lambda s: _code_kwargs(s, binary=True),
        None,
    ),
    # Kimi's len reward depends on the other completions of the prompt: the per-sample stage is
    # correctness (accuracy), the group stage runs in the caller (see length.combine_len).
    "length": (
        "len_reward",
        "megagrpo.rewards.math_accuracy:accuracy_reward",
        None,
        "megagrpo.rewards.length:combine_len",
    ),
    "soft_overlong_punishment": (
        "soft_overlong_punishment_reward",
        "megagrpo.rewards.length:get_soft_overlong_punishment",
        lambda s: {
            "max_completion_len": s.max_completion_len,
            "soft_punish_cache": s.soft_punish_cache,
        },
        None,
    ),
}

#: The built-ins that verify the answer with math-verify (one hang group).
_VERIFIES = ("accuracy", "cosine", "length")
MATH_VERIFY_GROUP = "math_verify"


def reads_solution(reward_funcs: list[str]) -> bool:
    """Whether a built-in of ``reward_funcs`` checks completions against the ``solution``."""
    return any(REWARD_ALIASES.get(n, n) in _VERIFIES for n in reward_funcs)


#: The built-ins that run the completion's program on the ``verification_info`` test cases.
_RUNS_CODE = ("code", "binary_code")


def reads_verification_info(reward_funcs: list[str]) -> bool:
    """Whether a built-in of ``reward_funcs`` runs programs on ``verification_info`` tests."""
    return any(REWARD_ALIASES.get(n, n) in _RUNS_CODE for n in reward_funcs)


#: open-r1's Python function names, accepted in reward_funcs.
ALIASES = REWARD_ALIASES

_LOADED: dict[tuple, Any] = {}


def import_dotted(path: str, what: str = "reward function"):
    """The object named by ``pkg.module:attr`` (``pkg.module.attr`` is accepted too)."""
    if not isinstance(path, str) or not path:
        raise ValueError(f"{what} path must be a non-empty string 'pkg.module:fn', got {path!r}")
    module_name, sep, attr = path.partition(":")
    if not sep:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise ValueError(f"{what} {path!r}: expected 'pkg.module:fn'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"{what} {path!r}: cannot import module {module_name!r} ({e})") from e
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{what} {path!r}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


@dataclass(frozen=True)
class RewardFunction:
    """One configured reward: how to build it (picklable), its metric name and weight."""

    name: str
    """Metric name (``rewards/<name>/mean``)."""
    target: str
    """``pkg.module:attr`` of the scoring function, or of its factory when ``kwargs`` is set."""
    kwargs: dict | None = None
    """Factory arguments; None when ``target`` is the scoring function itself."""
    weight: float = 1.0
    """Weight in the total reward (TRL's reward_weights)."""
    combine: str | None = None
    """``pkg.module:fn(values, columns, group_size) -> list`` turning the per-sample values of
    ``target`` into the final rewards with knowledge of the whole group (Kimi's len reward)."""
    hang_group: str | None = None
    """Functions of one hang group run the same expensive step on a sample (the built-in
    accuracy, cosine and length all verify the answer with math-verify): when one of them times
    out or crashes on a sample, the pool gives the group's other calls on that sample the same
    fate instead of running them into the same wall."""

    def load(self):
        """The scoring callable (built once per process)."""
        key = (self.target, repr(sorted((self.kwargs or {}).items())), self.kwargs is None)
        if key not in _LOADED:
            obj = import_dotted(self.target)
            fn = obj(**self.kwargs) if self.kwargs is not None else obj
            if not callable(fn):
                raise ValueError(f"reward function {self.target!r} is not callable")
            _LOADED[key] = fn
        return _LOADED[key]

    def finish(self, values: list, columns: dict, group_size: int | None) -> list:
        """Apply ``combine`` (if any) to the per-sample values of the whole batch."""
        if self.combine is None:
            return values
        return list(import_dotted(self.combine, "reward combine")(values, columns, group_size))

    def __call__(self, completions, num_generations: int | None = None, **columns) -> list:
        """Score a batch in this process, no timeouts (``num_generations`` groups Kimi's len)."""
        values = list(self.load()(completions, **columns))
        return self.finish(values, columns, num_generations)


def reward_function(entry: str, script_args=None, weight: float = 1.0) -> RewardFunction:
    """The ``RewardFunction`` of one ``reward_funcs`` entry.

    ``script_args`` (a ``GRPOScriptArguments``) supplies the parameters of the factories; None
    takes the defaults.
    """
    if not isinstance(entry, str) or not entry.strip():
        raise ValueError(f"reward_funcs entry {entry!r} must be a non-empty name")
    entry = entry.strip()
    key = ALIASES.get(entry, entry)
    if key in _BUILTINS:
        name, target, kwargs_of, combine = _BUILTINS[key]
        if kwargs_of is None:
            kwargs = None
        else:
            if script_args is None:
                from megagrpo.config.script_args import GRPOScriptArguments

                script_args = GRPOScriptArguments()
            kwargs = kwargs_of(script_args)
        group = MATH_VERIFY_GROUP if key in _VERIFIES else None
        fn = RewardFunction(name, target, kwargs, float(weight), combine, group)
    elif ":" in entry or "." in entry:
        obj = import_dotted(entry)
        if not callable(obj):
            raise ValueError(f"reward_funcs entry {entry!r} is not callable")
        fn = RewardFunction(
            getattr(obj, "__name__", entry.rpartition(":")[2]), entry, None, float(weight)
        )
    else:
        from megagrpo.config.script_args import REWARD_FUNCS

        raise ValueError(
            f"reward_funcs entry {entry!r} is not a reward function: choose from "
            f"{', '.join(REWARD_FUNCS)} (or their names {', '.join(ALIASES)}), or give a "
            "custom function as 'pkg.module:fn'"
        )
    fn.load()  # factory arguments are checked here, in the caller's process
    return fn


def build_reward_functions(script_args) -> list[RewardFunction]:
    """The reward functions and weights a ``GRPOScriptArguments`` configures, in order."""
    entries = list(script_args.reward_funcs or [])
    if not entries:
        raise ValueError("reward_funcs is empty: name at least one reward function")
    weights = script_args.reward_weights
    if weights is None:
        weights = [1.0] * len(entries)
    if len(weights) != len(entries):
        raise ValueError(
            f"reward_weights has {len(weights)} entries {list(weights)} but reward_funcs has "
            f"{len(entries)} {entries}: one weight per function"
        )
    for w in weights:
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise ValueError(
                f"reward_weights={list(weights)}: every weight must be a finite number"
            )
    fns = [reward_function(e, script_args, w) for e, w in zip(entries, weights)]
    names = [f.name for f in fns]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"reward_funcs {entries} name {', '.join(dupes)} more than once")
    return fns
