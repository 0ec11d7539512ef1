"""Rollout, rewards and advantages of one step, driven by global rank 0.

Rank 0 holds the rollout engine (or the client of an engine pool) and the reward pool. For every
step it turns the step's prompts into requests, gets ``num_generations`` completions per prompt
(through ``AsyncRollout``: synchronously, or one batch ahead within ``async_max_staleness``),
decodes and scores them with every reward function (``score_round``), and computes group
advantages over the whole generation batch (``assemble_step``; with dynamic sampling a step may
have several rounds, and the batch is the groups kept from them). The result is broadcast to all
ranks; each data-parallel rank trains on its contiguous share of whole groups. Legend: N
completions of the step, K reward functions.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from megagrpo.algorithms.advantages import multi_objective_advantages
from megagrpo.data.errors import DataError
from megagrpo.rewards.scores import RewardScores
from megagrpo.training.batch import CompletionBatch


@dataclass
class StepData:
    """One generation batch, on every rank."""

    step: int
    """The generation batch's index (= the optimizer step's with one step per generation)."""
    prompt_rows: list[int]
    """Dataset rows of the step's prompts, in group order."""
    prompt_ids: list[list[int]]
    """Per completion (group-major)."""
    completion_ids: list[list[int]]
    sampler_logprobs: list[list[float]]
    finish_reasons: list[str]
    weight_versions: list[int]
    rewards_nk: torch.Tensor
    reward_names: list[str]
    rewards_n: torch.Tensor
    """The weighted total reward of each completion (NaN where nothing scored)."""
    advantages_n: torch.Tensor
    metrics: dict[str, float] = field(default_factory=dict)
    texts: dict[str, list] = field(default_factory=dict)
    """Rank 0 only: prompt and completion texts for the completions table."""


def requests_for(rows, dataset, step: int, seed: int, round_: int = 0):
    """One request per prompt; seeds depend on the run seed, step, generation round (dynamic
    sampling's extra rounds) and prompt row only."""
    from megagrpo.rollout.protocol import RolloutRequest

    mask = (1 << 62) - 1
    tag = f"{step}" if round_ == 0 else f"{step}.{round_}"
    return [
        RolloutRequest(
            prompt_ids=tuple(dataset[int(r)]["prompt_ids"]),
            seed=(seed * 1_000_003 + step * 7919 + int(r) + round_ * _ROUND_SEED_STRIDE) & mask,
            request_id=f"{tag}:{int(r)}",
        )
        for r in rows
    ]


_ROUND_SEED_STRIDE = 0x9E3779B97F4A7C15
"""Moves the seeds of an extra round far from those of every step's first round."""


def completion_metrics(completion_ids, finish_reasons) -> dict[str, float]:
    """TRL's completion length metrics."""
    lengths = torch.tensor([len(c) for c in completion_ids], dtype=torch.float64)
    done = torch.tensor([f == "stop" for f in finish_reasons])
    term = lengths[done]
    return {
        "completions/mean_length": lengths.mean().item(),
        "completions/min_length": lengths.min().item(),
        "completions/max_length": lengths.max().item(),
        "completions/clipped_ratio": 1.0 - done.double().mean().item(),
        "completions/mean_terminated_length": term.mean().item() if len(term) else 0.0,
        "completions/min_terminated_length": term.min().item() if len(term) else 0.0,
        "completions/max_terminated_length": term.max().item() if len(term) else 0.0,
    }


def score_groups(groups, rows, dataset, tokenizer, scorer, reward_columns: dict[str, str]):
    """Decode groups of completions of the dataset ``rows`` (one group per row) and score them.

    Returns (completion_ids, texts, RewardScores), group-major.
    """
    group_size = len(groups[0])
    completion_ids = [list(s.completion_ids) for g in groups for s in g]
    texts = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
    completions = [[{"role": "assistant", "content": t}] for t in texts]
    columns = {
        name: [dataset[int(r)][col] for r in rows for _ in range(group_size)]
        for name, col in reward_columns.items()
    }
    columns["completion_ids"] = completion_ids
    return completion_ids, texts, scorer.score(completions, columns, group_size)


@dataclass
class ScoredRound:
    """One generation round of a step, decoded and scored (rank 0)."""

    groups: list
    """Groups of ``Sample`` (one per prompt row, ``num_generations`` each)."""
    rows: list[int]
    completion_ids: list[list[int]]
    texts: list[str]
    scores: RewardScores
    seconds: float
    """Wall time of decoding and scoring."""

    def total_n(self) -> torch.Tensor:
        return self.scores.total_n()


def score_round(
    groups, rows, dataset, tokenizer, scorer, reward_columns: dict[str, str], num_generations: int
) -> ScoredRound:
    """Rank 0: decode and score a generated round. ``reward_columns`` maps the name a reward
    function reads (``solution``) to the dataset column that holds it
    (``dataset_solution_column``)."""
    if any(len(g) != num_generations for g in groups):
        raise RuntimeError(
            f"the rollout engine returned groups of sizes "
            f"{sorted({len(g) for g in groups})}, expected {num_generations}"
        )
    t0 = time.perf_counter()
    completion_ids, texts, scores = score_groups(
        groups, rows, dataset, tokenizer, scorer, reward_columns
    )
    return ScoredRound(
        groups=list(groups),
        rows=[int(r) for r in rows],
        completion_ids=completion_ids,
        texts=texts,
        scores=scores,
        seconds=time.perf_counter() - t0,
    )


def assemble_step(
    rounds: list[ScoredRound],
    kept: list[int] | None,
    tokenizer,
    num_generations: int,
    scale_rewards: str,
    step: int,
    aggregation: str = "sum_then_normalize",
) -> StepData:
    """Rank 0: the StepData of the ``kept`` groups of a step's rounds (indices into their
    groups, in order; None keeps all), advantages computed over the kept groups only
    (``aggregation`` is ``multi_objective_aggregation``). The reward and completion metrics
    describe every completion the step generated."""
    from megagrpo.rewards import reward_metrics

    g = num_generations
    groups = [grp for r in rounds for grp in r.groups]
    kept = list(range(len(groups))) if kept is None else kept
    idx_n = [k * g + j for k in kept for j in range(g)]
    samples = [s for k in kept for s in groups[k]]
    every = [s for grp in groups for s in grp]
    scores = RewardScores.concat([r.scores for r in rounds])
    completion_ids = [c for r in rounds for c in r.completion_ids]
    texts = [t for r in rounds for t in r.texts]
    metrics = reward_metrics(scores, g)
    metrics.update(completion_metrics(completion_ids, [s.finish_reason for s in every]))
    metrics["time/scoring"] = sum(r.seconds for r in rounds)
    total_n = scores.total_n()[idx_n]
    stats = multi_objective_advantages(
        scores.rewards_nk[idx_n], scores.weights_k, g, scale_rewards, aggregation
    )
    prompt_texts = tokenizer.batch_decode(
        [list(s.prompt_ids) for s in samples[::g]], skip_special_tokens=False
    )
    rows = [row for r in rounds for row in r.rows]
    return StepData(
        step=step,
        prompt_rows=[rows[k] for k in kept],
        prompt_ids=[list(s.prompt_ids) for s in samples],
        completion_ids=[completion_ids[i] for i in idx_n],
        sampler_logprobs=[list(s.logprobs) for s in samples],
        finish_reasons=[s.finish_reason for s in samples],
        weight_versions=[int(s.weight_version) for s in samples],
        rewards_nk=scores.rewards_nk[idx_n],
        reward_names=list(scores.names),
        rewards_n=total_n,
        advantages_n=stats.advantages_n,
        metrics=metrics,
        texts={
            "prompts": [p for p in prompt_texts for _ in range(g)],
            "completions": [texts[i] for i in idx_n],
        },
    )


def broadcast_step(data: StepData | DataError | None, groups) -> StepData:
    """Send rank 0's StepData to every rank (texts stay on rank 0). A ``DataError`` in its place
    (a bad row that rank 0 read while streaming) is raised on every rank, so that no rank waits
    for a batch that never comes and every rank stops at the same point."""
    if groups.world_size == 1:
        if isinstance(data, DataError):
            raise data
        return data
    texts = data.texts if isinstance(data, StepData) else {}
    payload = [StepData(**{**data.__dict__, "texts": {}}) if isinstance(data, StepData) else data]
    device = torch.cuda.current_device() if torch.cuda.is_available() else None
    dist.broadcast_object_list(payload, src=0, device=device)
    out = payload[0]
    if isinstance(out, DataError):
        raise DataError(str(out))
    if groups.rank == 0:
        out.texts = texts
    return out


def local_batch(data: StepData, groups, num_generations: int) -> CompletionBatch:
    """This data-parallel rank's contiguous share of whole groups."""
    return rank_share(data, groups.dp_rank, groups.dp_size, num_generations)


def rank_share(data: StepData, dp_rank: int, dp_size: int, num_generations: int) -> CompletionBatch:
    """Data-parallel rank ``dp_rank``'s contiguous share of whole groups."""
    n = len(data.completion_ids)
    per_rank = n // dp_size
    if per_rank * dp_size != n or per_rank % num_generations:
        raise RuntimeError(
            f"{n} completions do not split into whole groups of "
            f"{num_generations} over {dp_size} data-parallel ranks"
        )
    sl = slice(dp_rank * per_rank, (dp_rank + 1) * per_rank)
    return CompletionBatch(
        prompt_ids=data.prompt_ids[sl],
        completion_ids=data.completion_ids[sl],
        finish_reasons=data.finish_reasons[sl],
        advantages_n=data.advantages_n[sl],
        sampler_logprobs=data.sampler_logprobs[sl],
        weight_versions=data.weight_versions[sl],
    )
