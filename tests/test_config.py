"""Recipe loading: the open-r1-style demo recipe, command-line overrides, bad input, round trips."""

from __future__ import annotations

import dataclasses
import math
import typing
import warnings
from pathlib import Path

import pytest

from megagrpo.config import (
    ConfigError,
    DatasetConfig,
    DatasetMixtureConfig,
    GRPOConfig,
    GRPOScriptArguments,
    MegatronConfig,
    ModelConfig,
    Recipe,
    UnusedKeysWarning,
    dump_recipe,
    load_recipe,
    recipe_to_dict,
    validate_layout,
    validate_recipe,
)
from megagrpo.config.coerce import coerce
from megagrpo.config.recipe import FIELD_SECTION, SECTIONS

REPO = Path(__file__).resolve().parents[1]
DEMO = str(REPO / "launch" / "configs" / "qwen2.5-1.5b-openr1-demo.yaml")
DEMO_UNUSED = [
    "do_eval",
    "gradient_checkpointing_kwargs",
    "hub_model_id",
    "hub_strategy",
    "logging_strategy",
    "overwrite_output_dir",
    "push_to_hub",
]


def load_quiet(path, argv=()):
    """load_recipe with the unused-keys warning silenced (tests of other behaviour)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnusedKeysWarning)
        return load_recipe(path, list(argv))


def write(tmp_path: Path, text: str, name: str = "recipe.yaml") -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


# ------------------------------------------------------------------------------------------------
# the demo recipe


def test_demo_recipe_values_land_in_the_right_dataclass_with_the_right_types():
    r = load_quiet(DEMO)
    assert isinstance(r.model, ModelConfig) and isinstance(r.script, GRPOScriptArguments)
    assert isinstance(r.training, GRPOConfig) and isinstance(r.megatron, MegatronConfig)
    assert r.model.model_name_or_path == "Qwen/Qwen2.5-1.5B-Instruct"
    assert r.model.torch_dtype == "bfloat16"
    assert r.model.attn_implementation == "flash_attention_2"
    assert r.script.dataset_name == "open-r1/OpenR1-Math-220k"
    assert r.script.dataset_prompt_column == "problem"
    assert r.script.reward_funcs == ["accuracy", "format", "tag_count"]
    assert r.script.reward_weights == [1.0, 1.0, 1.0]
    assert r.training.system_prompt.endswith("<answer>\n...\n</answer>")
    assert r.training.learning_rate == 2e-5 and type(r.training.learning_rate) is float
    assert r.training.num_train_epochs == 1.0 and type(r.training.num_train_epochs) is float
    assert r.training.num_generations == 16 and type(r.training.num_generations) is int
    assert r.training.per_device_train_batch_size == 16
    assert r.training.gradient_accumulation_steps == 4
    assert r.training.max_prompt_length == 512 and r.training.max_completion_length == 1024
    assert r.training.lr_scheduler_type == "cosine" and r.training.warmup_ratio == 0.1
    assert r.training.report_to == ["wandb"]
    assert r.training.save_strategy == "epoch" and r.training.save_total_limit == 1
    assert r.training.bf16 is True and r.training.use_vllm is True
    assert r.training.log_level == "info" and r.training.logging_first_step is True
    assert r.megatron.micro_batch_size == 8 and r.megatron.use_distributed_optimizer is True
    assert r.megatron.fp8 is None
    assert sorted(r.unused) == DEMO_UNUSED
    assert r.unused["gradient_checkpointing_kwargs"] == {"use_reentrant": False}


def test_demo_recipe_passes_the_rules_on_an_8_gpu_node():
    r = load_quiet(DEMO)
    validate_recipe(r)
    layout = validate_layout(
        r, world_size=8, num_layers=28, num_attention_heads=12, num_query_groups=2
    )
    assert (layout.tp, layout.pp, layout.cp, layout.dp, layout.world_size) == (1, 1, 1, 8, 8)
    rc = r.megatron.recompute(r.training.gradient_checkpointing)
    assert (rc.recompute_granularity, rc.recompute_method, rc.recompute_num_layers) == (
        "full",
        "uniform",
        1,
    )


def test_known_unused_keys_warn_once_naming_all_of_them():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_recipe(DEMO, ["--use_peft", "false", "--lora_r", "8"])
    ours = [w for w in caught if issubclass(w.category, UnusedKeysWarning)]
    assert len(ours) == 1
    text = str(ours[0].message)
    for key in DEMO_UNUSED + ["use_peft", "lora_r"]:
        assert key in text
    assert text.endswith(", ".join(sorted(DEMO_UNUSED + ["use_peft", "lora_r"])))


def test_no_warning_without_unused_keys(tmp_path):
    path = write(tmp_path, "model_name_or_path: m\ndataset_name: d\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_recipe(path, [])


def test_other_open_r1_grpo_recipe_keys_are_accepted(tmp_path):
    # Keys and values from open-r1's code / codeforces / R1-distill GRPO recipes.
    text = """
model_name_or_path: deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B
dataset_name: open-r1/verifiable-coding-problems-python
dataset_config: verifiable-prompts
dataset_train_split: train
dataset_test_split: test
chat_template: "{% for m in messages %}{{ m['content'] }}{% endfor %}"
beta: 0.01
loss_type: dr_grpo
scale_rewards: false
mask_truncated_completions: true
max_grad_norm: 0.2
lr_scheduler_type: cosine_with_min_lr
lr_scheduler_kwargs:
  min_lr_rate: 0.1
save_strategy: "steps"
save_steps: 0.05
eval_strategy: "no"
use_liger_kernel: true
vllm_device: auto
vllm_gpu_memory_utilization: 0.7
benchmarks: []
callbacks:
- push_to_hub_revision
hub_model_revision: v01.00
code_language: cpp
code_eval_test_batch_size: -1
code_eval_scoring_mode: weighted_sum
temperature: 0.7
wandb_entity: huggingface
wandb_project: open-r1
"""
    with pytest.warns(UnusedKeysWarning) as record:
        r = load_recipe(write(tmp_path, text), [])
    assert len(record) == 1
    assert r.script.dataset_config == "verifiable-prompts"
    assert r.training.scale_rewards == "none"
    assert r.training.loss_type == "dr_grpo" and r.training.beta == 0.01
    assert r.training.save_steps == 0.05 and r.training.eval_strategy == "no"
    assert r.training.lr_scheduler_kwargs == {"min_lr_rate": 0.1}
    assert r.training.wandb_entity == "huggingface" and r.training.temperature == 0.7
    assert set(r.unused) == {
        "use_liger_kernel",
        "vllm_device",
        "benchmarks",
        "callbacks",
        "hub_model_revision",
    }
    # the code_* keys are honoured (issue 15), not dropped
    assert r.script.code_language == "cpp" and r.script.code_eval_test_batch_size == -1
    assert r.script.code_eval_scoring_mode == "weighted_sum"
    validate_recipe(r)


# ------------------------------------------------------------------------------------------------
# command-line overrides

MIX = (
    "{datasets: [{id: a/b, weight: 0.5, columns: [problem, solution]}, {id: c, split: dev}], "
    "seed: 3}"
)


ACC_FMT = ["accuracy", "format"]


@pytest.mark.parametrize(
    "argv, section, name, expected",
    [
        (["--learning_rate", "1e-6"], "training", "learning_rate", 1e-6),
        (["--learning_rate=3e-7"], "training", "learning_rate", 3e-7),
        (["--learning-rate", "4e-7"], "training", "learning_rate", 4e-7),
        (["--learning_rate", "1e-6", "--learning_rate", "5e-6"], "training", "learning_rate", 5e-6),
        (["--bf16", "false"], "training", "bf16", False),
        (["--bf16=False"], "training", "bf16", False),
        (["--mask_truncated_completions"], "training", "mask_truncated_completions", True),
        (["--num_generations", "8"], "training", "num_generations", 8),
        (["--reward_funcs", "accuracy,format"], "script", "reward_funcs", ACC_FMT),
        (["--reward_funcs", "accuracy", "format"], "script", "reward_funcs", ACC_FMT),
        (["--reward_funcs", "[accuracy, format]"], "script", "reward_funcs", ACC_FMT),
        (["--reward_funcs=accuracy"], "script", "reward_funcs", ["accuracy"]),
        (
            ["--reward_weights", "0.5,2"],
            "script",
            "reward_weights",
            [
                0.5,
                2.0,
            ],
        ),
        (["--reward_weights", "[1, 2e-1]"], "script", "reward_weights", [1.0, 0.2]),
        (["--reward_weights", "null"], "script", "reward_weights", None),
        (["--repetition_max_penalty", "-0.5"], "script", "repetition_max_penalty", -0.5),
        (["--scale_rewards", "false"], "training", "scale_rewards", "none"),
        (["--scale_rewards", "True"], "training", "scale_rewards", "group"),
        (["--scale_rewards", "batch"], "training", "scale_rewards", "batch"),
        (["--fp8", "null"], "megatron", "fp8", None),
        (["--fp8", "hybrid"], "megatron", "fp8", "hybrid"),
        (["--recompute_granularity", "none"], "megatron", "recompute_granularity", None),
        (["--dtype", "float32"], "model", "torch_dtype", "float32"),
        (
            ["--system_prompt", "Answer: briefly, please"],
            "training",
            "system_prompt",
            "Answer: briefly, please",
        ),
        (["--system_prompt", "null"], "training", "system_prompt", None),
        (["--save_steps", "100"], "training", "save_steps", 100),
        (["--eval_steps", "0.25"], "training", "eval_steps", 0.25),
        (["--resume_from_checkpoint", "true"], "training", "resume_from_checkpoint", True),
        (
            ["--resume_from_checkpoint", "out/checkpoint-5"],
            "training",
            "resume_from_checkpoint",
            "out/checkpoint-5",
        ),
        (["--report_to", "none"], "training", "report_to", []),
        (["--report_to", "all"], "training", "report_to", ["wandb"]),
        (["--report_to", "jsonl,wandb,wandb"], "training", "report_to", ["wandb"]),
        (
            ["--lr_scheduler_kwargs", "{min_lr_rate: 0.1}"],
            "training",
            "lr_scheduler_kwargs",
            {"min_lr_rate": 0.1},
        ),
        (["--tensor_model_parallel_size", "2"], "megatron", "tensor_model_parallel_size", 2),
        (["--micro_batch_size", "null"], "megatron", "micro_batch_size", None),
    ],
)
def test_command_line_overrides_win_over_the_recipe(argv, section, name, expected):
    r = load_quiet(DEMO, argv)
    value = getattr(getattr(r, section), name)
    assert value == expected and type(value) is type(expected)


def test_dataset_mixture_from_the_command_line():
    r = load_quiet(DEMO, ["--dataset_name", "null", "--dataset_mixture", MIX])
    assert r.script.dataset_name is None
    assert r.script.dataset_mixture == DatasetMixtureConfig(
        datasets=[
            DatasetConfig(id="a/b", weight=0.5, columns=["problem", "solution"]),
            DatasetConfig(id="c", split="dev"),
        ],
        seed=3,
    )
    validate_recipe(r)


def test_yaml_1_1_quirks_are_read_as_meant(tmp_path):
    # PyYAML reads 1e-6 as a string and an unquoted `no` as False.
    text = "learning_rate: 1e-6\nsave_strategy: no\nscale_rewards: true\nbf16: 0\nfp16: 1\n"
    r = load_quiet(write(tmp_path, text))
    assert r.training.learning_rate == 1e-6 and r.training.save_strategy == "no"
    assert r.training.scale_rewards == "group"
    assert r.training.bf16 is False and r.training.fp16 is True


def test_no_recipe_file_gives_the_defaults_plus_overrides():
    r = load_quiet(None, ["--model_name_or_path", "m", "--dataset_name", "d"])
    assert r.training == GRPOConfig() and r.megatron == MegatronConfig()
    assert r.model == ModelConfig(model_name_or_path="m")
    # open-r1's GRPOScriptArguments defaults
    s = r.script
    assert (s.cosine_min_value_wrong, s.cosine_max_value_wrong) == (0.0, -0.5)
    assert (s.cosine_min_value_correct, s.cosine_max_value_correct) == (0.5, 1.0)
    assert (s.cosine_max_len, s.repetition_n_grams, s.repetition_max_penalty) == (1000, 3, -1.0)
    assert r.training.bf16 is True and r.training.fp16 is False  # TRL: bf16 unless fp16
    assert load_quiet(None, ["--fp16"]).training.bf16 is False


# ------------------------------------------------------------------------------------------------
# bad input at load time


@pytest.mark.parametrize(
    "yaml_text, argv, expected",
    [
        ("learning_rat: 1.0e-6\n", [], ["unknown key 'learning_rat'", "learning_rate"]),
        (
            "",
            ["--num_generation", "4"],
            ["unknown key 'num_generation'", "num_generations", "[command line]"],
        ),
        ("tensor_parallel_size: 2\n", [], ["tensor_parallel_size", "tensor_model_parallel_size"]),
        ("xyzzy: 1\n", [], ["unknown key 'xyzzy'", "no similar key"]),
        ("num_generations: sixteen\n", [], ["num_generations='sixteen'", "expected int"]),
        ("num_generations: 2.5\n", [], ["num_generations=2.5", "expected int"]),
        ("max_steps: true\n", [], ["max_steps=True", "expected int"]),
        ("max_generation_rounds: 2.5\n", [], ["max_generation_rounds=2.5", "expected int"]),
        ("dynamic_sampling: sometimes\n", [], ["dynamic_sampling='sometimes'", "expected bool"]),
        ("learning_rate: fast\n", [], ["learning_rate='fast'", "expected float"]),
        ("", ["--learning_rate", "1e-6x"], ["learning_rate='1e-6x'", "float", "[command line]"]),
        ("bf16: maybe\n", [], ["bf16='maybe'", "expected bool"]),
        ("bf16: 2\n", [], ["bf16=2 (int)", "expected bool"]),
        ("reward_funcs: {a: 1}\n", [], ["reward_funcs={'a': 1}", "a list of str"]),
        ("reward_weights: [1.0, heavy]\n", [], ["reward_weights[1]='heavy'", "float"]),
        ("lr_scheduler_kwargs: [1, 2]\n", [], ["lr_scheduler_kwargs=[1, 2]", "a mapping"]),
        ("output_dir: [a, b]\n", [], ["output_dir=['a', 'b']", "expected str"]),
        ("", ["--output_dir"], ["--output_dir needs a value"]),
        ("", ["--learning_rate", "1", "2"], ["learning_rate=['1', '2']", "float"]),
        ("loss_type: ppo\n", [], ["loss_type='ppo'", "'grpo', 'bnpo', 'dr_grpo', 'dapo'"]),
        ("loss_type: dapoo\n", [], ["loss_type='dapoo'", "did you mean 'dapo'"]),
        ("vllm_mode: remote\n", [], ["vllm_mode='remote'", "'server', 'colocate'"]),
        ("fp8: e4m4\n", [], ["fp8='e4m4'", "'e4m3', 'hybrid'"]),
        ("fp8_recipe: current\n", [], ["fp8_recipe='current'", "'delayed'"]),
        (
            "lr_scheduler_type: cosine_with_restarts\n",
            [],
            ["lr_scheduler_type='cosine_with_restarts'", "'cosine_with_min_lr'"],
        ),
        ("importance_sampling_level: sentence\n", [], ["importance_sampling_level='sentence'"]),
        ("scale_rewards: std\n", [], ["scale_rewards='std'", "'group', 'batch', 'none'"]),
        ("torch_dtype: fp8\n", [], ["torch_dtype='fp8'", "'bfloat16'"]),
        ("recompute_method: all\n", [], ["recompute_method='all'", "'uniform', 'block'"]),
        (
            "dataset_mixture: {datasets: [{id: a, wieght: 0.5}]}\n",
            [],
            ["dataset_mixture.datasets[0].wieght", "weight"],
        ),
        (
            "dataset_mixture: {datasets: [{split: train}]}\n",
            [],
            ["dataset_mixture.datasets[0].id is required"],
        ),
        (
            "dataset_mixture: {datasets: [{id: a, weight: half}]}\n",
            [],
            ["dataset_mixture.datasets[0].weight='half'", "float"],
        ),
        ("dataset_mixture: [a, b]\n", [], ["dataset_mixture=['a', 'b']", "DatasetMixtureConfig"]),
        ("dtype: float32\ntorch_dtype: bfloat16\n", [], ["dtype='float32'", "torch_dtype"]),
        ("seed: 1\nseed: 2\n", [], ["'seed' appears twice", "lines 1 and 2"]),
        ("- a\n- b\n", [], ["a recipe is a mapping"]),
        ("a: [1\n", [], ["not valid YAML"]),
        ("", ["learning_rate", "1e-6"], ["expected --key value", "'learning_rate'"]),
    ],
)
def test_bad_input_raises_config_error_naming_the_field(tmp_path, yaml_text, argv, expected):
    path = write(tmp_path, yaml_text)
    with pytest.raises(ConfigError) as info:
        load_quiet(path, argv)
    for fragment in expected:
        assert fragment in str(info.value)


def test_every_problem_is_reported_at_once(tmp_path):
    path = write(tmp_path, "learnin_rate: 1.0\nnum_generations: x\nloss_type: ppo\n")
    with pytest.raises(ConfigError) as info:
        load_quiet(path, ["--bogus_key", "1"])
    errors = info.value.errors
    assert len(errors) == 4
    assert any("learnin_rate" in e and path in e for e in errors)
    assert any("bogus_key" in e and "command line" in e for e in errors)
    assert any(e.startswith("num_generations='x'") for e in errors)
    assert any(e.startswith("loss_type='ppo'") for e in errors)
    assert str(info.value).startswith("4 problems in the recipe")


def test_missing_recipe_file_is_named(tmp_path):
    missing = str(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_recipe(missing, [])


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


# ------------------------------------------------------------------------------------------------
# dump / load round trip


def test_dump_and_load_round_trip(tmp_path):
    r = load_quiet(
        DEMO,
        [
            "--dataset_name",
            "null",
            "--dataset_mixture",
            MIX,
            "--learning_rate",
            "1.5e-7",
            "--save_steps",
            "0.05",
            "--resume_from_checkpoint",
            "true",
            "--fp8",
            "e4m3",
            "--system_prompt",
            "line one\nline 'two': \"quoted\" # not a comment",
        ],
    )
    path = str(tmp_path / "dumped.yaml")
    text = dump_recipe(r, path)
    assert text == Path(path).read_text(encoding="utf-8")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the unused keys are not dumped: no warning on reload
        again = load_recipe(path, [])
    # fields nothing reads are not dumped (their defaults come back); everything else is equal
    from megagrpo.config.known_keys import UNREAD_FIELDS

    def read(recipe):
        return {k: v for k, v in recipe_to_dict(recipe).items() if k not in UNREAD_FIELDS}

    assert read(again) == read(r)
    assert (again.script, again.megatron) == (r.script, r.megatron)
    assert r.model.attn_implementation == "flash_attention_2" and "attn_implementation" not in text
    assert again.unused == {} and len(r.unused) == len(DEMO_UNUSED)


def test_recipe_to_dict_is_flat_with_every_field_once():
    flat = recipe_to_dict(Recipe())
    assert set(flat) == set(FIELD_SECTION)
    assert len(flat) == sum(len(dataclasses.fields(c)) for c in SECTIONS.values())


# ------------------------------------------------------------------------------------------------
# the field convention


ALL_CONFIGS = [
    GRPOScriptArguments,
    GRPOConfig,
    ModelConfig,
    MegatronConfig,
    DatasetConfig,
    DatasetMixtureConfig,
]


@pytest.mark.parametrize("cls", ALL_CONFIGS, ids=lambda c: c.__name__)
def test_every_field_is_documented_and_its_default_has_its_type(cls):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        assert f.metadata.get("help", "").strip(), f"{cls.__name__}.{f.name} has no help"
        if f.default is not dataclasses.MISSING:
            assert coerce(f.default, hints[f.name], f.name) == f.default or (
                f.name == "bf16" and f.default is None
            )


def test_trl_and_seed_defaults():
    t = GRPOConfig()
    assert (t.learning_rate, t.beta, t.epsilon, t.num_generations, t.loss_type) == (
        1e-6,
        0.0,
        0.2,
        8,
        "dapo",
    )
    assert (t.temperature, t.top_p, t.top_k, t.scale_rewards, t.logging_steps) == (
        1.0,
        1.0,
        0,
        "group",
        10,
    )
    assert t.gradient_checkpointing is True and t.vllm_mode == "colocate"
    assert GRPOScriptArguments().reward_weights is None
    assert math.isclose(t.adam_epsilon, 1e-8)
