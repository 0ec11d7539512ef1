"""Per-rank bodies of the multi-process training tests."""

from __future__ import annotations

import torch

from megagrpo.config import MegatronConfig
from megagrpo.conversion.safetensors_io import SafetensorsDir
from megagrpo.distributed import init_distributed
from megagrpo.models.arch import load_arch
from megagrpo.models.builder import build_model
from megagrpo.models.hf_weights import load_hf_weights
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
