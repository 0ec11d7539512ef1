"""What the model takes and gives for one micro-batch.

Legend: b sequences, L the micro-batch's padded length, t packed tokens, C the CP size, V the
(vocab-parallel) vocabulary.

- ``model_input``: the input ids as the model runs them: the right-padded [b, L]; packed
  sequences back to back [1, t] with their ``PackedSeqParams`` (``packing.py``); under context
  parallelism this CP rank's positions of either ([b, L / C] or [1, t / C], with the whole
  sequences' ``PackedSeqParams``; ``distributed/context_parallel.py``).
- ``token_logprobs``: from the model's logits in that layout, the log-probs (and entropies) of
  the targets in the micro-batch's [b, L] layout, differentiable. Only per-token values move
  between layouts: the logits are never copied into another layout (for a packed micro-batch a
  [b, L, V] copy of its [1, t, V] logits, and that copy's scatter in the backward, cost more
  than the log-probs themselves on a large vocabulary); under CP they are all-gathered over the
  CP group, so the loss and its per-sequence reductions are the unsplit ones.

- ``logit_rows``: the positions of ``model_input``'s layout whose logits the loss reads (those
  predicting a completion token that counts), flattened the model's way (s-major); the output
  layer runs on them only (``models/output_rows.py``), and ``token_logprobs`` given them takes
  the model's logits ``[1, k, V]`` as those rows and puts the per-token values back in place
  (0 elsewhere, where the mask is 0).

The right-padded micro-batch without CP is the fused kernel's case: its loss takes the logits
itself (``policy_update.py``).
"""

from __future__ import annotations

import torch

from megagrpo.distributed.context_parallel import ContextParallel, gather_replicated, split


def _own(mb, cp: ContextParallel) -> torch.Tensor:
    if mb.packed is not None:
        return cp.packed_positions(mb.packed.cu_seqlens)
    return cp.positions(mb.input_ids_bl.shape[1])


def _model_layout(mb, cp: ContextParallel | None, x_bl: torch.Tensor, x_1t=None) -> torch.Tensor:
    """``x_bl`` (per position of the padded [b, L] layout; ``x_1t``: already packed) in
    ``model_input``'s layout."""
    packed = mb.packed
    if packed is not None and x_1t is None:
        x_1t = x_bl.new_zeros(packed.input_ids_1t.shape[1]).index_put_(
            (packed.unpack_bl.reshape(-1),),
            x_bl.reshape(-1),
            accumulate=True,  # positions past a sequence's end point at 0 with a value of 0
        )[None, :]
    x = x_1t if packed is not None else x_bl
    return x if cp is None else split(x, _own(mb, cp), 1)


def logit_rows(mb, cp: ContextParallel | None) -> torch.Tensor:
    """long [k >= 1]: the positions of ``model_input``'s layout ([B, S], flattened s-major as the
    model's [S, B] output) whose targets count in the loss (``mask_bl`` > 0); one row at least,
    so that every rank runs its output layer."""
    mask = _model_layout(mb, cp, mb.mask_bl)
    rows = mask.t().reshape(-1).nonzero().squeeze(1)
    return rows if rows.numel() else rows.new_zeros(1)


def model_input(mb, cp: ContextParallel | None):
    """``(input_ids, PackedSeqParams or None)`` of this rank."""
    packed = mb.packed
    if packed is None:
        return _model_layout(mb, cp, mb.input_ids_bl), None
    return _model_layout(mb, cp, mb.input_ids_bl, packed.input_ids_1t), packed.params()


def token_logprobs(
    logits: torch.Tensor,
    mb,
    cp: ContextParallel | None,
    *,
    temperature: float,
    tp_group=None,
    with_entropy: bool = False,
    rows: torch.Tensor | None = None,
):
    """``(logp_bl, entropy_bl or None)`` of the micro-batch's targets from the model's
    (vocab-parallel) ``logits`` in ``model_input``'s layout, or of its ``rows`` only
    (``logit_rows``; logits [1, k, V]); differentiable w.r.t. ``logits`` (under CP each rank's
    gradient reaches its own positions)."""
    from megagrpo_kernels import logprobs

    packed = mb.packed
    targets = _model_layout(
        mb, cp, mb.targets_bl, packed.targets_1t if packed is not None else None
    )
    if rows is not None:
        shape = targets.shape
        targets = targets.t().reshape(-1)[rows.to(targets.device)][None, :]
    out = logprobs(logits, targets, temperature, tp_group, with_entropy)
    values = list(out) if isinstance(out, tuple) else [out]
    if rows is not None:  # back in place: [1, k] -> [B, S]
        values = [_scatter_rows(x[0], rows, shape) for x in values]
    if cp is not None:
        cu = packed.cu_seqlens if packed is not None else None
        values = [gather_replicated(x, cp, 1, cu) for x in values]
    if packed is not None:  # [1, t] -> the micro-batch's [b, L]
        values = [x[0][packed.unpack_bl] for x in values]
    return values[0], (values[1] if with_entropy else None)


def _scatter_rows(values_k: torch.Tensor, rows: torch.Tensor, shape) -> torch.Tensor:
    """[B, S] zeros with ``values_k`` at the s-major ``rows`` (differentiable)."""
    flat = values_k.new_zeros(shape[1] * shape[0])
    flat = flat.index_put((rows.to(flat.device),), values_k)
    return flat.view(shape[1], shape[0]).t()
