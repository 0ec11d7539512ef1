"""Methods megagrpo adds to every vLLM worker (``LLM(worker_extension_cls=...)``).

vLLM mixes this class into its worker class, so ``self`` is a vLLM worker: ``self.model_runner
.model`` is its shard of the model and ``load_weights`` takes full HF-named tensors and keeps
the worker's tensor-parallel slice. The rollout-server calls the methods on all workers at once
with ``llm.collective_rpc(name, args=...)``. Each worker joins the weight-sync group as rank
``rank_offset + its rank inside the vLLM instance`` and receives every bucket of the broadcast.
"""

from __future__ import annotations


class WeightSyncExtension:
    """Receive megagrpo's bucketed weight broadcast inside a vLLM worker."""

    def _megagrpo_rank_in_instance(self) -> int:
        try:
            from vllm.distributed.parallel_state import get_world_group

            return int(get_world_group().rank)
        except ImportError:  # only outside vLLM (unit tests)
            return int(self.rank)

    def _megagrpo_group(self, spec_dict: dict, rank_offset: int):
        from megagrpo.rollout.weight_sync import GroupSpec, StatelessGroup

        spec = GroupSpec.from_dict(spec_dict)
        current = getattr(self, "_megagrpo_sync_group", None)
        if current is None or current.spec.group_id != spec.group_id:
            if current is not None:
                current.close()
            rank = rank_offset + self._megagrpo_rank_in_instance()
            device = getattr(self, "device", None)
            self._megagrpo_sync_group = StatelessGroup(spec, rank, device=device)
        return self._megagrpo_sync_group

    def megagrpo_receive_weights(self, spec_dict: dict, rank_offset: int, version: int) -> int:
        """Join (once per group) and load one whole update; returns the number of tensors."""
        from megagrpo.rollout.weight_sync import drain, receive_weights

        group = self._megagrpo_group(spec_dict, rank_offset)
        stream = receive_weights(group, version)
        model = self.model_runner.model
        count = 0
        try:
            for name, tensor in stream:
                model.load_weights(weights=[(name, tensor)])
                count += 1
        finally:
            drain(stream)
        return count
