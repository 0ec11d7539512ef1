"""Recipe keys megagrpo recognises but does not use, and accepted alternative key names.

Two kinds of keys of TRL / open-r1 / transformers are recognised without being implemented:

- ``UNUSED_KEYS`` / ``UNUSED_PREFIXES``: keys that cannot change what is trained (hub, logging,
  DeepSpeed / FSDP / DDP plumbing, kernels and compilers, evaluation bookkeeping). They are
  dropped with one warning naming all such keys of a recipe, so recipes load unchanged.
- ``REFUSED_UNLESS``: keys that would change training (optimizer, data order, prompts, sampling,
  PEFT, quantisation, ...). At their default (or an equivalent value) they are dropped like the
  unused keys; any other value is an error naming the key, because ignoring it would silently
  train something else.

Anything neither here nor a config field is an error. ``tests/test_config_fields.py`` checks
every field of TRL's ``GRPOConfig``, ``ModelConfig`` and ``ScriptArguments`` against these lists.
"""

from __future__ import annotations

#: Alternative spellings -> the config field they set.
KEY_ALIASES: dict[str, str] = {
    "dtype": "torch_dtype",  # TRL's ModelConfig renamed torch_dtype to dtype
    "evaluation_strategy": "eval_strategy",  # transformers' old name
    "vllm_importance_sampling_cap": "vllm_importance_sampling_clip_max",  # TRL's old name
    "eval_num_generations": "num_generations_eval",  # megagrpo's old name
}

#: Prefixes of whole families of unused keys.
UNUSED_PREFIXES: tuple[str, ...] = (
    "hub_",  # hub_model_id, hub_strategy, hub_private_repo, hub_token, hub_model_revision, ...
    "lora_",  # PEFT
    "ddp_",  # torch DDP knobs (megatron-core does its own data parallelism)
    "fsdp",  # fsdp, fsdp_config, ...
    "dataloader_",
    "bnb_",
    "torch_compile",
    "trackio_",
)

#: Keys that would change training if honoured: key -> (accepted values, what megagrpo does).
REFUSED_UNLESS: dict[str, tuple[tuple, str]] = {
    # transformers.TrainingArguments
    "optim": (
        ("adamw_torch", "adamw_torch_fused", "adamw_hf", "adamw_apex_fused"),
        "megagrpo trains with megatron-core's AdamW (adam_beta1/2, adam_epsilon, weight_decay)",
    ),
    "optim_args": ((None, ""), "megatron-core's AdamW takes the adam_* fields"),
    "optim_target_modules": ((None,), "every parameter is trained"),
    "neftune_noise_alpha": ((None,), "no embedding noise is implemented"),
    "load_best_model_at_end": ((False,), "the final model is the last step's"),
    "ignore_data_skip": ((False,), "a resumed run always continues the prompt order"),
    "data_seed": ((None,), "the prompt order follows seed"),
    "auto_find_batch_size": ((False,), "batch sizes are fixed (and TRL refuses it for GRPO)"),
    # TRL GRPOConfig
    "model_init_kwargs": ((None, {}), "the model is built by megatron-core; use torch_dtype"),
    "router_aux_loss_coef": ((None,), "MoE load-balancing losses are not implemented"),
    "cast_lm_head_to_fp32": (
        (False,),
        "the LM head runs in the model's dtype; the kernels compute log-probs in fp32",
    ),
    "shuffle_dataset": ((True,), "prompts are always shuffled (seeded by seed)"),
    "generation_kwargs": (
        (None, {}),
        "sampling takes temperature, top_p, top_k, min_p and repetition_penalty",
    ),
    "chat_template_kwargs": ((None, {}), "the chat template gets the messages only"),
    "vllm_structured_outputs_regex": ((None,), "no constrained decoding"),
    "vllm_guided_decoding_regex": ((None,), "no constrained decoding"),
    "vllm_server_base_url": (
        (None,),
        "server addresses are vllm_server_addresses or vllm_server_host:vllm_server_port",
    ),
    "max_tool_calling_iterations": ((None,), "tool calling is not implemented"),
    # TRL ModelConfig / ScriptArguments
    "use_peft": ((False,), "megagrpo trains all weights (no LoRA)"),
    "load_in_8bit": ((False,), "no bitsandbytes quantisation"),
    "load_in_4bit": ((False,), "no bitsandbytes quantisation"),
}


def refusal(key: str, value) -> str | None:
    """Why ``key=value`` cannot be honoured (None when ``key`` is not refused or ``value`` is an
    accepted one)."""
    if key not in REFUSED_UNLESS:
        return None
    accepted, why = REFUSED_UNLESS[key]
    value = _typed(value)
    if any(value == a and type(value) is type(a) for a in accepted):
        return None
    shown = " or ".join(repr(a) for a in accepted)
    return f"{key}={value!r}: megagrpo does not implement {key} ({why}); remove it or set {shown}"


def _typed(value):
    """A command-line string as YAML reads it ("true" -> True, "3" -> 3; "None" -> None)."""
    if not isinstance(value, str):
        return value
    if value in ("None", "none"):
        return None
    import yaml

    try:
        return yaml.safe_load(value)
    except yaml.YAMLError:
        return value


#: Single unused keys, by origin; none of them changes what is trained.
UNUSED_KEYS: frozenset[str] = frozenset(
    # transformers.TrainingArguments: plumbing, logging, saving, evaluation bookkeeping, kernels
    """
    deepspeed push_to_hub overwrite_output_dir do_train do_eval do_predict logging_strategy
    logging_dir logging_nan_inf_filter log_level_replica log_on_each_node save_on_each_node
    save_only_model save_safetensors restore_callback_states_from_checkpoint
    gradient_checkpointing_kwargs activation_checkpointing activation_checkpointing_kwargs
    use_liger_kernel liger_kernel_config tf32 use_cpu local_rank accelerator_config
    parallelism_config full_determinism disable_tqdm debug skip_memory_metrics
    prediction_loss_only eval_accumulation_steps eval_delay eval_on_start eval_do_concat_batches
    eval_use_gather_object batch_eval_metrics include_for_metrics include_num_input_tokens_seen
    metric_for_best_model greater_is_better label_names label_smoothing_factor
    length_column_name group_by_length average_tokens_across_devices torch_empty_cache_steps
    bf16_full_eval fp16_full_eval fp16_opt_level half_precision_backend jit_mode_eval use_ipex
    past_index project train_sampling_strategy use_cache enable_jit_checkpoint
    remove_unused_columns
    """.split()
    # TRL GRPOConfig (disable_dropout: megagrpo's models have no dropout anyway)
    + """
    disable_dropout use_liger_loss ds3_gather_for_generation pad_to_multiple_of
    cache_implementation vllm_model_impl vllm_group_port vllm_device vllm_dtype
    log_multimodal log_unique_prompts log_completions_hub_repo
    use_transformers_continuous_batching transformers_continuous_batching_config
    use_transformers_paged
    """.split()
    # TRL ModelConfig / ScriptArguments (meaningful only with use_peft / load_in_*bit, refused)
    + """
    use_rslora use_dora use_bnb_nested_quant ignore_bias_buffers
    gradient_checkpointing_use_reentrant
    """.split()
    # open-r1 additions
    + """
    benchmarks callbacks push_to_hub_revision overwrite_hub_revision wandb_log_unique_prompts
    parallel_code_exec_per_proc e2b_router_url morph_router_url ioi_provider
    """.split()
    # (parallel_code_exec_per_proc: concurrency of E2B calls; the local sandbox runs
    # num_reward_workers x code_eval_test_batch_size programs at once. The router URLs and
    # ioi_provider serve code_provider e2b / morph and ioi_code, which are refused.)
)


#: Fields of the recipe dataclasses that nothing reads, and why. A recipe that sets one gets the
#: same warning as the unused keys (tests/test_config_fields.py keeps this list exact: every other
#: field is read outside ``megagrpo/config``).
UNREAD_FIELDS: dict[str, str] = {
    "attn_implementation": "megatron-core, the embedded engine's decoder and vLLM each choose "
    "their own attention kernels",
    "per_device_eval_batch_size": "evaluation sends the whole test split to the engines at once; "
    "they batch internally (rollout_max_batch_size, vLLM's max_num_seqs)",
}


def is_known_unused(key: str) -> bool:
    """True when ``key`` is a recognised key that megagrpo ignores (refused keys included: at an
    accepted value they are ignored too, see :func:`refusal`)."""
    return key in UNUSED_KEYS or key in REFUSED_UNLESS or key.startswith(UNUSED_PREFIXES)
