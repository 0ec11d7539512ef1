"""How generation batches map onto optimizer steps (TRL's ``steps_per_generation``).

Legend: N completions of this data-parallel rank's share of one generation batch.

One generation batch holds ``per_device_train_batch_size x steps_per_generation`` completions per
data-parallel rank. TRL calls each ``per_device_train_batch_size`` slice a step; megagrpo trains
``gradient_accumulation_steps`` of them per optimizer step, so a generation batch is
``parts = steps_per_generation / gradient_accumulation_steps`` optimizer-step batches, passed over
``num_iterations`` times: ``updates_per_generation = parts x num_iterations`` optimizer steps, in
TRL's order (every part of pass 1, then every part of pass 2, ...).

Steps are counted as TRL counts them: every optimizer step is a step (``max_steps``, the learning-
rate schedule, logging, checkpoints, ``ref_model_sync_steps``). Generation ``g`` trains steps
``g x updates_per_generation + 1 ..``; the last generation of a run whose ``max_steps`` is not a
multiple stops early. Evaluations and checkpoints fall on generation boundaries (the engines hold
the weights pushed after a generation's last step; a checkpoint inside one could not resume it
exactly): one that falls due inside a generation batch happens after its last step.

With ``parts > 1`` the rank's share is shuffled before it is split, as TRL shuffles its generation
batch (``shuffle_sequence_dict`` then ``split_tensor_dict``): every optimizer step then sees a mix
of groups. The permutation depends on the seed, the generation and the rank only, so a resumed run
draws the same one. With one part nothing is shuffled (megagrpo's behaviour before this setting).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megagrpo.training.batch import CompletionBatch


@dataclass(frozen=True)
class GenerationSchedule:
    parts: int
    """Optimizer-step batches in one generation batch: steps_per_generation / GA."""
    num_iterations: int
    """Passes over each generation batch."""

    @classmethod
    def from_config(cls, training, dp_size: int) -> GenerationSchedule:
        spg = training.steps_per_generation_for(dp_size)
        return cls(
            parts=spg // training.gradient_accumulation_steps,
            num_iterations=training.num_iterations,
        )

    @property
    def updates_per_generation(self) -> int:
        return self.parts * self.num_iterations

    def generation_of(self, step: int) -> int:
        """The generation batch that optimizer step ``step`` (0-based) trains on."""
        return step // self.updates_per_generation

    def generations(self, total_steps: int) -> int:
        """Generation batches a run of ``total_steps`` optimizer steps needs."""
        return -(-total_steps // self.updates_per_generation)

    def steps_of(self, generation: int, total_steps: int) -> range:
        """The 0-based optimizer steps of ``generation``."""
        first = generation * self.updates_per_generation
        return range(first, min(first + self.updates_per_generation, total_steps))

    def part_of(self, step: int) -> int:
        """Which part of its generation batch step ``step`` trains on."""
        return step % self.updates_per_generation % self.parts


def split_generation(
    batch: CompletionBatch, parts: int, *, seed: int, generation: int, dp_rank: int = 0
) -> list[CompletionBatch]:
    """This rank's share of a generation batch as ``parts`` optimizer-step batches: shuffled
    (when parts > 1), then cut into equal consecutive slices."""
    if parts == 1:
        return [batch]
    n = len(batch)
    if parts < 1 or n % parts:
        raise ValueError(f"{n} completions do not split into {parts} optimizer steps")
    g = torch.Generator().manual_seed((seed * 1_000_003 + generation) * 1_009 + dp_rank)
    order = torch.randperm(n, generator=g).tolist()
    size = n // parts
    return [_select(batch, order[i * size : (i + 1) * size]) for i in range(parts)]


def _select(batch: CompletionBatch, idx: list[int]) -> CompletionBatch:
    def pick(values):
        return None if values is None else [values[i] for i in idx]

    return CompletionBatch(
        prompt_ids=pick(batch.prompt_ids),
        completion_ids=pick(batch.completion_ids),
        finish_reasons=pick(batch.finish_reasons),
        advantages_n=batch.advantages_n[idx],
        sampler_logprobs=pick(batch.sampler_logprobs),
        weight_versions=pick(batch.weight_versions) if batch.weight_versions else [],
    )
