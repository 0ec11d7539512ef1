"""megagrpo_kernels: fused log-prob gathering (vocab-parallel, with entropy) and the GRPO loss.

Installed under the import name ``megagrpo_kernels`` (the directory is ``kernels/``); imports
nothing from ``megagrpo``, and importing it does not import Triton (the kernel modules load
lazily, see :mod:`megagrpo_kernels.backend`).

- :func:`logprobs`: ``logits [..., V] , targets [...] -> logp [...]`` (fp32), entropy on request,
  with backward; vocab-parallel with ``tp_group``.
- :class:`GRPOLossSpec`: every knob of the per-token loss (objective: clip / cispo / sapo / vespo,
  clipping, KL, importance-sampling level, masks), one frozen object.
- :func:`grpo_loss`: per-token GRPO loss (TRL semantics) + clip fractions and mean KL.
- :func:`logprob_grpo_loss`: logits straight to the loss (the training path).

Each runs the Triton kernels on CUDA and the chunked PyTorch references (:mod:`reference`) on
CPU; ``backend="triton"|"torch"`` forces one.
"""

from .fused_logprob_loss import logprob_grpo_loss
from .grpo_loss import GRPOLossOutput, grpo_loss
from .logprobs import logprobs
from .loss_spec import GRPOLossSpec

__all__ = ["GRPOLossOutput", "GRPOLossSpec", "grpo_loss", "logprob_grpo_loss", "logprobs"]
