"""Global rank 0's side of rollouts: the engine, the async producer and the reward pool.

``RolloutDriver.create(run)`` builds the engine the recipe asks for (embedded transformers
engine, a pool of engine processes, or vLLM), the reward pool, and a producer that generates the
steps' batches in order (``async_max_staleness`` ahead at most). ``step_data(step)`` returns the
scored, advantage-weighted StepData of a step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from megagrpo.rollout.async_rollout import AsyncRollout, AsyncRolloutConfig
from megagrpo.rollout.config import RolloutConfig, build_rollout_engine
from megagrpo.rollout.protocol import SamplingParams
from megagrpo.training.rollout_step import StepData, requests_for, score_and_advantage


def rollout_config(training) -> RolloutConfig:
    return RolloutConfig(
        use_vllm=training.use_vllm,
        vllm_mode=training.vllm_mode,
        vllm_gpu_memory_utilization=training.vllm_gpu_memory_utilization,
        vllm_tensor_parallel_size=training.vllm_tensor_parallel_size,
        vllm_enable_sleep_mode=training.vllm_enable_sleep_mode,
        vllm_server_host=training.vllm_server_host,
        vllm_server_port=training.vllm_server_port,
        vllm_server_addresses=list(training.vllm_server_addresses),
        rollout_num_engines=training.rollout_num_engines,
        rollout_threads_per_engine=training.rollout_threads_per_engine,
        rollout_max_batch_size=training.rollout_max_batch_size,
        weight_sync_bucket_mb=training.weight_sync_bucket_mb,
    )


@dataclass
class RolloutDriver:
    engine: Any
    scorer: Any
    sampling: SamplingParams
    data: Any
    tokenizer: Any
    training: Any
    producer: AsyncRollout | None = None
    first_step: int = 0
    script: Any = None
    _eval_scorer: Any = None

    @classmethod
    def create(cls, run) -> RolloutDriver:
        from megagrpo.rewards import RewardPool, RewardPoolConfig, build_reward_functions

        t, script = run.recipe.training, run.recipe.script
        device = "cuda" if run.device.type == "cuda" else "cpu"
        engine = build_rollout_engine(rollout_config(t), run.model_dir, device=device)
        return cls(
            engine=engine,
            scorer=RewardPool(
                build_reward_functions(script), RewardPoolConfig.from_script_args(script)
            ),
            sampling=SamplingParams.from_config(t),
            data=run.data,
            tokenizer=run.tokenizer,
            training=t,
            script=script,
        )

    def start(self, first_step: int, total_steps: int) -> None:
        """Begin producing the batches of steps first_step .. total_steps - 1."""
        self.first_step = first_step

        def batches():
            for step in range(first_step, total_steps):
                rows = self.data.sampler.rows_at(step)
                yield requests_for(rows, self.data.train, step, self.training.seed), self.sampling

        self.producer = AsyncRollout(
            self.engine, batches(), AsyncRolloutConfig(self.training.async_max_staleness)
        )

    def step_data(self, step: int) -> StepData:
        t0 = time.perf_counter()
        batch = self.producer.get()
        waited = time.perf_counter() - t0
        if self.first_step + batch.index != step:
            raise RuntimeError(f"rollout batch {batch.index} arrived for step {step}")
        rows = self.data.sampler.rows_at(step)
        data = score_and_advantage(
            batch.groups,
            rows,
            self.data.train,
            self.tokenizer,
            self.scorer,
            self.data.reward_columns,
            self.training.num_generations,
            self.training.scale_rewards,
            step,
        )
        data.metrics["time/generation"] = waited  # waiting for the engine (async: overlapped)
        data.metrics["rollout/staleness"] = float(batch.staleness(self.producer.updates))
        return data

    def generate_now(self, requests, sampling):
        """Generate outside the training stream (evaluation), between its generations."""
        if self.producer is None:
            return self.engine.generate(requests, sampling)
        return self.producer.generate_now(requests, sampling)

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
            close = getattr(obj, "close", None)
            if close is not None:
                close()
