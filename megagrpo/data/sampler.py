"""Which prompts each data-parallel rank takes at each step, resumable.

Every step draws ``prompts_per_step`` prompts from a per-epoch permutation (seeded by seed and
epoch); rank r of D takes the r-th contiguous slice, so each rank owns whole prompts and with
them whole groups of completions. An epoch's tail shorter than a step is skipped (drop-last), as
the HF Trainer does. ``state_dict`` records the epoch and position for checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PromptSampler:
    num_prompts: int
    prompts_per_step: int
    """Prompts per generation batch over all data-parallel ranks (a "step" here is a generation
    batch; ``training/generation_steps.py`` maps them to optimizer steps)."""
    dp_rank: int = 0
    dp_size: int = 1
    seed: int = 0
    epoch: int = 0
    position: int = 0
    """Index into this epoch's permutation of the next prompt."""

    def __post_init__(self):
        if self.prompts_per_step % self.dp_size:
            raise ValueError(
                f"{self.prompts_per_step} prompts per step do not split over "
                f"{self.dp_size} data-parallel ranks"
            )
        if self.num_prompts < self.prompts_per_step:
            raise ValueError(
                f"the dataset has {self.num_prompts} prompts, fewer than the "
                f"{self.prompts_per_step} one step needs"
            )

    @property
    def steps_per_epoch(self) -> int:
        return self.num_prompts // self.prompts_per_step

    def _permutation(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_prompts, generator=g)

    def rows_at(self, step: int) -> list[int]:
        """This rank's prompt indices of step ``step`` (0-based), without touching the state:
        the order is a function of the step alone, so resuming needs only the step."""
        epoch, k = divmod(step, self.steps_per_epoch)
        perm = self._permutation(epoch)
        per_rank = self.prompts_per_step // self.dp_size
        start = k * self.prompts_per_step + self.dp_rank * per_rank
        return perm[start : start + per_rank].tolist()

    def next_step(self) -> list[int]:
        """This rank's prompt indices for the next step."""
        if self.position + self.prompts_per_step > self.num_prompts:
            self.epoch, self.position = self.epoch + 1, 0
        perm = self._permutation(self.epoch)
        per_rank = self.prompts_per_step // self.dp_size
        start = self.position + self.dp_rank * per_rank
        self.position += self.prompts_per_step
        return perm[start : start + per_rank].tolist()

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "num_prompts": self.num_prompts,
            "prompts_per_step": self.prompts_per_step,
        }

    def load_state_dict(self, state: dict) -> None:
        for key in ("num_prompts", "prompts_per_step", "seed"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"checkpoint's data position was saved with {key}={state[key]}, this run has "
                    f"{key}={getattr(self, key)}: resuming would silently change the data order"
                )
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


REFILL_SEED_OFFSET = 0x5EED_0F_D5
"""Added to the run seed for the permutations the extra generation rounds draw from."""


@dataclass(frozen=True)
class GenerationRounds:
    """Which prompts each generation round of a step draws (dynamic sampling).

    Round 0 of step s takes the step's prompts, ``first.rows_at(s)``: the epochs, the data order
    and their resume are those of a run without dynamic sampling. Round r >= 1 takes batch
    ``s x (max_rounds - 1) + r - 1`` of a second stream of per-epoch permutations of the same
    prompts (seeded apart from the first), less the prompts the step drew already: each step
    owns ``max_rounds - 1`` slots of that stream, used or not, and its extra rounds' prompts are
    new to it. So every round's prompts are a function of (seed, step, round) alone: async
    rollouts generate a step's first round before earlier steps know how many rounds they need,
    and a resumed run draws the same prompts without any state in the checkpoint. The epochs
    (``steps_per_epoch``) count first rounds only.
    """

    first: PromptSampler
    max_rounds: int

    def __post_init__(self):
        if not isinstance(self.max_rounds, int) or self.max_rounds < 1:
            raise ValueError(f"max_generation_rounds must be an int >= 1, got {self.max_rounds!r}")

    @property
    def refill(self) -> PromptSampler:
        f = self.first
        return PromptSampler(
            f.num_prompts,
            f.prompts_per_step,
            dp_rank=f.dp_rank,
            dp_size=f.dp_size,
            seed=f.seed + REFILL_SEED_OFFSET,
        )

    def rows_at(self, step: int, round_: int) -> list[int]:
        """The prompt rows of round ``round_`` (0-based) of step ``step``: an extra round leaves
        out the prompts the step's earlier rounds drew (so it may hold fewer, even none)."""
        if not 0 <= round_ < self.max_rounds:
            raise ValueError(f"round {round_} of step {step}: expected 0 .. {self.max_rounds - 1}")
        rows = self.first.rows_at(step)
        if round_ == 0:
            return rows
        drawn = set(rows)
        refill = self.refill
        for r in range(1, round_ + 1):
            slot = refill.rows_at(step * (self.max_rounds - 1) + r - 1)
            rows = [row for row in slot if row not in drawn]
            drawn.update(rows)
        return rows
