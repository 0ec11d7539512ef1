"""Evaluation on the test split (the seed's "track overall model performance").

Every ``eval_steps`` and at the end of training, global rank 0 generates with the current
weights for each test prompt one greedy completion and ``eval_num_generations`` (k) sampled ones
at the training temperature, scores them with the math-verify accuracy reward (in its own small
reward pool, whatever the training rewards are), and logs:

- ``eval/accuracy``: greedy accuracy;
- ``eval/mean@k``: mean accuracy of the k samples;
- ``eval/pass@k``: fraction of prompts with at least one correct sample among the k;
- ``eval/num_prompts``.

Other ranks do nothing during evaluation (it uses no collective).
"""

from __future__ import annotations

import dataclasses

import torch

from megagrpo.rollout.protocol import RolloutRequest


def eval_requests(test, seed: int) -> list[RolloutRequest]:
    return [
        RolloutRequest(tuple(test[i]["prompt_ids"]), seed=seed * 7_919 + i, request_id=f"eval:{i}")
        for i in range(len(test))
    ]


def accuracy_matrix(scorer, groups, solutions, tokenizer) -> torch.Tensor:
    """[prompts, samples] accuracy (NaN where it could not score)."""
    k = len(groups[0])
    ids = [list(s.completion_ids) for g in groups for s in g]
    texts = tokenizer.batch_decode(ids, skip_special_tokens=True)
    scores = scorer.score(
        [[{"role": "assistant", "content": t}] for t in texts],
        {"solution": [sol for sol in solutions for _ in range(k)], "completion_ids": ids},
        k,
    )
    return scores.rewards_nk[:, 0].view(len(groups), k)


def eval_metrics(greedy_p1: torch.Tensor, sampled_pk: torch.Tensor) -> dict[str, float]:
    k = sampled_pk.shape[1]
    correct = torch.nan_to_num(sampled_pk, nan=0.0) >= 1.0
    return {
        "eval/accuracy": torch.nan_to_num(greedy_p1, nan=0.0).mean().item(),
        f"eval/mean@{k}": correct.double().mean().item(),
        f"eval/pass@{k}": correct.any(dim=1).double().mean().item(),
        "eval/num_prompts": float(greedy_p1.shape[0]),
    }


def evaluate(run) -> dict[str, float] | None:
    """Evaluate on rank 0; returns the metrics (None elsewhere) for the step's log record."""
    if run.groups.rank != 0 or run.data.test is None:
        return None
    t = run.recipe.training
    driver = run.rollout
    test = run.data.test
    solution_col = run.data.reward_columns.get("solution")
    if solution_col is None:
        raise ValueError("evaluation needs the dataset_solution_column of the test split")
    requests = eval_requests(test, t.seed)
    greedy = dataclasses.replace(driver.sampling, n=1, temperature=0.0)
    sampled = dataclasses.replace(driver.sampling, n=t.eval_num_generations)
    scorer = driver.eval_scorer()
    solutions = [test[i][solution_col] for i in range(len(test))]
    greedy_p1 = accuracy_matrix(
        scorer, driver.generate_now(requests, greedy), solutions, run.tokenizer
    )
    sampled_pk = accuracy_matrix(
        scorer, driver.generate_now(requests, sampled), solutions, run.tokenizer
    )
    return eval_metrics(greedy_p1, sampled_pk)
