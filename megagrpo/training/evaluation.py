"""Evaluation on the test split (open-r1's ``eval_dataset``, when eval_strategy is not "no").

At step 0, every ``eval_steps`` and at the end of training, the rollout engines generate with the
current weights, for each test prompt, one greedy completion and k = ``num_generations_eval``
(TRL's; None: ``num_generations``) completions sampled at the training temperature, and score
them with the configured reward functions through the training reward pool. It logs:

- ``eval/accuracy``: greedy accuracy (math-verify's ``accuracy_reward`` equal to 1);
- ``eval/mean@k``: mean accuracy of the k samples;
- ``eval/pass@k``: fraction of prompts with at least one correct sample among the k;
- ``eval/reward`` and ``eval/rewards/<fn>/mean``: the greedy completions' weighted reward and
  each function's mean (NaN-ignoring, as in training); ``eval/reward@k``: the samples' reward;
- ``eval/num_prompts``.

When the recipe does not train on ``accuracy_reward``, correctness is scored by a separate small
accuracy-only pool. With colocated vLLM every rank generates its share of the test prompts and
rank 0 gathers them; otherwise the other ranks do nothing during evaluation.
"""

from __future__ import annotations

import dataclasses

import torch

from megagrpo.rollout.protocol import RolloutRequest
from megagrpo.training.rollout_step import score_groups

ACCURACY = "accuracy_reward"


def eval_requests(test, seed: int) -> list[RolloutRequest]:
    return [
        RolloutRequest(tuple(test[i]["prompt_ids"]), seed=seed * 7_919 + i, request_id=f"eval:{i}")
        for i in range(len(test))
    ]


def accuracy_metrics(greedy_p1: torch.Tensor, sampled_pk: torch.Tensor) -> dict[str, float]:
    """From [prompts, 1] and [prompts, k] accuracy scores (NaN = could not score = wrong)."""
    k = sampled_pk.shape[1]
    correct = torch.nan_to_num(sampled_pk, nan=0.0) >= 1.0
    return {
        "eval/accuracy": (torch.nan_to_num(greedy_p1, nan=0.0) >= 1.0).double().mean().item(),
        f"eval/mean@{k}": correct.double().mean().item(),
        f"eval/pass@{k}": correct.any(dim=1).double().mean().item(),
        "eval/num_prompts": float(greedy_p1.shape[0]),
    }


def eval_reward_metrics(greedy, sampled) -> dict[str, float]:
    """The greedy completions' weighted reward and per-function means, the samples' reward."""
    k = sampled.rewards_nk.shape[0] // max(greedy.rewards_nk.shape[0], 1)
    out = {
        "eval/reward": greedy.total_n().nanmean().item(),
        f"eval/reward@{k}": sampled.total_n().nanmean().item(),
    }
    for j, name in enumerate(greedy.names):
        out[f"eval/rewards/{name}/mean"] = greedy.rewards_nk[:, j].nanmean().item()
    return out


def _accuracy(scores, accuracy_only) -> torch.Tensor:
    """[N] accuracy: the configured accuracy_reward, else the accuracy-only scorer's."""
    if ACCURACY in scores.names:
        return scores.rewards_nk[:, scores.names.index(ACCURACY)]
    return accuracy_only().rewards_nk[:, 0]


def score_eval(groups, test, tokenizer, scorer, reward_columns, fallback_scorer):
    """Score one set of groups (one per test row) -> (RewardScores, accuracy [prompts, n])."""
    rows = list(range(len(test)))
    args = (groups, rows, test, tokenizer)
    scores = score_groups(*args, scorer, reward_columns)[2]
    acc = _accuracy(scores, lambda: score_groups(*args, fallback_scorer(), reward_columns)[2])
    return scores, acc.view(len(rows), len(groups[0]))


def evaluate(run) -> dict[str, float] | None:
    """Evaluate; returns the metrics on rank 0 (None elsewhere) for the step's log record.

    Every rank holding an engine generates its share (colocated vLLM); rank 0 scores."""
    if run.rollout is None or run.data.test is None:
        return None
    t = run.recipe.training
    driver = run.rollout
    test = run.data.test
    requests = eval_requests(test, t.seed)
    greedy = dataclasses.replace(driver.sampling, n=1, temperature=0.0)
    sampled = dataclasses.replace(driver.sampling, n=t.num_generations_eval or t.num_generations)
    greedy_groups = driver.generate_now(requests, greedy)
    sampled_groups = driver.generate_now(requests, sampled)
    if not driver.share.is_root:
        return None
    common = (test, run.tokenizer, driver.scorer, run.data.reward_columns, driver.eval_scorer)
    greedy_scores, greedy_acc = score_eval(greedy_groups, *common)
    sampled_scores, sampled_acc = score_eval(sampled_groups, *common)
    metrics = accuracy_metrics(greedy_acc, sampled_acc)
    metrics.update(eval_reward_metrics(greedy_scores, sampled_scores))
    return metrics
