"""The reference policy of the KL term (beta > 0).

A second set of megatron model chunks with the policy's layout, loaded from the same starting
checkpoint and never trained. With ``ref_model_offload`` its weights live in pinned CPU memory
and visit the GPU only for the reference log-prob pass, so the update phase does not pay for them.

With ``sync_ref_model`` (TR-DPO, arXiv 2404.09656; TRL's ``SyncRefModelCallback``) every
``ref_model_sync_steps`` optimizer steps ``mix_in`` moves it towards the policy: each parameter
becomes ``alpha x policy + (1 - alpha) x reference``, in the parameters' dtype, shard by shard
(both models have the same TP x PP layout, so no communication). A reference that has been synced
is saved with each checkpoint (``checkpoint.REFERENCE_DIR``) and restored on resume.
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
        self.synced = False
        """Whether the weights moved from the starting checkpoint's (sync_ref_model)."""
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
    def mix_in(self, policy_chunks, alpha: float) -> None:
        """reference <- alpha x policy + (1 - alpha) x reference, parameter by parameter."""
        for ref_chunk, pol_chunk in zip(self.chunks, policy_chunks, strict=True):
            ref_params = dict(ref_chunk.named_parameters())
            pol_params = dict(pol_chunk.named_parameters())
            if ref_params.keys() != pol_params.keys():
                raise RuntimeError("the reference and the policy have different parameters")
            for name, ref in ref_params.items():
                pol = pol_params[name].detach().to(ref.device, ref.dtype)
                ref.mul_(1.0 - alpha).add_(pol, alpha=alpha)
        self.synced = True

    def fill(self, micro_batches, groups, *, temperature: float) -> None:
        """Set ``ref_logp_bl`` of every micro-batch."""
        self.fill_parts([micro_batches], groups, temperature=temperature)

    @torch.no_grad()
    def fill_parts(self, parts, groups, *, temperature: float) -> None:
        """``fill`` for lists of micro-batches (of one shape each), one visit to the GPU."""
        if self.offload:
            self._move("cuda")
        try:
            for micro_batches in parts:
                fill_logprobs(
                    self.chunks, micro_batches, groups, temperature=temperature, field="ref_logp_bl"
                )
        finally:
            if self.offload:
                self._move("cpu")
