"""The GRPO training loop and its monitoring (what TRL's GRPOTrainer.train does for open-r1).

Each generation batch: rollout -> rewards -> advantages (rank 0, broadcast) -> this rank's share,
split into optimizer-step batches (``generation_steps``) of micro-batches -> old / reference
log-probs -> its optimizer steps through megatron's schedules (TR-DPO reference syncs between
them) -> weight sync to the rollout engines -> evaluation and checkpoint when due. Every optimizer
step logs its metrics.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import replace

import torch
import torch.distributed as dist

from megagrpo.algorithms.loss_aggregation import BatchContext, TokenWeighted
from megagrpo.data.errors import DataError
from megagrpo.distributed.context_parallel import chunk_multiple
from megagrpo.monitoring.progress import StepProgress
from megagrpo.rollout.weight_sync import sync_weights_from_megatron
from megagrpo.training.batch import make_micro_batches, sequence_length_multiple
from megagrpo.training.checkpoint import TrainerState, save_checkpoint
from megagrpo.training.generation_steps import split_generation
from megagrpo.training.logprob_pass import fill_logprobs
from megagrpo.training.optimizer import finish_param_gather, set_learning_rate
from megagrpo.training.policy_update import grpo_update, reduce_metrics
from megagrpo.training.rollout_step import broadcast_step, local_batch, rank_share
from megagrpo.training.token_budget import token_budget_micro_batches


def train(run) -> list[dict]:
    """Run the optimizer steps from run.start_step to run.total_steps, a generation batch at a
    time; returns the logged metrics (one record per optimizer step)."""
    t = run.recipe.training
    plan = run.generation
    first, total = plan.generation_of(run.start_step), plan.generations(run.total_steps)
    if run.start_step > 0:  # a resumed policy: the engines still hold the initial weights
        push_weights(run, version=run.start_step, direct=True)
    if run.rollout is not None:
        run.rollout.start(first, total)
    if t.eval_strategy != "no" and run.start_step == 0:  # the starting point, as step 0
        from megagrpo.training.evaluation import evaluate

        metrics = evaluate(run)
        if run.groups.rank == 0:
            run.logger.log(0, metrics)
    history = []
    progress = StepProgress(run.total_steps, run.start_step, enabled=run.groups.rank == 0)
    try:
        for generation in range(first, total):
            history += train_generation(run, generation, progress)
        export_final_model(run)
    finally:
        if run.rollout is not None:
            run.rollout.close()
        progress.close()
        run.logger.close()
    return history


def _rank_step_data(run, generation: int):
    """This rank's part of the batch (the StepData on rank 0, None on ranks without a rollout),
    or the DataError a bad row raised while streaming, for ``broadcast_step`` to raise on every
    rank."""
    if run.rollout is None:
        return None
    try:
        return run.rollout.step_data(generation)
    except DataError as e:
        return e


def train_generation(run, generation: int, progress) -> list[dict]:
    """Generate and score one batch, then train its optimizer steps; returns their metrics."""
    t = run.recipe.training
    steps = run.generation.steps_of(generation, run.total_steps)
    timer = StepTimer(progress)
    with timer("rollout"):
        data = broadcast_step(_rank_step_data(run, generation), run.groups)
    parts = step_micro_batches(run, data, generation)
    ctx = batch_context(
        [mb for mbs in parts for mb in mbs],
        run.groups,
        run.device,
        t.max_completion_length,
        steps=len(parts),
    )
    loss_type = run.loss_type if run.token_budget is None else TokenWeighted()
    with timer("logprobs"):
        if run.needs_old_logprobs:
            for mbs in parts:
                fill_logprobs(
                    run.policy, mbs, run.groups, temperature=t.temperature, field="old_logp_bl"
                )
        if run.reference is not None:
            run.reference.fill_parts(parts, run.groups, temperature=t.temperature)
        if run.importance_sampling is not None:
            # the old log-probs are on the last pipeline stage, where the loss is computed
            for mb in (mb for mbs in parts for mb in mbs if mb.old_logp_bl is not None):
                mb.is_weight_bl = run.importance_sampling.weights(
                    mb.old_logp_bl, mb.sampler_logp_bl, mb.mask_bl
                )
    history = []
    for step in steps:
        with timer("update"):
            mbs = parts[run.generation.part_of(step)]
            if run.token_budget is not None:  # this rank's micro-batches of this step
                ctx = replace(ctx, num_microbatches=len(mbs))
            update = optimizer_step(run, mbs, ctx, step, loss_type)
        sync_reference(run, step + 1)
        ends_generation = step == steps[-1]
        if ends_generation:
            with timer("weight_sync"):
                push_weights(run, version=step + 1)
        metrics = {**data.metrics, **update, **timer.metrics(), "step": step + 1}
        history.append(metrics)
        after_step(run, step + 1, data, metrics, steps if ends_generation else None)
        progress.step_done(metrics)
        timer = StepTimer(progress)
    return history


def step_micro_batches(run, data, generation: int) -> list[list]:
    """This rank's share of the generation batch as one list of micro-batches per optimizer-step
    batch (``generation_steps.split_generation``), on the device."""
    t = run.recipe.training
    length_multiple = sequence_length_multiple(
        fp8=run.recipe.megatron.fp8 is not None,
        sequence_parallel=run.recipe.megatron.sequence_parallel,
        tp_size=run.groups.tp_size,
        cp_size=run.groups.cp_size,
    )
    if run.token_budget is not None:
        g = run.groups
        shares = [rank_share(data, r, g.dp_size, t.num_generations) for r in range(g.dp_size)]
        parts = token_budget_micro_batches(
            shares,
            g.dp_rank,
            run.token_budget,
            run.loss_type,
            parts=run.generation.parts,
            seed=t.seed,
            generation=generation,
            max_completion_length=t.max_completion_length,
            pad_token_id=run.tokenizer.pad_token_id or 0,
            mask_truncated_completions=t.mask_truncated_completions,
            length_multiple=length_multiple,
            sequence_multiple=chunk_multiple(g.cp_size),
        )
        return [[mb.to(run.device) for mb in mbs] for mbs in parts]
    share = local_batch(data, run.groups, t.num_generations)
    split = split_generation(
        share, run.generation.parts, seed=t.seed, generation=generation, dp_rank=run.groups.dp_rank
    )
    return [
        [
            mb.to(run.device)
            for mb in make_micro_batches(
                part,
                run.micro_batch_size,
                pad_token_id=run.tokenizer.pad_token_id or 0,
                mask_truncated_completions=t.mask_truncated_completions,
                length_multiple=length_multiple,
            )
        ]
        for part in split
    ]


def batch_context(mbs, groups, device, max_completion_length: int, steps: int = 1) -> BatchContext:
    """The loss types' context of one optimizer step. ``mbs``: this rank's micro-batches of the
    whole generation batch, trained as ``steps`` optimizer-step batches. DAPO's normaliser is the
    generation batch's completion tokens over all DP ranks divided by ``steps`` (TRL rescales
    ``num_items_in_batch`` by gradient_accumulation_steps / steps_per_generation the same way)."""
    tokens = torch.tensor(
        [float(sum(mb.num_tokens for mb in mbs))], dtype=torch.float64, device=device
    )
    if groups.dp_size > 1:
        dist.all_reduce(tokens, group=groups.dp)
    return BatchContext(
        num_microbatches=len(mbs) // steps,
        dp_size=groups.dp_size,
        max_completion_length=max_completion_length,
        global_num_tokens=tokens.item() / steps,
    )


def sync_reference(run, step: int) -> None:
    """TR-DPO (sync_ref_model): after every ref_model_sync_steps-th optimizer step the reference
    moves towards the policy (TRL's SyncRefModelCallback.on_step_end)."""
    t = run.recipe.training
    if run.reference is None or not t.sync_ref_model or step % t.ref_model_sync_steps:
        return
    run.reference.mix_in(run.modules, t.ref_model_mixup_alpha)


def optimizer_step(
    run, mbs, ctx: BatchContext, update_index: int, loss_type=None
) -> dict[str, float]:
    """One optimizer step over ``mbs``; ``loss_type`` defaults to the run's."""
    loss_type = run.loss_type if loss_type is None else loss_type
    for m in run.policy:
        m.zero_grad_buffer()
    run.optimizer.zero_grad()
    bonus = run.entropy_bonus
    coef = bonus.applied_coef() if bonus is not None else 0.0
    sums = grpo_update(run.policy, mbs, run.groups, run.loss_spec, loss_type, ctx, coef)
    lr = run.schedule.lr(update_index)
    metrics = reduce_metrics(
        sums, run.groups, ctx.num_microbatches, loss_type, run.loss_spec.objective
    )
    if bonus is not None:  # every rank: the same reduced metrics, so the same coefficient
        bonus.step_done(metrics["entropy/trained"])
        metrics["entropy_coef"] = bonus.coef  # TRL's: the coefficient for the next step
    if gradients_are_finite(run.policy, run.groups, run.device):
        set_learning_rate(run.optimizer, lr, run.recipe.training.weight_decay)
        ok, grad_norm, _ = run.optimizer.step()
        finish_param_gather(run.policy)  # weight push, save, eval and export read them next
    else:  # a NaN / Inf loss or gradient anywhere: no rank applies this update
        ok, grad_norm = False, float("nan")
        if run.groups.rank == 0:
            print(f"update {update_index + 1}: non-finite gradients, update skipped", flush=True)
    metrics.update(
        learning_rate=lr, grad_norm=float(grad_norm or 0.0), update_skipped=float(not ok)
    )
    return metrics


def gradients_are_finite(policy, groups, device) -> bool:
    """Whether every gradient of the (DDP-wrapped) ``policy`` on every rank is finite: one fused
    device-side check over all ``main_grad`` buffers, one MAX all-reduce over the world, one
    device-to-host copy."""
    grads = [
        p.main_grad
        for m in policy
        for p in m.parameters()
        if getattr(p, "main_grad", None) is not None
    ]
    bad = torch.zeros(1, device=device)
    if grads:
        # The multi-tensor kernel megatron's fp16 optimizer and torch's GradScaler use: sets
        # ``bad`` to 1 if any element is NaN or +-Inf; multiplying by 1.0 leaves the grads as
        # they are.
        torch._amp_foreach_non_finite_check_and_unscale_(grads, bad, torch.ones_like(bad))
    if groups.world_size > 1:
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return bad.item() == 0


def push_weights(run, *, version: int, direct: bool = False) -> None:
    """Megatron weights -> HF names -> the rollout engines (every rank takes part)."""
    target = None
    if run.rollout is not None:
        target = run.rollout.engine if direct else run.rollout.weight_target()
    sync_weights_from_megatron(run.modules, run.arch, run.groups, target, version)


def after_step(run, step: int, data, metrics: dict, generation_steps: range | None) -> None:
    """Logging and completion tables after an optimizer step; evaluation and checkpoints after
    the last step of a generation batch (``generation_steps``, 0-based; None before), when one of
    its steps made them due."""
    t = run.recipe.training
    span = (run.total_steps, run.steps_per_epoch)
    evaluated = _due_in(generation_steps, t.eval_strategy, t.eval_steps or t.logging_steps, *span)
    if evaluated:
        from megagrpo.training.evaluation import evaluate

        metrics.update(evaluate(run) or {})
    first = step == 1 and t.logging_first_step
    if run.groups.rank == 0 and (_due(step, "steps", t.logging_steps, *span) or first or evaluated):
        run.logger.log(step, metrics)
        if t.log_completions:
            from megagrpo.monitoring.completions_table import write_completions_table

            write_completions_table(
                t.output_dir,
                step,
                data.texts["prompts"],
                data.texts["completions"],
                {n: data.rewards_nk[:, k].tolist() for k, n in enumerate(data.reward_names)},
                data.rewards_n.tolist(),
                data.advantages_n.tolist(),
                data.finish_reasons,
            )
            if t.num_completions_to_print != 0:
                from megagrpo.monitoring.completions_table import print_completions

                print_completions(
                    step,
                    data.texts["prompts"],
                    data.texts["completions"],
                    data.rewards_n.tolist(),
                    data.advantages_n.tolist(),
                    t.num_completions_to_print,
                )
    if _due_in(generation_steps, t.save_strategy, t.save_steps, *span):
        save_checkpoint(
            t.output_dir,
            TrainerState(
                step=step,
                sampler=run.data.position(run.generation.generation_of(step)) if run.data else {},
                layout=_layout(run.groups),
                metrics=metrics,
                extra={"entropy_bonus": run.entropy_bonus.state_dict()}
                if run.entropy_bonus is not None
                else {},
            ),
            run.modules,
            run.optimizer,
            run.arch,
            run.groups,
            save_total_limit=t.save_total_limit,
            hf_source_dir=run.model_dir,
            distributed_optimizer=run.recipe.megatron.use_distributed_optimizer
            and torch.cuda.is_available(),
            reference_chunks=run.reference.chunks
            if run.reference is not None and run.reference.synced
            else None,
        )


def export_final_model(run) -> str:
    """The trained policy as a Hugging Face checkpoint in ``<output_dir>/final_model``."""
    import os
    import shutil

    from megagrpo.conversion.convert import megatron_to_hf
    from megagrpo.conversion.hf_weights import save_megatron_shards
    from megagrpo.conversion.megatron_format import HF_FILES_DIR, copy_side_files

    out = run.recipe.training.output_dir
    shards = os.path.join(out, ".final_megatron")
    final = os.path.join(out, "final_model")
    save_megatron_shards(run.modules, shards, run.arch, run.groups)
    if dist.is_initialized():
        dist.barrier()
    if run.groups.rank == 0:
        copy_side_files(run.model_dir, os.path.join(shards, HF_FILES_DIR))
        shutil.rmtree(final, ignore_errors=True)
        megatron_to_hf(shards, final)
        shutil.rmtree(shards)
    if dist.is_initialized():
        dist.barrier()
    return final


def _due(step: int, strategy: str, every, total_steps: int, steps_per_epoch: int) -> bool:
    """Whether an event with HF's strategy ("no" / "steps" / "epoch") happens after ``step``;
    "steps" and "epoch" events also happen at the last step."""
    if strategy == "no":
        return False
    if step == total_steps:
        return True
    if strategy == "epoch":
        return step % steps_per_epoch == 0
    return step % _every(every, total_steps) == 0


def _due_in(steps: range | None, strategy: str, every, total_steps, steps_per_epoch) -> bool:
    """Whether an event falls due at any of the (0-based) optimizer ``steps``."""
    return steps is not None and any(
        _due(s + 1, strategy, every, total_steps, steps_per_epoch) for s in steps
    )


def _every(value, total: int) -> int:
    """Steps between events: a whole number, or a fraction of the run (HF's convention)."""
    return max(1, round(value * total) if value < 1 else int(value))


def _layout(g) -> dict:
    return {"tp": g.tp_size, "pp": g.pp_size, "vpp": g.vpp_size, "cp": g.cp_size, "dp": g.dp_size}


class StepTimer:
    """Wall-clock time of the phases of a step (TRL-style ``time/<phase>`` metrics), shown on
    the progress bar as they start."""

    def __init__(self, progress=None):
        self.start = time.perf_counter()
        self.times: dict[str, float] = {}
        self.progress = progress

    @contextmanager
    def __call__(self, name: str):
        if self.progress is not None:
            self.progress.phase(name)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - t0

    def metrics(self) -> dict[str, float]:
        out = {f"time/{k}": v for k, v in self.times.items()}
        out["step_time"] = time.perf_counter() - self.start
        return out
