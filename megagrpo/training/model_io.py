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


def model_input(mb, cp: ContextParallel | None):
    """``(input_ids, PackedSeqParams or None)`` of this rank."""
    packed = mb.packed
    if packed is None:
        ids = mb.input_ids_bl
        return (ids if cp is None else split(ids, _own(mb, cp), 1)), None
    ids = packed.input_ids_1t
    return (ids if cp is None else split(ids, _own(mb, cp), 1)), packed.params()


def token_logprobs(
    logits: torch.Tensor,
    mb,
    cp: ContextParallel | None,
    *,
    temperature: float,
    tp_group=None,
    with_entropy: bool = False,
):
    """``(logp_bl, entropy_bl or None)`` of the micro-batch's targets from the model's
    (vocab-parallel) ``logits`` in ``model_input``'s layout; differentiable w.r.t. ``logits``
    (under CP each rank's gradient reaches its own positions)."""
    from megagrpo_kernels import logprobs

    packed = mb.packed
    targets = packed.targets_1t if packed is not None else mb.targets_bl
    if cp is not None:
        targets = split(targets, _own(mb, cp), 1)
    out = logprobs(logits, targets, temperature, tp_group, with_entropy)
    values = list(out) if isinstance(out, tuple) else [out]
    if cp is not None:
        cu = packed.cu_seqlens if packed is not None else None
        values = [gather_replicated(x, cp, 1, cu) for x in values]
    if packed is not None:  # [1, t] -> the micro-batch's [b, L]
        values = [x[0][packed.unpack_bl] for x in values]
    return values[0], (values[1] if with_entropy else None)
