"""The GRPO trainer end to end on the embedded demo: it learns, resumes exactly, and gives the same
numbers sharded over TP or PP as on one process; dynamic sampling trains the batches the data
implies, synchronously, resumed and with async rollouts."""

from __future__ import annotations

import json
import os

import pytest
from _dynamic_expect import SEED as DYN_SEED
from _dynamic_expect import dynamic_expected
from _multiproc import run_ranks
from _train_workers import batch_recording_demo_worker, demo_run_worker

from megagrpo.demo.grpo_demo import learning_summary

SHORT = ["--save_strategy", "no", "--eval_strategy", "no", "--log_completions", "false"]


def _only(results):
    return next(r for r in results if r is not None)


def test_demo_learns_and_writes_its_outputs(demo_dir, demo_learning_data, tmp_path):
    out = str(tmp_path / "run")
    steps = ["--max_steps", "60", "--save_steps", "30", "--lr_scheduler_type", "constant"]
    run_ranks(1, demo_run_worker, demo_dir, out, ["--dataset_name", demo_learning_data, *steps])
    from megagrpo.monitoring.metrics_log import read_metrics

    s = learning_summary(read_metrics(os.path.join(out, "metrics.jsonl")))
    # reward (accuracy + format + tag_count) and accuracy rise on 16 of the demo's problems: by
    # +0.32 and +0.34 (accuracy +0.30, +0.30) in two measured 60-step runs (conftest.py,
    # demo_learning_data); the bounds are half of that
    assert s["reward_last"] > s["reward_first"] + 0.15, s
    assert s["accuracy_last"] > s["accuracy_first"] + 0.1, s
    assert "eval_accuracy_before" in s and "eval_accuracy_after" in s  # step 0 and step 60
    # TRL's metric names, the time split and the sampler/trainer gap are logged
    with open(os.path.join(out, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    last = records[-1]
    for key in (
        "reward",
        "reward_std",
        "rewards/accuracy_reward/mean",
        "frac_reward_zero_std",
        "kl",
        "entropy",
        "clip_ratio/region_mean",
        "completions/mean_length",
        "completions/clipped_ratio",
        "num_tokens",
        "step_time",
        "time/generation",
        "time/update",
        "time/weight_sync",
        "time/scoring",
        "time/rollout",
        "learning_rate",
        "grad_norm",
        "eval/accuracy",
        "eval/mean@8",
        "eval/pass@8",
        "eval/rewards/format_reward/mean",
        "eval/reward@8",
    ):
        assert key in last, key
    # the engine's log-probs are the trainer's (weights synced exactly after every step)
    assert max(r["sampler_logprob_gap"] for r in records if "reward" in r) < 1e-4
    assert sorted(os.listdir(out)) == [
        "checkpoint-30",
        "checkpoint-60",
        "completions",
        "final_model",
        "metrics.jsonl",
    ]
    assert len(os.listdir(os.path.join(out, "completions"))) == 60
    from transformers import AutoModelForCausalLM

    final = AutoModelForCausalLM.from_pretrained(os.path.join(out, "final_model"))
    assert final.config.model_type == "qwen2"


def test_resume_continues_exactly(demo_dir, tmp_path):
    # "--max_steps 3" stands in for an interruption after step 3, so the learning rate must not
    # depend on max_steps: constant here (the cosine schedule's resume is the kill -9 test's)
    const = ["--lr_scheduler_type", "constant"]
    full = _only(
        run_ranks(
            1, demo_run_worker, demo_dir, str(tmp_path / "a"), SHORT + const + ["--max_steps", "6"]
        )
    )
    out = str(tmp_path / "b")
    run_ranks(
        1,
        demo_run_worker,
        demo_dir,
        out,
        ["--max_steps", "6", "--save_steps", "3", "--eval_strategy", "no"]
        + ["--log_completions", "false", "--max_steps", "3"]
        + const,
    )
    resumed = _only(
        run_ranks(
            1,
            demo_run_worker,
            demo_dir,
            out,
            [
                "--max_steps",
                "6",
                "--save_steps",
                "3",
                "--eval_strategy",
                "no",
                "--log_completions",
                "false",
            ]
            + const,
        )
    )
    assert [h["step"] for h in resumed] == [4, 5, 6]
    for a, b in zip(full[3:], resumed):
        for key in ("reward", "loss", "grad_norm", "entropy", "completions/mean_length"):
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-9), key


# micro-batches of 32: PP=2 needs two per step, DP=2 trains 32 completions per rank; with the
# sampler's importance weights, which need the old log-probs (on the last pipeline stage only)
SHARDED_STEPS = SHORT + ["--max_steps", "3", "--micro_batch_size", "32"]
SHARDED_STEPS += ["--vllm_importance_sampling_correction", "true"]


@pytest.fixture(scope="module")
def one_process_run(demo_dir, tmp_path_factory):
    """The reference the sharded runs are compared with (run once for the three layouts)."""
    out = str(tmp_path_factory.mktemp("one") / "run")
    return _only(run_ranks(1, demo_run_worker, demo_dir, out, SHARDED_STEPS))


@pytest.mark.parametrize("tp,pp,dp", [(2, 1, 1), (1, 2, 1), (1, 1, 2)])
def test_sharded_training_matches_one_process(demo_dir, one_process_run, tmp_path, tp, pp, dp):
    """Same global batch (64 completions): DP=2 trains on 32 per rank."""
    one = one_process_run
    per_rank = ["--per_device_train_batch_size", str(64 // dp)]
    sharded = _only(
        run_ranks(
            tp * pp * dp,
            demo_run_worker,
            demo_dir,
            str(tmp_path / "sh"),
            SHARDED_STEPS + per_rank,
            tp,
            pp,
        )
    )
    # the first step sees the same completions; the update is the same up to float rounding
    assert sharded[0]["reward"] == one[0]["reward"]
    assert sharded[0]["loss"] == pytest.approx(one[0]["loss"], abs=1e-6)
    assert sharded[0]["grad_norm"] == pytest.approx(one[0]["grad_norm"], rel=1e-4)
    assert len(sharded) == 3


def test_context_parallel_training_matches_one_process(demo_dir, one_process_run, tmp_path):
    """CP=2: each rank runs half of every sequence (megatron's load-balanced chunks); the first
    step's loss and gradient norm are one process's, and the run trains on."""
    one = one_process_run
    cp = _only(
        run_ranks(
            2,
            demo_run_worker,
            demo_dir,
            str(tmp_path / "cp"),
            SHARDED_STEPS + ["--context_parallel_size", "2"],
        )
    )
    assert cp[0]["reward"] == one[0]["reward"]
    assert cp[0]["loss"] == pytest.approx(one[0]["loss"], abs=1e-6)
    assert cp[0]["grad_norm"] == pytest.approx(one[0]["grad_norm"], rel=1e-4)
    assert cp[0]["num_tokens"] == one[0]["num_tokens"]
    assert len(cp) == 3


def test_async_reference_model_and_iterations(demo_dir, tmp_path):
    """One batch ahead (staleness 1), a KL-regularised loss against the reference model, two
    updates per batch (each an optimizer step, as TRL counts them: 8 steps are 4 batches),
    truncated importance sampling: the logged ``kl`` is the k3 estimator of KL(policy ||
    reference) on the batch, recomputed here with plain torch before each update."""
    from _train_workers import kl_recording_demo_worker

    hist, k3 = _only(
        run_ranks(
            1,
            kl_recording_demo_worker,
            demo_dir,
            str(tmp_path / "r"),
            SHORT
            + [
                "--max_steps",
                "8",
                "--async_max_staleness",
                "1",
                "--beta",
                "0.04",
                "--num_iterations",
                "2",
                "--vllm_importance_sampling_correction",
                "true",
            ],
        )
    )
    assert [h["step"] for h in hist] == list(range(1, 9))
    assert max(h["rollout/staleness"] for h in hist) <= 1
    assert any(h["rollout/staleness"] == 1 for h in hist)  # generation overlapped an update
    # old and reference log-prob passes ran, once per batch (timed in its first step's record)
    assert all(h["time/logprobs"] > 0 for h in hist[0::2])
    assert not any("time/logprobs" in h for h in hist[1::2])
    # The reference is the starting policy: the first update sees KL 0, every later one, after
    # the policy moved, a positive KL. No ceiling on its size: k3 after one Adam step is
    # heavy-tailed (a few tokens that lost several nats carry most of it) and its value on
    # the warm-started demo model differs between CPUs by a factor of 30.
    assert len(k3) == 8  # 4 batches x 2 updates
    assert k3[0] == pytest.approx(0.0, abs=1e-9)
    assert all(v > 1e-6 for v in k3[1:])
    # a step logs its update's token-weighted k3 (the kernel's fp32 against fp64 here: they
    # agree to ~3e-7 relative; 1e-4 leaves a wide margin for rounding)
    for h, k in zip(hist, k3):
        assert h["kl"] == pytest.approx(k, rel=1e-4, abs=1e-9)


def test_loss_variant_with_masks_and_adaptive_entropy_trains(demo_dir, tmp_path):
    """cispo with the top-entropy mask, the off-policy mask, the token-masked sampler weight and
    the adaptive entropy bonus trains end to end; the coefficient follows the controller's rule
    from the logged entropy, and its state is saved with the checkpoint."""
    out = tmp_path / "v"
    coef, delta, target = 0.01, 0.004, 0.5
    hist = _only(
        run_ranks(
            1,
            demo_run_worker,
            demo_dir,
            str(out),
            ["--eval_strategy", "no", "--log_completions", "false", "--max_steps", "3"]
            + ["--save_steps", "3", "--loss_type", "cispo", "--epsilon_high", "4.0"]
            + ["--top_entropy_quantile", "0.5", "--off_policy_mask_threshold", "0.2"]
            + ["--vllm_importance_sampling_mode", "token_mask"]
            + ["--use_adaptive_entropy", "--entropy_coef", str(coef)]
            + ["--entropy_coef_delta", str(delta), "--entropy_target", str(target)],
        )
    )
    assert [h["step"] for h in hist] == [1, 2, 3]
    for h in hist:
        assert 0.0 <= h["cispo_clip_ratio"] <= 1.0 and "clip_ratio/region_mean" not in h
        assert 0.0 < h["entropy/trained"] and abs(h["loss"]) < 10
    expected = coef
    for h in hist:  # one optimizer step per training step
        step = delta if h["entropy/trained"] <= target else -delta
        expected = min(max(expected + step, 0.0), 1.0)
        assert h["entropy_coef"] == pytest.approx(expected)
    state = json.load(open(out / "checkpoint-3" / "trainer_state.json"))
    assert state["extra"]["entropy_bonus"]["entropy_coef"] == pytest.approx(expected)
    assert state["extra"]["entropy_bonus"]["last_entropy"] == pytest.approx(
        hist[-1]["entropy/trained"]
    )


def test_missing_prompt_column_is_reported_before_anything_runs(demo_dir, tmp_path):
    from megagrpo.data.prompts import PromptError

    with pytest.raises(AssertionError, match="question.*not found.*columns present"):
        run_ranks(
            1,
            demo_run_worker,
            demo_dir,
            str(tmp_path / "x"),
            SHORT + ["--dataset_prompt_column", "question"],
        )
    assert PromptError  # the error type the message comes from


def test_train_command_under_torchrun_with_tp2(demo_dir, tmp_path):
    """launch/train.sh -> torchrun -> megagrpo train, two processes, TP=2."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "tp2"
    cmd = [
        os.path.join(root, "launch", "train.sh"),
        "--config",
        os.path.join(root, "launch", "configs", "cpu-demo.yaml"),
        "--model_name_or_path",
        os.path.join(demo_dir, "model"),
        "--dataset_name",
        os.path.join(demo_dir, "data"),
        "--output_dir",
        str(out),
        "--tensor_model_parallel_size",
        "2",
        "--max_steps",
        "2",
        "--num_reward_workers",
        "1",
        *SHORT,
    ]
    r = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "NPROC": "2", "OMP_NUM_THREADS": "1"},
    )
    assert r.returncode == 0, r.stderr[-4000:]
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2]
    assert (out / "final_model" / "model.safetensors").is_file()


CKPT = [
    "--eval_strategy",
    "no",
    "--log_completions",
    "false",
    "--save_strategy",
    "steps",
    "--save_steps",
    "2",
    "--save_total_limit",
    "2",
    "--max_steps",
    "6",
]


def test_kill9_in_training_and_in_a_save_then_resume_exactly(demo_dir, tmp_path):
    from _multiproc import RankDied
    from _train_workers import faulty_demo_worker

    reference = _only(run_ranks(1, demo_run_worker, demo_dir, str(tmp_path / "ref"), CKPT))
    keys = ("reward", "loss", "grad_norm", "entropy")

    # SIGKILL in the middle of step 5: checkpoints 2 and 4 are complete
    out = tmp_path / "killed"
    with pytest.raises(RankDied):
        run_ranks(1, faulty_demo_worker, demo_dir, str(out), CKPT, "kill_in_update", 5)
    assert sorted(os.listdir(out))[:2] == ["checkpoint-2", "checkpoint-4"]
    resumed = _only(run_ranks(1, demo_run_worker, demo_dir, str(out), CKPT))
    assert [h["step"] for h in resumed] == [5, 6]
    for a, b in zip(reference[4:], resumed):
        assert all(a[k] == pytest.approx(b[k], rel=1e-6, abs=1e-9) for k in keys)

    # SIGKILL while checkpoint-4 is being written: a temporary directory is left, 2 is newest
    out = tmp_path / "killed_in_save"
    with pytest.raises(RankDied):
        run_ranks(1, faulty_demo_worker, demo_dir, str(out), CKPT, "kill_in_save", 4)
    names = sorted(os.listdir(out))
    assert ".checkpoint-4.tmp" in names and "checkpoint-4" not in names
    resumed = _only(run_ranks(1, demo_run_worker, demo_dir, str(out), CKPT))
    assert [h["step"] for h in resumed] == [3, 4, 5, 6]
    for a, b in zip(reference[2:], resumed):
        assert all(a[k] == pytest.approx(b[k], rel=1e-6, abs=1e-9) for k in keys)
    names = sorted(os.listdir(out))
    assert not [n for n in names if n.endswith(".tmp")]  # the broken save was removed
    assert [n for n in names if n.startswith("checkpoint-")] == ["checkpoint-4", "checkpoint-6"]


def test_nan_gradient_skips_the_update_and_training_goes_on(demo_dir, tmp_path):
    from _train_workers import faulty_demo_worker

    hist = _only(
        run_ranks(
            1,
            faulty_demo_worker,
            demo_dir,
            str(tmp_path / "nan"),
            SHORT + ["--max_steps", "4"],
            "nan_grad",
            2,
        )
    )
    assert [h["update_skipped"] for h in hist] == [0.0, 1.0, 0.0, 0.0]
    assert all(h["grad_norm"] == h["grad_norm"] for h in (hist[0], hist[2], hist[3]))  # finite
    # the skipped step changed nothing: steps 2 and 3 saw the same weights (same entropy of the
    # engine's samples is not guaranteed, but the policy log-prob gap stays exact)
    assert max(h["sampler_logprob_gap"] for h in hist) < 1e-4


# ---- dynamic sampling ----
# The reward ``_reward_fns.signal_when_divisible_by_<k>`` gives a group a spread exactly when its
# prompt's solution is a multiple of k, so which groups train follows from the data alone and
# ``dynamic_expected`` predicts every step without looking at what the run did. The demo's batch
# is 8 groups of 8 completions, here in micro-batches of 16: a batch cut short at the bound is a
# multiple of 2 groups (padded with zero-std groups up to 2 when fewer have a spread).

DYN_GROUPS, DYN_G, DYN_ROUNDS = 8, 8, 3


def _dynamic_recipe(k: int, steps: int) -> list[str]:
    return SHORT + [
        "--seed", str(DYN_SEED),
        "--max_steps", str(steps),
        "--lr_scheduler_type", "constant",
        "--reward_funcs", f"_reward_fns:signal_when_divisible_by_{k}",
        "--reward_weights", "1.0",
        "--dynamic_sampling", "true",
        "--max_generation_rounds", str(DYN_ROUNDS),
        "--micro_batch_size", "16",  # the smallest trainable batch: 2 groups
    ]  # fmt: skip


def _check_dynamic(history, steps, solutions, k: int, first_step: int = 0) -> list[dict]:
    import torch

    from megagrpo.algorithms.advantages import group_advantages

    expected = [
        dynamic_expected(solutions, first_step + i, k, DYN_ROUNDS, multiple=2)
        for i in range(len(steps))
    ]
    assert [h["step"] for h in history] == [first_step + i + 1 for i in range(len(steps))]
    for h, s, e in zip(history, steps, expected):
        assert s["prompt_rows"] == e["rows"], h["step"]
        size = e["dynamic_sampling/kept_groups"]
        assert s["completions"] == s["trained"] == DYN_G * size  # what the update trained on
        for key, value in e.items():
            if key.startswith("dynamic_sampling/"):
                assert h[key] == value, (h["step"], key)
        # the kept groups have a spread (but padding), advantages over the kept batch alone
        r_bg = torch.tensor(s["rewards_n"], dtype=torch.float64).view(-1, DYN_G)
        spread = int((r_bg.std(dim=1) > 0).sum())
        assert spread == size - e["dynamic_sampling/padded_groups"]
        adv = group_advantages(r_bg.flatten().float(), DYN_G, "group").advantages_n
        assert s["advantages_n"] == pytest.approx(adv.tolist(), rel=1e-5, abs=1e-6)
        # the reward metrics describe everything generated, zero-std groups included
        silent = e["dynamic_sampling/filtered_groups"] + e["dynamic_sampling/padded_groups"]
        assert h["frac_reward_zero_std"] == pytest.approx(silent / e["generated"])
    return expected


def test_dynamic_sampling_fills_the_batch_and_resumes_with_the_same_prompts(demo_dir, tmp_path):
    recipe = _dynamic_recipe(3, 4)
    history, steps, solutions = _only(
        run_ranks(1, batch_recording_demo_worker, demo_dir, str(tmp_path / "a"), recipe)
    )
    expected = _check_dynamic(history, steps, solutions, 3)
    # the run met each case: cut short at the bound (6 spread groups after 3 rounds), full at
    # the bound (with surplus), full before it
    cases = {(e["dynamic_sampling/rounds"], e["dynamic_sampling/kept_groups"]) for e in expected}
    assert {(3, 6), (3, 8), (2, 8)} <= cases, cases
    assert any(e["dynamic_sampling/surplus_groups"] > 0 for e in expected)
    # interrupted after step 2 and resumed: steps 3 and 4 draw the same prompts and groups
    out = str(tmp_path / "b")
    save = ["--save_strategy", "steps", "--save_steps", "2"]
    run_ranks(1, batch_recording_demo_worker, demo_dir, out, recipe + save + ["--max_steps", "2"])
    resumed, resumed_steps, _ = _only(
        run_ranks(1, batch_recording_demo_worker, demo_dir, out, recipe + save)
    )
    _check_dynamic(resumed, resumed_steps, solutions, 3, first_step=2)
    assert [s["prompt_rows"] for s in resumed_steps] == [s["prompt_rows"] for s in steps[2:]]
    for a, b in zip(history[2:], resumed):  # the same completions, trained the same way
        for key in ("entropy", "completions/mean_length", "reward_std", "loss", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-9), key


def test_dynamic_sampling_with_async_rollouts_and_no_signal_at_all(demo_dir, tmp_path):
    """One batch ahead; solutions that are multiples of 5 are rarer: a step cut short at the
    bound, and one where no group of three rounds has a spread (it trains on 2 padded groups
    with advantage 0, the run goes on)."""
    recipe = _dynamic_recipe(5, 3) + ["--async_max_staleness", "1"]
    history, steps, solutions = _only(
        run_ranks(1, batch_recording_demo_worker, demo_dir, str(tmp_path / "r"), recipe)
    )
    expected = _check_dynamic(history, steps, solutions, 5)
    assert [e["dynamic_sampling/padded_groups"] for e in expected] == [0, 0, 2]
    assert steps[2]["advantages_n"] == [0.0] * 2 * DYN_G
    assert [e["dynamic_sampling/kept_groups"] for e in expected] == [4, 4, 2]
    assert max(h["rollout/staleness"] for h in history) <= 1
    assert any(h["rollout/staleness"] == 1 for h in history)  # a first round overlapped


def test_token_budget_micro_batches_train_as_padded_ones(demo_dir, tmp_path):
    """``--max_tokens_per_micro_batch``: the demo's first step trains on packed micro-batches of
    at most 512 tokens (instead of the recipe's one padded micro-batch of 64) with the same loss
    and gradient norm (dapo: the global token count) as the padded run, on one process and over
    two data-parallel ranks (the sequences rebalanced by tokens)."""
    steps = SHORT + ["--max_steps", "1"]
    padded = _only(run_ranks(1, demo_run_worker, demo_dir, str(tmp_path / "padded"), steps))
    budget = ["--max_tokens_per_micro_batch", "512"]
    packed = _only(
        run_ranks(1, demo_run_worker, demo_dir, str(tmp_path / "packed"), steps + budget)
    )
    dp2 = ["--per_device_train_batch_size", "32", "--micro_batch_size", "32"]
    packed_dp2 = _only(
        run_ranks(2, demo_run_worker, demo_dir, str(tmp_path / "dp2"), steps + budget + dp2)
    )
    for run in (packed, packed_dp2):
        assert run[0]["reward"] == padded[0]["reward"]  # the same rollout
        assert run[0]["num_tokens"] == padded[0]["num_tokens"]
        # the loss (~ -2e-3) cancels positive and negative advantages: float32 sums in another
        # order moved it by 1.3e-8 (6.7e-6 relative) over two ranks on a 2-core Xeon
        assert run[0]["loss"] == pytest.approx(padded[0]["loss"], rel=1e-5, abs=1e-7)
        assert run[0]["grad_norm"] == pytest.approx(padded[0]["grad_norm"], rel=1e-5)
