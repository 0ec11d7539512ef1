"""The rollout side of training: the engine, the async producer and the reward pool.

``RolloutDriver.create(run)`` builds, on each rank that holds an engine (global rank 0; every
rank with colocated vLLM, see ``rollout_engines``), the engine the recipe asks for, a producer
that generates this rank's share of the steps' batches in order (``async_max_staleness`` ahead
at most), and on rank 0 the reward pool. ``step_data(step)`` gathers the step's groups on rank
0 and returns them scored and advantage-weighted there (None on other ranks); every rank that
holds an engine calls it, in step order.

With ``dynamic_sampling`` (``algorithms/dynamic_sampling.py``) a step may take more generation
rounds: rank 0 scores each round and decides whether the step needs another, every rank that
holds an engine learns the decision (``EngineShare.agree``) and generates its share of the next
round's prompts (``GenerationRounds``) outside the async stream, with the current weights
(``AsyncRollout.generate_now``). The stream itself still produces one first round per step, so
``async_max_staleness`` bounds it as before; extra rounds are never stale.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from megagrpo.algorithms.advantages import zero_std_groups
from megagrpo.algorithms.dynamic_sampling import BatchQuota, needs_another_round, select_groups
from megagrpo.data.sampler import GenerationRounds
from megagrpo.rollout.async_rollout import AsyncRollout, AsyncRolloutConfig
from megagrpo.rollout.colocated import EngineShare
from megagrpo.rollout.protocol import SamplingParams
from megagrpo.training.rollout_engines import build_rollout_engine
from megagrpo.training.rollout_step import (
    ScoredRound,
    StepData,
    assemble_step,
    requests_for,
    score_round,
)


@dataclass
class RolloutDriver:
    engine: Any
    share: EngineShare
    scorer: Any
    """Rank 0's reward pool (None elsewhere)."""
    sampling: SamplingParams
    data: Any
    tokenizer: Any
    training: Any
    rounds: GenerationRounds
    """The prompts of each generation round (one round per step without dynamic sampling)."""
    quota: BatchQuota | None = None
    """Dynamic sampling's batch of groups (None: dynamic sampling is off)."""
    producer: AsyncRollout | None = None
    first_step: int = 0
    script: Any = None
    _eval_scorer: Any = None

    @classmethod
    def create(cls, run, share: EngineShare) -> RolloutDriver:
        from megagrpo.rewards import RewardPool, RewardPoolConfig, build_reward_functions

        t, script = run.recipe.training, run.recipe.script
        dp = run.groups.dp_size
        quota = _quota(run) if t.dynamic_sampling else None
        completions = t.per_device_train_batch_size * t.steps_per_generation_for(dp) * dp
        engine = build_rollout_engine(
            run.recipe, run.model_dir, run.arch, share,
            completions_per_step=completions,
            on_gpu=run.device.type == "cuda",
        )  # fmt: skip
        scorer = None
        if share.is_root:
            scorer = RewardPool(
                build_reward_functions(script), RewardPoolConfig.from_script_args(script)
            )
        return cls(
            engine=engine,
            share=share,
            scorer=scorer,
            sampling=SamplingParams.from_config(t),
            data=run.data,
            tokenizer=run.tokenizer,
            training=t,
            rounds=GenerationRounds(run.data.sampler, quota.max_rounds if quota else 1),
            quota=quota,
            script=script,
        )

    def start(self, first_step: int, total_steps: int) -> None:
        """Begin producing generation batches first_step .. total_steps - 1 (a "step" here is a
        generation batch; ``GenerationSchedule`` maps them to optimizer steps)."""
        self.first_step = first_step

        def batches():
            for step in range(first_step, total_steps):
                yield self.share.mine(self._requests(step, 0)), self.sampling

        self.producer = AsyncRollout(
            self.engine, batches(), AsyncRolloutConfig(self.training.async_max_staleness)
        )

    def _requests(self, step: int, round_: int):
        rows = self.rounds.rows_at(step, round_)
        return requests_for(rows, self.data.train, step, self.training.seed, round_)

    def step_data(self, step: int) -> StepData | None:
        """The step's rounds, scored, filtered (dynamic sampling) and advantage-weighted on rank
        0; None on the other ranks."""
        t0 = time.perf_counter()
        batch = self.producer.get()
        if self.first_step + batch.index != step:
            raise RuntimeError(f"rollout batch {batch.index} arrived for step {step}")
        groups = self.share.gather(batch.groups)
        generating = time.perf_counter() - t0
        scored = [self._score(groups, step, 0)] if self.share.is_root else []
        rounds = 1
        while self.share.agree(self._wants_another_round(scored, step)):
            t1 = time.perf_counter()
            mine = self.share.mine(self._requests(step, rounds))
            groups = self.share.gather(self.producer.generate_now(mine, self.sampling))
            generating += time.perf_counter() - t1
            if self.share.is_root:
                scored.append(self._score(groups, step, rounds))
            rounds += 1
        if not self.share.is_root:
            return None
        selection = None
        if self.quota is not None:
            selection = select_groups(self._signal(scored), rounds, self.quota)
        data = assemble_step(
            scored,
            selection.kept if selection is not None else None,
            self.tokenizer,
            self.training.num_generations,
            self.training.scale_rewards,
            step,
            self.training.multi_objective_aggregation,
        )
        if selection is not None:
            data.metrics.update(selection.metrics())
        data.metrics.update(self.data.step_metrics(step))  # streaming: rows skipped so far
        data.metrics["time/generation"] = generating  # waiting for the engine (async: overlapped)
        data.metrics["rollout/staleness"] = float(batch.staleness(self.producer.updates))
        return data

    def _score(self, groups, step: int, round_: int) -> ScoredRound:
        return score_round(
            groups,
            self.rounds.rows_at(step, round_),
            self.data.train,
            self.tokenizer,
            self.scorer,
            self.data.reward_columns,
            self.training.num_generations,
        )

    def _signal(self, scored: list[ScoredRound]) -> torch.Tensor:
        """bool [groups of the step so far]: the group's rewards have a nonzero std."""
        total_n = torch.cat([r.total_n() for r in scored])
        return ~zero_std_groups(total_n, self.training.num_generations)

    def _wants_another_round(self, scored: list[ScoredRound], step: int) -> bool | None:
        """Rank 0's decision (None on the other ranks, which learn it through ``agree``); a
        round with no prompt new to the step (a tiny dataset) ends the rounds early."""
        if not self.share.is_root:
            return None
        return (
            self.quota is not None
            and needs_another_round(self._signal(scored), len(scored), self.quota)
            and bool(self.rounds.rows_at(step, len(scored)))
        )

    def generate_now(self, requests, sampling):
        """Generate outside the training stream (evaluation), between its generations: this
        rank's share of ``requests``; the whole batch's groups on rank 0, None elsewhere."""
        mine = self.share.mine(requests)
        run = self.engine.generate if self.producer is None else self.producer.generate_now
        return self.share.gather(run(mine, sampling))

    def eval_scorer(self):
        """A small accuracy-only reward pool (built on first use): evaluation's correctness when
        the recipe does not train on accuracy_reward."""
        if self._eval_scorer is None:
            import dataclasses

            from megagrpo.rewards import RewardPool, RewardPoolConfig, build_reward_functions

            script = dataclasses.replace(
                self.script, reward_funcs=["accuracy"], reward_weights=None
            )
            self._eval_scorer = RewardPool(
                build_reward_functions(script),
                RewardPoolConfig.from_script_args(script, num_workers=1),
            )
        return self._eval_scorer

    def weight_target(self):
        """What the weight sync pushes into: the producer (serialises with generation)."""
        return self.producer if self.producer is not None else self.engine

    def close(self) -> None:
        if self.producer is not None:
            self.producer.close()
        for obj in (self.engine, self.scorer, self._eval_scorer):
            if obj is None:
                continue
            close = getattr(obj, "close", None)
            if close is not None:
                close()


def _quota(run) -> BatchQuota:
    t, g = run.recipe.training, run.groups
    interleaved = g.vpp_size is not None and g.pp_size > 1  # micro-batches: a multiple of PP
    # a generation batch trains as ``parts`` optimizer steps of whole micro-batches each
    return BatchQuota.for_layout(
        run.data.prompts_per_step,
        num_generations=t.num_generations,
        dp_size=g.dp_size,
        micro_batch_size=run.micro_batch_size,
        max_rounds=t.max_generation_rounds,
        microbatch_multiple=(g.pp_size if interleaved else 1) * run.generation.parts,
    )
