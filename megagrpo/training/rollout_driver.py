"""The rollout side of training: the engine, the async producer and the reward pool.

``RolloutDriver.create(run)`` builds, on each rank that holds an engine (global rank 0; every
rank with colocated vLLM, see ``rollout_engines``), the engine the recipe asks for, a producer
that generates this rank's share of the steps' batches in order (``async_max_staleness`` ahead
at most), and on rank 0 the reward pool. ``step_data(step)`` gathers the step's groups on rank
0 and returns them scored and advantage-weighted there (None on other ranks); every rank that
holds an engine calls it, in step order.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from megagrpo.rollout.async_rollout import AsyncRollout, AsyncRolloutConfig
from megagrpo.rollout.colocated import EngineShare
from megagrpo.rollout.protocol import SamplingParams
from megagrpo.training.rollout_engines import build_rollout_engine
from megagrpo.training.rollout_step import StepData, requests_for, score_and_advantage


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
    producer: AsyncRollout | None = None
    first_step: int = 0
    script: Any = None
    _eval_scorer: Any = None

    @classmethod
    def create(cls, run, share: EngineShare) -> RolloutDriver:
        from megagrpo.rewards import RewardPool, RewardPoolConfig, build_reward_functions

        t, script = run.recipe.training, run.recipe.script
        dp = run.groups.dp_size
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
            script=script,
        )

    def start(self, first_step: int, total_steps: int) -> None:
        """Begin producing generation batches first_step .. total_steps - 1 (a "step" here is a
        generation batch; ``GenerationSchedule`` maps them to optimizer steps)."""
        self.first_step = first_step

        def batches():
            for step in range(first_step, total_steps):
                rows = self.data.sampler.rows_at(step)
                requests = requests_for(rows, self.data.train, step, self.training.seed)
                yield self.share.mine(requests), self.sampling

        self.producer = AsyncRollout(
            self.engine, batches(), AsyncRolloutConfig(self.training.async_max_staleness)
        )

    def step_data(self, step: int) -> StepData | None:
        t0 = time.perf_counter()
        batch = self.producer.get()
        if self.first_step + batch.index != step:
            raise RuntimeError(f"rollout batch {batch.index} arrived for step {step}")
        groups = self.share.gather(batch.groups)
        waited = time.perf_counter() - t0
        if not self.share.is_root:
            return None
        rows = self.data.sampler.rows_at(step)
        data = score_and_advantage(
            groups,
            rows,
            self.data.train,
            self.tokenizer,
            self.scorer,
            self.data.reward_columns,
            self.training.num_generations,
            self.training.scale_rewards,
            step,
            self.training.multi_objective_aggregation,
        )
        data.metrics["time/generation"] = waited  # waiting for the engine (async: overlapped)
        data.metrics["rollout/staleness"] = float(batch.staleness(self.producer.updates))
        return data

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
