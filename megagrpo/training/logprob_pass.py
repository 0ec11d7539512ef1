"""Per-token log-probs of the completions under a model, without gradients.

Used for the old policy (when the update is not exactly on-policy: num_iterations > 1, async
rollouts, or truncated importance sampling against the sampler) and for the frozen reference
model (beta > 0). The log-probs land in each micro-batch (``old_logp_bl`` / ``ref_logp_bl``) on
the last pipeline stage, where the loss is computed. The output layer runs on the completion
positions that count only (``model_io.logit_rows``).
"""

from __future__ import annotations

import functools

import torch

from megagrpo.distributed.context_parallel import ContextParallel
from megagrpo.training.forward_backward import forward_backward
from megagrpo.training.model_io import logit_rows, token_logprobs


def fill_logprobs(chunks, micro_batches, groups, *, temperature: float, field: str) -> None:
    """Set ``mb.<field>`` to the log-probs of ``mb.targets_bl`` under ``chunks``."""
    tp_group = groups.tp if groups.tp_size > 1 else None
    cp = ContextParallel.of(groups)
    was_training = [c.training for c in chunks]
    for c in chunks:
        c.eval()

    def loss_fn(mb, logits, rows):
        logp_bl, _ = token_logprobs(
            logits, mb, cp, temperature=temperature, tp_group=tp_group, rows=rows
        )
        return torch.zeros((), device=logits.device), {"logp": logp_bl.detach()}

    rows_of = functools.partial(logit_rows, cp=cp)
    try:
        outputs = forward_backward(
            chunks, micro_batches, loss_fn, forward_only=True, cp=cp, rows_of=rows_of
        )
    finally:
        for c, mode in zip(chunks, was_training):
            c.train(mode)
    for mb, out in zip(micro_batches, outputs):
        setattr(mb, field, out["logp"].to(mb.mask_bl.device) * mb.mask_bl)
