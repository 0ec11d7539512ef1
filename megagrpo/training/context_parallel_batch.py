"""A micro-batch under context parallelism: this CP rank's share of the model's work and the
whole sequences' per-token log-probs back (the split and the gather are
``distributed/context_parallel.py``, which explains what is split and why the loss is exact).

Legend: b sequences, L the micro-batch's padded length, t packed tokens, C the CP size.

- ``model_input``: the input ids of this rank's positions ([b, L / C], or [1, t / C] of packed
  sequences with the whole sequences' ``PackedSeqParams``), what ``forward_backward`` feeds the
  model;
- ``cp_logprobs``: from this rank's logits, the log-probs (and entropies) of its positions' targets,
  all-gathered into the micro-batch's [b, L] layout, differentiable.

Without CP (``cp`` None) the model takes the whole micro-batch as before.
"""

from __future__ import annotations

import torch

from megagrpo.distributed.context_parallel import ContextParallel, gather_replicated, split


def _own(mb, cp: ContextParallel) -> torch.Tensor:
    if mb.packed is not None:
        return cp.packed_positions(mb.packed.cu_seqlens)
    return cp.positions(mb.input_ids_bl.shape[1])


def model_input(mb, cp: ContextParallel | None):
    """``(input_ids, PackedSeqParams or None)`` of this CP rank."""
    packed = mb.packed
    if packed is None:
        ids = mb.input_ids_bl
        return (ids if cp is None else split(ids, _own(mb, cp), 1)), None
    ids = packed.input_ids_1t
    return (ids if cp is None else split(ids, _own(mb, cp), 1)), packed.params()


def cp_logprobs(
    logits: torch.Tensor,
    mb,
    cp: ContextParallel,
    *,
    temperature: float,
    tp_group=None,
    with_entropy: bool = False,
):
    """``(logp_bl, entropy_bl or None)`` of the whole sequences from this rank's (vocab-parallel)
    ``logits`` [b, L / C, V / TP] (packed: [1, t / C, V / TP]); differentiable w.r.t. ``logits``
    (each rank's gradient reaches its own positions)."""
    from megagrpo_kernels import logprobs

    own = _own(mb, cp)
    packed = mb.packed
    targets = packed.targets_1t if packed is not None else mb.targets_bl
    out = logprobs(logits, split(targets, own, 1), temperature, tp_group, with_entropy)
    local = out if isinstance(out, tuple) else (out,)
    cu = packed.cu_seqlens if packed is not None else None
    whole = [gather_replicated(x, cp, 1, cu) for x in local]
    if packed is not None:  # [1, t] -> the micro-batch's [b, L]
        whole = [x[0][packed.unpack_bl] for x in whole]
    return whole[0], (whole[1] if with_entropy else None)
