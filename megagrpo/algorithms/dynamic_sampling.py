"""DAPO's dynamic sampling: a step trains only on groups that carry a learning signal.

Legend: B groups generated so far in the step (all its rounds, in generation order).

A group whose rewards all agree (zero std, ``advantages.zero_std_groups``) gets advantage 0 for
every completion: it adds nothing to the policy gradient, yet it counts in the batch and dilutes
the loss of the others. DAPO (Yu et al. 2025, "DAPO: An Open-Source LLM Reinforcement Learning
System at Scale", section 3.2) drops such groups and samples groups of further prompts until the
batch is full again; verl bounds the rounds with ``max_num_gen_batches``, megagrpo with
``max_generation_rounds``. Per step:

1. The first round generates the step's prompts. While fewer than ``quota.groups`` groups have
   a signal and fewer than ``quota.max_rounds`` rounds ran, another round generates the groups
   of further prompts (``data.sampler.GenerationRounds`` says which).
2. With at least ``quota.groups`` signal groups, the first ``quota.groups`` of them train; the
   rest are surplus and dropped.
3. Otherwise the bound was reached and the step trains on what it has, cut down to a multiple of
   ``quota.multiple`` (so that every data-parallel rank gets whole groups in whole micro-batches).
   With fewer than ``quota.multiple`` signal groups, zero-std groups of the latest rounds fill
   the batch up to ``quota.multiple``: the step is still a well-defined update (those groups
   have advantage 0, no policy gradient; they still count in the KL and entropy terms).

Advantages are computed afterwards over the kept groups only (``scale_rewards: batch`` divides
by the std of the kept batch).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class BatchQuota:
    """How many groups a step trains on."""

    groups: int
    """The configured batch: groups (prompts) per step over all data-parallel ranks."""
    multiple: int
    """A smaller batch must be a multiple of this many groups (``for_layout``)."""
    max_rounds: int
    """Generation rounds per step at most, the first included (``max_generation_rounds``)."""

    def __post_init__(self):
        for name in ("groups", "multiple", "max_rounds"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"BatchQuota.{name} must be an int >= 1, got {value!r}")
        if self.groups % self.multiple:
            raise ValueError(
                f"BatchQuota: a batch of {self.groups} groups is not a multiple of "
                f"{self.multiple}, the smallest batch the layout can train"
            )

    @classmethod
    def for_layout(
        cls,
        groups: int,
        *,
        num_generations: int,
        dp_size: int,
        micro_batch_size: int,
        max_rounds: int,
        microbatch_multiple: int = 1,
    ) -> BatchQuota:
        """The quota of a run: a trained batch of k groups must give each of the ``dp_size``
        ranks whole groups (k a multiple of dp_size) that fill whole micro-batches (k / dp_size
        x num_generations a multiple of micro_batch_size), as many as a multiple of
        ``microbatch_multiple`` (the pipeline size under the interleaved schedule)."""
        completions = micro_batch_size * microbatch_multiple  # per rank, a multiple of this
        per_rank = completions // math.gcd(num_generations, completions)
        return cls(groups=groups, multiple=dp_size * per_rank, max_rounds=max_rounds)


def needs_another_round(signal_b: torch.Tensor, rounds: int, quota: BatchQuota) -> bool:
    """Whether the step generates one more round, after ``rounds`` rounds whose groups'
    signal (bool [B], True = nonzero reward std) is ``signal_b``."""
    return int(signal_b.sum()) < quota.groups and rounds < quota.max_rounds


@dataclass(frozen=True)
class GroupSelection:
    """The groups a step trains on, and what happened to the others."""

    kept: list[int]
    """Indices into the step's generated groups (all rounds, in order), ascending."""
    rounds: int
    filtered: int
    """Zero-std groups dropped."""
    padded: int
    """Zero-std groups kept to fill the smallest trainable batch (rule 3)."""
    surplus: int
    """Groups with a signal dropped because the batch was full (or to round it down)."""

    def metrics(self) -> dict[str, float]:
        return {
            "dynamic_sampling/rounds": float(self.rounds),
            "dynamic_sampling/filtered_groups": float(self.filtered),
            "dynamic_sampling/kept_groups": float(len(self.kept)),
            "dynamic_sampling/padded_groups": float(self.padded),
            "dynamic_sampling/surplus_groups": float(self.surplus),
        }


def select_groups(signal_b: torch.Tensor, rounds: int, quota: BatchQuota) -> GroupSelection:
    """The module docstring's rules 2 and 3 over the step's groups (bool [B] signal)."""
    signal = torch.nonzero(signal_b, as_tuple=False).flatten().tolist()
    silent = torch.nonzero(~signal_b, as_tuple=False).flatten().tolist()
    if len(signal) >= quota.groups:
        size = quota.groups
    else:
        size = max(quota.multiple, len(signal) // quota.multiple * quota.multiple)
    if len(silent) + len(signal) < size:
        raise ValueError(
            f"{len(signal_b)} groups generated in {rounds} round(s), fewer than the smallest "
            f"trainable batch of {size} groups"
        )
    kept = signal[:size]
    padding = silent[len(silent) - (size - len(kept)) :] if size > len(kept) else []
    return GroupSelection(
        kept=sorted(kept + padding),
        rounds=rounds,
        filtered=len(silent) - len(padding),
        padded=len(padding),
        surplus=len(signal) - len(kept),
    )
