"""LR schedules against transformers; megatron's optimizer (on CPU) against torch AdamW."""

from __future__ import annotations

import pytest
import torch
from _multiproc import run_ranks

from megagrpo.config import GRPOConfig
from megagrpo.training.lr_schedule import LRSchedule, schedule_from_config

WD = 0.1


@pytest.mark.parametrize(
    "name,kwargs",
    [
        ("constant", {}),
        ("constant_with_warmup", {}),
        ("linear", {}),
        ("cosine", {}),
        ("cosine_with_min_lr", {"min_lr_rate": 0.1}),
    ],
)
def test_schedules_equal_transformers(name, kwargs):
    from transformers import get_scheduler

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2e-6)
    ref = get_scheduler(
        name,
        opt,
        num_warmup_steps=3,
        num_training_steps=20,
        scheduler_specific_kwargs=kwargs or None,
    )
    ours = LRSchedule(name, 2e-6, 20, 3, kwargs.get("min_lr_rate", 0.0))
    for step in range(22):
        assert ours.lr(step) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12, abs=1e-18)
        opt.step()
        ref.step()


def test_schedule_from_config():
    cfg = GRPOConfig(
        learning_rate=1e-5,
        lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr": 1e-6},
        warmup_ratio=0.1,
    )
    s = schedule_from_config(cfg, total_steps=95)
    assert s.warmup_steps == 10 and s.min_lr_rate == pytest.approx(0.1)
    assert s.lr(95) == pytest.approx(1e-6)
    with pytest.raises(ValueError, match="lr_scheduler_type='poly'"):
        LRSchedule("poly", 1.0, 10)


def _optimizer_worker(hf_dir, clip):
    from megagrpo.config import MegatronConfig
    from megagrpo.conversion.hf_weights import load_hf_weights
    from megagrpo.conversion.safetensors_io import SafetensorsDir
    from megagrpo.distributed import init_distributed
    from megagrpo.models.arch import load_arch
    from megagrpo.models.builder import build_model
    from megagrpo.training.optimizer import (
        OptimizerSettings,
        build_optimizer,
        set_learning_rate,
        wrap_ddp,
    )

    par = MegatronConfig()
    groups = init_distributed(par)
    arch = load_arch(hf_dir)
    chunks = [build_model(arch, par, pg_collection=groups.pg_collection)[0] for _ in range(2)]
    for c in chunks:
        load_hf_weights([c], SafetensorsDir(hf_dir), arch, groups)
    ours = wrap_ddp([chunks[0]], par)
    settings = OptimizerSettings(learning_rate=1e-2, weight_decay=WD, max_grad_norm=clip)
    opt = build_optimizer(ours, settings, par)
    ref_model = chunks[1]
    decay = [p for n, p in ref_model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in ref_model.named_parameters() if p.ndim == 1]
    ref_opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": WD}, {"params": no_decay, "weight_decay": 0.0}], lr=1e-2
    )
    g = torch.Generator().manual_seed(0)
    norms = []
    for step in range(3):
        ids = torch.randint(0, 105, (2, 12), generator=g)
        for m in ours:
            m.zero_grad_buffer()
        opt.zero_grad()
        ours[0](ids, None, attention_mask=None, labels=ids).mean().backward()
        ours[0].finish_grad_sync()
        set_learning_rate(opt, 1e-2 * (step + 1), WD)
        ok, norm, _ = opt.step()
        clipped = torch.sqrt(sum(p.grad.double().norm() ** 2 for p in chunks[0].parameters()))
        ref_opt.zero_grad()
        ref_model(ids, None, attention_mask=None, labels=ids).mean().backward()
        ref_norm = torch.nn.utils.clip_grad_norm_(ref_model.parameters(), clip)
        for grp in ref_opt.param_groups:
            grp["lr"] = 1e-2 * (step + 1)
        ref_opt.step()
        norms.append((ok, norm, ref_norm.item(), clipped.item()))
    diff = max(
        (a - b).abs().max().item() for a, b in zip(chunks[0].parameters(), ref_model.parameters())
    )
    return norms, diff


@pytest.mark.parametrize("clip", [1e9, 0.5])
def test_megatron_optimizer_on_cpu_equals_torch_adamw(clip, tiny_checkpoint):
    ((norms, diff),) = run_ranks(1, _optimizer_worker, tiny_checkpoint("qwen2"), clip)
    for ok, norm, ref, clipped in norms:
        assert ok and norm == pytest.approx(ref, rel=1e-5)
        assert clipped == pytest.approx(min(norm, clip), rel=1e-5)  # the gradient stepped on
    if clip < 1:
        assert all(ref > clip for _, _, ref, _ in norms)  # clipping was exercised
    # Adam's update is nearly scale-free, so near-zero gradients amplify rounding: parameters
    # agree to 1e-4 after three steps of lr up to 3e-2 (a wrong weight decay gives ~7e-3).
    assert diff < 1e-4
