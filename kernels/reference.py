"""Plain-PyTorch references of the kernels; the chunked ones are also the CPU production path.

- :func:`local_row_stats` / :func:`logprobs_backward`: log-prob (and entropy) forward statistics and
  backward, chunked over the vocab so that memory stays ``O(N x chunk)``: no ``N x V`` fp32 tensor
  is ever built (the backward writes ``grad_logits`` in the logits' dtype, which is the output).
  They follow the kernels' math exactly (see :mod:`vocab_parallel` for the statistics).
- :func:`logprobs_eager`: the textbook ``log_softmax`` + ``gather`` (``O(N x V)``), the baseline of
  tests and benchmarks, in whatever dtype it is given.
- :func:`grpo_loss_reference`: the GRPO per-token loss (every objective of
  :class:`loss_spec.GRPOLossSpec`) and its clip/KL metrics with TRL's semantics
  (``GRPOTrainer._compute_loss``), differentiated by autograd.

Shapes: ``_n`` rows/tokens, ``_v`` local vocab, ``_c`` a vocab chunk, ``_s`` sequences.
Compute dtype: float64 for float64 inputs, float32 for everything else.
"""

from __future__ import annotations

import torch

from .loss_spec import GRPOLossSpec
from .vocab_parallel import MAX, NUM_STATS, OWNER, SUMEXP, TARGET, XLOGX, merge_row_stats

CHUNK_ELEMENTS = 1 << 22  # elements of one [N, chunk] column chunk at most: 16 MB in fp32
BLOCK_ELEMENTS = 1 << 20  # elements of one row block of a chunk: 4 MB in fp32
# log p floor of the backward's entropy term: exact (p = exp(log p) is 0 below -104 in fp32,
# -745 in fp64), and small enough that (floor + H) * gh stays finite, so where p = 0 the term is
# 0 and not -inf * 0 = NaN
LOG_P_FLOOR = -1.0e4


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def chunk_columns(n_rows: int, vocab: int, chunk_size: int | None = None) -> int:
    """Vocab columns per chunk: ``chunk_size`` if given, else the whole vocab up to
    ``CHUNK_ELEMENTS`` columns (rows are then processed in blocks, ``row_blocks``)."""
    if chunk_size is not None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        return min(chunk_size, max(vocab, 1))
    return max(1, min(vocab, CHUNK_ELEMENTS))


def row_blocks(n_rows: int, cols: int):
    """``(r0, r1)`` blocks of rows holding about ``BLOCK_ELEMENTS`` elements of ``cols`` columns:
    each pass over a block reads memory the previous one left in cache, and a block of whole
    rows is contiguous (a [N, chunk] column slice is strided, and 3x slower to reduce on CPU)."""
    rows = max(1, BLOCK_ELEMENTS // max(cols, 1))
    return [(r0, min(r0 + rows, n_rows)) for r0 in range(0, n_rows, rows)]


def local_row_stats(
    logits_nv: torch.Tensor,
    targets_n: torch.Tensor,
    vocab_start: int,
    temperature: float,
    chunk_size: int | None = None,
    with_entropy: bool = True,
) -> torch.Tensor:
    """This shard's per-row statistics ``[N, 5]`` (see :mod:`vocab_parallel`), chunk by chunk
    and row block by row block; ``XLOGX`` is left 0 without ``with_entropy``."""
    n_rows, vocab = logits_nv.shape
    dtype = compute_dtype(logits_nv.dtype)
    cols = chunk_columns(n_rows, vocab, chunk_size)
    n_chunks = max(1, -(-vocab // cols))
    stats_kn5 = torch.zeros((n_chunks, n_rows, NUM_STATS), dtype=dtype, device=logits_nv.device)
    stats_kn5[..., MAX] = -torch.inf
    floor = torch.finfo(dtype).min
    for k, c0 in enumerate(range(0, vocab, cols)):
        for r0, r1 in row_blocks(n_rows, min(cols, vocab - c0)):
            block_bc = logits_nv[r0:r1, c0 : c0 + cols]
            m_b = block_bc.amax(dim=-1).to(dtype)
            safe_m_b = torch.where(torch.isneginf(m_b), torch.zeros_like(m_b), m_b)
            u_bc = _scaled_shifted(block_bc, safe_m_b, temperature, dtype)
            stats_kn5[k, r0:r1, MAX] = m_b
            if with_entropy:
                e_bc = torch.exp(u_bc)
                stats_kn5[k, r0:r1, SUMEXP] = e_bc.sum(dim=-1)
                # e * u with exp(-inf) * -inf read as 0: clamp u to a finite floor first.
                stats_kn5[k, r0:r1, XLOGX] = u_bc.clamp_(min=floor).mul_(e_bc).sum(dim=-1)
                del e_bc
            else:
                stats_kn5[k, r0:r1, SUMEXP] = u_bc.exp_().sum(dim=-1)
            del u_bc
    stats_n5 = merge_row_stats(stats_kn5, temperature)
    local_n = targets_n.long() - vocab_start
    owner_n = (local_n >= 0) & (local_n < vocab)
    safe_local_n = torch.where(owner_n, local_n, torch.zeros_like(local_n))
    if vocab > 0:
        target_n = logits_nv.gather(1, safe_local_n[:, None])[:, 0].to(dtype)
        stats_n5[:, TARGET] = torch.where(owner_n, target_n, torch.zeros_like(target_n))
    stats_n5[:, OWNER] = owner_n.to(dtype)
    return stats_n5


def _scaled_shifted(
    logits_nc: torch.Tensor, max_n: torch.Tensor, temperature: float, dtype: torch.dtype
) -> torch.Tensor:
    """``(z - M) / T`` in ``dtype`` as a fresh tensor (never a view of the logits), one pass
    (two with a temperature)."""
    u_nc = torch.sub(logits_nc.to(dtype), max_n[:, None])
    if temperature != 1.0:
        u_nc.div_(temperature)
    return u_nc


def logprobs_backward(
    logits_nv: torch.Tensor,
    targets_n: torch.Tensor,
    vocab_start: int,
    temperature: float,
    max_n: torch.Tensor,
    logsumexp_n: torch.Tensor,
    grad_logp_n: torch.Tensor | None,
    entropy_n: torch.Tensor | None = None,
    grad_entropy_n: torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """``grad_logits [N, V]`` (logits' dtype) from the saved row max and log-sum-exp, chunked.

    ``d logp / d z_j = (1[j = target] - p_j) / T`` and
    ``d entropy / d z_j = -p_j (log p_j + entropy) / T``, so a row's gradient is
    ``(g 1[j = target] - p_j (g + gh (log p_j + entropy))) / T``.
    """
    n_rows, vocab = logits_nv.shape
    dtype = compute_dtype(logits_nv.dtype)
    dead_n = torch.isneginf(logsumexp_n)
    zeros_n = torch.zeros(n_rows, dtype=dtype, device=logits_nv.device)
    safe_m_n = torch.where(dead_n, zeros_n, max_n.to(dtype))
    safe_lse_n = torch.where(dead_n, zeros_n, logsumexp_n.to(dtype))
    g_n = zeros_n if grad_logp_n is None else torch.where(dead_n, zeros_n, grad_logp_n.to(dtype))
    with_entropy = grad_entropy_n is not None
    if with_entropy:
        gh_n = torch.where(dead_n, zeros_n, grad_entropy_n.to(dtype))
        h_n = torch.where(dead_n, zeros_n, entropy_n.to(dtype))
    local_n = targets_n.long() - vocab_start
    grad_nv = torch.empty_like(logits_nv)
    cols = chunk_columns(n_rows, vocab, chunk_size)
    floor = LOG_P_FLOOR
    for c0 in range(0, vocab, cols):
        width = min(cols, vocab - c0)
        for r0, r1 in row_blocks(n_rows, width):
            logq_bc = _scaled_shifted(
                logits_nv[r0:r1, c0 : c0 + cols], safe_m_n[r0:r1], temperature, dtype
            )
            logq_bc.sub_(safe_lse_n[r0:r1, None])  # log p_j
            g_b = g_n[r0:r1, None]
            if with_entropy:
                p_bc = torch.exp(logq_bc)
                # -p (g + gh (log p + H)), in the log p buffer
                gz_bc = logq_bc.clamp_(min=floor).add_(h_n[r0:r1, None]).mul_(gh_n[r0:r1, None])
                gz_bc.add_(g_b).mul_(p_bc).neg_()
                del p_bc
            else:
                gz_bc = logq_bc.exp_().mul_(-g_b)  # -p g, in place
            local_b = local_n[r0:r1] - c0
            rows_r = ((local_b >= 0) & (local_b < width)).nonzero()[:, 0]
            gz_bc[rows_r, local_b[rows_r]] += g_n[r0:r1][rows_r]
            if temperature != 1.0:
                gz_bc.div_(temperature)
            grad_nv[r0:r1, c0 : c0 + cols] = flush_subnormal_(gz_bc)
            del gz_bc
    return grad_nv


def flush_subnormal_(x: torch.Tensor) -> torch.Tensor:
    """``x`` with its subnormal values (magnitude below the dtype's smallest normal, 1.2e-38 in
    fp32 and bf16) set to 0, in place. A large vocabulary's improbable tokens give ``p g`` down
    there, and an x86 CPU multiplies subnormal inputs about 100x slower (measured: the output
    layer's weight-gradient matmul of 352 rows x 151,936, 14.7 s against 0.13 s); zero differs
    from them by less than fp32 resolves next to any normal value of the same sum. (Keeping
    ``exp`` from producing them in the first place, here and in the forward, measured no faster.)"""
    bits, exponent = _EXPONENT_BITS[x.dtype]
    # the exponent field read as an integer: arithmetic on the subnormals themselves is slow too
    x.masked_fill_(x.view(bits).bitwise_and(exponent) == 0, 0.0)
    return x


# integer view and exponent-field mask per float dtype (exponent 0: zero or subnormal)
_EXPONENT_BITS = {
    torch.float32: (torch.int32, 0x7F800000),
    torch.bfloat16: (torch.int16, 0x7F80),
    torch.float16: (torch.int16, 0x7C00),
    torch.float64: (torch.int64, 0x7FF0000000000000),
}


def logprobs_eager(
    logits_nv: torch.Tensor,
    targets_n: torch.Tensor,
    temperature: float = 1.0,
    return_entropy: bool = False,
):
    """``log_softmax(logits / T).gather(targets)`` in the logits' own dtype (autograd-able)."""
    logq_nv = torch.log_softmax(logits_nv / temperature, dim=-1)
    logp_n = logq_nv.gather(-1, targets_n.long()[..., None])[..., 0]
    if not return_entropy:
        return logp_n
    entropy_n = -(logq_nv.exp() * logq_nv.nan_to_num(neginf=0.0)).sum(-1)
    return logp_n, entropy_n


def sequence_log_weights(
    log_ratio_n: torch.Tensor, valid_n: torch.Tensor, seq_n: torch.Tensor, num_sequences: int
):
    """GSPO's per-sequence log weight, the masked mean of ``logp - old``: ``(logw_s, count_s)``."""
    count_s = torch.zeros(num_sequences, dtype=log_ratio_n.dtype, device=log_ratio_n.device)
    count_s = count_s.index_add(0, seq_n, valid_n.to(log_ratio_n.dtype))
    total_s = torch.zeros_like(count_s).index_add(0, seq_n, log_ratio_n)
    return total_s / count_s.clamp(min=1.0), count_s


def _policy_term(ratio_n, lp_n, adv_n, spec: GRPOLossSpec):
    """``(policy_n, clipped_low_n, clipped_high_n)`` of the spec's objective (autograd)."""
    none_n = torch.zeros_like(adv_n, dtype=torch.bool)
    if spec.objective == "clip":
        coef2_n = torch.clamp(ratio_n, 1 - spec.epsilon_low, 1 + spec.epsilon_high)
        coef1_n = ratio_n if spec.delta is None else torch.clamp(ratio_n, max=spec.delta)
        policy_n = -torch.min(coef1_n * adv_n, coef2_n * adv_n)
        low_n = (coef1_n < 1 - spec.epsilon_low) & (adv_n < 0)
        return policy_n, low_n, (coef1_n > 1 + spec.epsilon_high) & (adv_n > 0)
    if spec.objective == "cispo":
        capped_n = torch.clamp(ratio_n, max=spec.epsilon_high).detach()
        high_n = (ratio_n > spec.epsilon_high) & (adv_n > 0)
        return -capped_n * adv_n * lp_n, none_n, high_n
    if spec.objective == "sapo":
        tau_n = torch.where(adv_n > 0, spec.sapo_temperature_pos, spec.sapo_temperature_neg)
        tau_n = tau_n.to(ratio_n.dtype)
        return -torch.sigmoid(tau_n * (ratio_n - 1)) * 4 / tau_n * adv_n, none_n, none_n
    # "vespo": the gamma weight phi is the (constant) policy weight
    return -adv_n * lp_n, none_n, none_n


def grpo_loss_reference(logp_n, inputs, spec: GRPOLossSpec, weight_n=None):
    """Per-token GRPO loss (zero on masked tokens) and its metrics, TRL semantics, autograd.

    ``inputs`` is a :class:`grpo_loss.LossInputs`; ``weight_n`` the constant policy weight
    (:func:`policy_weights.policy_weight`). Only ``logp_n`` is differentiated; the other inputs
    are constants (as in TRL, which computes them without gradient). Masked tokens may hold any
    value (even -inf): they are replaced by zeros before any arithmetic, so they can neither
    poison the values nor the gradient. Returns ``(loss_n, metrics)`` with ``metrics =
    (clip_low, clip_high, clip_region, kl_mean)``, 0-dim tensors (``kl_mean`` is None without
    ``ref_n``).
    """
    valid_n = inputs.valid_n
    zeros_n = torch.zeros_like(logp_n)

    def clean(x_n):
        return torch.where(valid_n, x_n.detach().to(logp_n.dtype), zeros_n)

    lp_n = torch.where(valid_n, logp_n, zeros_n)
    old_n = lp_n.detach() if inputs.old_n is None else clean(inputs.old_n)
    adv_n = clean(inputs.adv_n)
    log_ratio_n = lp_n - old_n
    if spec.importance_sampling_level == "token":
        logw_n = log_ratio_n
    else:
        logw_s, count_s = sequence_log_weights(
            log_ratio_n, valid_n, inputs.seq_n, inputs.num_sequences
        )
        if spec.importance_sampling_level == "sequence":
            logw_n = logw_s[inputs.seq_n]
        else:  # "sequence_token": GSPO-token, sg[s_i] * pi_t / sg[pi_t]
            logw_n = lp_n - lp_n.detach() + logw_s.detach()[inputs.seq_n]
    ratio_n = torch.exp(logw_n)
    loss_n, low_n, high_n = _policy_term(ratio_n, lp_n, adv_n, spec)
    if weight_n is not None:
        loss_n = loss_n * clean(weight_n)
    kl_n = None
    if inputs.ref_n is not None:
        diff_n = clean(inputs.ref_n) - lp_n
        kl_n = torch.exp(diff_n) - diff_n - 1
        if spec.kl_bias_correction:
            kl_n = kl_n * ratio_n
        if spec.beta != 0.0:
            loss_n = loss_n + spec.beta * kl_n
    loss_n = torch.where(valid_n, loss_n, zeros_n)

    with torch.no_grad():
        valid_f = valid_n.to(logp_n.dtype)
        if spec.importance_sampling_level == "token":
            metric_w_n, denom = valid_f, valid_f.sum().clamp(min=1.0)
        else:  # TRL averages sequence-level clip indicators over sequences
            metric_w_n = valid_f / count_s.clamp(min=1.0)[inputs.seq_n]
            denom = torch.tensor(float(max(inputs.num_sequences, 1)), dtype=logp_n.dtype)
        metrics = tuple(
            (metric_w_n * ind_n.to(logp_n.dtype)).sum() / denom
            for ind_n in (low_n, high_n, low_n | high_n)
        )
        kl_mean = None if kl_n is None else (valid_f * kl_n).sum() / valid_f.sum().clamp(min=1.0)
    return loss_n, (*metrics, kl_mean)
