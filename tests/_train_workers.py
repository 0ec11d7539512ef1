"""Per-rank bodies of the multi-process training tests."""

from __future__ import annotations

import torch

from megagrpo.config import MegatronConfig
from megagrpo.conversion.hf_weights import load_hf_weights
from megagrpo.conversion.safetensors_io import SafetensorsDir
from megagrpo.distributed import init_distributed
from megagrpo.models.arch import load_arch
from megagrpo.models.builder import build_model
from megagrpo.training.checkpoint import TrainerState, load_checkpoint, save_checkpoint
from megagrpo.training.optimizer import (
    OptimizerSettings,
    build_optimizer,
    set_learning_rate,
    wrap_ddp,
)


def _setup(hf_dir, tp, pp, cp=1, sequence_parallel=False):
    par = MegatronConfig(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        context_parallel_size=cp,
        sequence_parallel=sequence_parallel,
    )
    groups = init_distributed(par, seed=11)
    arch = load_arch(hf_dir)
    chunks = build_model(arch, par, pg_collection=groups.pg_collection)
    load_hf_weights(chunks, SafetensorsDir(hf_dir), arch, groups)
    ddp = wrap_ddp(chunks, par)
    opt = build_optimizer(ddp, OptimizerSettings(learning_rate=1e-2, weight_decay=0.01), par)
    return arch, groups, chunks, ddp, opt


def _sft_step(ddp, opt, ids):
    """One next-token step (tp-only layouts: no pipeline schedule needed)."""
    for m in ddp:
        m.zero_grad_buffer()
    opt.zero_grad()
    ddp[0](ids[:, :-1], None, attention_mask=None, labels=ids[:, 1:]).mean().backward()
    ddp[0].finish_grad_sync()
    set_learning_rate(opt, 1e-2, 0.01)
    return opt.step()


def _snapshot(chunks, opt):
    params = [p.detach().clone() for c in chunks for p in c.parameters()]
    state = opt.state_dict()
    return params, state


def resume_worker(hf_dir, out_dir, tp):
    """Train 2 steps, save, train a 3rd; a fresh model loads the checkpoint and trains the
    same 3rd step: everything must match bit for bit."""
    arch, groups, chunks, ddp, opt = _setup(hf_dir, tp, 1)
    g = torch.Generator().manual_seed(5)
    batches = [torch.randint(0, 105, (2, 12), generator=g) for _ in range(3)]
    _sft_step(ddp, opt, batches[0])
    save_checkpoint(out_dir, TrainerState(step=1), chunks, opt, arch, groups, save_total_limit=2)
    _sft_step(ddp, opt, batches[1])
    path = save_checkpoint(
        out_dir,
        TrainerState(step=2, sampler={"epoch": 0, "position": 8}),
        chunks,
        opt,
        arch,
        groups,
        save_total_limit=2,
        hf_source_dir=hf_dir,
    )
    after_save = torch.rand(3)
    _sft_step(ddp, opt, batches[2])
    continued = [p.detach().clone() for c in chunks for p in c.parameters()]

    # a fresh model and optimizer, different weights (the HF ones), then resume
    arch, groups2, chunks2, ddp2, opt2 = arch, groups, *_fresh(hf_dir, arch, groups)
    state = load_checkpoint(path, chunks2, opt2, arch, groups2)
    rng_ok = torch.equal(torch.rand(3), after_save)
    _sft_step(ddp2, opt2, batches[2])
    resumed = [p.detach().clone() for c in chunks2 for p in c.parameters()]
    same = all(torch.equal(a, b) for a, b in zip(continued, resumed))
    save_checkpoint(out_dir, TrainerState(step=3), chunks2, opt2, arch, groups, save_total_limit=2)
    return {
        "state": state.sampler,
        "step": state.step,
        "rng_ok": rng_ok,
        "same": same,
        "path": path,
    }


def _fresh(hf_dir, arch, groups):
    par = MegatronConfig(tensor_model_parallel_size=groups.tp_size)
    chunks = build_model(arch, par, pg_collection=groups.pg_collection)
    load_hf_weights(chunks, SafetensorsDir(hf_dir), arch, groups)
    ddp = wrap_ddp(chunks, par)
    opt = build_optimizer(ddp, OptimizerSettings(learning_rate=1e-2, weight_decay=0.01), par)
    return chunks, ddp, opt


def update_worker(
    hf_dir, tp, pp, batch, loss_type_name, spec, need_old, entropy_coef=0.0, sampling=None
):
    """One GRPO update through megatron's schedules with the loss ``spec`` (and the sampler
    importance weight ``sampling``, an ``ImportanceSampling``); returns DP-reduced metrics and
    gradients (full tensors, re-assembled over TP) of a few parameters, from the last stage."""
    (result,) = updates_worker(
        hf_dir, tp, pp, batch, [(loss_type_name, spec, need_old, entropy_coef, sampling)]
    )
    return result


def updates_worker(hf_dir, tp, pp, batch, cases):
    """``update_worker`` for each ``(loss_type, spec, need_old, entropy_coef, sampling)`` of
    ``cases`` on one model (gradients only, no optimizer step): one launch, many updates."""
    _, groups, chunks, ddp, _ = _setup(hf_dir, tp, pp)
    return [_update(groups, chunks, ddp, batch, *case) for case in cases]


def _update(groups, chunks, ddp, batch, loss_type_name, spec, need_old, entropy_coef, sampling):
    import torch.distributed as dist

    from megagrpo.algorithms.loss_aggregation import get_loss_type
    from megagrpo.training.batch import make_micro_batches
    from megagrpo.training.logprob_pass import fill_logprobs
    from megagrpo.training.loop import batch_context
    from megagrpo.training.policy_update import grpo_update, reduce_metrics

    tp = groups.tp_size
    mbs = make_micro_batches(batch, 2, pad_token_id=0)
    ctx = batch_context(mbs, groups, torch.device("cpu"), max_completion_length=8)
    if need_old:
        fill_logprobs(ddp, mbs, groups, temperature=spec.temperature, field="old_logp_bl")
    if sampling is not None:
        for mb in mbs:
            mb.is_weight_bl = sampling.weights(mb.old_logp_bl, mb.sampler_logp_bl, mb.mask_bl)
    for m in ddp:
        m.zero_grad_buffer()
    loss_type = get_loss_type(loss_type_name)
    sums = grpo_update(ddp, mbs, groups, spec, loss_type, ctx, entropy_coef)
    for m in ddp:
        m.finish_grad_sync()
    metrics = reduce_metrics(sums, groups, len(mbs), loss_type, spec.objective)
    grads = {}
    for c in chunks:
        for name, p in c.named_parameters():
            if name.endswith(("final_layernorm.weight", "linear_proj.weight", "linear_fc2.weight")):
                g = p.main_grad.clone()
                if name.endswith(("linear_proj.weight", "linear_fc2.weight")) and tp > 1:
                    parts = [torch.empty_like(g) for _ in range(tp)]
                    dist.all_gather(parts, g, group=groups.tp)
                    g = torch.cat(parts, dim=1)
                layer = (
                    c.decoder.layers[int(name.split(".")[2])].layer_number - 1
                    if name.startswith("decoder.layers")
                    else None
                )
                grads[name if layer is None else f"{layer}:{name.split('.', 3)[3]}"] = g
    return {"metrics": metrics, "grads": grads, "pp_rank": groups.pp_rank}


# The tests' short runs of the demo recipe train from their first step: the recipe's 10% warmup
# would give the first update (of a run of up to 10 steps) a learning rate of 0.
NO_WARMUP = ["--warmup_ratio", "0"]


def demo_run_worker(demo_dir, out_dir, overrides, tp=1, pp=1):
    """Train the demo recipe (its data and warm-started model already in demo_dir)."""
    from megagrpo.demo.grpo_demo import demo_recipe_at
    from megagrpo.training import build_run, train

    parallel = ["--tensor_model_parallel_size", str(tp), "--pipeline_model_parallel_size", str(pp)]
    recipe = demo_recipe_at(
        demo_dir, out_dir, [*parallel, "--num_reward_workers", "1", *NO_WARMUP, *overrides]
    )
    run = build_run(recipe)
    history = train(run)
    return history if run.groups.rank == 0 else None


def faulty_demo_worker(demo_dir, out_dir, overrides, fault: str, at: int):
    """demo_run_worker with a fault injected: ``kill_in_update`` / ``kill_in_save`` SIGKILL this
    process during the update of step ``at`` / while checkpoint-``at`` is written (after the model
    shards and optimizer state, before the marker); ``nan_grad`` puts a NaN in a gradient of
    step ``at``."""
    import os
    import signal

    from megagrpo.training import checkpoint, loop

    if fault == "kill_in_update":
        original = loop.optimizer_step

        def optimizer_step(run, mbs, ctx, update_index, *args):
            if update_index + 1 == at:
                os.kill(os.getpid(), signal.SIGKILL)
            return original(run, mbs, ctx, update_index, *args)

        loop.optimizer_step = optimizer_step
    elif fault == "kill_in_save":
        original_save = checkpoint._save_torch

        def _save_torch(obj, path):
            if f".checkpoint-{at}.tmp" in path and "rng" in path:
                os.kill(os.getpid(), signal.SIGKILL)
            return original_save(obj, path)

        checkpoint._save_torch = _save_torch
    elif fault == "nan_grad":
        original_update = loop.grpo_update
        calls = {"n": 0}

        def grpo_update(chunks, *args, **kwargs):
            out = original_update(chunks, *args, **kwargs)
            calls["n"] += 1
            if calls["n"] == at:
                next(chunks[0].parameters()).main_grad.view(-1)[0] = float("nan")
            return out

        loop.grpo_update = grpo_update
    return demo_run_worker(demo_dir, out_dir, overrides)


def kl_recording_demo_worker(demo_dir, out_dir, overrides):
    """demo_run_worker that also recomputes, before every policy update, the k3 estimator of
    KL(policy || reference) on that update's completion tokens (times the ratio to the old
    policy with use_bias_correction_kl), with plain torch: float64
    log-softmax of the policy's logits (not the fused kernel that computes the logged ``kl``)
    against the reference log-probs the loop filled in. Returns ``(history, k3 per update)``."""
    from megagrpo.training import loop

    original_update = loop.grpo_update
    k3_per_update = []

    def grpo_update(chunks, micro_batches, groups, loss, *args, **kwargs):
        k3_sum = tokens = 0.0
        with torch.no_grad():
            for c in chunks:
                c.eval()
            for mb in micro_batches:
                logits_blv = chunks[0](mb.input_ids_bl, None, attention_mask=None)
                logp_blv = torch.log_softmax(logits_blv.double() / loss.temperature, dim=-1)
                logp_bl = logp_blv.gather(-1, mb.targets_bl.unsqueeze(-1)).squeeze(-1)
                diff_bl = mb.ref_logp_bl.double() - logp_bl
                k3_bl = torch.exp(diff_bl) - diff_bl - 1
                if loss.kl_bias_correction:  # TRL's use_bias_correction_kl: times pi / pi_old
                    k3_bl = k3_bl * torch.exp(logp_bl - mb.old_logp_bl.double())
                k3_sum += float((k3_bl * mb.mask_bl).sum())
                tokens += float(mb.mask_bl.sum())
            for c in chunks:
                c.train()
        k3_per_update.append(k3_sum / tokens)
        return original_update(chunks, micro_batches, groups, loss, *args, **kwargs)

    loop.grpo_update = grpo_update
    return demo_run_worker(demo_dir, out_dir, overrides), k3_per_update


def _policy_logp(chunks, mb, temperature):
    """float64 log-probs of ``mb``'s targets under the policy (plain torch, no kernel)."""
    logits_blv = chunks[0](mb.input_ids_bl, None, attention_mask=None)
    logp_blv = torch.log_softmax(logits_blv.double() / temperature, dim=-1)
    return logp_blv.gather(-1, mb.targets_bl.unsqueeze(-1)).squeeze(-1)


def generation_recording_demo_worker(demo_dir, out_dir, overrides):
    """demo_run_worker that records every generation batch (its prompt rows, rewards [N, K],
    weights and advantages) and, before every policy update, what the update trains on: its
    completions' advantages, its token count, the loss context, and the largest gap between the
    policy's log-probs and the old log-probs the loop filled in (None when none were).
    Returns ``(history, {"generations": [...], "updates": [...]})``."""
    from megagrpo.training import loop

    record = {"generations": [], "updates": []}
    original_broadcast, original_update = loop.broadcast_step, loop.grpo_update

    def broadcast_step(data, groups):
        out = original_broadcast(data, groups)
        record["generations"].append(
            {
                "rows": list(out.prompt_rows),
                "rewards_nk": out.rewards_nk.clone(),
                "advantages_n": out.advantages_n.clone(),
                "completion_ids": [list(c) for c in out.completion_ids],
            }
        )
        return out

    def grpo_update(chunks, micro_batches, groups, loss, loss_type, ctx, *args):
        gap = None
        with torch.no_grad():
            for c in chunks:
                c.eval()
            if micro_batches[0].old_logp_bl is not None:
                gaps = [
                    (_policy_logp(chunks, mb, loss.temperature) - mb.old_logp_bl) * mb.mask_bl
                    for mb in micro_batches
                ]
                gap = max(float(g.abs().max()) for g in gaps)
            for c in chunks:
                c.train()
        record["updates"].append(
            {
                "advantages": torch.cat([mb.advantages_b for mb in micro_batches]).clone(),
                "completions": sum(mb.input_ids_bl.shape[0] for mb in micro_batches),
                "tokens": sum(mb.num_tokens for mb in micro_batches),
                "global_num_tokens": ctx.global_num_tokens,
                "num_microbatches": ctx.num_microbatches,
                "old_logp_gap": gap,
            }
        )
        return original_update(chunks, micro_batches, groups, loss, loss_type, ctx, *args)

    loop.broadcast_step, loop.grpo_update = broadcast_step, grpo_update
    return demo_run_worker(demo_dir, out_dir, overrides), record


def reference_sync_demo_worker(demo_dir, out_dir, overrides):
    """demo_run_worker that checks every TR-DPO sync: the reference's parameters before the
    sync, the policy's and the reference's after, for each step at which the reference moved.
    Returns ``(history, syncs, final reference parameters)`` with ``syncs`` a list of
    ``(step, max |after - (alpha x policy + (1 - alpha) x before)|, max |policy - before|)``."""
    from megagrpo.training import loop

    syncs = []
    original = loop.sync_reference
    state = {}

    def sync_reference(run, step):
        before = [p.detach().clone() for c in run.reference.chunks for p in c.parameters()]
        policy = [p.detach().clone() for c in run.modules for p in c.parameters()]
        original(run, step)
        after = [p.detach().clone() for c in run.reference.chunks for p in c.parameters()]
        if any(not torch.equal(a, b) for a, b in zip(after, before)):
            alpha = run.recipe.training.ref_model_mixup_alpha
            err = max(
                float((a - (alpha * p + (1 - alpha) * b)).abs().max())
                for a, p, b in zip(after, policy, before)
            )
            moved = max(float((p - b).abs().max()) for p, b in zip(policy, before))
            syncs.append((step, err, moved))
        state["reference"] = after

    loop.sync_reference = sync_reference
    history = demo_run_worker(demo_dir, out_dir, overrides)
    return history, syncs, state.get("reference")


def built_reference_worker(demo_dir, out_dir, overrides):
    """Build a run (resuming from out_dir's newest checkpoint) and return its reference model's
    parameters, without training."""
    from megagrpo.demo.grpo_demo import demo_recipe_at
    from megagrpo.training import build_run

    recipe = demo_recipe_at(
        demo_dir, out_dir, ["--num_reward_workers", "1", *NO_WARMUP, *overrides]
    )
    run = build_run(recipe)
    try:
        params = [p.detach().clone() for c in run.reference.chunks for p in c.parameters()]
        return run.start_step, params, run.reference.synced
    finally:
        if run.rollout is not None:
            run.rollout.close()
        run.logger.close()


def batch_recording_demo_worker(demo_dir, out_dir, overrides):
    """demo_run_worker that records each step's trained batch: the StepData every
    rank receives (prompt rows, rewards, advantages) and the size of the batch the loop cuts
    into micro-batches (this rank's share). Returns ``(history, steps, solutions)``: steps as
    dicts, solutions the ``solution`` column of the prepared training prompts (row -> solution;
    None on ranks without the prompts)."""
    from megagrpo.demo.grpo_demo import demo_recipe_at
    from megagrpo.training import build_run, loop, train

    steps = []
    original_broadcast, original_local = loop.broadcast_step, loop.local_batch

    def broadcast_step(data, groups):
        out = original_broadcast(data, groups)
        steps.append(
            {
                "prompt_rows": list(out.prompt_rows),
                "rewards_n": out.rewards_n.tolist(),
                "advantages_n": out.advantages_n.tolist(),
                "completions": len(out.completion_ids),
            }
        )
        return out

    def local_batch(data, groups, num_generations):
        batch = original_local(data, groups, num_generations)
        steps[-1]["trained"] = len(batch)
        return batch

    loop.broadcast_step, loop.local_batch = broadcast_step, local_batch
    recipe = demo_recipe_at(
        demo_dir, out_dir, ["--num_reward_workers", "1", *NO_WARMUP, *overrides]
    )
    run = build_run(recipe)
    solutions = [row["solution"] for row in run.data.train] if run.data is not None else None
    history = train(run)
    return history, steps, solutions


def code_run_worker(model_dir, data_dir, out_dir, overrides):
    """A short GRPO run of the demo recipe on the code task (code rewards, local sandbox)."""
    from megagrpo.config import load_recipe
    from megagrpo.demo.code_tasks import CODE_SYSTEM_PROMPT
    from megagrpo.demo.grpo_demo import DEMO_RECIPE
    from megagrpo.training import build_run, train

    recipe = load_recipe(
        DEMO_RECIPE,
        [
            "--model_name_or_path", model_dir,
            "--dataset_name", data_dir,
            "--output_dir", out_dir,
            "--system_prompt", CODE_SYSTEM_PROMPT,
            "--reward_funcs", "code,code_format",
            "--reward_weights", "1.0,0.5",
            "--num_reward_workers", "1",
            *overrides,
        ],
    )  # fmt: skip
    run = build_run(recipe)
    return train(run) if run.groups.rank == 0 else None


def packed_updates_worker(hf_dir, tp, pp, batch, cases, max_tokens, sequence_parallel=False):
    """For each ``(loss_type, spec, need_old, entropy_coef, sampling)`` of ``cases``: the update
    (and old log-prob pass) over padded micro-batches of 2 from this DP rank's share, then over
    token-budget micro-batches of ``max_tokens`` packed tokens balanced over the DP ranks.
    Returns per case ``{"padded": ..., "packed": ...}``, each with the DP-reduced metrics, the
    gradients of ``_update``, the old log-probs by global sequence index (last stage) and the
    positions the output layer ran on (``output_positions``, summed over its calls)."""
    from megagrpo.training.batch import sequence_length_multiple

    _, groups, chunks, ddp, _ = _setup(hf_dir, tp, pp, sequence_parallel=sequence_parallel)
    multiple = sequence_length_multiple(
        fp8=False, sequence_parallel=sequence_parallel, tp_size=tp, cp_size=1
    )
    return [
        {
            layout: _counting_output_positions(
                chunks,
                lambda layout=layout, case=case: _layout_update(
                    groups, chunks, ddp, batch, case, max_tokens, layout, length_multiple=multiple
                ),
            )
            for layout in ("padded", "packed")
        }
        for case in cases
    ]


def _counting_output_positions(chunks, run):
    """``run()``'s result with ``output_positions``: the positions (rows of logits) the last
    stage's output layer computed, over all its calls."""
    counted = [0]

    def count(module, args, output):
        counted[0] += output[0].shape[:-1].numel()

    handles = [c.output_layer.register_forward_hook(count) for c in chunks if c.post_process]
    try:
        result = run()
    finally:
        for h in handles:
            h.remove()
    result["output_positions"] = counted[0]
    return result


def _layout_update(groups, chunks, ddp, batch, case, max_tokens, layout, length_multiple=1):
    from dataclasses import replace

    from megagrpo.algorithms.loss_aggregation import TokenWeighted, get_loss_type
    from megagrpo.distributed.context_parallel import chunk_multiple
    from megagrpo.training.batch import make_micro_batches
    from megagrpo.training.generation_steps import _select
    from megagrpo.training.logprob_pass import fill_logprobs
    from megagrpo.training.loop import batch_context
    from megagrpo.training.token_budget import TokenBudget, token_budget_micro_batches

    loss_type_name, spec, need_old, entropy_coef, sampling = case
    dp, per_rank = groups.dp_size, len(batch) // groups.dp_size
    shares = [_select(batch, list(range(r * per_rank, (r + 1) * per_rank))) for r in range(dp)]
    loss_type = get_loss_type(loss_type_name)
    if layout == "padded":
        mbs = make_micro_batches(
            shares[groups.dp_rank], 2, pad_token_id=0, length_multiple=length_multiple
        )
        offset = groups.dp_rank * per_rank  # local index -> index in ``batch``
        ctx = batch_context(mbs, groups, torch.device("cpu"), max_completion_length=8)
    else:
        budget = TokenBudget(
            max_tokens=max_tokens, micro_batch_size=2, pad_to_budget=groups.pp_size > 1
        )
        (mbs,) = token_budget_micro_batches(
            shares,
            groups.dp_rank,
            budget,
            loss_type,
            parts=1,
            seed=0,
            generation=0,
            max_completion_length=8,
            pad_token_id=0,
            length_multiple=length_multiple,
            sequence_multiple=chunk_multiple(groups.cp_size),
        )
        offset = 0  # the pool's index is the index in ``batch``
        ctx = batch_context(mbs, groups, torch.device("cpu"), max_completion_length=8)
        ctx = replace(ctx, num_microbatches=len(mbs))
        loss_type = TokenWeighted()
    if need_old:
        fill_logprobs(ddp, mbs, groups, temperature=spec.temperature, field="old_logp_bl")
    if sampling is not None and groups.is_last_stage:  # the log-probs live on the last stage
        for mb in mbs:
            mb.is_weight_bl = sampling.weights(mb.old_logp_bl, mb.sampler_logp_bl, mb.mask_bl)
    for m in ddp:
        m.zero_grad_buffer()
    result = _grads_of_update(groups, chunks, ddp, mbs, spec, loss_type, ctx, entropy_coef)
    old = {}
    if need_old and groups.is_last_stage:
        for mb in mbs:
            for row, i in enumerate(mb.index):
                p, c = batch.prompt_ids[offset + i], batch.completion_ids[offset + i]
                old[offset + i] = mb.old_logp_bl[row, len(p) - 1 : len(p) - 1 + len(c)].clone()
    result["old_logp"] = old
    result["num_microbatches"] = len(mbs)
    return result


def _grads_of_update(groups, chunks, ddp, mbs, spec, loss_type, ctx, entropy_coef):
    """DP-reduced metrics and this rank's (DP-averaged) gradient shards of every parameter."""
    from megagrpo.training.policy_update import grpo_update, reduce_metrics

    sums = grpo_update(ddp, mbs, groups, spec, loss_type, ctx, entropy_coef)
    for m in ddp:
        m.finish_grad_sync()
    metrics = reduce_metrics(sums, groups, len(mbs), loss_type, spec.objective)
    grads = {
        f"{k}:{name}": p.main_grad.clone()
        for k, c in enumerate(chunks)
        for name, p in c.named_parameters()
    }
    return {
        "metrics": metrics,
        "grads": grads,
        "pp_rank": groups.pp_rank,
        "tp_rank": groups.tp_rank,
        "cp_rank": groups.cp_rank,
    }


def context_parallel_updates_worker(hf_dir, tp, pp, cp, batch, cases, max_tokens):
    """``packed_updates_worker`` with a context-parallel group of ``cp`` ranks (padded
    micro-batches of a length that splits into 2 x CP chunks; packed sequences each padded to a
    multiple of 2 x CP). Returns per case the padded and packed layouts' results."""
    from megagrpo.training.batch import sequence_length_multiple

    _, groups, chunks, ddp, _ = _setup(hf_dir, tp, pp, cp)
    multiple = sequence_length_multiple(
        fp8=False, sequence_parallel=False, tp_size=tp, cp_size=groups.cp_size
    )
    return [
        {
            layout: _layout_update(
                groups, chunks, ddp, batch, case, max_tokens, layout, length_multiple=multiple
            )
            for layout in ("padded", "packed")
        }
        for case in cases
    ]
