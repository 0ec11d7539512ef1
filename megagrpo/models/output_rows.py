"""Running a GPTModel's output layer on some rows of its input only.

The loss reads the logits of the positions that predict a completion token; the prompt's
positions (often half of a GRPO sequence or more) only feed attention. ``output_rows`` makes the
last stage's output layer (``[s, b, h] -> [s, b, V / TP]``, the largest matmul of the model on a
150k vocabulary, forward and both backward products) run on the given rows of the flattened
``[s * b]`` positions, s-major: the model then returns logits ``[1, k, V / TP]``, row i being
position ``rows[i]``. TRL's ``logits_to_keep`` does the same for the completion's tail.

Under sequence parallelism the output layer's input is this TP rank's slice of the positions and
the layer all-gathers it; the rows are then taken from the gathered positions and the layer runs
without sequence parallelism for that call (its input replicated over TP, its input gradient
all-reduced there), as megatron-core's own inference path does for the last token's logits. The
gather's backward keeps this rank's slice of that all-reduced gradient.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch


def _output_layer(model):
    from megatron.core.utils import get_attr_wrapped_model

    if not get_attr_wrapped_model(model, "post_process"):
        return None
    return get_attr_wrapped_model(model, "output_layer")


@contextmanager
def output_rows(model, rows: torch.Tensor | None):
    """Within the block, ``model``'s output layer (on the last pipeline stage; elsewhere nothing
    changes) runs on ``rows`` (long [k]) of its input's flattened positions only; None: on all."""
    layer = _output_layer(model) if rows is not None else None
    if layer is None:
        yield
        return
    sequence_parallel = layer.sequence_parallel

    def select(module, args, kwargs):
        hidden = args[0]
        if sequence_parallel:
            from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

            hidden = gather_from_sequence_parallel_region(
                hidden, tensor_parallel_output_grad=False, group=module.tp_group
            )
            module.sequence_parallel = False
        flat = hidden.reshape(-1, 1, hidden.shape[-1])
        return (flat.index_select(0, rows.to(flat.device)), *args[1:]), kwargs

    def restore(module, args, output):
        module.sequence_parallel = sequence_parallel

    handles = [
        layer.register_forward_pre_hook(select, with_kwargs=True),
        layer.register_forward_hook(restore),
    ]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        layer.sequence_parallel = sequence_parallel
