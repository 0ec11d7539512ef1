"""Per-row softmax statistics: their layout, how partial statistics merge, and the one collective.

A row of logits ``z`` (scaled by ``1/temperature``) is summarised, over any subset of its columns
(a vocab chunk, a Triton block, a tensor-parallel shard), by five numbers in raw logit units:

- ``MAX``: ``M = max z_raw`` over the subset (-inf when all are -inf),
- ``SUMEXP``: ``S = sum exp((z_raw - M) / T)``,
- ``XLOGX``: ``W = sum exp((z_raw - M) / T) * (z_raw - M) / T`` (the entropy piece),
- ``TARGET``: the raw target logit when the target column is in the subset, else 0,
- ``OWNER``: 1 when the target column is in the subset, else 0.

Partial statistics merge exactly (a log-sum-exp merge), so a tensor-parallel group merges them
with ONE collective: an all-gather of the small ``[TP, N, 5]`` stats tensor, then a local merge.
(The two-collective alternative, a max all-reduce followed by a sum all-reduce, costs two
latencies.) The finished row gives, with ``logS = log S``:

    logp    = (z_target - M) / T - logS        (no large-magnitude cancellation)
    entropy = logS - W / S
    p_j     = exp((z_j - M) / T - logS)        (what the backward recomputes)

Rows whose logits are all -inf have ``S = 0``: by convention ``logp = -inf``, ``entropy = 0`` and
their gradient is zero. A row whose target no shard owns gets ``logp = nan``.

Shapes: ``_n`` rows (tokens), ``_k`` partial statistics of one row (chunks or ranks).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

MAX, SUMEXP, XLOGX, TARGET, OWNER = range(5)
NUM_STATS = 5


def merge_row_stats(stats_kn5: torch.Tensor, temperature: float) -> torch.Tensor:
    """Merges ``K`` partial statistics of the same rows into one: ``[K, N, 5] -> [N, 5]``."""
    m_kn = stats_kn5[..., MAX]
    s_kn = stats_kn5[..., SUMEXP]
    w_kn = stats_kn5[..., XLOGX]
    m_n = m_kn.amax(dim=0)
    safe_m_n = torch.where(torch.isneginf(m_n), torch.zeros_like(m_n), m_n)
    live_kn = ~torch.isneginf(m_kn)
    shift_kn = torch.where(live_kn, (m_kn - safe_m_n) / temperature, torch.zeros_like(m_kn))
    scale_kn = torch.where(live_kn, torch.exp(shift_kn), torch.zeros_like(m_kn))
    out_n5 = torch.empty_like(stats_kn5[0])
    out_n5[:, MAX] = m_n
    out_n5[:, SUMEXP] = (scale_kn * s_kn).sum(dim=0)
    out_n5[:, XLOGX] = (scale_kn * (w_kn + shift_kn * s_kn)).sum(dim=0)
    out_n5[:, TARGET] = stats_kn5[..., TARGET].sum(dim=0)
    out_n5[:, OWNER] = stats_kn5[..., OWNER].sum(dim=0)
    return out_n5


def finalize_row_stats(stats_n5: torch.Tensor, temperature: float):
    """Merged statistics -> ``(logp_n, entropy_n, max_n, logsumexp_n)``.

    ``max_n`` (raw units) and ``logsumexp_n`` (``log S``) are what the backward needs to
    recompute the softmax with the forward's precision.
    """
    m_n = stats_n5[:, MAX]
    s_n = stats_n5[:, SUMEXP]
    live_n = s_n > 0
    ones_n = torch.ones_like(s_n)
    log_s_n = torch.where(live_n, torch.log(torch.where(live_n, s_n, ones_n)), -torch.inf * ones_n)
    safe_m_n = torch.where(live_n, m_n, torch.zeros_like(m_n))
    logp_n = (stats_n5[:, TARGET] - safe_m_n) / temperature - log_s_n
    logp_n = torch.where(live_n, logp_n, -torch.inf * ones_n)
    logp_n = torch.where(stats_n5[:, OWNER] == 1, logp_n, torch.nan * ones_n)
    entropy_n = torch.where(
        live_n,
        log_s_n - stats_n5[:, XLOGX] / torch.where(live_n, s_n, ones_n),
        torch.zeros_like(s_n),
    )
    return logp_n, entropy_n, m_n, log_s_n


def gather_row_stats(stats_n5: torch.Tensor, group) -> torch.Tensor:
    """All-gathers every rank's ``[N, 5]`` statistics into ``[TP, N, 5]`` (one collective)."""
    world = dist.get_world_size(group)
    n_rows = stats_n5.shape[0]
    # Concatenated along dim 0 ([TP * N, 5]): the layout both gloo and NCCL accept.
    out_m5 = torch.empty((world * n_rows, NUM_STATS), dtype=stats_n5.dtype, device=stats_n5.device)
    # torch >= 2.13 names it all_gather_single (all_gather_into_tensor is deprecated there)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out_m5, stats_n5.contiguous(), group=group)
    return out_m5.view(world, n_rows, NUM_STATS)


def default_vocab_start(vocab_local: int, group) -> int:
    """Megatron's equal vocab partition: rank ``r`` holds ``[r*V_local, (r+1)*V_local)``."""
    if group is None:
        return 0
    return dist.get_rank(group) * vocab_local


def check_owners(stats_n5: torch.Tensor, vocab_local: int, vocab_start: int, group) -> None:
    """Raises when some target is owned by no shard (out of range); costs one host sync."""
    bad_n = stats_n5[:, OWNER] != 1
    if bool(bad_n.any()):
        row = int(bad_n.nonzero()[0, 0])
        where = (
            ""
            if group is None
            else (
                f" (this rank holds columns [{vocab_start}, {vocab_start + vocab_local}) of the "
                f"vocab-parallel group)"
            )
        )
        raise ValueError(
            f"targets: {int(bad_n.sum())} target ids lie outside the vocabulary, "
            f"first at row {row}; expected ids in [0, vocab size){where}"
        )
