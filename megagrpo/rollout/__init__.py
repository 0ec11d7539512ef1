"""Rollout: engines that sample groups of completions, the pool that runs them, weight sync.

Modules (import what you need; nothing heavy is imported here):

- ``protocol``: SamplingParams, RolloutRequest, Sample, the RolloutEngine protocol, seeds.
- ``sampling``: the sampling distribution as tensor code; seeded draws.
- ``decoder`` / ``hf_engine``: the embedded transformers engine (static KV cache).
- ``vllm_engine`` / ``vllm_worker``: vLLM, colocated in a trainer process or behind a server.
- ``wire`` / ``server`` / ``pool``: ``megagrpo rollout-server`` processes and the pool client.
- ``weight_sync``: bucketed broadcast of HF-named tensors over a torch.distributed group.
- ``async_rollout``: generation of batch t+1 during the update on batch t, staleness-bounded.
"""

from megagrpo.rollout.protocol import RolloutEngine, RolloutRequest, Sample, SamplingParams

__all__ = ["RolloutEngine", "RolloutRequest", "Sample", "SamplingParams"]
