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


def _setup(hf_dir, tp, pp):
    par = MegatronConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
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


def update_worker(hf_dir, tp, pp, batch, loss_type_name, settings, need_old):
    """One GRPO update through megatron's schedules; returns DP-reduced metrics and gradients
    (full tensors, re-assembled over TP) of a few parameters, from the last stage."""
    import torch.distributed as dist

    from megagrpo.algorithms.loss_aggregation import get_loss_type
    from megagrpo.training.batch import make_micro_batches
    from megagrpo.training.logprob_pass import fill_logprobs
    from megagrpo.training.loop import batch_context
    from megagrpo.training.policy_update import grpo_update, reduce_metrics

    arch, groups, chunks, ddp, opt = _setup(hf_dir, tp, pp)

    class _Run:  # what batch_context reads
        pass

    run = _Run()
    run.groups, run.device = groups, torch.device("cpu")
    run.recipe = type("R", (), {"training": type("T", (), {"max_completion_length": 8})()})()
    mbs = make_micro_batches(batch, 2, pad_token_id=0)
    ctx = batch_context(run, mbs)
    if need_old:
        fill_logprobs(ddp, mbs, groups, temperature=settings.temperature, field="old_logp_bl")
    for m in ddp:
        m.zero_grad_buffer()
    loss_type = get_loss_type(loss_type_name)
    sums = grpo_update(ddp, mbs, groups, settings, loss_type, ctx)
    for m in ddp:
        m.finish_grad_sync()
    metrics = reduce_metrics(sums, groups, len(mbs), loss_type)
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


def demo_run_worker(demo_dir, out_dir, overrides, tp=1, pp=1):
    """Train the demo recipe (its data and warm-started model already in demo_dir)."""
    from megagrpo.demo.grpo_demo import demo_recipe_at
    from megagrpo.training import build_run, train

    parallel = ["--tensor_model_parallel_size", str(tp), "--pipeline_model_parallel_size", str(pp)]
    recipe = demo_recipe_at(demo_dir, out_dir, [*parallel, "--num_reward_workers", "1", *overrides])
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

        def optimizer_step(run, mbs, ctx, update_index):
            if update_index + 1 == at:
                os.kill(os.getpid(), signal.SIGKILL)
            return original(run, mbs, ctx, update_index)

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
    KL(policy || reference) on that update's completion tokens, with plain torch: float64
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
                k3_sum += float((k3_bl * mb.mask_bl).sum())
                tokens += float(mb.mask_bl.sum())
            for c in chunks:
                c.train()
        k3_per_update.append(k3_sum / tokens)
        return original_update(chunks, micro_batches, groups, loss, *args, **kwargs)

    loop.grpo_update = grpo_update
    return demo_run_worker(demo_dir, out_dir, overrides), k3_per_update


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
    recipe = demo_recipe_at(demo_dir, out_dir, ["--num_reward_workers", "1", *overrides])
    run = build_run(recipe)
    solutions = [row["solution"] for row in run.data.train] if run.data is not None else None
    history = train(run)
    return history, steps, solutions
