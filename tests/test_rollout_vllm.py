"""The vLLM engine against a stand-in that follows vLLM's documented offline API (vLLM itself
does not install on CPU machines): request building, output parsing, sleep / wake ordering,
weight loading paths, the import guard, and the engine factory."""

from __future__ import annotations

import importlib
import random
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest
import torch

from megagrpo.rollout.config import RolloutConfig, build_rollout_engine
from megagrpo.rollout.protocol import RolloutEngine, RolloutRequest, SamplingParams
from megagrpo.rollout.vllm_engine import (
    WORKER_EXTENSION,
    VLLMConfig,
    VLLMEngine,
    import_vllm,
    llm_kwargs,
    samples_from_output,
    vllm_sampling_params,
)
from megagrpo.rollout.weight_sync import GroupSpec

# -- a stand-in for the parts of vLLM the engine uses (names as in vllm/sampling_params.py,
#    vllm/outputs.py, vllm/logprobs.py and vllm/entrypoints/llm.py) ---------------------------


@dataclass(kw_only=True)
class FakeSamplingParams:
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: list | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    detokenize: bool = True
    skip_special_tokens: bool = True


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: None
    outputs: list[CompletionOutput]
    finished: bool = True


def fake_completion(prompt_ids, params: FakeSamplingParams, index: int) -> CompletionOutput:
    """Deterministic in (prompt, seed, index), like a seeded vLLM request."""
    rng = random.Random(hash((tuple(prompt_ids), params.seed, index)))
    length = rng.randint(1, params.max_tokens)
    ids = [rng.randrange(8, 100) for _ in range(length)]
    stopped = length < params.max_tokens
    if stopped:
        ids[-1] = (params.stop_token_ids or [2])[0]
    # vLLM returns the sampled token's entry plus (here) a more likely one with rank 1
    lps = [
        {t: Logprob(-0.01 * (k + 1), rank=2), 7: Logprob(-0.001, rank=1)} for k, t in enumerate(ids)
    ]
    return CompletionOutput(index, "", ids, None, lps, "stop" if stopped else "length")


@dataclass
class FakeLLM:
    calls: list = field(default_factory=list)
    kwargs: dict = field(default_factory=dict)

    def __post_init__(self):
        calls = self.calls

        class Model:
            def load_weights(self, weights):
                for name, t in weights:
                    calls.append(("load_weights", name, t.clone()))

        self.llm_engine = SimpleNamespace(
            model_executor=SimpleNamespace(
                driver_worker=SimpleNamespace(model_runner=SimpleNamespace(model=Model()))
            )
        )

    def generate(self, prompts, sampling_params=None, *, use_tqdm=True, lora_request=None):
        self.calls.append(("generate", len(prompts)))
        out = []
        for i, (p, sp) in enumerate(zip(prompts, sampling_params)):
            ids = p["prompt_token_ids"]
            comps = [fake_completion(ids, sp, j) for j in range(sp.n)][::-1]  # any order
            out.append(RequestOutput(str(i), None, ids, None, comps))
        return out

    def sleep(self, level: int = 1):
        self.calls.append(("sleep", level))

    def wake_up(self, tags: list[str] | None = None):
        self.calls.append(("wake_up", tags))

    def reset_prefix_cache(self):
        self.calls.append(("reset_prefix_cache",))

    def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
        self.calls.append(("collective_rpc", method, args))
        return [7] * self.kwargs.get("tensor_parallel_size", 1)


def fake_vllm():
    def make_llm(**kwargs):
        return FakeLLM(kwargs=kwargs)

    return SimpleNamespace(SamplingParams=FakeSamplingParams, LLM=make_llm)


def _names(calls):
    return [c[0] if c[0] != "load_weights" else "load" for c in calls]


REQS = [RolloutRequest((5, 6, 7), seed=1, request_id="a"), RolloutRequest((9,), request_id="b")]

# -- tests ----------------------------------------------------------------------------------


def test_llm_arguments_per_mode():
    colo = llm_kwargs(VLLMConfig(model="m", tensor_parallel_size=2, gpu_memory_utilization=0.3))
    assert colo["distributed_executor_backend"] == "external_launcher"
    assert colo["enable_sleep_mode"] is True and colo["logprobs_mode"] == "processed_logprobs"
    assert (colo["tensor_parallel_size"], colo["gpu_memory_utilization"]) == (2, 0.3)
    server = llm_kwargs(VLLMConfig(model="m", mode="server"))
    assert server["enable_sleep_mode"] is False and "distributed_executor_backend" not in server
    module, _, cls = server["worker_extension_cls"].rpartition(".")
    assert server["worker_extension_cls"] == WORKER_EXTENSION
    assert hasattr(importlib.import_module(module), cls)
    with pytest.raises(ValueError, match="VLLMConfig.model: a model directory is required"):
        llm_kwargs(VLLMConfig())
    with pytest.raises(ValueError, match="VLLMConfig.mode must be colocate or server"):
        VLLMConfig(mode="remote")
    with pytest.raises(ValueError, match="VLLMConfig.sleep_level must be 1 or 2"):
        VLLMConfig(sleep_level=3)


def test_sampling_params_in_vllm_terms():
    vllm = fake_vllm()
    sp = SamplingParams(
        n=8, temperature=0.7, top_p=0.9, top_k=0, min_p=0.05, repetition_penalty=1.1,
        max_tokens=128,
    )  # fmt: skip
    v = vllm_sampling_params(vllm, sp, seed=42)
    assert (v.n, v.temperature, v.top_p, v.top_k, v.min_p) == (8, 0.7, 0.9, -1, 0.05)
    assert (v.repetition_penalty, v.max_tokens, v.seed) == (1.1, 128, 42)
    assert v.logprobs == 0 and v.detokenize is False  # sampled-token log-prob, ids only
    assert (v.stop_token_ids, v.ignore_eos) == (None, False)  # vLLM's EOS
    never = vllm_sampling_params(vllm, SamplingParams(stop_token_ids=()), None)
    assert (never.stop_token_ids, never.ignore_eos) == (None, True)
    own = vllm_sampling_params(vllm, SamplingParams(stop_token_ids=(5, 9), top_k=20), None)
    assert (own.stop_token_ids, own.ignore_eos, own.top_k) == ([5, 9], True, 20)


def test_outputs_become_ordered_groups_with_sampled_logprobs():
    llm = FakeLLM()
    engine = VLLMEngine(
        llm, VLLMConfig(model="m", enable_sleep_mode=False), vllm_module=fake_vllm()
    )
    assert isinstance(engine, RolloutEngine)
    engine.weight_version = 6
    sp = SamplingParams(n=3, max_tokens=10, seed=123)
    groups = engine.generate(REQS, sp)
    assert [[s.index for s in g] for g in groups] == [[0, 1, 2], [0, 1, 2]]
    assert [g[0].request_id for g in groups] == ["a", "b"]
    for g, r in zip(groups, REQS):
        for s in g:
            assert s.prompt_ids == list(r.prompt_ids) and s.weight_version == 6
            assert s.logprobs == [-0.01 * (k + 1) for k in range(len(s.completion_ids))]
            assert s.finish_reason == ("stop" if len(s.completion_ids) < 10 else "length")
    assert _names(llm.calls) == ["generate"]  # no sleep mode: no sleep / wake
    # the same seeds give the same groups (the per-group seed is the request's)
    again = engine.generate(REQS, sp)
    assert [[s.completion_ids for s in g] for g in again] == [
        [s.completion_ids for s in g] for g in groups
    ]


def test_malformed_outputs_are_refused():
    req = REQS[0]
    good = fake_completion([1], FakeSamplingParams(max_tokens=4, seed=1), 0)
    out = RequestOutput("0", None, [1], None, [good])
    with pytest.raises(ValueError, match="'a': vLLM returned 1 completions, expected 2"):
        samples_from_output(out, req, 2, 0)
    no_lp = RequestOutput(
        "0", None, [1], None, [CompletionOutput(0, "", [3, 4], None, None, "length")]
    )
    with pytest.raises(ValueError, match="0 log-prob entries for 2 tokens"):
        samples_from_output(no_lp, req, 1, 0)
    abort = RequestOutput(
        "0", None, [1], None, [CompletionOutput(0, "", [3], None, [{3: Logprob(-1.0)}], "abort")]
    )
    with pytest.raises(ValueError, match="finished with 'abort'"):
        samples_from_output(abort, req, 1, 0)
    wrong = RequestOutput(
        "0", None, [1], None, [CompletionOutput(0, "", [3], None, [{4: Logprob(-1.0)}], "length")]
    )
    with pytest.raises(ValueError, match="no log-prob for the sampled token 3"):
        samples_from_output(wrong, req, 1, 0)


def test_colocated_sleep_wake_and_weight_loading_order():
    vllm = fake_vllm()
    engine = VLLMEngine.from_config(VLLMConfig(model="m"), vllm_module=vllm)
    llm = engine.llm
    assert llm.kwargs["enable_sleep_mode"] is True
    assert llm.calls == [("sleep", 1)]  # asleep until the first generation
    sp = SamplingParams(n=2, max_tokens=5, seed=0)
    engine.generate(REQS, sp)
    assert llm.calls[1:] == [("wake_up", None), ("generate", 2), ("sleep", 1)]
    del llm.calls[:]
    w = {"model.embed_tokens.weight": torch.ones(3, 2), "lm_head.weight": torch.zeros(3, 2)}
    assert engine.update_weights(w.items(), 1) == 2
    assert _names(llm.calls) == ["wake_up", "load", "load", "reset_prefix_cache"]
    assert llm.calls[0] == ("wake_up", ["weights"])  # weights only: the KV cache stays freed
    assert [c[1] for c in llm.calls if c[0] == "load_weights"] == list(w)
    assert all(torch.equal(c[2], w[c[1]]) for c in llm.calls if c[0] == "load_weights")
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


def test_server_mode_takes_weights_through_the_workers():
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


def test_import_guard_and_factory(tiny_checkpoint):
    try:
        import vllm  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match=r"pip install 'megagrpo\[gpu\]'"):
            import_vllm()
        with pytest.raises(ImportError, match="needs vLLM"):
            build_rollout_engine(RolloutConfig(use_vllm=True), "model")
    from megagrpo.rollout.hf_engine import TransformersEngine

    engine = build_rollout_engine(
        RolloutConfig(rollout_max_batch_size=64), tiny_checkpoint("qwen2")
    )
    assert isinstance(engine, TransformersEngine) and engine.config.max_batch_size == 64
    with pytest.raises(ValueError, match="RolloutConfig.vllm_mode must be colocate or server"):
        RolloutConfig(vllm_mode="remote")
    with pytest.raises(ValueError, match="RolloutConfig.rollout_num_engines must be >= 0"):
        RolloutConfig(rollout_num_engines=-1)
