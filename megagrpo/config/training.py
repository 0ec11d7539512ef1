"""Training settings of a GRPO run: TRL's ``GRPOConfig`` fields plus open-r1's additions.

Names and defaults are TRL's (which builds on ``transformers.TrainingArguments``) so a TRL or
open-r1 user's recipe means the same thing; every default that differs from TRL's says so in its
help. Fields of TRL / transformers that megagrpo does not implement are listed in
``megagrpo.config.known_keys`` and only warned about.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from megagrpo.config.fields import option
from megagrpo.config.script_args import R1_SYSTEM_PROMPT

#: YAML 1.1 reads an unquoted ``no`` as False; accept it for the *_strategy fields.
_NO = {False: "no"}
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_min_lr")
"""``lr_scheduler_type``'s choices (``training/lr_schedule.py`` implements them)."""
LOSS_TYPE_NAMES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo", "cispo", "sapo", "vespo")
"""``loss_type``'s choices (``algorithms/loss_aggregation.py`` aggregates them,
``algorithms/loss_variants.py`` gives their per-token objective)."""
IS_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
"""``vllm_importance_sampling_mode``'s choices (``algorithms/importance_sampling.py``)."""
SCALE_REWARDS = ("group", "batch", "none")
"""``scale_rewards``' choices (``algorithms/advantages.py`` implements them)."""
MULTI_OBJECTIVE_AGGREGATIONS = ("sum_then_normalize", "normalize_then_sum")
"""``multi_objective_aggregation``'s choices (``algorithms/advantages.py`` implements them)."""
REPORT_TO = ("wandb",)


@dataclass
class GRPOConfig:
    """Optimisation, generation, GRPO loss, rollout-engine, logging and checkpoint settings."""

    # ---- output, logging, tracking ----
    output_dir: str = option(
        "outputs",
        help="Directory for checkpoints, metrics (JSONL) and the final Hugging Face export "
        "(transformers' default is 'trainer_output').",
    )
    run_name: str | None = option(None, help="Run name for wandb; None lets wandb pick one.")
    seed: int = option(42, help="Random seed of data order, sampling and initialisation.")
    logging_steps: int | float = option(
        10,
        help="Log every this many optimizer steps; a value below 1 is a fraction of the total "
        "steps (TRL's default, transformers' is 500).",
    )
    logging_first_step: bool = option(False, help="Also log the first optimizer step.")
    log_level: Literal["debug", "info", "warning", "error", "critical", "passive"] = option(
        "passive",
        help="Level of the transformers, datasets, vLLM, megatron and torch loggers on global "
        "rank 0; 'passive' leaves each library's own.",
    )
    report_to: list[str] = option(
        [],
        help="Trackers besides stdout and the JSONL metrics file (always written, so 'jsonl' "
        "is accepted and dropped): 'wandb', or 'none' / [] for none; 'all' means every tracker "
        "megagrpo has (wandb). TRL's default is 'none'.",
    )
    wandb_entity: str | None = option(None, help="wandb entity (team or user) of the run.")
    wandb_project: str | None = option(None, help="wandb project of the run.")
    wandb_run_group: str | None = option(None, help="wandb group of the run.")
    log_completions: bool = option(
        False, help="Log a sample of (prompt, completion, rewards) every logging_steps."
    )
    num_completions_to_print: int | None = option(
        None,
        help="With log_completions: how many of a logging step's completions to print to stdout "
        "as a table; None prints all of them (TRL's default), 0 none.",
    )

    # ---- optimisation ----
    learning_rate: float = option(
        1e-6, help="Peak learning rate of AdamW (TRL's default; transformers' is 5e-5)."
    )
    lr_scheduler_type: Literal[LR_SCHEDULERS] = option(
        "linear", help="Learning-rate schedule after warm-up."
    )
    lr_scheduler_kwargs: dict[str, Any] | None = option(
        None,
        help="Schedule parameters: cosine_with_min_lr needs exactly one of min_lr (absolute) or "
        "min_lr_rate (fraction of learning_rate).",
    )
    warmup_ratio: float = option(
        0.0,
        help="Fraction of the total steps spent in linear warm-up (transformers 5 folds this into "
        "warmup_steps; megagrpo keeps open-r1's key). Set this or warmup_steps.",
    )
    warmup_steps: int = option(0, help="Number of linear warm-up steps. Set this or warmup_ratio.")
    num_train_epochs: float = option(
        3.0,
        help="Passes over the prompts; ignored when max_steps > 0. An epoch is (prompts // "
        "prompts per generation batch) generation batches, each worth steps_per_generation / "
        "gradient_accumulation_steps x num_iterations optimizer steps (TRL's count).",
    )
    max_steps: int = option(
        -1,
        help="Total optimizer steps, as TRL counts them (every update of num_iterations and of "
        "steps_per_generation counts); -1 derives them from num_train_epochs.",
    )
    per_device_train_batch_size: int = option(
        8,
        help="Completions per data-parallel rank per micro-step (TRL's meaning: completions, not "
        "prompts).",
    )
    per_device_eval_batch_size: int = option(
        8,
        help="transformers' evaluation batch. Not used: evaluation sends the whole test split to "
        "the engines, which batch internally (a recipe that sets it gets a warning).",
    )
    gradient_accumulation_steps: int = option(
        1,
        help="Micro-steps per optimizer step: an optimizer step trains on "
        "per_device_train_batch_size x gradient_accumulation_steps x DP completions (one "
        "generation batch unless steps_per_generation says otherwise).",
    )
    max_grad_norm: float = option(1.0, help="Gradient clipping norm; 0 disables clipping.")
    weight_decay: float = option(0.0, help="AdamW weight decay.")
    adam_beta1: float = option(0.9, help="AdamW beta1.")
    adam_beta2: float = option(0.999, help="AdamW beta2.")
    adam_epsilon: float = option(1e-8, help="AdamW epsilon.")
    bf16: bool | None = option(
        None, help="Train in bf16 mixed precision; None means True unless fp16 is set (TRL)."
    )
    fp16: bool = option(False, help="Train in fp16 mixed precision with loss scaling.")
    gradient_checkpointing: bool = option(
        True,
        help="Recompute activations in backward (TRL's default True). On megatron this means "
        "recompute_granularity=full, recompute_method=uniform, recompute_num_layers=1 unless the "
        "megatron recompute_* keys are set explicitly.",
    )

    # ---- generation ----
    num_generations: int = option(
        8, help="Completions sampled per prompt (the group size G); at least 2."
    )
    max_prompt_length: int | None = option(
        512,
        help="Longest prompt in tokens, chat template included; longer prompts are skipped (and "
        "counted) or raise, as long_prompts says, never cut. None: no limit. (TRL removed this "
        "key in 0.28 and used to truncate; open-r1 recipes still set it.)",
    )
    long_prompts: Literal["skip", "error"] = option(
        "skip", help="What a prompt over max_prompt_length does: skip (drop and count) or error."
    )
    max_completion_length: int = option(512, help="Maximum completion length in tokens.")
    temperature: float = option(1.0, help="Sampling temperature (> 0).")
    top_p: float = option(1.0, help="Nucleus sampling probability mass, in (0, 1].")
    top_k: int = option(0, help="Top-k sampling; 0 (or -1, vLLM's spelling) disables it.")
    min_p: float | None = option(
        None, help="Minimum token probability relative to the most likely token, in [0, 1]."
    )
    repetition_penalty: float = option(
        1.0, help="Sampling repetition penalty (> 0); 1.0 disables it."
    )
    system_prompt: str | None = option(
        R1_SYSTEM_PROMPT,
        help="System message put before every prompt; null for none. Defaults to the R1 "
        "<think>/<answer> prompt of open-r1's first grpo.py (open-r1's default is now None).",
    )
    chat_template: str | None = option(
        None, help="Jinja chat template replacing the tokenizer's; None keeps the tokenizer's."
    )

    # ---- GRPO objective ----
    beta: float = option(
        0.0,
        help="KL coefficient against the reference model; 0 skips the reference model (TRL's "
        "default; DeepSeek-R1 used 0.001).",
    )
    ref_model_offload: bool = option(
        False,
        help="Keep the frozen reference model in (pinned) CPU memory and move it to the GPU only "
        "for the reference log-prob pass (megagrpo; saves its weights' GPU memory during the "
        "update). No effect on CPU machines.",
    )
    epsilon: float = option(0.2, help="Lower clipping range of the policy ratio: 1 - epsilon.")
    epsilon_high: float | None = option(
        None,
        help="Upper clipping range 1 + epsilon_high (DAPO's clip-higher, e.g. 0.28); None uses "
        "epsilon.",
    )
    delta: float | None = option(
        None,
        help="Two-sided clipping (INTELLECT-2): ratios of negative-advantage tokens are capped at "
        "delta (> 1, best > 1 + epsilon); None disables.",
    )
    loss_type: Literal[LOSS_TYPE_NAMES] = option(
        "dapo",
        help="The loss (docs/algorithms.md): grpo (clipped ratio, mean per sequence, then over "
        "sequences), bnpo (mean over the local batch's tokens), dr_grpo (sum / (batch x "
        "max_completion_length)), dapo (mean over the global batch's tokens; TRL's default), "
        "luspo (token sum per sequence, mean over sequences), cispo (MiniMax-M1: clipped, "
        "detached ratio times log-prob; epsilon_high caps the ratio, e.g. 5.0), sapo (soft "
        "sigmoid gate instead of the clip), vespo (gamma-weighted sequence ratio).",
    )
    sapo_temperature_pos: float = option(
        1.0, help="sapo: temperature of the soft gate for positive advantages (> 0)."
    )
    sapo_temperature_neg: float = option(
        1.05, help="sapo: temperature of the soft gate for negative advantages (> 0)."
    )
    vespo_k_pos: float = option(2.0, help="vespo: shape k of the gamma weight, advantages >= 0.")
    vespo_lambda_pos: float = option(
        3.0, help="vespo: rate lambda of the gamma weight, advantages >= 0."
    )
    vespo_k_neg: float = option(3.0, help="vespo: shape k of the gamma weight, advantages < 0.")
    vespo_lambda_neg: float = option(
        2.0, help="vespo: rate lambda of the gamma weight, advantages < 0."
    )
    use_bias_correction_kl: bool = option(
        True,
        help="Multiply the per-token KL by the importance ratio pi / pi_old (DeepSeek-V3.2's "
        "unbiased KL estimate off-policy); only matters with beta > 0.",
    )
    off_policy_mask_threshold: float | None = option(
        None,
        help="DeepSeek-V3.2's off-policy sequence mask: completions with a negative advantage "
        "whose mean log-prob drift (sampler - current policy) exceeds this are left out of the "
        "policy loss; None disables.",
    )
    top_entropy_quantile: float = option(
        1.0,
        help="Train only on the tokens whose entropy is in this top quantile of the micro-batch "
        "(0.2 = the top 20%, 'Beyond the 80/20 rule'); 1.0 trains on all tokens.",
    )
    entropy_coef: float = option(
        0.0,
        help="Entropy bonus: subtract entropy_coef x the mean token entropy (over the tokens the "
        "policy loss trains on) from every micro-batch's loss; the initial value with "
        "use_adaptive_entropy.",
    )
    use_adaptive_entropy: bool = option(
        False,
        help="Adapt entropy_coef after every optimizer step: + entropy_coef_delta when the "
        "step's entropy is at or below entropy_target, - otherwise, within [entropy_coef_min, "
        "entropy_coef_max]; the bonus applies only while the entropy is at or below the target.",
    )
    entropy_coef_min: float = option(0.0, help="Lower bound of the adaptive entropy_coef.")
    entropy_coef_max: float = option(1.0, help="Upper bound of the adaptive entropy_coef.")
    entropy_coef_delta: float = option(
        0.005, help="Step of the adaptive entropy_coef per optimizer step (>= 0)."
    )
    entropy_target: float = option(
        0.2, help="Entropy (nats per token) the adaptive entropy_coef steers towards."
    )
    importance_sampling_level: Literal["token", "sequence"] = option(
        "token",
        help="Policy ratio per token, or one length-normalised ratio per sequence ('sequence' = "
        "GSPO).",
    )
    scale_rewards: Literal[SCALE_REWARDS] = option(
        "group",
        help="Divide advantages by the reward std of the group, of the whole batch, or not at all "
        "(Dr. GRPO). TRL's old booleans are accepted: true = group, false = none.",
        aliases={True: "group", False: "none", "true": "group", "false": "none"},
    )
    num_iterations: int = option(
        1,
        help="Passes over each generation batch (mu); every pass is steps_per_generation / "
        "gradient_accumulation_steps optimizer steps; > 1 needs old log-probs.",
    )
    mask_truncated_completions: bool = option(
        False, help="Leave completions cut at max_completion_length out of the loss (DAPO)."
    )
    dynamic_sampling: bool = option(
        False,
        help="DAPO's dynamic sampling: drop the groups whose rewards all agree (zero std, no "
        "learning signal) and generate groups of further prompts until the step has its batch "
        "of groups, or max_generation_rounds is reached (then it trains on the groups it has). "
        "See docs/dynamic_sampling.md.",
    )
    max_generation_rounds: int = option(
        3,
        help="With dynamic_sampling: generation rounds per step at most, the first included "
        "(verl's max_num_gen_batches); >= 1.",
    )

    # ---- rollout engines (vLLM) ----
    use_vllm: bool = option(
        False,
        help="Generate with vLLM (extra 'gpu' on CUDA machines, 'vllm-cpu' on CPUs); False uses "
        "the embedded transformers engine.",
    )
    vllm_mode: Literal["server", "colocate"] = option(
        "colocate",
        help="colocate: engines live in the trainer ranks and sleep during the update; server: "
        "engines run in their own processes / GPUs (TRL's default is colocate).",
    )
    vllm_gpu_memory_utilization: float = option(
        0.3, help="Fraction of GPU memory a colocated vLLM engine may take, in (0, 1]."
    )
    vllm_tensor_parallel_size: int = option(1, help="Tensor-parallel size of each vLLM engine.")
    vllm_server_host: str = option("0.0.0.0", help="Host of the vLLM server (server mode).")
    vllm_server_port: int = option(8000, help="Port of the vLLM server (server mode).")
    vllm_server_timeout: float = option(
        240.0,
        help="Seconds to keep trying each rollout-server until it answers (server mode); then "
        "the run stops with an error naming the address.",
    )
    vllm_enable_sleep_mode: bool = option(
        False, help="Offload a colocated engine's weights and KV cache while the trainer updates."
    )
    vllm_max_model_length: int | None = option(
        None,
        help="Context window of the engines; None derives it from the model (>= prompt + "
        "completion).",
    )
    vllm_kv_cache_memory_bytes: int | None = option(
        None,
        help="KV-cache bytes of each vLLM engine, instead of a share of vllm_gpu_memory_utilization"
        "; None: vLLM's sizing on GPUs, room for one step's sequences on CPUs (vLLM's CPU build "
        "reads the memory fraction as a share of the whole machine).",
    )
    vllm_enable_prefix_caching: bool = option(
        True,
        help="Let vLLM reuse the KV cache of a prompt across its group's completions (reset "
        "after every weight update).",
    )
    vllm_importance_sampling_correction: bool = option(
        True,
        help="Reweight the policy loss by the ratio pi_trainer_old / pi_sampler (truncated or "
        "masked, see vllm_importance_sampling_mode) to correct the sampler/trainer mismatch. "
        "megagrpo applies it with every rollout engine (TRL only with vLLM).",
    )
    vllm_importance_sampling_mode: Literal[IS_MODES] = option(
        "sequence_mask",
        help="token_truncate / token_mask: one ratio per token, clamped to / zeroed outside "
        "[clip_min, clip_max]; sequence_truncate / sequence_mask: one ratio per completion (the "
        "product of its tokens'), likewise.",
    )
    vllm_importance_sampling_clip_max: float | None = option(
        3.0,
        help="Upper bound of the sampler ratio (truncation cap or mask limit); None for none. "
        "vllm_importance_sampling_cap (TRL's old name) is accepted as an alias.",
    )
    vllm_importance_sampling_clip_min: float | None = option(
        None, help="Lower bound of the sampler ratio; None for none."
    )

    # ---- rollout engines (megagrpo) ----
    rollout_num_engines: int = option(
        0,
        help="Transformers-engine processes generating completions (use_vllm false); 0 runs the "
        "engine inside the trainer's rank 0.",
    )
    rollout_threads_per_engine: int | None = option(
        None, help="CPU threads per rollout-engine process; None splits the cores evenly."
    )
    rollout_max_batch_size: int = option(
        1024, help="Sequences the transformers engine decodes together."
    )
    vllm_server_addresses: list[str] = option(
        [],
        help="server mode: host:port of every rollout-server (several for a pool); empty uses "
        "vllm_server_host:vllm_server_port.",
    )
    weight_sync_host: str | None = option(
        None,
        help="Address at which rollout engines in other processes reach the trainer's weight-sync "
        "store; None: 127.0.0.1 when every engine runs on this machine, else torchrun's "
        "MASTER_ADDR (rank 0's node), else this machine's name.",
    )
    weight_sync_bucket_mb: int = option(
        512, help="Bucket size of the weight broadcast from the trainer to engine processes."
    )
    async_max_staleness: int = option(
        0,
        help="Generate the next batch while the policy trains on this one; a batch may lag the "
        "trained weights by at most this many generation batches (weight pushes; = optimizer "
        "steps with the default steps_per_generation and num_iterations 1; 0: synchronous). "
        "Off-policy tokens are corrected by the truncated importance weight.",
    )

    # ---- checkpoints and evaluation ----
    save_strategy: Literal["no", "steps", "epoch"] = option(
        "steps", help="When to save checkpoints.", aliases=_NO
    )
    save_steps: int | float = option(
        500,
        help="Save every this many steps (save_strategy=steps); below 1, a fraction of the total.",
    )
    save_total_limit: int | None = option(
        None, help="Keep at most this many checkpoints, deleting the oldest; None keeps all."
    )
    resume_from_checkpoint: bool | str | None = option(
        None,
        help="Checkpoint directory to resume from; true resumes from the newest checkpoint in "
        "output_dir.",
    )
    eval_strategy: Literal["no", "steps", "epoch"] = option(
        "no", help="When to evaluate on dataset_test_split.", aliases=_NO
    )
    eval_steps: int | float | None = option(
        None, help="Evaluate every this many steps (eval_strategy=steps); None uses logging_steps."
    )
    eval_max_prompts: int | None = option(
        None, help="Evaluate on at most this many test prompts (the first ones); None: all."
    )

    # ---- generation batches, evaluation samples, reference sync, reward aggregation ----
    # (TRL 1.16's names, defaults and rules; docs/config.md and training/generation_steps.py)
    steps_per_generation: int | None = option(
        None,
        help="Micro-steps (of per_device_train_batch_size completions per rank) one generation "
        "batch feeds, as in TRL: the batch is shuffled and split into steps_per_generation / "
        "gradient_accumulation_steps consecutive optimizer steps. None: "
        "gradient_accumulation_steps (one optimizer step per generation). Must be a multiple of "
        "gradient_accumulation_steps (megagrpo trains whole optimizer steps per generation). "
        "Set this or generation_batch_size.",
    )
    generation_batch_size: int | None = option(
        None,
        help="Completions per generation batch over all data-parallel ranks: "
        "per_device_train_batch_size x DP x steps_per_generation (TRL). Must be divisible by "
        "per_device_train_batch_size x DP and by num_generations. Set this or "
        "steps_per_generation.",
    )
    num_generations_eval: int | None = option(
        None,
        help="Samples per test prompt at evaluation: the k of eval/mean@k and eval/pass@k "
        "(TRL's name; megagrpo's old key eval_num_generations is accepted). None: "
        "num_generations.",
    )
    sync_ref_model: bool = option(
        False,
        help="TR-DPO: every ref_model_sync_steps optimizer steps, reference = alpha x policy + "
        "(1 - alpha) x reference (TRL's SyncRefModelCallback). Needs beta > 0. Checkpoints then "
        "hold the reference's weights too, and resuming restores them.",
    )
    ref_model_mixup_alpha: float = option(
        0.6, help="TR-DPO's alpha in [0, 1]: the policy's share of the synced reference."
    )
    ref_model_sync_steps: int = option(
        512, help="TR-DPO's tau: optimizer steps between reference syncs (sync_ref_model)."
    )
    multi_objective_aggregation: Literal[MULTI_OBJECTIVE_AGGREGATIONS] = option(
        "sum_then_normalize",
        help="How several reward functions make one advantage: sum_then_normalize (weighted sum, "
        "then scale_rewards) or normalize_then_sum (GDPO: each function's rewards normalised "
        "within its group by mean and std, the weighted sum normalised over the generation "
        "batch; needs scale_rewards='group', which it always applies).",
    )

    def steps_per_generation_for(self, dp_size: int) -> int:
        """steps_per_generation resolved as TRL's __post_init__ does, with ``dp_size`` processes
        (the layout rules check that the division is exact)."""
        if self.steps_per_generation is not None:
            return self.steps_per_generation
        if self.generation_batch_size is not None:
            step_batch = self.per_device_train_batch_size * dp_size
            return max(1, self.generation_batch_size // step_batch)
        return self.gradient_accumulation_steps

    def __post_init__(self) -> None:
        if self.bf16 is None:
            self.bf16 = not self.fp16
        if isinstance(self.report_to, str):
            self.report_to = [self.report_to]
        names: list[str] = []
        for name in self.report_to:
            expanded = (
                list(REPORT_TO) if name == "all" else [] if name in ("none", "jsonl") else [name]
            )
            names += [n for n in expanded if n not in names]
        self.report_to = names
