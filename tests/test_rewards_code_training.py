"""A short GRPO run on the demo-style code task with the code reward (issue 15 item 5): the
dataset is written locally, verification_info reaches the reward pool, the metric is logged, and
bad verification_info rows stop the run before training, naming file, row and column."""

from __future__ import annotations

import json
import math
import os

import pytest
from _multiproc import run_ranks
from _train_workers import code_run_worker

from megagrpo.demo.code_tasks import code_problems, formatted_code_answer, write_code_dataset

SHORT = [
    "--max_steps", "2", "--save_strategy", "no", "--eval_strategy", "no",
    "--log_completions", "false", "--num_generations", "4",
    "--per_device_train_batch_size", "8", "--micro_batch_size", "8",
    "--max_completion_length", "16", "--max_prompt_length", "224",
    "--code_timeout_seconds", "2",
]  # fmt: skip


def test_reference_programs_pass_their_tests():
    from megagrpo.rewards.code_execution import get_code_reward

    rows = code_problems()
    assert len(rows) == 6 and all(len(r["verification_info"]["test_cases"]) == 4 for r in rows)
    fn = get_code_reward(test_batch_size=-1, timeout_seconds=3.0)
    infos = [r["verification_info"] for r in rows]
    assert fn([formatted_code_answer(r) for r in rows], verification_info=infos) == [1.0] * 6
    # a program for the wrong task passes only where the answers coincide: a + b for a - b is
    # right on none of (1,2) (7,3) (0,9) (12,5)... but a + b for max(a, b) is right on (0, 9)
    add = formatted_code_answer(rows[[r["problem"] for r in rows].index(
        "Read two integers a and b on one line and print a + b.")])  # fmt: skip
    by_text = {r["problem"]: r["verification_info"] for r in rows}
    got = fn(
        [add, add],
        verification_info=[
            by_text["Read two integers a and b on one line and print a - b."],
            by_text["Read two integers a and b on one line and print the larger one."],
        ],
    )
    assert got == [0.0, 0.25]


def test_grpo_on_the_code_task_logs_the_code_reward(tmp_path, tiny_checkpoint):
    data = str(tmp_path / "data")
    write_code_dataset(data)
    out = str(tmp_path / "run")
    history = next(
        r
        for r in run_ranks(1, code_run_worker, tiny_checkpoint("qwen2-demo"), data, out, SHORT)
        if r is not None
    )
    assert [h["step"] for h in history] == [1, 2]
    with open(os.path.join(out, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f if '"reward"' in line]
    for r in records:
        mean = r["rewards/code_reward/mean"]
        assert not math.isnan(mean) and 0.0 <= mean <= 1.0, r
        assert 0.0 <= r["rewards/code_format_reward/mean"] <= 1.0
        # every sample scored: none raised, timed out or crashed
        assert r["rewards/errors"] == 0 and r["rewards/timeouts"] == 0, r
        assert r["rewards/crashes"] == 0


@pytest.mark.parametrize("streaming", ["false", "true"])
def test_bad_verification_info_stops_before_training(tmp_path, tiny_checkpoint, streaming):
    from transformers import AutoTokenizer

    from megagrpo.config import load_recipe
    from megagrpo.data.errors import DataError
    from megagrpo.demo.grpo_demo import DEMO_RECIPE
    from megagrpo.training.prompt_data import load_prompt_data

    rows = code_problems()
    rows[3]["verification_info"] = {"language": "cpp", "test_cases": []}
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    model = tiny_checkpoint("qwen2-demo")
    recipe = load_recipe(
        DEMO_RECIPE,
        ["--model_name_or_path", model, "--dataset_name", str(path), "--output_dir",
         str(tmp_path / "run"), "--reward_funcs", "code", "--eval_strategy", "no",
         "--per_device_train_batch_size", "8", "--num_generations", "4",
         "--dataset_streaming", streaming, "--max_steps", "2"],
    )  # fmt: skip
    tok = AutoTokenizer.from_pretrained(model)
    with pytest.raises(DataError) as err:
        data = load_prompt_data(recipe, tok, dp_size=1)
        for k in range(3):  # streaming: when the row is read (2 prompts a step, 6 rows)
            data.sampler.rows_at(k)
    assert str(err.value).startswith(
        f"{path}: row 3 (0-based), line 4: column 'verification_info' has language 'cpp': the "
        "local code sandbox runs python programs only"
    )
    del rows[3]["verification_info"]  # a missing column names it
    for r in rows:
        r.pop("verification_info", None)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=r"column\(s\) \['verification_info'\] not found"):
        load_prompt_data(recipe, tok, dp_size=1)


def test_code_keys_are_honoured_or_refused(tmp_path):
    """Every open-r1 code_* key is a field that reaches the rewards, or an error naming it."""
    from megagrpo.config import ConfigError, load_recipe
    from megagrpo.config.validate import validate_recipe
    from megagrpo.rewards.registry import build_reward_functions

    base = [
        "--model_name_or_path",
        "m",
        "--dataset_name",
        "d",
        "--reward_funcs",
        "code,code_format",
    ]
    r = load_recipe(
        None,
        [*base, "--code_language", "python", "--code_eval_test_batch_size", "-1",
         "--code_eval_scoring_mode", "weighted_sum", "--code_timeout_seconds", "3",
         "--code_memory_mb", "256", "--code_cpu_seconds", "2", "--code_max_output_bytes", "100"],
    )  # fmt: skip
    assert not r.unused
    validate_recipe(r)
    code, fmt = build_reward_functions(r.script)
    assert code.kwargs == {
        "provider": "local", "scoring_mode": "weighted_sum", "test_batch_size": -1,
        "binary": False, "timeout_seconds": 3.0, "cpu_seconds": 2, "memory_mb": 256,
        "max_output_bytes": 100, "strict": True,
    }  # fmt: skip
    assert fmt.kwargs == {"language": "python"}
    for provider in ("e2b", "morph"):
        with pytest.raises(ConfigError, match=rf"code_provider='{provider}': megagrpo runs"):
            validate_recipe(load_recipe(None, [*base, "--code_provider", provider]))
    with pytest.raises(ConfigError, match=r"code_timeout_seconds=10.0 must be below"):
        validate_recipe(load_recipe(None, [*base, "--code_timeout_seconds", "10"]))
    with pytest.raises(ConfigError, match=r"code_eval_scoring_mode"):
        load_recipe(None, [*base, "--code_eval_scoring_mode", "best"])
