"""vLLM behind the rollout protocol: colocated in a trainer process, or inside a rollout-server.

vLLM is imported only when a ``VLLMEngine`` is built (it does not install on CPU machines). The
names used here are vLLM's documented offline API (checked against vLLM's sources and docs, see
docs/rollout.md): ``LLM(model, tensor_parallel_size, gpu_memory_utilization, dtype, seed,
enable_sleep_mode, logprobs_mode="processed_logprobs", distributed_executor_backend,
worker_extension_cls)``, ``LLM.generate([{"prompt_token_ids": ...}], [SamplingParams])``,
``RequestOutput.outputs[i].token_ids / .logprobs (list of {token_id: Logprob(.logprob)}) /
.finish_reason``, ``LLM.sleep(level)``, ``LLM.wake_up(tags)``, ``LLM.reset_prefix_cache()``,
``LLM.collective_rpc(method, args=...)`` and the model's ``load_weights(weights=[(name, t)])``.

Modes (``VLLMConfig.mode``):

- ``colocate``: one ``LLM`` per trainer rank (``external_launcher``: vLLM's TP group is made of
  consecutive trainer ranks). With sleep mode the engine sleeps while the trainer trains:
  ``generate`` = wake (KV cache, and weights if still asleep) -> generate -> sleep;
  ``update_weights`` = wake the weights only -> ``load_weights`` per tensor -> reset the prefix
  cache (the KV cache stays asleep until the next ``generate``). Level 2 sleep discards weights,
  so after it ``generate`` refuses to run until a full ``update_weights``.
- ``server``: inside ``megagrpo rollout-server`` on its own GPUs; weights arrive over the sync
  group straight into every vLLM worker (``vllm_worker.WeightSyncExtension`` through
  ``collective_rpc``), never through the server process.

``logprobs_mode="processed_logprobs"`` makes vLLM return log-probs after penalties, temperature,
min-p, top-k and top-p, i.e. the distribution of ``protocol.py``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from megagrpo.rollout.protocol import RolloutRequest, Sample, SamplingParams, resolve_seeds

WORKER_EXTENSION = "megagrpo.rollout.vllm_worker.WeightSyncExtension"


def import_vllm():
    try:
        import vllm
    except ImportError as e:
        raise ImportError(
            "the vLLM rollout engine needs vLLM, which is not installed (it has CUDA-only "
            "wheels: pip install 'megagrpo[gpu]' on a GPU machine); on CPU use the "
            "transformers engine (use_vllm=False)"
        ) from e
    return vllm


@dataclass
class VLLMConfig:
    """A vLLM engine (field names follow GRPOConfig's ``vllm_*`` settings without the prefix)."""

    model: str = ""
    """Hugging Face model directory."""
    mode: str = "colocate"
    """``colocate`` (in the trainer process) or ``server`` (in a rollout-server)."""
    tensor_parallel_size: int = 1
    """vLLM tensor-parallel GPUs (``vllm_tensor_parallel_size``)."""
    gpu_memory_utilization: float = 0.9
    """Fraction of GPU memory vLLM may use (``vllm_gpu_memory_utilization``)."""
    dtype: str = "auto"
    """vLLM ``dtype``."""
    max_model_len: int | None = None
    """Prompt + completion tokens per sequence (vLLM's default: the model's)."""
    enable_sleep_mode: bool = True
    """colocate: release GPU memory between generations (``llm.sleep``)."""
    sleep_level: int = 1
    """1: weights to CPU, KV cache dropped; 2: weights dropped too (a full update must follow)."""
    seed: int = 0
    """vLLM's engine seed (per-request seeds come from the requests)."""
    enforce_eager: bool = False
    """Skip CUDA graphs."""
    max_num_seqs: int | None = None
    """vLLM's cap on sequences per step."""

    def __post_init__(self):
        if self.mode not in ("colocate", "server"):
            raise ValueError(f"VLLMConfig.mode must be colocate or server, got {self.mode!r}")
        if self.sleep_level not in (1, 2):
            raise ValueError(f"VLLMConfig.sleep_level must be 1 or 2, got {self.sleep_level}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(
                "VLLMConfig.gpu_memory_utilization must be in (0, 1], got "
                f"{self.gpu_memory_utilization}"
            )
        if self.tensor_parallel_size < 1:
            raise ValueError(
                f"VLLMConfig.tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}"
            )

    @property
    def sleeps(self) -> bool:
        return self.mode == "colocate" and self.enable_sleep_mode


def llm_kwargs(config: VLLMConfig) -> dict:
    """Keyword arguments of ``vllm.LLM`` for this configuration."""
    if not config.model:
        raise ValueError("VLLMConfig.model: a model directory is required")
    kw = dict(
        model=config.model,
        tensor_parallel_size=config.tensor_parallel_size,
        gpu_memory_utilization=config.gpu_memory_utilization,
        dtype=config.dtype,
        seed=config.seed,
        enforce_eager=config.enforce_eager,
        logprobs_mode="processed_logprobs",
        enable_sleep_mode=config.sleeps,
    )
    if config.max_model_len is not None:
        kw["max_model_len"] = config.max_model_len
    if config.max_num_seqs is not None:
        kw["max_num_seqs"] = config.max_num_seqs
    if config.mode == "colocate":
        kw["distributed_executor_backend"] = "external_launcher"
    else:
        kw["worker_extension_cls"] = WORKER_EXTENSION
    return kw


def vllm_sampling_params(vllm, sampling: SamplingParams, seed: int | None):
    """vLLM ``SamplingParams`` for one group (its seed, ``n`` samples, sampled-token log-probs).

    Our ``stop_token_ids`` replace the EOS ids: None keeps vLLM's EOS stop, () never stops
    early (``ignore_eos``), explicit ids stop on exactly those.
    """
    stop, ignore_eos = None, False
    if sampling.stop_token_ids is not None:
        ignore_eos = True
        stop = list(sampling.stop_token_ids) or None
    return vllm.SamplingParams(
        n=sampling.n,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        top_k=sampling.top_k if sampling.top_k > 0 else -1,
        min_p=sampling.min_p,
        repetition_penalty=sampling.repetition_penalty,
        max_tokens=sampling.max_tokens,
        stop_token_ids=stop,
        ignore_eos=ignore_eos,
        seed=seed,
        logprobs=0,
        detokenize=False,
    )


def _sampled_logprob(step_logprobs: dict, token_id: int, where: str) -> float:
    entry = step_logprobs.get(token_id)
    if entry is None:
        raise ValueError(f"{where}: vLLM returned no log-prob for the sampled token {token_id}")
    return float(getattr(entry, "logprob", entry))


def samples_from_output(
    output, request: RolloutRequest, n: int, weight_version: int
) -> list[Sample]:
    """One vLLM ``RequestOutput`` -> the group of ``Sample``s, ordered by completion index."""
    where = f"request {request.request_id!r}"
    completions = sorted(output.outputs, key=lambda c: c.index)
    if len(completions) != n:
        raise ValueError(f"{where}: vLLM returned {len(completions)} completions, expected {n}")
    group = []
    for c in completions:
        ids = [int(t) for t in c.token_ids]
        if c.logprobs is None or len(c.logprobs) != len(ids):
            raise ValueError(
                f"{where}: vLLM returned {0 if c.logprobs is None else len(c.logprobs)} log-prob "
                f"entries for {len(ids)} tokens (SamplingParams.logprobs must be 0)"
            )
        if c.finish_reason not in ("stop", "length"):
            raise ValueError(f"{where}: completion {c.index} finished with {c.finish_reason!r}")
        group.append(
            Sample(
                prompt_ids=list(request.prompt_ids),
                completion_ids=ids,
                logprobs=[_sampled_logprob(d, t, where) for d, t in zip(c.logprobs, ids)],
                finish_reason=c.finish_reason,
                weight_version=weight_version,
                request_id=request.request_id,
                index=int(c.index),
            )
        )
    return group


class VLLMEngine:
    """A ``RolloutEngine`` over ``vllm.LLM`` (see the module docstring for the two modes)."""

    def __init__(self, llm, config: VLLMConfig, *, vllm_module=None):
        self.llm, self.config = llm, config
        self._vllm = vllm_module if vllm_module is not None else import_vllm()
        self.weight_version = 0
        self.weight_receivers = config.tensor_parallel_size
        self._weights_awake = True
        self._kv_awake = True
        self._weights_valid = True

    @classmethod
    def from_config(cls, config: VLLMConfig, *, vllm_module=None) -> VLLMEngine:
        vllm = vllm_module if vllm_module is not None else import_vllm()
        engine = cls(vllm.LLM(**llm_kwargs(config)), config, vllm_module=vllm)
        if config.sleeps:
            engine.sleep()
        return engine

    # -- memory --------------------------------------------------------------------------------

    def sleep(self) -> None:
        """Free the GPU for the trainer (colocate with sleep mode)."""
        if not self.config.sleeps or not (self._weights_awake or self._kv_awake):
            return
        self.llm.sleep(level=self.config.sleep_level)
        self._weights_awake = self._kv_awake = False
        if self.config.sleep_level == 2:
            self._weights_valid = False

    def _wake_for_generation(self) -> None:
        if not self._weights_valid:
            raise RuntimeError(
                "vLLM slept at level 2, which discards the weights; call update_weights with "
                "the full model before generate (or use sleep_level=1)"
            )
        if not self._weights_awake:
            self.llm.wake_up()
        elif not self._kv_awake:
            self.llm.wake_up(tags=["kv_cache"])
        self._weights_awake = self._kv_awake = True

    # -- protocol ------------------------------------------------------------------------------

    def generate(
        self, requests: Sequence[RolloutRequest], sampling: SamplingParams
    ) -> list[list[Sample]]:
        requests = resolve_seeds(list(requests), sampling)
        prompts = [{"prompt_token_ids": list(r.prompt_ids)} for r in requests]
        params = [vllm_sampling_params(self._vllm, sampling, r.seed) for r in requests]
        if self.config.sleeps:
            self._wake_for_generation()
        try:
            outputs = self.llm.generate(prompts, params, use_tqdm=False)
        finally:
            if self.config.sleeps:
                self.sleep()
        if len(outputs) != len(requests):
            raise ValueError(f"vLLM returned {len(outputs)} outputs for {len(requests)} prompts")
        return [
            samples_from_output(o, r, sampling.n, self.weight_version)
            for o, r in zip(outputs, requests)
        ]

    def _local_model(self):
        """The model inside this process (colocate / external_launcher), as TRL reaches it."""
        return self.llm.llm_engine.model_executor.driver_worker.model_runner.model

    def update_weights(self, named_tensors: Iterable, version: int) -> int:
        """colocate: load HF-named tensors into the in-process vLLM model, one at a time."""
        if self.config.mode != "colocate":
            raise RuntimeError(
                "VLLMEngine(mode='server') takes weights over the sync group "
                "(receive_broadcast); update_weights is the colocated path"
            )
        if not isinstance(version, int) or version < 0:
            raise ValueError(f"update_weights: version must be an int >= 0, got {version!r}")
        if self.config.sleeps and not self._weights_awake:
            self.llm.wake_up(tags=["weights"])
            self._weights_awake = True
        model = self._local_model()
        count = 0
        for name, tensor in named_tensors:
            model.load_weights(weights=[(name, tensor)])
            count += 1
        self.llm.reset_prefix_cache()
        self._weights_valid = True
        self.weight_version = version
        return count

    def receive_broadcast(self, spec, rank_offset: int, version: int) -> int:
        """server: every vLLM worker joins the sync group and loads the broadcast buckets."""
        counts = self.llm.collective_rpc(
            "megagrpo_receive_weights", args=(spec.to_dict(), rank_offset, version)
        )
        if len(set(counts)) != 1:
            raise RuntimeError(f"vLLM workers loaded different numbers of tensors: {counts}")
        self.llm.reset_prefix_cache()
        self.weight_version = version
        return int(counts[0])

    def state_dict_copy(self):
        """colocate: the in-process model's parameters (vLLM's names, e.g. fused qkv_proj)."""
        if self.config.mode != "colocate":
            raise RuntimeError("VLLMEngine(mode='server') holds no model in this process")
        return {n: p.detach().cpu().clone() for n, p in self._local_model().named_parameters()}
