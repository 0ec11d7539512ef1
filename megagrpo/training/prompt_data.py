"""The run's prompts (global rank 0): load, format, tokenize, and the per-step sampler.

Dataset preparation as in open-r1's grpo.py: the dataset (``dataset_name`` or
``dataset_mixture``) is loaded with HF ``datasets``, each row becomes the ``<think>/<answer>``
conversation with the system prompt, columns the rewards do not read are dropped, and prompts are
tokenized with the chat template; prompts over ``max_prompt_length`` are skipped and counted (or
raise).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from megagrpo.data.prompts import PromptFormat, format_conversations, tokenize_prompts
from megagrpo.data.sampler import PromptSampler
from megagrpo.data.sources import load_mixture, load_source


@dataclass
class PromptData:
    train: Any
    test: Any | None
    sampler: PromptSampler
    prompts_per_step: int
    total_steps: int
    reward_columns: dict[str, str]
    """Name a reward function reads (``solution``) -> the dataset column holding it."""
    skipped_long_prompts: int


def load_prompt_data(recipe, tokenizer, *, dp_size: int) -> PromptData:
    s, t = recipe.script, recipe.training
    if s.dataset_mixture is not None:
        splits = load_mixture(s.dataset_mixture)
        train_raw, test_raw = splits["train"], splits.get("test")
    else:
        train_raw = load_source(s.dataset_name, s.dataset_config, s.dataset_train_split)
        test_raw = None
        if t.eval_strategy != "no":
            test_raw = load_source(s.dataset_name, s.dataset_config, s.dataset_test_split)
    reward_columns = {"solution": s.dataset_solution_column} if s.dataset_solution_column else {}
    fmt = PromptFormat(
        prompt_column=s.dataset_prompt_column,
        system_prompt=t.system_prompt,
        reward_columns=list(reward_columns.values()),
        max_prompt_length=t.max_prompt_length,
        long_prompts=t.long_prompts,
    )
    name = s.dataset_name or "dataset_mixture"
    train = tokenize_prompts(
        format_conversations(train_raw, fmt, name=name),
        tokenizer,
        fmt,
        chat_template=t.chat_template,
        name=name,
    )
    test = None
    if test_raw is not None:
        test = tokenize_prompts(
            format_conversations(test_raw, fmt, name=f"{name} (test)"),
            tokenizer,
            fmt,
            chat_template=t.chat_template,
            name=f"{name} (test)",
        ).dataset
        if t.eval_max_prompts:
            test = test.select(range(min(t.eval_max_prompts, len(test))))
    completions = t.per_device_train_batch_size * t.gradient_accumulation_steps * dp_size
    prompts_per_step = completions // t.num_generations
    sampler = PromptSampler(len(train.dataset), prompts_per_step, seed=t.seed)
    return PromptData(
        train=train.dataset,
        test=test,
        sampler=sampler,
        prompts_per_step=prompts_per_step,
        total_steps=steps_for(len(train.dataset), prompts_per_step, t),
        reward_columns=reward_columns,
        skipped_long_prompts=train.skipped,
    )


def steps_for(num_prompts: int, prompts_per_step: int, training) -> int:
    """Generation steps of the run: max_steps, else num_train_epochs over the prompts."""
    if training.max_steps and training.max_steps > 0:
        return training.max_steps
    return max(1, math.ceil(training.num_train_epochs * (num_prompts // prompts_per_step)))
