"""The frozen reference policy of the KL term (beta > 0).

A second set of megatron model chunks with the policy's layout, loaded from the same starting
checkpoint and never updated. With ``ref_model_offload`` its weights live in pinned CPU memory
and visit the GPU only for the reference log-prob pass, so the update phase does not pay for them.
"""

from __future__ import annotations

import torch

from megagrpo.training.logprob_pass import fill_logprobs


class ReferenceModel:
    def __init__(self, chunks, *, offload: bool = False):
        self.chunks = chunks
        for c in chunks:
            c.eval()
            for p in c.parameters():
                p.requires_grad_(False)
        self.offload = offload and torch.cuda.is_available()
        if self.offload:
            self._move("cpu")

    def _move(self, device: str) -> None:
        for c in self.chunks:
            for p in c.parameters():
                data = p.data.to(device, non_blocking=True)
                p.data = data.pin_memory() if device == "cpu" else data
        if device != "cpu":
            torch.cuda.synchronize()

    @torch.no_grad()
    def fill(self, micro_batches, groups, *, temperature: float) -> None:
        """Set ``ref_logp_bl`` of every micro-batch."""
        if self.offload:
            self._move("cuda")
        try:
            fill_logprobs(
                self.chunks, micro_batches, groups, temperature=temperature, field="ref_logp_bl"
            )
        finally:
            if self.offload:
                self._move("cpu")
