"""TRL 1.16's generation-batch, evaluation-sample, reference-sync and reward-aggregation settings:
steps_per_generation / generation_batch_size, num_generations_eval, sync_ref_model (TR-DPO) and
multi_objective_aggregation (GDPO): their rules, and each one trained end to end on the demo."""

from __future__ import annotations

import json
import math
import os
import statistics
import types
import warnings

import pytest
import torch
from _multiproc import run_ranks

from megagrpo.config import (
    ConfigError,
    UnusedKeysWarning,
    load_recipe,
    validate_layout,
    validate_recipe,
)

QUIET = ["--save_strategy", "no", "--eval_strategy", "no", "--log_completions", "false"]
SMALL = ["--per_device_train_batch_size", "16", "--micro_batch_size", "16"]  # 2 prompts x 8


def _only(results):
    return next(r for r in results if r is not None)


def _recipe(*argv: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnusedKeysWarning)
        return load_recipe(None, ["--model_name_or_path", "m", "--dataset_name", "d", *argv])


MODEL = dict(num_layers=4, num_attention_heads=4, num_query_groups=2)


# ---- rules ----


@pytest.mark.parametrize(
    "argv, expected",
    [
        (
            ["--steps_per_generation", "2", "--generation_batch_size", "16"],
            "steps_per_generation=2 and generation_batch_size=16 are both set",
        ),
        (["--steps_per_generation", "0"], "steps_per_generation=0 must be >= 1"),
        (
            ["--steps_per_generation", "3", "--gradient_accumulation_steps", "2"],
            "steps_per_generation=3 must be a multiple of gradient_accumulation_steps=2",
        ),
        (
            ["--generation_batch_size", "12"],
            "generation_batch_size=12 must be divisible by num_generations=8",
        ),
        (["--num_generations_eval", "0"], "num_generations_eval=0 must be >= 1"),
        (["--eval_num_generations", "0"], "num_generations_eval=0 must be >= 1"),  # old name
        (["--sync_ref_model", "true"], "sync_ref_model=True needs beta > 0, got beta=0.0"),
        (
            ["--beta", "0.1", "--sync_ref_model", "true", "--ref_model_mixup_alpha", "1.5"],
            "ref_model_mixup_alpha=1.5 must be in [0, 1]",
        ),
        (["--ref_model_sync_steps", "0"], "ref_model_sync_steps=0 must be >= 1"),
        (
            ["--multi_objective_aggregation", "normalize_then_sum", "--scale_rewards", "batch"],
            "multi_objective_aggregation='normalize_then_sum' with scale_rewards='batch'",
        ),
    ],
)
def test_each_static_rule_names_the_field(argv, expected):
    with pytest.raises(ConfigError) as info:
        validate_recipe(_recipe(*argv))
    assert len(info.value.errors) == 1, info.value.errors
    assert expected in str(info.value)


def test_sync_ref_model_refuses_fp8_reference_parameters():
    r = _recipe("--beta", "0.1", "--sync_ref_model", "true", "--fp8", "e4m3")
    r.megatron.fp8_param_gather = r.megatron.use_distributed_optimizer = True
    with pytest.raises(ConfigError, match="sync_ref_model=True with fp8_param_gather=True"):
        validate_recipe(r)


def test_an_unknown_aggregation_is_refused_with_the_choices():
    with pytest.raises(ConfigError, match="multi_objective_aggregation.*normalize_then_sum"):
        _recipe("--multi_objective_aggregation", "mean")


@pytest.mark.parametrize(
    "argv, world, expected",
    [
        (
            ["--per_device_train_batch_size", "16", "--generation_batch_size", "48"],
            2,
            "generation_batch_size=48 must be divisible by per_device_train_batch_size=16 x "
            "DP=2 = 32 (TRL's rule)",
        ),
        (
            ["--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "2"]
            + ["--generation_batch_size", "24"],
            1,
            "generation_batch_size=24 gives steps_per_generation=24 / 8 = 3, which must be a "
            "multiple of gradient_accumulation_steps=2",
        ),
        (
            ["--per_device_train_batch_size", "4", "--steps_per_generation", "3"],
            1,
            "per_device_train_batch_size=4 x steps_per_generation=3 x DP=1 = 12 completions must "
            "be divisible by num_generations=8",
        ),
    ],
)
def test_each_layout_rule_names_the_field(argv, world, expected):
    with pytest.raises(ConfigError) as info:
        validate_layout(_recipe(*argv), world_size=world, **MODEL)
    assert len(info.value.errors) == 1, info.value.errors
    assert expected in str(info.value)


def test_generation_batch_size_and_steps_per_generation_resolve_as_in_trl():
    t = _recipe("--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2").training
    assert t.steps_per_generation_for(dp_size=2) == 2  # default: gradient_accumulation_steps
    t = _recipe("--per_device_train_batch_size", "4", "--generation_batch_size", "32").training
    assert t.steps_per_generation_for(dp_size=2) == 4  # 32 / (4 x 2)
    # a recipe with 4 micro-steps per optimizer step per generation, on 2 ranks, is accepted
    r = _recipe("--per_device_train_batch_size", "4", "--steps_per_generation", "4")
    validate_recipe(r)
    validate_layout(r, world_size=2, **MODEL)


# ---- counting: optimizer steps, epochs, the split of a generation batch ----


def test_steps_epochs_and_the_split_of_a_generation_batch():
    from megagrpo.training.batch import CompletionBatch
    from megagrpo.training.generation_steps import GenerationSchedule, split_generation
    from megagrpo.training.prompt_data import steps_for

    t = types.SimpleNamespace(
        steps_per_generation_for=lambda dp: 4, gradient_accumulation_steps=2, num_iterations=3
    )
    plan = GenerationSchedule.from_config(t, dp_size=1)
    assert (plan.parts, plan.updates_per_generation) == (2, 6)
    # TRL's order: pass 1 over both parts, then pass 2, then pass 3
    assert [plan.part_of(s) for s in range(12)] == [0, 1] * 6
    assert [plan.generation_of(s) for s in (0, 5, 6, 11)] == [0, 0, 1, 1]
    assert plan.generations(13) == 3 and plan.steps_of(2, 13) == range(12, 13)  # cut short
    # epochs count optimizer steps: 10 prompts, 4 per generation -> 2 generations x 6 steps
    epochs = types.SimpleNamespace(max_steps=-1, num_train_epochs=1.5)
    assert steps_for(10, 4, epochs, plan.updates_per_generation) == 18
    assert steps_for(10, 4, types.SimpleNamespace(max_steps=7), 6) == 7

    n = 12
    batch = CompletionBatch(
        prompt_ids=[[i] for i in range(n)],
        completion_ids=[[100 + i, 200 + i] for i in range(n)],
        finish_reasons=["stop"] * n,
        advantages_n=torch.arange(n, dtype=torch.float32),
        sampler_logprobs=[[-0.1 * i, -0.2 * i] for i in range(n)],
        weight_versions=list(range(n)),
    )
    parts = split_generation(batch, 3, seed=1, generation=5)
    assert [len(p) for p in parts] == [4, 4, 4]
    order = [p[0] for part in parts for p in part.prompt_ids]
    assert sorted(order) == list(range(n)) and order != list(range(n))  # shuffled, all once
    for part in parts:  # every field of a completion travels with it
        for i, p in enumerate(part.prompt_ids):
            assert part.completion_ids[i] == [100 + p[0], 200 + p[0]]
            assert part.advantages_n[i] == p[0] and part.weight_versions[i] == p[0]
            assert part.sampler_logprobs[i] == [-0.1 * p[0], -0.2 * p[0]]
    again = split_generation(batch, 3, seed=1, generation=5)
    assert [p.prompt_ids for p in again] == [p.prompt_ids for p in parts]  # resumable
    assert split_generation(batch, 1, seed=1, generation=5) == [batch]  # no shuffle


# ---- GDPO ----


def _gdpo_by_hand(rewards, weights, g, eps=1e-4):
    """TRL 1.16's normalize_then_sum in plain Python: per function and group, (r - mean) /
    (std + eps) over the scored members; the weighted sum over scored functions; then over the
    batch (r - mean) / (std + eps); 0 for a completion no function scored."""
    n, k = len(rewards), len(weights)
    norm = [[math.nan] * k for _ in range(n)]
    for start in range(0, n, g):
        for j in range(k):
            vals = [rewards[i][j] for i in range(start, start + g) if not math.isnan(rewards[i][j])]
            mean = sum(vals) / len(vals) if vals else 0.0
            std = statistics.stdev(vals) if len(vals) > 1 else 0.0
            for i in range(start, start + g):
                if not math.isnan(rewards[i][j]):
                    norm[i][j] = (rewards[i][j] - mean) / (std + eps)
    total = [
        sum(w * v for w, v in zip(weights, row) if not math.isnan(v))
        if any(not math.isnan(v) for v in row)
        else math.nan
        for row in norm
    ]
    scored = [v for v in total if not math.isnan(v)]
    mean, std = sum(scored) / len(scored), statistics.stdev(scored)
    return [0.0 if math.isnan(v) else (v - mean) / (std + eps) for v in total]


def test_gdpo_advantages_equal_a_hand_computation():
    from megagrpo.algorithms.advantages import multi_objective_advantages

    nan = math.nan
    rewards = [
        [1.0, 0.0],
        [0.0, 1.0],
        [1.0, 1.0],  # group 1
        [0.0, nan],
        [0.0, 0.5],
        [nan, nan],  # group 2: one completion nothing scored
        [2.0, 3.0],
        [2.0, 3.0],
        [2.0, 3.0],  # group 3: all equal
    ]
    weights = [1.0, 0.5]
    stats = multi_objective_advantages(
        torch.tensor(rewards, dtype=torch.float64),
        torch.tensor(weights, dtype=torch.float64),
        3,
        "group",
        "normalize_then_sum",
    )
    expected = _gdpo_by_hand(rewards, weights, 3)
    torch.testing.assert_close(
        stats.advantages_n, torch.tensor(expected, dtype=torch.float64), rtol=1e-9, atol=1e-9
    )
    assert stats.advantages_n[5] == 0.0
    # sum_then_normalize is today's group_advantages of the weighted sum
    from megagrpo.algorithms.advantages import group_advantages, weighted_rewards

    r_nk, w_k = torch.tensor(rewards, dtype=torch.float64), torch.tensor(weights)
    plain = multi_objective_advantages(r_nk, w_k, 3, "batch")
    ref = group_advantages(weighted_rewards(r_nk, w_k), 3, "batch")
    torch.testing.assert_close(plain.advantages_n, ref.advantages_n)


def test_gdpo_trains_on_hand_computed_advantages(demo_dir, tmp_path):
    from _train_workers import generation_recording_demo_worker

    hist, rec = _only(
        run_ranks(
            1,
            generation_recording_demo_worker,
            demo_dir,
            str(tmp_path / "g"),
            QUIET + SMALL + ["--max_steps", "1"]
            + ["--multi_objective_aggregation", "normalize_then_sum"],
        )
    )  # fmt: skip
    (gen,) = rec["generations"]
    rewards = gen["rewards_nk"].tolist()  # accuracy, format, tag_count; weights 1, 0.5, 0.5
    expected = torch.tensor(_gdpo_by_hand(rewards, [1.0, 0.5, 0.5], 8), dtype=torch.float64)
    torch.testing.assert_close(gen["advantages_n"].double(), expected, rtol=1e-6, atol=1e-6)
    (update,) = rec["updates"]
    torch.testing.assert_close(update["advantages"].double(), expected, rtol=1e-6, atol=1e-6)
    assert len(hist) == 1


# ---- steps_per_generation and num_generations_eval, end to end ----


def test_steps_per_generation_splits_each_generation_into_optimizer_steps(demo_dir, tmp_path):
    """64 completions per generation, trained as 2 optimizer steps of 32 (GA 1): 4 steps are 2
    generations of 8 prompts; the second step of a generation trains against old log-probs from
    before the first; the linear schedule runs over the 4 optimizer steps; DAPO's normaliser is
    half the generation's tokens; evaluations (3 samples per prompt) fall on generation ends."""
    from _train_workers import generation_recording_demo_worker

    out = str(tmp_path / "s")
    hist, rec = _only(
        run_ranks(
            1,
            generation_recording_demo_worker,
            demo_dir,
            out,
            ["--save_strategy", "no", "--log_completions", "false", "--max_steps", "4"]
            + ["--steps_per_generation", "2", "--per_device_train_batch_size", "32"]
            + ["--micro_batch_size", "16", "--lr_scheduler_type", "linear"]
            + ["--eval_strategy", "steps", "--eval_steps", "1", "--eval_max_prompts", "4"]
            + ["--num_generations_eval", "3"],
        )
    )  # fmt: skip
    assert [h["step"] for h in hist] == [1, 2, 3, 4]
    gens, updates = rec["generations"], rec["updates"]
    assert len(gens) == 2 and len(updates) == 4
    rows = [r for g in gens for r in g["rows"]]
    assert all(len(g["rows"]) == 8 for g in gens) and len(set(rows)) == 16  # 16 prompts used
    for g, gen in enumerate(gens):
        first, second = updates[2 * g], updates[2 * g + 1]
        assert first["completions"] == second["completions"] == 32
        assert first["num_microbatches"] == second["num_microbatches"] == 2
        # the two steps train on the generation's 64 completions, each once
        trained = torch.cat([first["advantages"], second["advantages"]]).sort().values
        torch.testing.assert_close(trained, gen["advantages_n"].float().sort().values)
        tokens = first["tokens"] + second["tokens"]
        assert first["global_num_tokens"] == second["global_num_tokens"] == tokens / 2
        # old log-probs: equal to the policy's before the generation's first step, not after
        assert first["old_logp_gap"] < 1e-5, first["old_logp_gap"]
        assert second["old_logp_gap"] > 1e-4, second["old_logp_gap"]
        # one record per optimizer step; the generation's reward metrics in both
        assert hist[2 * g]["reward"] == hist[2 * g + 1]["reward"]
        assert [hist[2 * g + i]["num_tokens"] for i in (0, 1)] == [
            first["tokens"],
            second["tokens"],
        ]
    lr = 3e-4  # the demo's learning rate, linear over 4 optimizer steps
    assert [h["learning_rate"] for h in hist] == pytest.approx([lr, 0.75 * lr, 0.5 * lr, 0.25 * lr])
    assert ["time/weight_sync" in h for h in hist] == [False, True, False, True]
    with open(os.path.join(out, "metrics.jsonl")) as f:
        evals = [json.loads(line) for line in f]
    evals = {r["step"]: r for r in evals if "eval/accuracy" in r}
    assert sorted(evals) == [0, 2, 4]  # eval_steps 1, but at generation ends only
    for r in evals.values():
        assert "eval/mean@3" in r and "eval/pass@3" in r and "eval/reward@3" in r
        assert not any(k.endswith("@8") for k in r)  # not num_generations


# ---- sync_ref_model, end to end and across a resume ----


def test_sync_ref_model_mixes_the_policy_in_and_resumes_with_it(demo_dir, tmp_path):
    from _train_workers import built_reference_worker, reference_sync_demo_worker

    out = str(tmp_path / "r")
    sync = ["--beta", "0.04", "--sync_ref_model", "true", "--ref_model_sync_steps", "2"]
    sync += ["--ref_model_mixup_alpha", "0.25"]
    hist, syncs, final_ref = _only(
        run_ranks(
            1,
            reference_sync_demo_worker,
            demo_dir,
            out,
            SMALL + sync + ["--max_steps", "3", "--save_strategy", "steps", "--save_steps", "2"]
            + ["--eval_strategy", "no", "--log_completions", "false"],
        )
    )  # fmt: skip
    assert [h["step"] for h in hist] == [1, 2, 3]
    # one sync, after step 2: reference = 0.25 x policy + 0.75 x reference before, exactly
    assert [s[0] for s in syncs] == [2], syncs
    step, err, moved = syncs[0]
    assert moved > 1e-6 and err < 1e-7, syncs
    # the KL is 0 until the reference moves, positive after it (step 3's reference log-probs
    # come from the synced reference, the policy from two updates)
    assert hist[0]["kl"] == pytest.approx(0.0, abs=1e-9)
    for name in ("checkpoint-2", "checkpoint-3"):
        assert os.path.isdir(os.path.join(out, name, "reference")), name
    start, resumed_ref, synced = _only(
        run_ranks(1, built_reference_worker, demo_dir, out, SMALL + sync + ["--max_steps", "3"])
    )
    assert start == 3 and synced
    assert all(torch.equal(a, b) for a, b in zip(resumed_ref, final_ref))
    # step 3 is inside a generation batch of 2 optimizer steps (num_iterations 2): refused
    with pytest.raises(AssertionError, match="after optimizer step 3, inside a generation batch"):
        run_ranks(
            1,
            built_reference_worker,
            demo_dir,
            out,
            SMALL + sync + ["--max_steps", "4", "--num_iterations", "2"],
        )
