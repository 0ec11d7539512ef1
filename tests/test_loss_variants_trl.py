"""Every loss variant and correction equals TRL 1.16's ``GRPOTrainer._compute_loss``.

TRL's own method runs on a bare trainer object holding just the attributes it reads (its model
forward is replaced by log-probs and entropies of the test's logits, computed with TRL's
definitions); megagrpo's path is the one the trainer takes: ``loss_spec`` and
``ImportanceSampling`` from a ``GRPOConfig``, ``logprob_grpo_loss``, the loss type's aggregation
and the entropy bonus (``micro_batch_loss``). For every combination TRL allows of loss type,
importance-sampling level, sampler-correction mode, top-entropy quantile, entropy bonus,
off-policy mask and KL bias correction, the losses and the gradients w.r.t. the logits agree
(fp32, 1e-5 relative), and so do the logged metrics.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from _kernel_backends import (  # before triton is imported: its interpreter without CUDA
    NO_TRITON,
    TRITON_OK,
    only_without_triton_here,
    run_triton_cases_in_fresh_process,
)
from megagrpo_kernels import logprob_grpo_loss

from megagrpo.algorithms.importance_sampling import ImportanceSampling
from megagrpo.algorithms.loss_aggregation import BatchContext, get_loss_type
from megagrpo.algorithms.loss_variants import loss_spec
from megagrpo.config.training import LOSS_TYPE_NAMES, GRPOConfig
from megagrpo.training.policy_update import micro_batch_loss

pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

B, T, V = 6, 7, 13
TEMPERATURE = 0.8
IS_MODES = (None, "token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
CLIP_MIN, CLIP_MAX = 0.85, 1.2


def _data():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(B, T, V, generator=g) * 2.0
    ids = torch.randint(0, V, (B, T), generator=g)
    lengths = torch.tensor([7, 5, 3, 7, 6, 2])
    mask = (torch.arange(T)[None, :] < lengths[:, None]).float()
    logp = torch.log_softmax(logits / TEMPERATURE, -1).gather(-1, ids[..., None])[..., 0]
    old = logp + 0.25 * torch.randn(B, T, generator=g)  # ratios in and out of the clip range
    sampler = old + 0.12 * torch.randn(B, T, generator=g)  # the sampler / trainer mismatch
    ref = logp + 0.3 * torch.randn(B, T, generator=g)
    adv = torch.tensor([1.0, -0.7, 0.4, -1.2, 0.0, 0.9])
    return logits, ids, mask, old, sampler, ref, adv


def _trl_is_ratio(old, sampler, mask, mode):
    """TRL 1.16 ``_generate_and_score_completions``: the vLLM importance-sampling ratio."""
    diff = torch.nan_to_num((old - sampler) * mask, nan=0.0)
    if mode.startswith("sequence"):
        diff = diff.sum(-1, keepdim=True)
    ratio = torch.exp(diff)
    if mode.endswith("truncate"):
        return torch.clamp(ratio, min=CLIP_MIN, max=CLIP_MAX)
    return ratio.masked_fill((ratio < CLIP_MIN) | (ratio > CLIP_MAX), 0.0)


_ACCELERATOR = []


def _accelerator():
    """One CPU ``accelerate.Accelerator`` for every call (TRL gathers and reduces through it)."""
    if not _ACCELERATOR:
        from accelerate import Accelerator

        _ACCELERATOR.append(Accelerator(cpu=True))
    return _ACCELERATOR[0]


def _trl_loss(cfg: GRPOConfig, logits, ids, mask, old, sampler, ref, adv, is_ratio):
    """TRL's ``_compute_loss`` on a bare GRPOTrainer; returns (loss, metrics)."""
    from _trl import import_trl

    trl_grpo = import_trl("trl.trainer.grpo_trainer")  # after _kernel_backends: imports triton

    trainer = object.__new__(trl_grpo.GRPOTrainer)

    def per_token(model, input_ids, attention_mask, logits_to_keep, **kw):
        scaled = logits / TEMPERATURE
        logq = torch.log_softmax(scaled, -1)
        logps = logq.gather(-1, ids[..., None])[..., 0]
        entropies = -(logq.exp() * logq).sum(-1)
        return logps, entropies, None

    entropy_bonus = cfg.entropy_coef != 0.0
    trainer.__dict__.update(
        args=SimpleNamespace(
            delta=cfg.delta,
            use_bias_correction_kl=cfg.use_bias_correction_kl,
            sapo_temperature_pos=cfg.sapo_temperature_pos,
            sapo_temperature_neg=cfg.sapo_temperature_neg,
            vespo_k_pos=cfg.vespo_k_pos,
            vespo_lambda_pos=cfg.vespo_lambda_pos,
            vespo_k_neg=cfg.vespo_k_neg,
            vespo_lambda_neg=cfg.vespo_lambda_neg,
            steps_per_generation=1,
            entropy_target=cfg.entropy_target,
        ),
        accelerator=_accelerator(),
        model=SimpleNamespace(training=True),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _get_per_token_logps_and_entropies=per_token,
        loss_type=cfg.loss_type,
        beta=cfg.beta,
        epsilon_low=cfg.epsilon,
        epsilon_high=cfg.epsilon_high if cfg.epsilon_high is not None else cfg.epsilon,
        importance_sampling_level=cfg.importance_sampling_level,
        top_entropy_quantile=cfg.top_entropy_quantile,
        off_policy_mask_threshold=cfg.off_policy_mask_threshold,
        use_vllm=True,
        vllm_importance_sampling_correction=cfg.vllm_importance_sampling_correction,
        current_gradient_accumulation_steps=1,
        aux_loss_enabled=False,
        entropy_coef=cfg.entropy_coef,
        use_adaptive_entropy=False,
        _entropy_bonus_enabled=entropy_bonus,
        _last_world_entropy=math.inf,
        _entropy_window_stats=None,
        max_completion_length=T,
    )
    inputs = {
        "prompt_ids": torch.ones(B, 1, dtype=torch.long),
        "prompt_mask": torch.ones(B, 1, dtype=torch.long),
        "completion_ids": ids,
        "completion_mask": mask,
        "advantages": adv,
        "old_per_token_logps": old,
        "sampling_per_token_logps": sampler,
        "ref_per_token_logps": ref,
        "num_items_in_batch": mask.sum(),
    }
    if is_ratio is not None:
        inputs["importance_sampling_ratio"] = is_ratio
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loss = trl_grpo.GRPOTrainer._compute_loss(trainer, None, inputs)
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    return loss, metrics


def _megagrpo_loss(cfg: GRPOConfig, logits, ids, mask, old, sampler, ref, adv, backend):
    """The trainer's path for one micro-batch; returns (value, kernel output)."""
    spec = loss_spec(cfg)
    sampling = ImportanceSampling.from_config(cfg)
    is_weight = None if sampling is None else sampling.weights(old, sampler, mask)
    out = logprob_grpo_loss(
        logits,
        ids,
        old,
        ref if cfg.beta != 0.0 else None,
        adv,
        mask,
        spec=spec,
        is_weight=is_weight,
        sampler_logp=sampler,
        return_entropy=True,
        entropy_grad=cfg.entropy_coef != 0.0,
        backend=backend,
    )
    ctx = BatchContext(
        num_microbatches=1, dp_size=1, max_completion_length=T, global_num_tokens=int(mask.sum())
    )
    value, _ = micro_batch_loss(out, mask, get_loss_type(cfg.loss_type), ctx, cfg.entropy_coef)
    return value, out


def _combinations(loss_type):
    for level, mode, quantile, coef, threshold, (beta, bias) in itertools.product(
        ("token", "sequence"),
        IS_MODES,
        (1.0, 0.3),
        (0.0, 0.05),
        (None, 0.05),
        ((0.0, True), (0.04, True), (0.04, False)),
    ):
        if loss_type == "vespo" and mode is not None and not mode.startswith("token"):
            continue  # TRL refuses it (so does megagrpo's validation)
        yield GRPOConfig(
            loss_type=loss_type,
            temperature=TEMPERATURE,
            epsilon=0.2,
            epsilon_high=3.0 if loss_type == "cispo" else 0.28,
            importance_sampling_level=level,
            vllm_importance_sampling_correction=mode is not None,
            vllm_importance_sampling_mode=mode or "sequence_mask",
            vllm_importance_sampling_clip_min=CLIP_MIN,
            vllm_importance_sampling_clip_max=CLIP_MAX,
            top_entropy_quantile=quantile,
            entropy_coef=coef,
            off_policy_mask_threshold=threshold,
            beta=beta,
            use_bias_correction_kl=bias,
        )


def _describe(cfg):
    return (
        f"loss_type={cfg.loss_type} level={cfg.importance_sampling_level} "
        f"is={cfg.vllm_importance_sampling_correction and cfg.vllm_importance_sampling_mode} "
        f"quantile={cfg.top_entropy_quantile} entropy_coef={cfg.entropy_coef} "
        f"off_policy={cfg.off_policy_mask_threshold} beta={cfg.beta} "
        f"bias_kl={cfg.use_bias_correction_kl}"
    )


def _check(cfg, data, backend="torch"):
    logits, ids, mask, old, sampler, ref, adv = data
    mode = cfg.vllm_importance_sampling_mode if cfg.vllm_importance_sampling_correction else None
    is_ratio = None if mode is None else _trl_is_ratio(old, sampler, mask, mode)
    trl_logits = logits.clone().requires_grad_(True)
    trl_value, trl_metrics = _trl_loss(cfg, trl_logits, ids, mask, old, sampler, ref, adv, is_ratio)
    trl_value.backward()
    ours_logits = logits.clone().requires_grad_(True)
    value, out = _megagrpo_loss(cfg, ours_logits, ids, mask, old, sampler, ref, adv, backend)
    value.backward()
    what = _describe(cfg)
    torch.testing.assert_close(value, trl_value, rtol=1e-5, atol=1e-7, msg=lambda m: f"{what}: {m}")
    torch.testing.assert_close(
        ours_logits.grad, trl_logits.grad, rtol=1e-5, atol=1e-7, msg=lambda m: f"{what}: {m}"
    )
    ours = {"entropy": out.entropy[mask.bool()].mean()}
    if cfg.beta != 0.0:
        ours["kl"] = out.kl_mean
    if out.phi_mean is not None:
        ours["vespo/phi_seq_mean"] = out.phi_mean
    if cfg.loss_type == "cispo":
        ours["cispo_clip_ratio"] = out.clip_high
    elif cfg.loss_type not in ("sapo", "vespo"):
        ours["clip_ratio/low_mean"] = out.clip_low
        ours["clip_ratio/high_mean"] = out.clip_high
        ours["clip_ratio/region_mean"] = out.clip_region
    for key, v in ours.items():
        assert float(v.detach()) == pytest.approx(trl_metrics[key], rel=1e-5, abs=1e-7), (
            f"{what}: {key}"
        )


@pytest.mark.parametrize("loss_type", LOSS_TYPE_NAMES)
def test_every_combination_equals_trl(loss_type):
    data = _data()
    n = 0
    for cfg in _combinations(loss_type):
        _check(cfg, data)
        n += 1
    assert n >= 96


def _triton_combinations(loss_type):
    """A cross-section for the (slow, interpreted) Triton kernels: the fused single kernel
    (token level, no masks) and the unfused chain (sequence level, masks, entropy bonus)."""
    for cfg in _combinations(loss_type):
        plain = (
            cfg.top_entropy_quantile == 1.0
            and cfg.entropy_coef == 0.0
            and cfg.off_policy_mask_threshold is None
        )
        everything = (
            cfg.top_entropy_quantile < 1.0
            and cfg.entropy_coef != 0.0
            and cfg.off_policy_mask_threshold is not None
        )
        modes = (None, "token_mask") if plain else ("token_truncate",)
        mode = (
            cfg.vllm_importance_sampling_mode if cfg.vllm_importance_sampling_correction else None
        )
        if (
            (plain or everything)
            and cfg.beta != 0.0
            and cfg.use_bias_correction_kl
            and mode in modes
        ):
            yield cfg


@pytest.mark.skipif(not TRITON_OK, reason=NO_TRITON)
@pytest.mark.parametrize("loss_type", LOSS_TYPE_NAMES)
def test_triton_equals_trl(loss_type):
    data = _data()
    n = 0
    for cfg in _triton_combinations(loss_type):
        _check(cfg, data, backend="triton")
        n += 1
    assert n >= 4


@pytest.mark.skipif(not TRITON_OK, reason=NO_TRITON)
def test_triton_unfused_path_is_logged_once(caplog):
    """A spec the single kernel cannot compute takes the chained kernels and says so once per
    reason; a fusable one says nothing."""
    from megagrpo_kernels import GRPOLossSpec, fused_logprob_loss

    logits, ids, mask, old, sampler, ref, adv = _data()
    fused_logprob_loss._LOGGED_UNFUSED.clear()
    with caplog.at_level("WARNING", logger="megagrpo_kernels"):
        for spec in (GRPOLossSpec(), GRPOLossSpec(objective="cispo", epsilon_high=3.0)):
            logprob_grpo_loss(logits, ids, old, None, adv, mask, spec=spec, backend="triton")
        assert caplog.records == []
        for _ in range(2):
            vespo = GRPOLossSpec(objective="vespo")
            logprob_grpo_loss(logits, ids, old, None, adv, mask, spec=vespo, backend="triton")
    assert [r.getMessage() for r in caplog.records] == [
        "logprob_grpo_loss: objective='vespo' (a per-sequence weight) needs the unfused path "
        "(the log-prob kernel, then the loss kernel; same values, one more pass over the logits)"
    ]


@only_without_triton_here
def test_triton_cases_in_fresh_process():
    """Run this file's Triton cases in a fresh interpreter-mode process (see _kernel_backends)."""
    run_triton_cases_in_fresh_process(__file__, "triton_equals or triton_unfused")


def test_the_data_exercises_every_branch():
    """The comparison is only as strong as its data: clipping, IS masking and truncation, the
    off-policy mask and the entropy mask must all change something."""
    logits, ids, mask, old, sampler, ref, adv = _data()
    logp = torch.log_softmax(logits / TEMPERATURE, -1).gather(-1, ids[..., None])[..., 0]
    ratio = torch.exp(logp - old)[mask.bool()]
    assert (ratio < 0.8).any() and (ratio > 1.28).any()
    for mode in IS_MODES[1:]:
        r = _trl_is_ratio(old, sampler, mask, mode)
        r = r.expand(B, T)[mask.bool()]
        changed = (
            (r == 0).any() if mode.endswith("mask") else ((r == CLIP_MIN) | (r == CLIP_MAX)).any()
        )
        assert changed and (r != 0).any(), mode
    seq_kl = ((sampler - logp) * mask).sum(-1) / mask.sum(-1)
    assert ((seq_kl > 0.05) & (adv < 0)).any() and ((seq_kl <= 0.05) | (adv >= 0)).any()
