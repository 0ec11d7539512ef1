"""Methods megagrpo adds to every vLLM worker (``LLM(worker_extension_cls=...)``).

vLLM mixes this class into its worker class, so ``self`` is a vLLM worker: ``self.model_runner
.model`` is its shard of the model, and ``self.reload_weights`` (vLLM's in-place reload) takes
full HF-named tensors and keeps the worker's tensor-parallel slice. ``VLLMEngine`` calls the
methods on all workers at once with ``llm.collective_rpc(name, args=...)``:

- ``megagrpo_load_weights``: colocated engines (the worker lives in the trainer process, so the
  tensors are passed, not copied);
- ``megagrpo_receive_weights``: rollout-servers; each worker joins the weight-sync group as rank
  ``rank_offset + its rank inside the vLLM instance`` and receives every bucket of the broadcast;
- ``megagrpo_record_digests`` / ``megagrpo_weights_digest``: sha256 of the tensors the worker
  loaded in its last update, for checks.
"""

from __future__ import annotations


class WeightSyncExtension:
    """Load and check weights inside a vLLM worker."""

    def _megagrpo_rank_in_instance(self) -> int:
        from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

        return int(get_tensor_model_parallel_rank())

    def _megagrpo_group(self, spec_dict: dict, rank_offset: int):
        from megagrpo.rollout.weight_sync import GroupSpec, StatelessGroup

        spec = GroupSpec.from_dict(spec_dict)
        current = getattr(self, "_megagrpo_sync_group", None)
        if current is None or current.spec.group_id != spec.group_id:
            if current is not None:
                current.close()
            rank = rank_offset + self._megagrpo_rank_in_instance()
            device = getattr(self, "device", None)
            if device is not None and getattr(device, "type", "cpu") == "cpu":
                device = None
            self._megagrpo_sync_group = StatelessGroup(spec, rank, device=device)
        return self._megagrpo_sync_group

    def _megagrpo_reload(self, named_tensors) -> int:
        """Load HF-named full tensors through vLLM's in-place reload (which re-runs the
        per-layer weight processing; a bare ``model.load_weights`` after start-up is refused)."""
        count = 0
        digests = getattr(self, "_megagrpo_digests", None)
        if digests is not None:
            from megagrpo.rollout.weight_sync import tensor_digest

            digests.clear()

        def counted():
            nonlocal count
            for name, tensor in named_tensors:
                count += 1
                if digests is not None:
                    digests[name] = tensor_digest(tensor)
                yield name, tensor

        self.reload_weights(weights_iterator=counted(), is_checkpoint_format=True)
        _refresh_tied_cpu_gemms(self.model_runner.model)
        return count

    def megagrpo_load_weights(self, named_tensors) -> int:
        """Load an iterable of (HF name, full tensor): a whole update (colocated engines)."""
        return self._megagrpo_reload(named_tensors)

    def megagrpo_receive_weights(self, spec_dict: dict, rank_offset: int, version: int) -> int:
        """Join (once per group) and load one whole update; returns the number of tensors."""
        from megagrpo.rollout.weight_sync import drain, receive_weights

        group = self._megagrpo_group(spec_dict, rank_offset)
        stream = receive_weights(group, version)
        try:
            return self._megagrpo_reload(stream)
        finally:
            drain(stream)  # the sender's broadcasts must all be matched, even after an error

    def megagrpo_record_digests(self, on: bool) -> bool:
        """Keep a sha256 per tensor of every later update (for checks; it costs a pass over the
        weights per update). vLLM's CPU build repacks linear weights for its GEMM kernels and
        drops the parameters, so what a worker loaded is checked as it goes in."""
        self._megagrpo_digests = {} if on else None
        return on

    def megagrpo_weights_digest(self) -> dict[str, list]:
        """{HF name: [dtype, shape, sha256]} of the tensors this worker loaded in the last update
        (recorded since ``megagrpo_record_digests(True)``)."""
        digests = getattr(self, "_megagrpo_digests", None)
        if digests is None:
            raise RuntimeError(
                "this vLLM worker records no weight digests: start the rollout-server with "
                "--record-weight-digests"
            )
        return dict(digests)


def _refresh_tied_cpu_gemms(model) -> None:
    """vLLM's CPU build packs each linear layer's weight for its GEMM kernel when the layer's
    weights are processed. A tied LM head shares the embedding's parameter but is a layer of its
    own, and the in-place reload re-processes only the embedding: the head would keep computing
    logits with the packed copy of the old weights. Re-pack every layer that still holds its
    2-D weight next to a packed kernel (the tied head; layers whose weights were re-processed
    dropped theirs)."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    for module in model.modules():
        weight = getattr(module, "weight", None)
        method = getattr(module, "quant_method", None)
        if hasattr(module, "cpu_linear") and method is not None and weight is not None:
            if weight.ndim == 2 and weight.numel() > 0 and not weight.is_meta:
                method.process_weights_after_loading(module)
