"""validate_recipe (static rules) and validate_layout (world size x model shape), rule by rule."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import warnings

import pytest

from megagrpo.config import (
    ConfigError,
    ParallelLayout,
    UnusedKeysWarning,
    load_recipe,
    validate_layout,
    validate_recipe,
)

BASE = ["--model_name_or_path", "m", "--dataset_name", "d"]


def recipe(*argv: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnusedKeysWarning)
        return load_recipe(None, BASE + list(argv))


@pytest.fixture
def with_transformer_engine(monkeypatch):
    """Make ``transformer_engine`` look importable (it cannot be installed on CPU machines)."""
    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        if name == "transformer_engine":
            return importlib.machinery.ModuleSpec("transformer_engine", loader=None)
        return real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


def test_base_recipe_is_valid():
    validate_recipe(recipe())


@pytest.mark.parametrize(
    "argv, expected",
    [
        # data
        (["--model_name_or_path", "null"], ["model_name_or_path is not set"]),
        (["--dataset_name", "null"], ["exactly one of dataset_name=None and dataset_mixture"]),
        (
            ["--dataset_mixture", "{datasets: [{id: a}]}"],
            ["exactly one of dataset_name='d' and dataset_mixture"],
        ),
        (
            ["--dataset_name", "null", "--dataset_mixture", "{datasets: []}"],
            ["dataset_mixture.datasets is empty"],
        ),
        (
            ["--dataset_name", "null", "--dataset_mixture", "{datasets: [{id: a, weight: 0}]}"],
            ["dataset_mixture.datasets[0].weight=0.0 (a) must be in (0, 1]"],
        ),
        (
            [
                "--dataset_name",
                "null",
                "--dataset_mixture",
                "{datasets: [{id: a, columns: [x, y]}, {id: b, columns: [x]}]}",
            ],
            ["dataset_mixture.datasets[*].columns must be the same", "[0]: ['x', 'y']; [1]: ['x']"],
        ),
        (
            [
                "--dataset_name",
                "null",
                "--dataset_mixture",
                "{datasets: [{id: a}], test_split_size: 1}",
            ],
            ["dataset_mixture.test_split_size=1.0 must be in (0, 1)"],
        ),
        (
            ["--eval_strategy", "steps", "--eval_steps", "10", "--dataset_solution_column", ""],
            ["eval_strategy='steps' scores the test split's answers", "dataset_solution_column"],
        ),
        # rewards
        (["--reward_funcs", ""], ["reward_funcs is empty"]),
        (["--reward_funcs", "accuracy,ioi"], ["reward_funcs contains 'ioi'", "tag_count"]),
        (["--reward_funcs", "accuracy,accuracy"], ["reward_funcs names accuracy more than once"]),
        (
            ["--reward_funcs", "accuracy,accuracy_reward"],
            ["reward_funcs names accuracy more than once"],
        ),
        (
            ["--reward_weights", "1,2,3"],
            ["reward_weights has 3 entries [1.0, 2.0, 3.0]", "reward_funcs has 2"],
        ),
        (["--reward_weights", "1,inf"], ["reward_weights=[1.0, inf] must all be finite"]),
        (["--repetition_max_penalty", "0.5"], ["repetition_max_penalty=0.5 must be <= 0"]),
        (["--repetition_n_grams", "0"], ["repetition_n_grams=0 must be >= 1"]),
        (["--cosine_max_len", "0"], ["cosine_max_len=0 must be >= 1"]),
        (
            ["--soft_punish_cache", "20000"],
            ["soft_punish_cache=20000 must be in [0, max_completion_len=16384)"],
        ),
        (["--reward_timeout_seconds", "0"], ["reward_timeout_seconds=0.0 must be > 0"]),
        (["--num_reward_workers", "0"], ["num_reward_workers=0 must be >= 1"]),
        (["--rollout_num_engines", "-1"], ["rollout_num_engines=-1 must be >= 0"]),
        (["--async_max_staleness", "-2"], ["async_max_staleness=-2 must be >= 0"]),
        (["--eval_num_generations", "0"], ["num_generations_eval=0 must be >= 1"]),
        (["--max_generation_rounds", "0"], ["max_generation_rounds=0 must be >= 1"]),
        (
            ["--dynamic_sampling", "true", "--max_generation_rounds", "-1"],
            ["max_generation_rounds=-1 must be >= 1"],
        ),
        (["--weight_sync_bucket_mb", "0"], ["weight_sync_bucket_mb=0 must be >= 1"]),
        (["--rollout_threads_per_engine", "0"], ["rollout_threads_per_engine=0 must be >= 1"]),
        (["--eval_max_prompts", "0"], ["eval_max_prompts=0 must be >= 1"]),
        # optimisation
        (["--learning_rate", "0"], ["learning_rate=0.0 must be > 0"]),
        (["--learning_rate", "nan"], ["learning_rate=nan must be > 0"]),
        (["--warmup_ratio", "1.5"], ["warmup_ratio=1.5 must be in [0, 1]"]),
        (
            ["--warmup_ratio", "0.1", "--warmup_steps", "10"],
            ["warmup_ratio=0.1 and warmup_steps=10 are both set"],
        ),
        (
            ["--lr_scheduler_type", "cosine_with_min_lr"],
            ["lr_scheduler_type='cosine_with_min_lr' needs exactly one of min_lr or min_lr_rate"],
        ),
        (["--max_steps", "0"], ["max_steps=0 must be > 0, or -1"]),
        (["--num_train_epochs", "0"], ["num_train_epochs=0.0 must be > 0 when max_steps=-1"]),
        (["--per_device_train_batch_size", "0"], ["per_device_train_batch_size=0 must be >= 1"]),
        (["--gradient_accumulation_steps", "0"], ["gradient_accumulation_steps=0 must be >= 1"]),
        (["--max_grad_norm", "-1"], ["max_grad_norm=-1.0 must be >= 0"]),
        (["--adam_beta2", "1"], ["adam_beta2=1.0 must be in [0, 1)"]),
        (["--adam_epsilon", "0"], ["adam_epsilon=0.0 must be > 0"]),
        (["--bf16", "true", "--fp16", "true"], ["bf16=True and fp16=True"]),
        # generation and loss
        (["--num_generations", "1"], ["num_generations=1 must be >= 2"]),
        (["--max_completion_length", "0"], ["max_completion_length=0 must be >= 1"]),
        (["--temperature", "0"], ["temperature=0.0 must be > 0"]),
        (["--top_p", "0"], ["top_p=0.0 must be in (0, 1]"]),
        (["--top_p", "1.5"], ["top_p=1.5 must be in (0, 1]"]),
        (["--top_k", "-2"], ["top_k=-2 must be >= -1"]),
        (["--min_p", "2"], ["min_p=2.0 must be in [0, 1]"]),
        (["--repetition_penalty", "0"], ["repetition_penalty=0.0 must be > 0"]),
        (["--beta", "-0.1"], ["beta=-0.1 must be >= 0"]),
        (["--epsilon", "0"], ["epsilon=0.0 must be in (0, 1)"]),
        (["--epsilon", "1.5"], ["epsilon=1.5 must be in (0, 1)"]),
        (["--epsilon_high", "0.1"], ["epsilon_high=0.1 must be >= epsilon=0.2"]),
        (["--delta", "0.9"], ["delta=0.9 must be > 1"]),
        (["--num_iterations", "0"], ["num_iterations=0 must be >= 1"]),
        (["--vllm_gpu_memory_utilization", "1.2"], ["vllm_gpu_memory_utilization=1.2"]),
        (["--vllm_server_port", "70000"], ["vllm_server_port=70000 must be in [1, 65535]"]),
        (
            ["--vllm_importance_sampling_cap", "0.5", "--vllm_importance_sampling_clip_min", "0.5"],
            [
                "vllm_importance_sampling_clip_min=0.5 must be < "
                "vllm_importance_sampling_clip_max=0.5"
            ],
        ),
        (
            ["--vllm_importance_sampling_clip_max", "-1"],
            ["vllm_importance_sampling_clip_max=-1.0 must be > 0"],
        ),
        (
            [
                "--vllm_importance_sampling_mode",
                "token_truncate",
                "--vllm_importance_sampling_clip_max",
                "null",
            ],
            [
                "vllm_importance_sampling_mode='token_truncate' needs "
                "vllm_importance_sampling_clip_min"
            ],
        ),
        (
            ["--loss_type", "vespo"],
            ["loss_type='vespo' with vllm_importance_sampling_mode='sequence_mask'"],
        ),
        (["--top_entropy_quantile", "1.5"], ["top_entropy_quantile=1.5 must be in [0, 1]"]),
        (["--sapo_temperature_neg", "0"], ["sapo_temperature_neg=0.0 must be > 0"]),
        (["--vespo_k_pos", "-1"], ["vespo_k_pos=-1.0 must be >= 0"]),
        (
            ["--use_adaptive_entropy", "--entropy_coef_min", "0.5", "--entropy_coef_max", "0.1"],
            ["entropy_coef_min=0.5 and entropy_coef_max=0.1 must satisfy 0 <= min <= max"],
        ),
        (
            ["--use_adaptive_entropy", "--entropy_coef_delta", "-0.1"],
            ["entropy_coef_delta=-0.1 must be >= 0"],
        ),
        (
            ["--vllm_max_model_length", "1000"],
            [
                "vllm_max_model_length=1000 must be >= max_prompt_length=512 + "
                "max_completion_length=512"
            ],
        ),
        # logging and saving
        (["--save_steps", "2.5"], ["save_steps=2.5 must be a whole number of steps"]),
        (["--logging_steps", "0"], ["logging_steps=0 must be a whole number"]),
        (["--save_total_limit", "0"], ["save_total_limit=0 must be >= 1"]),
        (["--report_to", "tensorboard"], ["report_to contains 'tensorboard'"]),
        # megatron
        (["--tensor_model_parallel_size", "0"], ["tensor_model_parallel_size=0 must be >= 1"]),
        (
            ["--sequence_parallel"],
            [
                "sequence_parallel=True needs tensor_model_parallel_size > 1, got "
                "tensor_model_parallel_size=1"
            ],
        ),
        (
            ["--virtual_pipeline_model_parallel_size", "2"],
            [
                "virtual_pipeline_model_parallel_size=2 needs "
                "pipeline_model_parallel_size > 1, got 1"
            ],
        ),
        (
            [
                "--micro_batch_size",
                "3",
                "--per_device_train_batch_size",
                "4",
                "--gradient_accumulation_steps",
                "2",
            ],
            [
                "micro_batch_size=3 must divide per_device_train_batch_size=4 x "
                "gradient_accumulation_steps=2 = 8"
            ],
        ),
        (["--max_tokens_per_micro_batch", "0"], ["max_tokens_per_micro_batch=0 must be >= 1"]),
        (
            ["--max_tokens_per_micro_batch", "100", "--max_prompt_length", "64"]
            + ["--max_completion_length", "64"],
            [
                "max_tokens_per_micro_batch=100 must be >= max_prompt_length=64 + "
                "max_completion_length=64"
            ],
        ),
        (
            ["--max_tokens_per_micro_batch", "4096", "--top_entropy_quantile", "0.5"],
            ["max_tokens_per_micro_batch=4096 with top_entropy_quantile=0.5"],
        ),
        (
            ["--overlap_param_gather"],
            [
                "overlap_param_gather=True needs use_distributed_optimizer=True and "
                "overlap_grad_reduce=True, got use_distributed_optimizer=False"
            ],
        ),
        (
            ["--recompute_granularity", "selective", "--recompute_num_layers", "2"],
            [
                "recompute_granularity='selective' takes no recompute_method=None / "
                "recompute_num_layers=2"
            ],
        ),
        (
            ["--gradient_checkpointing", "false", "--recompute_method", "block"],
            ["recompute_method='block' / recompute_num_layers=None are set but recompute is off"],
        ),
        (["--recompute_num_layers", "0"], ["recompute_num_layers=0 must be >= 1"]),
        (["--fp8_recipe", "blockwise"], ["fp8_recipe='blockwise' is set but fp8=None"]),
        (
            ["--fp8_param_gather", "--use_distributed_optimizer"],
            ["fp8_param_gather=True needs fp8"],
        ),
        (["--fp8", "e4m3"], ["fp8='e4m3' needs Transformer Engine"]),
        (["--fp8", "hybrid", "--fp8_recipe", "delayed"], ["fp8='hybrid' needs Transformer Engine"]),
        (
            [
                "--context_parallel_size",
                "4",
                "--max_prompt_length",
                "30",
                "--max_completion_length",
                "20",
                "--max_tokens_per_micro_batch",
                "50",
            ],
            ["max_completion_length=20, rounded up to a multiple of 2 x context_parallel_size=4"],
        ),
        (
            ["--transformer_impl", "transformer_engine"],
            ["transformer_impl='transformer_engine' needs Transformer Engine"],
        ),
    ],
)
def test_each_static_rule(argv, expected):
    with pytest.raises(ConfigError) as info:
        validate_recipe(recipe(*argv))
    assert len(info.value.errors) == 1, info.value.errors
    for fragment in expected:
        assert fragment in str(info.value)


def test_all_violations_are_listed_together():
    with pytest.raises(ConfigError) as info:
        validate_recipe(recipe("--num_generations", "1", "--beta", "-1", "--top_p", "0"))
    assert [e.split("=")[0] for e in info.value.errors] == ["num_generations", "top_p", "beta"]


def test_fp8_passes_where_transformer_engine_is_importable(with_transformer_engine):
    validate_recipe(
        recipe(
            "--fp8",
            "e4m3",
            "--fp8_recipe",
            "tensorwise",
            "--fp8_param_gather",
            "--use_distributed_optimizer",
        )
    )
    validate_recipe(recipe("--transformer_impl", "transformer_engine"))
    with pytest.raises(ConfigError, match="fp8_recipe='mxfp8' is set but fp8=None"):
        validate_recipe(recipe("--fp8_recipe", "mxfp8"))


def test_context_parallel_passes_with_either_attention(with_transformer_engine):
    # Transformer Engine's ring attention on GPU; the local spec's all-gathered keys and values
    validate_recipe(recipe("--context_parallel_size", "2", "--transformer_impl", "local"))
    validate_recipe(
        recipe("--context_parallel_size", "2", "--transformer_impl", "transformer_engine")
    )
    # the packed span of a 50-token sequence under CP=4 is 56 tokens
    budget = ["--max_prompt_length", "30", "--max_completion_length", "20"]
    validate_recipe(
        recipe("--context_parallel_size", "4", *budget, "--max_tokens_per_micro_batch", "56")
    )


def test_fp8_param_gather_needs_the_distributed_optimizer(with_transformer_engine):
    with pytest.raises(ConfigError) as info:
        validate_recipe(recipe("--fp8", "e4m3", "--fp8_param_gather"))
    assert info.value.errors == [
        "fp8_param_gather=True needs use_distributed_optimizer=True (megatron all-gathers FP8 "
        "parameters only from its distributed optimizer), got use_distributed_optimizer=False"
    ]


def test_seed_names_and_custom_functions_are_valid_reward_funcs():
    validate_recipe(recipe("--reward_funcs", "accuracy_reward,format_reward,my_pkg.rewards:fn"))


def test_valid_combinations_pass():
    validate_recipe(
        recipe(
            "--dataset_name",
            "null",
            "--dataset_mixture",
            "{datasets: [{id: a, columns: [x, y]}, {id: b, columns: [y, x]}]}",
        )
    )
    validate_recipe(
        recipe(
            "--lr_scheduler_type", "cosine_with_min_lr", "--lr_scheduler_kwargs", "{min_lr: 1e-7}"
        )
    )
    validate_recipe(
        recipe(
            "--epsilon_high",
            "0.28",
            "--delta",
            "1.5",
            "--save_steps",
            "0.1",
            "--top_k",
            "-1",
            "--reward_funcs",
            "accuracy,format,tag_count",
            "--reward_weights",
            "1,1,0.5",
        )
    )
    validate_recipe(
        recipe(
            "--tensor_model_parallel_size",
            "2",
            "--sequence_parallel",
            "--use_distributed_optimizer",
            "--overlap_grad_reduce",
            "--overlap_param_gather",
            "--recompute_granularity",
            "selective",
        )
    )


# ------------------------------------------------------------------------------------------------
# recompute: TRL's gradient_checkpointing -> megatron recompute


@pytest.mark.parametrize(
    "argv, expected",
    [
        ([], ("full", "uniform", 1)),  # TRL default gradient_checkpointing=True
        (["--gradient_checkpointing", "false"], (None, None, None)),
        (["--recompute_granularity", "selective"], ("selective", None, None)),
        (
            ["--gradient_checkpointing", "false", "--recompute_granularity", "selective"],
            ("selective", None, None),
        ),
        (["--recompute_granularity", "full"], ("full", "uniform", 1)),
        (["--recompute_method", "block", "--recompute_num_layers", "2"], ("full", "block", 2)),
        (
            [
                "--gradient_checkpointing",
                "false",
                "--recompute_granularity",
                "full",
                "--recompute_num_layers",
                "4",
            ],
            ("full", "uniform", 4),
        ),
    ],
)
def test_recompute_mapping(argv, expected):
    r = recipe(*argv)
    validate_recipe(r)
    rc = r.megatron.recompute(r.training.gradient_checkpointing)
    assert (rc.recompute_granularity, rc.recompute_method, rc.recompute_num_layers) == expected
    resolved = r.megatron.resolved(r.training.gradient_checkpointing)
    got = (resolved.recompute_granularity, resolved.recompute_method, resolved.recompute_num_layers)
    assert got == expected
    assert resolved.tensor_model_parallel_size == r.megatron.tensor_model_parallel_size


# ------------------------------------------------------------------------------------------------
# layout rules with hand-picked numbers

QWEN_1_5B = dict(num_layers=28, num_attention_heads=12, num_query_groups=2)
LLAMA_8B = dict(num_layers=32, num_attention_heads=32, num_query_groups=8)


@pytest.mark.parametrize(
    "argv, world, model, expected",
    [
        ([], 1, QWEN_1_5B, ParallelLayout(tp=1, pp=1, cp=1, dp=1, world_size=1)),
        (
            ["--tensor_model_parallel_size", "2", "--pipeline_model_parallel_size", "2"],
            8,
            QWEN_1_5B,
            ParallelLayout(tp=2, pp=2, cp=1, dp=2, world_size=8),
        ),
        (
            [
                "--tensor_model_parallel_size",
                "8",
                "--pipeline_model_parallel_size",
                "4",
                "--virtual_pipeline_model_parallel_size",
                "2",
                "--per_device_train_batch_size",
                "8",
                "--gradient_accumulation_steps",
                "4",
            ],
            64,
            LLAMA_8B,
            ParallelLayout(tp=8, pp=4, cp=1, dp=2, world_size=64),
        ),
        (
            ["--tensor_model_parallel_size", "2", "--context_parallel_size", "2"],
            16,
            LLAMA_8B,
            ParallelLayout(tp=2, pp=1, cp=2, dp=4, world_size=16),
        ),
    ],
)
def test_layout_ok(argv, world, model, expected):
    layout = validate_layout(recipe(*argv), world_size=world, **model)
    assert layout == expected
    assert layout.model_parallel_size * layout.dp == world


@pytest.mark.parametrize(
    "argv, world, model, expected",
    [
        (
            ["--tensor_model_parallel_size", "4"],
            6,
            LLAMA_8B,
            "world_size=6 must be divisible by tensor_model_parallel_size=4 x "
            "pipeline_model_parallel_size=1 x context_parallel_size=1 = 4",
        ),
        (
            [
                "--tensor_model_parallel_size",
                "2",
                "--pipeline_model_parallel_size",
                "3",
                "--context_parallel_size",
                "2",
            ],
            8,
            dict(num_layers=30, num_attention_heads=16, num_query_groups=8),
            "world_size=8 must be divisible by tensor_model_parallel_size=2 x "
            "pipeline_model_parallel_size=3 x context_parallel_size=2 = 12",
        ),
        (
            ["--tensor_model_parallel_size", "4"],
            4,
            QWEN_1_5B,
            "tensor_model_parallel_size=4 must divide num_query_groups=2",
        ),
        (
            ["--pipeline_model_parallel_size", "3"],
            3,
            QWEN_1_5B,
            "pipeline_model_parallel_size=3 must divide num_layers=28",
        ),
        (
            ["--pipeline_model_parallel_size", "2", "--virtual_pipeline_model_parallel_size", "4"],
            2,
            QWEN_1_5B,
            "pipeline_model_parallel_size=2 x virtual_pipeline_model_parallel_size=4 = 8 must "
            "divide num_layers=28",
        ),
        (
            [
                "--pipeline_model_parallel_size",
                "2",
                "--virtual_pipeline_model_parallel_size",
                "2",
                "--per_device_train_batch_size",
                "4",
                "--gradient_accumulation_steps",
                "3",
                "--num_generations",
                "4",
            ],
            2,
            QWEN_1_5B,
            "micro_batch_size=4 = 3, to be a multiple of pipeline_model_parallel_size=2",
        ),
        (
            ["--per_device_train_batch_size", "6", "--num_generations", "4"],
            2,
            QWEN_1_5B,
            "per_device_train_batch_size=6 x gradient_accumulation_steps=1 x DP=2 = 12 completions "
            "must be divisible by num_generations=4 x DP=2 = 8",
        ),
        (
            [
                "--per_device_train_batch_size",
                "4",
                "--gradient_accumulation_steps",
                "3",
                "--num_generations",
                "8",
            ],
            4,
            QWEN_1_5B,
            "= 48 completions must be divisible by num_generations=8 x DP=4 = 32",
        ),
        (
            ["--sequence_parallel"],
            2,
            QWEN_1_5B,
            "sequence_parallel=True needs tensor_model_parallel_size > 1",
        ),
        (
            ["--pipeline_model_parallel_size", "4", "--recompute_num_layers", "8"],
            4,
            QWEN_1_5B,
            "recompute_num_layers=8 must be <= the layers of one model chunk, num_layers=28 / "
            "(pipeline_model_parallel_size=4) = 7",
        ),
    ],
)
def test_each_layout_rule(argv, world, model, expected):
    with pytest.raises(ConfigError) as info:
        validate_layout(recipe(*argv), world_size=world, **model)
    assert len(info.value.errors) == 1, info.value.errors
    assert expected in str(info.value)


def test_tp_not_dividing_the_heads_names_heads_and_groups():
    # The query groups divide the heads, so a TP size that misses the heads misses both.
    with pytest.raises(ConfigError) as info:
        validate_layout(
            recipe("--tensor_model_parallel_size", "3"),
            world_size=3,
            num_layers=24,
            num_attention_heads=16,
            num_query_groups=4,
        )
    assert info.value.errors == [
        "tensor_model_parallel_size=3 must divide num_attention_heads=16: each TP rank holds "
        "whole attention heads",
        "tensor_model_parallel_size=3 must divide num_query_groups=4: each TP rank holds whole "
        "KV groups",
    ]


def test_layout_reports_every_broken_rule():
    with pytest.raises(ConfigError) as info:
        validate_layout(
            recipe(
                "--tensor_model_parallel_size",
                "5",
                "--pipeline_model_parallel_size",
                "3",
                "--num_generations",
                "3",
            ),
            world_size=16,
            **QWEN_1_5B,
        )
    text = str(info.value)
    for fragment in (
        "world_size=16",
        "num_attention_heads=12",
        "num_query_groups=2",
        "num_layers=28",
        "num_generations=3",
    ):
        assert fragment in text


def test_layout_rejects_nonpositive_sizes():
    with pytest.raises(ConfigError, match="world_size=0"):
        validate_layout(recipe(), world_size=0, **QWEN_1_5B)
