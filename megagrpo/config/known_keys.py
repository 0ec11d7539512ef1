"""Recipe keys megagrpo recognises but does not use, and accepted alternative key names.

A key listed here (or starting with one of the prefixes) is dropped with one warning naming all
such keys of a recipe, so TRL / open-r1 / transformers recipes load unchanged. Anything neither
here nor a config field is an error.
"""

from __future__ import annotations

#: Alternative spellings -> the config field they set.
KEY_ALIASES: dict[str, str] = {
    "dtype": "torch_dtype",  # TRL's ModelConfig renamed torch_dtype to dtype
    "evaluation_strategy": "eval_strategy",  # transformers' old name
    "vllm_importance_sampling_clip_max": "vllm_importance_sampling_cap",  # TRL's new name
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
    "code_",  # open-r1's code rewards (code_language, code_eval_*, code_provider)
    "trackio_",
)

#: Single unused keys, by origin.
UNUSED_KEYS: frozenset[str] = frozenset(
    # transformers.TrainingArguments
    """
    deepspeed push_to_hub overwrite_output_dir do_train do_eval do_predict logging_strategy
    logging_dir logging_nan_inf_filter log_level_replica log_on_each_node save_on_each_node
    save_only_model save_safetensors restore_callback_states_from_checkpoint
    gradient_checkpointing_kwargs activation_checkpointing activation_checkpointing_kwargs
    use_liger_kernel liger_kernel_config optim optim_args optim_target_modules tf32 use_cpu
    local_rank accelerator_config parallelism_config auto_find_batch_size full_determinism data_seed
    disable_tqdm debug skip_memory_metrics prediction_loss_only eval_accumulation_steps eval_delay
    eval_on_start eval_do_concat_batches eval_use_gather_object batch_eval_metrics
    include_for_metrics include_num_input_tokens_seen load_best_model_at_end metric_for_best_model
    greater_is_better ignore_data_skip label_names label_smoothing_factor length_column_name
    group_by_length neftune_noise_alpha average_tokens_across_devices torch_empty_cache_steps
    bf16_full_eval fp16_full_eval fp16_opt_level half_precision_backend jit_mode_eval use_ipex
    past_index project train_sampling_strategy use_cache enable_jit_checkpoint
    remove_unused_columns
    """.split()
    # TRL GRPOConfig
    + """
    model_init_kwargs router_aux_loss_coef disable_dropout cast_lm_head_to_fp32 use_liger_loss
    ds3_gather_for_generation shuffle_dataset pad_to_multiple_of
    generation_kwargs chat_template_kwargs
    cache_implementation vllm_model_impl vllm_structured_outputs_regex vllm_guided_decoding_regex
    vllm_server_base_url vllm_group_port vllm_device vllm_dtype
    sapo_temperature_neg sapo_temperature_pos vespo_k_pos vespo_lambda_pos vespo_k_neg
    vespo_lambda_neg top_entropy_quantile entropy_coef use_adaptive_entropy entropy_coef_min
    entropy_coef_max entropy_coef_delta entropy_target max_tool_calling_iterations
    vllm_importance_sampling_mode vllm_importance_sampling_clip_min off_policy_mask_threshold
    use_bias_correction_kl log_multimodal log_unique_prompts log_completions_hub_repo
    use_transformers_continuous_batching transformers_continuous_batching_config
    use_transformers_paged
    """.split()
    # TRL ModelConfig / ScriptArguments (PEFT, quantisation, misc)
    + """
    use_peft use_rslora use_dora load_in_4bit load_in_8bit use_bnb_nested_quant
    dataset_streaming ignore_bias_buffers gradient_checkpointing_use_reentrant
    """.split()
    # open-r1 additions
    + """
    benchmarks callbacks push_to_hub_revision overwrite_hub_revision wandb_log_unique_prompts
    parallel_code_exec_per_proc e2b_router_url morph_router_url ioi_provider
    """.split()
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
    """True when ``key`` is a recognised key that megagrpo ignores."""
    return key in UNUSED_KEYS or key.startswith(UNUSED_PREFIXES)
