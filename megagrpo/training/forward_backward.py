"""Running micro-batches through megatron-core's forward/backward pipeline schedules (the
learning-rate schedule is ``lr_schedule.py``).

``forward_backward`` feeds every pipeline stage the same micro-batches (all ranks of a
model-parallel group hold the step's data), lets megatron pick the schedule (no pipelining, 1F1B,
interleaved 1F1B), and returns what the loss function produced for each micro-batch on the last
stage (an empty list elsewhere). The model runs ``model_io.model_input``'s layout (padded
``[b, L]``, packed ``[1, t]`` with its ``PackedSeqParams``, or this context-parallel rank's
positions of either) and the loss function receives the micro-batch and this rank's
vocab-parallel logits in that layout (``model_io.token_logprobs`` turns them into the
micro-batch's per-token log-probs).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext

import torch

from megagrpo.models.output_rows import output_rows
from megagrpo.training.model_io import model_input


def forward_backward(
    chunks,
    micro_batches: list,
    loss_fn: Callable,
    *,
    forward_only: bool,
    cp=None,
    rows_of: Callable | None = None,
) -> list[dict]:
    """``loss_fn(mb, logits, rows) -> (loss, metrics dict)``; returns the metrics dicts in
    order. ``cp``: the ``ContextParallel`` group, or None. ``rows_of(mb)``: the rows of the
    model's output positions the loss reads (``model_io.logit_rows``; the logits are then
    ``[1, rows, V]``), or None for all of them (``rows`` None)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    if not micro_batches:
        return []

    def forward_step(data_iterator, model):
        mb = next(data_iterator)
        ids, params = model_input(mb, cp)
        rows = rows_of(mb) if rows_of is not None else None
        kwargs = {} if params is None else {"packed_seq_params": params}
        with output_rows(model, rows):
            output = model(ids, None, attention_mask=None, **kwargs)
        return output, lambda logits: loss_fn(mb, logits, rows)

    iterators = [iter(micro_batches) for _ in chunks]  # one per model chunk (interleaved 1F1B)
    first = micro_batches[0]
    # the whole sequences' shape: megatron's schedules divide the length by CP (and by TP under
    # sequence parallelism) for the tensors pipeline stages exchange
    shape = (first.packed.input_ids_1t if first.packed is not None else first.input_ids_bl).shape
    context = torch.no_grad() if forward_only else nullcontext()
    with context:
        return get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iterators if len(chunks) > 1 else iterators[0],
            model=chunks if len(chunks) > 1 else chunks[0],
            num_microbatches=len(micro_batches),
            seq_length=shape[1],
            micro_batch_size=shape[0],
            forward_only=forward_only,
        )
