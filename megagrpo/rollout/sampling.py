"""The sampling distribution of ``protocol.py`` as tensor code, and the seeded draw from it.

Legend: ``b`` rows (samples) in the batch, ``v`` vocabulary, ``t`` generated positions.

``processed_logprobs(logits_bv, params, seen_bv)`` returns the log-probabilities the engine
samples from (``-inf`` for filtered tokens); ``draw(logp_bv, u_b)`` picks one token per row by
inverse CDF with one uniform per row, so a row's token depends only on its own logits and its own
uniform (never on the other rows of the batch). Uniforms come from ``uniforms_for``: one
``torch.Generator`` per sample, seeded by ``protocol.sample_seed``, drawn once per generation.
"""

from __future__ import annotations

import torch

from megagrpo.rollout.protocol import SamplingParams, sample_seed

NEG_INF = float("-inf")


def apply_repetition_penalty(
    logits_bv: torch.Tensor, seen_bv: torch.Tensor, penalty: float
) -> torch.Tensor:
    """``z / r`` where ``z > 0`` else ``z * r``, on the tokens marked in ``seen_bv``."""
    if penalty == 1.0:
        return logits_bv
    scaled = torch.where(logits_bv > 0, logits_bv / penalty, logits_bv * penalty)
    return torch.where(seen_bv, scaled, logits_bv)


def apply_min_p(z_bv: torch.Tensor, min_p: float) -> torch.Tensor:
    if min_p <= 0.0:
        return z_bv
    probs = torch.softmax(z_bv, dim=-1)
    limit = probs.amax(dim=-1, keepdim=True) * min_p
    return z_bv.masked_fill(probs < limit, NEG_INF)


def apply_top_k(z_bv: torch.Tensor, top_k: int) -> torch.Tensor:
    if top_k <= 0 or top_k >= z_bv.shape[-1]:
        return z_bv
    kth = torch.topk(z_bv, top_k, dim=-1).values[:, -1:]
    return z_bv.masked_fill(z_bv < kth, NEG_INF)


def apply_top_p(z_bv: torch.Tensor, top_p: float) -> torch.Tensor:
    if top_p >= 1.0:
        return z_bv
    sorted_z, order = torch.sort(z_bv, dim=-1, descending=False)
    cum = torch.softmax(sorted_z, dim=-1).cumsum(dim=-1)
    drop_sorted = cum <= (1.0 - top_p)
    drop_sorted[:, -1] = False  # the most likely token always stays
    drop = torch.zeros_like(drop_sorted).scatter_(1, order, drop_sorted)
    return z_bv.masked_fill(drop, NEG_INF)


def processed_logprobs(
    logits_bv: torch.Tensor, params: SamplingParams, seen_bv: torch.Tensor | None = None
) -> torch.Tensor:
    """Log-probabilities of the sampling distribution (protocol.py), float32, ``-inf`` = dropped.

    ``seen_bv`` (bool) marks the tokens of each row's prompt and completion so far; it is only
    read when ``params.repetition_penalty != 1``.
    """
    z = logits_bv.float()
    if params.repetition_penalty != 1.0:
        if seen_bv is None:
            raise ValueError("repetition_penalty != 1 needs the seen-token mask")
        z = apply_repetition_penalty(z, seen_bv, params.repetition_penalty)
    if params.greedy:
        return torch.log_softmax(z, dim=-1)
    if params.temperature != 1.0:
        z = z / params.temperature
    z = apply_min_p(z, params.min_p)
    z = apply_top_k(z, params.top_k)
    z = apply_top_p(z, params.top_p)
    return torch.log_softmax(z, dim=-1)


def draw(logp_bv: torch.Tensor, u_b: torch.Tensor) -> torch.Tensor:
    """One token per row from ``exp(logp_bv)`` by inverse CDF with the row's uniform in [0, 1).

    Zero-probability tokens (``-inf``) own an empty interval of the CDF and are never chosen.
    """
    cdf_bv = torch.exp(logp_bv).cumsum_(dim=-1)
    target_b1 = (u_b * cdf_bv[:, -1]).unsqueeze(1)
    tok_b = torch.searchsorted(cdf_bv, target_b1, right=True).squeeze(1)
    vocab = logp_bv.shape[-1]
    # target == total after rounding: take the last token whose interval ends there instead.
    over_b = tok_b >= vocab
    if bool(over_b.any()):
        left = torch.searchsorted(cdf_bv, target_b1, right=False).squeeze(1)
        tok_b = torch.where(over_b, left.clamp_max(vocab - 1), tok_b)
    return tok_b


def greedy(logp_bv: torch.Tensor) -> torch.Tensor:
    return torch.argmax(logp_bv, dim=-1)


def uniforms_for(group_seeds: list[int], n: int, steps: int) -> torch.Tensor:
    """``[len(group_seeds) * n, steps]`` uniforms: row ``g * n + j`` from ``sample_seed(g, j)``."""
    out = torch.empty(len(group_seeds) * n, steps, dtype=torch.float32)
    gen = torch.Generator()
    row = 0
    for seed in group_seeds:
        for j in range(n):
            gen.manual_seed(sample_seed(seed, j))
            torch.rand(steps, generator=gen, out=out[row])
            row += 1
    return out
