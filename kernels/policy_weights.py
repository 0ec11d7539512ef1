"""Constant per-token weights of the policy term, computed before the loss (no gradient).

- :func:`off_policy_keep`: DeepSeek-V3.2's off-policy sequence mask (TRL's
  ``get_off_policy_mask``): a token is kept when its advantage is >= 0 or its sequence's mean
  ``sampler_logp - logp`` is at most the threshold.
- :func:`high_entropy_mask`: the tokens at or above the ``1 - top_entropy_quantile`` quantile of
  the valid tokens' entropies (TRL's ``get_high_entropy_mask``, "Beyond the 80/20 rule").
- :func:`vespo_phi`: VESPO's gamma weight of each token's sequence (TRL's ``get_gamma_weights``).
- :func:`policy_weight`: their product with the sampler importance weight, the ``w`` of
  :class:`loss_spec.GRPOLossSpec`.

Inputs are the flat ``[N]`` vectors of :class:`grpo_loss.LossInputs` (``_n`` tokens, ``_s``
sequences); the log-probs ``lp_n`` are the current policy's, detached, zero on masked tokens.
"""

from __future__ import annotations

import math

import torch

from .loss_spec import GRPOLossSpec

LOG_MIN = math.log(1e-8)  # VESPO's floor of log-ratios (TRL's, matching the paper's code)
_QUANTILE_MAX = 1 << 24  # torch.quantile's input limit


def sequence_sums(x_n: torch.Tensor, seq_n: torch.Tensor, num_sequences: int) -> torch.Tensor:
    return torch.zeros(num_sequences, dtype=x_n.dtype, device=x_n.device).index_add(0, seq_n, x_n)


def off_policy_keep(lp_n, behaviour_n, adv_n, valid_n, seq_n, num_sequences, threshold):
    """``[N]`` 1.0 (keep) / 0.0 (drop); ``behaviour_n`` the sampler's (else the old policy's)
    log-probs. Tokens the sampler could not score (NaN) count as no divergence."""
    valid_f = valid_n.to(lp_n.dtype)
    kl_n = torch.nan_to_num(behaviour_n - lp_n, nan=0.0) * valid_f
    mean_s = sequence_sums(kl_n, seq_n, num_sequences) / sequence_sums(
        valid_f, seq_n, num_sequences
    ).clamp(min=1.0)
    return ((adv_n >= 0) | (mean_s[seq_n] <= threshold)).to(lp_n.dtype)


def high_entropy_mask(entropy_n: torch.Tensor, valid_n: torch.Tensor, top_quantile: float):
    """``[N]`` bool: valid tokens whose entropy is >= the ``1 - top_quantile`` quantile of the
    valid tokens' entropies (linear interpolation, as ``torch.quantile``)."""
    entropy_n = entropy_n.detach().float()
    local = entropy_n[valid_n]
    if local.numel() == 0:
        return torch.zeros_like(valid_n)
    q = 1.0 - top_quantile
    if local.numel() <= _QUANTILE_MAX:
        threshold = torch.quantile(local, q)
    else:  # torch.quantile refuses inputs this large: the same interpolation by hand
        s = local.sort().values
        pos = q * (s.numel() - 1)
        lo = math.floor(pos)
        hi = min(lo + 1, s.numel() - 1)
        threshold = s[lo] + (s[hi] - s[lo]) * (pos - lo)
    return (entropy_n * valid_n.float() >= threshold) & valid_n


def vespo_phi(lp_n, old_n, is_n, adv_n, valid_n, seq_n, num_sequences, spec: GRPOLossSpec):
    """``[N]`` VESPO's gamma weight ``phi(W) = exp(lambda + k log W - lambda W)``, ``W`` the
    product of the sequence's ratios ``pi / pi_old`` (and sampler weights ``is_n``), clamped in
    log space to [log 1e-8, 20]; ``k, lambda`` by the sign of the token's advantage (one per
    sequence for ``[B]`` advantages). Non-finite values become 0."""
    valid_f = valid_n.to(lp_n.dtype)
    log_ratio_n = torch.clamp(lp_n - old_n, -20.0, 20.0) * valid_f
    if is_n is not None:
        log_ratio_n = log_ratio_n + torch.clamp(torch.log(is_n), LOG_MIN, 20.0) * valid_f
    log_w_s = torch.clamp(sequence_sums(log_ratio_n, seq_n, num_sequences), LOG_MIN, 20.0)
    log_w_n = log_w_s[seq_n]
    nonneg_n = adv_n >= 0
    k_n = torch.where(nonneg_n, spec.vespo_k_pos, spec.vespo_k_neg).to(lp_n.dtype)
    lam_n = torch.where(nonneg_n, spec.vespo_lambda_pos, spec.vespo_lambda_neg).to(lp_n.dtype)
    lam_n = lam_n.clamp(min=1e-4)
    log_phi_n = lam_n + k_n * log_w_n - lam_n * torch.exp(log_w_n)
    return torch.exp(log_phi_n).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


@torch.no_grad()
def policy_weight(lp_n, inputs, spec: GRPOLossSpec):
    """``(weight_n | None, entropy_mask_n | None, phi_n | None)``: the policy term's constant
    per-token weight (None when every weight is 1), the top-entropy mask, VESPO's ``phi``."""
    lp_n = torch.where(inputs.valid_n, lp_n.detach(), torch.zeros_like(lp_n))
    old_n = lp_n if inputs.old_n is None else inputs.old_n
    weight_n = entropy_mask_n = phi_n = None
    if spec.objective == "vespo":
        phi_n = vespo_phi(
            lp_n,
            old_n,
            inputs.is_n,
            inputs.adv_n,
            inputs.valid_n,
            inputs.seq_n,
            inputs.num_sequences,
            spec,
        )
        weight_n = phi_n
    elif inputs.is_n is not None:
        weight_n = inputs.is_n
    if spec.off_policy_mask_threshold is not None:
        behaviour_n = old_n if inputs.sampler_n is None else inputs.sampler_n
        keep_n = off_policy_keep(
            lp_n,
            behaviour_n,
            inputs.adv_n,
            inputs.valid_n,
            inputs.seq_n,
            inputs.num_sequences,
            spec.off_policy_mask_threshold,
        )
        weight_n = keep_n if weight_n is None else weight_n * keep_n
    if spec.needs_entropy:
        entropy_mask_n = high_entropy_mask(
            inputs.entropy_n, inputs.valid_n, spec.top_entropy_quantile
        )
        m_n = entropy_mask_n.to(lp_n.dtype)
        weight_n = m_n if weight_n is None else weight_n * m_n
    return weight_n, entropy_mask_n, phi_n
