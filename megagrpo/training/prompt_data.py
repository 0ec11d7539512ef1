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

from megagrpo.data.errors import DataError
from megagrpo.data.prompts import (
    PromptFormat,
    chat_template_of,
    check_columns,
    prepare_row,
    prepare_source,
)
from megagrpo.data.rows import REASONS, SkippedRows
from megagrpo.data.sampler import PromptSampler
from megagrpo.data.sources import load_mixture, open_source
from megagrpo.data.stream_sampler import PromptStream, take_in_order
from megagrpo.data.stream_sources import open_member, open_members
from megagrpo.rewards.registry import reads_solution, reads_verification_info
from megagrpo.training.generation_steps import GenerationSchedule


@dataclass
class PromptData:
    train: Any
    test: Any | None
    sampler: PromptSampler | PromptStream
    """Draws each generation batch's prompts (its "steps" are generation batches)."""
    prompts_per_step: int
    """Prompts per generation batch, over all data-parallel ranks."""
    total_steps: int
    """Optimizer steps of the run (TRL's count, see ``generation_steps``)."""
    steps_per_epoch: int
    """Optimizer steps per pass over the prompts."""
    reward_columns: dict[str, str]
    """Name a reward function reads (``solution``) -> the dataset column holding it."""
    skipped: SkippedRows
    """Rows dropped from the train and test prompts (bad rows, too-long prompts), per reason
    (streaming: the test split's; the train split's are counted by ``stream`` as it reads)."""
    stream: PromptStream | None = None
    """``dataset_streaming``: the sampler, which reads the prompts as the steps take them."""

    @property
    def skipped_long_prompts(self) -> int:
        return self.skipped.counts.get("prompt_too_long", 0)

    def position(self, generation: int) -> dict:
        """The data position before generation batch ``generation``, for the checkpoint
        (streaming only: otherwise the position is a function of the step)."""
        return self.stream.state_before(generation) if self.stream is not None else {}

    def resume(self, position: dict, generation: int) -> None:
        """Continue from a checkpoint's ``position`` before generation batch ``generation``."""
        if self.stream is None:
            return
        self.stream.load_state_dict(position)
        if position["step"] != generation:
            raise ValueError(
                f"the checkpoint's data position is before generation batch {position['step']}, "
                f"but the run resumes at generation batch {generation}"
            )

    def step_metrics(self, generation: int) -> dict:
        """Streaming: ``data/skipped_rows`` after generation batch ``generation`` (the rows
        skipped so far in the first pass), and the skip summary printed once, when the first
        pass ends. Empty otherwise (the counts are logged once, with the first record)."""
        if self.stream is None:
            return {}
        state = self.stream.state_before(generation + 1)
        counts, first = state["skipped"]["counts"], state["skipped"]["first"]
        skipped = SkippedRows(dict(counts), {k: list(v) for k, v in first.items()})
        skipped.merge(self.skipped)
        if state["epoch"] > 0 and not self._summary_printed and skipped.total:
            print(f"megagrpo: skipped {skipped.summary()} (first pass over the data)", flush=True)
            self._summary_printed = True
        return skipped.metrics()

    _summary_printed = False


def load_prompt_data(recipe, tokenizer, *, dp_size: int) -> PromptData:
    s, t = recipe.script, recipe.training
    reward_columns = {"solution": s.dataset_solution_column} if s.dataset_solution_column else {}
    row_checks = {}
    if reads_verification_info(s.reward_funcs):  # the code rewards' test cases
        from megagrpo.rewards.code_execution import COLUMN, verification_problem

        reward_columns[COLUMN] = COLUMN
        row_checks[COLUMN] = verification_problem
    fmt = PromptFormat(
        prompt_column=s.dataset_prompt_column,
        system_prompt=t.system_prompt,
        reward_columns=list(reward_columns.values()),
        max_prompt_length=t.max_prompt_length,
        long_prompts=t.long_prompts,
    )
    train_skipped, test_skipped = SkippedRows(), SkippedRows()
    evaluates = t.eval_strategy != "no"
    rewards_solution = s.dataset_solution_column if reads_solution(s.reward_funcs) else None

    def prepare(source, skipped, solution_column):
        return prepare_source(
            source,
            tokenizer,
            fmt,
            skipped,
            chat_template=t.chat_template,
            on_bad_rows=s.on_bad_rows,
            solution_column=solution_column,
            row_checks=row_checks,
        )

    schedule = GenerationSchedule.from_config(t, dp_size)
    completions = t.per_device_train_batch_size * t.steps_per_generation_for(dp_size) * dp_size
    prompts_per_step = completions // t.num_generations
    if s.dataset_streaming:
        return _streamed_prompt_data(
            recipe, tokenizer, fmt, prompts_per_step, reward_columns, row_checks
        )
    if s.dataset_mixture is not None:
        test_solution = evaluates and s.dataset_mixture.test_split_size
        solution_column = s.dataset_solution_column if test_solution else rewards_solution
        splits = load_mixture(
            s.dataset_mixture, lambda src: prepare(src, train_skipped, solution_column)
        )
        train, test = splits["train"], splits.get("test")
    else:
        src = open_source(s.dataset_name, s.dataset_config, s.dataset_train_split)
        train, test = prepare(src, train_skipped, rewards_solution), None
        if evaluates:
            src = open_source(s.dataset_name, s.dataset_config, s.dataset_test_split)
            test = prepare(src, test_skipped, s.dataset_solution_column)
    if test is not None and t.eval_max_prompts:
        test = test.select(range(min(t.eval_max_prompts, len(test))))
    if len(train) < prompts_per_step:
        raise DataError(_too_few_prompts(recipe, len(train), prompts_per_step, train_skipped))
    skipped = SkippedRows()
    skipped.merge(train_skipped)
    skipped.merge(test_skipped)
    sampler = PromptSampler(len(train), prompts_per_step, seed=t.seed)
    return PromptData(
        train=train,
        test=test,
        sampler=sampler,
        prompts_per_step=prompts_per_step,
        total_steps=steps_for(len(train), prompts_per_step, t, schedule.updates_per_generation),
        steps_per_epoch=sampler.steps_per_epoch * schedule.updates_per_generation,
        reward_columns=reward_columns,
        skipped=skipped,
    )


def _streamed_prompt_data(
    recipe, tokenizer, fmt, prompts_per_step, reward_columns, row_checks
) -> PromptData:
    """``dataset_streaming``: the members opened (no row read), the first step's prompts read and
    tokenized now (so that a bad first row or too little data stops before training), the test
    split read in file order (its first ``eval_max_prompts`` prompts)."""
    s, t = recipe.script, recipe.training
    if fmt.long_prompts not in ("skip", "error"):
        raise DataError(f"long_prompts={fmt.long_prompts!r}; expected 'skip' or 'error'")
    members = open_members(s)
    for m in members:
        check_columns(m.columns, fmt, m.name)
    template = chat_template_of(tokenizer, t.chat_template, members[0].name)
    solution = s.dataset_solution_column if reads_solution(s.reward_funcs) else None

    def prepare(row, solution_column=solution):
        return prepare_row(row, tokenizer, fmt, template, solution_column, row_checks)

    stream = PromptStream(
        members,
        prepare,
        prompts_per_step,
        seed=t.seed,
        buffer_size=s.dataset_shuffle_buffer_size,
        on_bad_rows=s.on_bad_rows,
        long_prompts=fmt.long_prompts,
        too_few=lambda kept, skipped: _too_few_prompts(recipe, kept, prompts_per_step, skipped),
    )
    stream.rows_at(0)
    test, test_skipped = None, SkippedRows()
    if t.eval_strategy != "no":
        member = open_member(s.dataset_name, s.dataset_test_split)
        check_columns(member.columns, fmt, member.name)
        test = take_in_order(
            member,
            lambda row: prepare(row, s.dataset_solution_column),
            t.eval_max_prompts or None,
            on_bad_rows=s.on_bad_rows,
            long_prompts=fmt.long_prompts,
            skipped=test_skipped,
            buffer_size=s.dataset_shuffle_buffer_size,
        )
    return PromptData(
        train=stream.rows,
        test=test,
        sampler=stream,
        prompts_per_step=prompts_per_step,
        total_steps=t.max_steps,
        steps_per_epoch=0,  # unknown before a pass over the data (no "epoch" strategies)
        reward_columns=reward_columns,
        skipped=test_skipped,
        stream=stream,
    )


def steps_for(
    num_prompts: int, prompts_per_generation: int, training, updates_per_generation: int = 1
) -> int:
    """Optimizer steps of the run: max_steps, else num_train_epochs over the prompts, each
    generation batch counting ``updates_per_generation`` steps (TRL's count)."""
    if training.max_steps and training.max_steps > 0:
        return training.max_steps
    per_epoch = (num_prompts // prompts_per_generation) * updates_per_generation
    return max(1, math.ceil(training.num_train_epochs * per_epoch))


def _too_few_prompts(recipe, kept: int, needed: int, skipped: SkippedRows) -> str:
    """Why the training set is smaller than one step, and which setting to change."""
    s, t = recipe.script, recipe.training
    name = s.dataset_name or "dataset_mixture"
    text = (
        f"{name}: {kept} training prompt(s), fewer than the {needed} one generation batch needs "
        "(per_device_train_batch_size x steps_per_generation (default: "
        "gradient_accumulation_steps) x data-parallel ranks / num_generations)"
    )
    if not skipped.total:
        return text + "; use more data or lower per_device_train_batch_size"
    why = []
    for reason, n in sorted(skipped.counts.items()):
        if reason == "prompt_too_long":
            why.append(
                f"{n} longer than max_prompt_length={t.max_prompt_length} tokens (raise "
                "max_prompt_length)"
            )
        else:
            why.append(f"{n}: {REASONS.get(reason, reason)} (fix those rows)")
    return f"{text}; {skipped.total + kept} were loaded and {skipped.total} dropped: " + ", ".join(
        why
    )


def share_prompt_data(recipe, tokenizer, groups, broadcast, *, load: bool | None = None):
    """Rank 0 loads the prompts; every rank returns ``(data or None, total_steps,
    steps_per_epoch)``. A ``DataError`` on rank 0 is raised on every rank with the same message
    (the ``megagrpo`` command prints it on rank 0 only); any other failure raises on rank 0 with
    its traceback and as a RuntimeError on the others, so that no rank waits in the broadcast.
    ``broadcast(value, groups)`` sends rank 0's value to all ranks. ``load``: whether this rank
    loads the prompts too (default: rank 0 only; rank 0 always does)."""
    data, shared, failure = None, None, None
    if groups.rank == 0 or load:
        try:
            data = load_prompt_data(recipe, tokenizer, dp_size=groups.dp_size)
            shared = ("ok", data.total_steps, data.steps_per_epoch)
            if groups.rank == 0 and data.skipped.total and data.stream is None:
                print(f"megagrpo: skipped {data.skipped.summary()}", flush=True)
        except DataError as e:
            failure, shared = e, ("data_error", str(e))
        except Exception as e:  # noqa: BLE001 - re-raised below, after telling the other ranks
            failure, shared = e, ("failed", f"{type(e).__name__}: {e}")
    shared = broadcast(shared, groups)
    if failure is not None:
        raise failure
    if shared[0] == "data_error":
        raise DataError(shared[1])
    if shared[0] == "failed":
        raise RuntimeError(f"rank 0 failed while loading the prompt data: {shared[1]}")
    return data, shared[1], shared[2]
