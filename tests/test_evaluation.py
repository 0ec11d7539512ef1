"""Held-out evaluation: greedy accuracy, mean@k, pass@k and reward means from the configured
reward functions scored in a real reward pool, checked against hand-computed values."""

from __future__ import annotations

import math

import pytest
from datasets import Dataset

from megagrpo.config import GRPOScriptArguments
from megagrpo.demo.tokenizer import build_demo_tokenizer
from megagrpo.demo.warm_start import demo_completion
from megagrpo.rewards import RewardPool, RewardPoolConfig, build_reward_functions
from megagrpo.rollout.protocol import Sample
from megagrpo.training.evaluation import accuracy_metrics, eval_reward_metrics, score_eval

TEST = Dataset.from_list(
    [
        {"problem": "What is 3 + 5?", "solution": "8", "prompt_ids": [1, 2]},
        {"problem": "What is 2 + 2?", "solution": "4", "prompt_ids": [3, 4]},
    ]
)
RIGHT_0 = demo_completion({"problem": "What is 3 + 5?", "solution": "8"})  # formatted, correct
WRONG_0 = demo_completion({"problem": "What is 3 + 5?", "solution": "9"})  # formatted, wrong
WRONG_1_BARE = "the answer is \\boxed{5}"  # unformatted, wrong
RIGHT_1_BARE = "\\boxed{4}"  # unformatted, correct


@pytest.fixture(scope="module")
def tok():
    return build_demo_tokenizer()


def _groups(tok, texts_per_prompt):
    return [
        [
            Sample(
                list(TEST[i]["prompt_ids"]), tok.encode(t), [0.0] * len(tok.encode(t)), "stop", 0
            )
            for t in texts
        ]
        for i, texts in enumerate(texts_per_prompt)
    ]


def _pool(funcs, weights=None):
    script = GRPOScriptArguments(reward_funcs=funcs, reward_weights=weights)
    return RewardPool(
        build_reward_functions(script), RewardPoolConfig.from_script_args(script, num_workers=1)
    )


def test_metrics_from_the_configured_rewards_and_the_accuracy_fallback(tok):
    configured = _pool(["accuracy", "format"], [1.0, 0.5])
    accuracy_only = _pool(["accuracy"])
    fallback_calls = []

    def fallback():
        fallback_calls.append(1)
        return accuracy_only

    try:
        cols = {"solution": "solution"}
        greedy = _groups(tok, [[RIGHT_0], [WRONG_1_BARE]])
        sampled = _groups(
            tok, [[RIGHT_0, WRONG_0, WRONG_0], [WRONG_1_BARE, RIGHT_1_BARE, WRONG_1_BARE]]
        )
        g_scores, g_acc = score_eval(greedy, TEST, tok, configured, cols, fallback)
        s_scores, s_acc = score_eval(sampled, TEST, tok, configured, cols, fallback)
        assert not fallback_calls  # accuracy came from the configured functions
        assert g_acc.tolist() == [[1.0], [0.0]]
        assert s_acc.tolist() == [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]
        m = accuracy_metrics(g_acc, s_acc)
        assert m == {
            "eval/accuracy": 0.5,
            "eval/mean@3": pytest.approx(2 / 6),
            "eval/pass@3": 1.0,
            "eval/num_prompts": 2.0,
        }
        r = eval_reward_metrics(g_scores, s_scores)
        # greedy: (1 + 0.5 * 1) and (0 + 0.5 * 0); samples: formatted ones earn the 0.5
        assert r["eval/reward"] == pytest.approx((1.5 + 0.0) / 2)
        assert r["eval/rewards/accuracy_reward/mean"] == pytest.approx(0.5)
        assert r["eval/rewards/format_reward/mean"] == pytest.approx(0.5)
        assert r["eval/reward@3"] == pytest.approx((1.5 + 0.5 + 0.5 + 0 + 1 + 0) / 6)

        # a recipe without accuracy_reward: correctness from the accuracy-only pool
        format_only = _pool(["format"])
        try:
            f_scores, f_acc = score_eval(sampled, TEST, tok, format_only, cols, fallback)
        finally:
            format_only.close()
        assert fallback_calls == [1]
        assert f_acc.tolist() == s_acc.tolist()
        assert eval_reward_metrics(f_scores, f_scores)["eval/rewards/format_reward/mean"] == 0.5
    finally:
        configured.close()
        accuracy_only.close()


def test_unscorable_completions_count_as_wrong_and_reward_means_ignore_them():
    import torch

    nan = math.nan
    m = accuracy_metrics(torch.tensor([[nan], [1.0]]), torch.tensor([[nan, 1.0], [nan, nan]]))
    assert m["eval/accuracy"] == 0.5 and m["eval/mean@2"] == 0.25 and m["eval/pass@2"] == 0.5
