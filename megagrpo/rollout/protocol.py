"""What every rollout engine speaks: sampling settings, requests, samples, the engine protocol.

An engine takes prompts (token ids) and returns, for each prompt, a *group* of ``n`` samples:

    engine.generate(requests, sampling) -> list[list[Sample]]   # one group per request, in order
    engine.update_weights(named_tensors, version)                # HF-named tensors, in place

Sampling distribution (the one ``Sample.logprobs`` refers to), for each generated position with
model logits ``z`` (float32) over the vocabulary:

1. repetition penalty ``r`` (CTRL / HF / vLLM form) over every token id present in the prompt or
   already generated: ``z_v / r`` where ``z_v > 0``, ``z_v * r`` otherwise;
2. temperature: ``z / T``;
3. min-p: drop tokens whose probability is below ``min_p`` x the top probability;
4. top-k: keep the ``k`` largest logits (ties with the k-th kept);
5. top-p: on the distribution that is left, sort ascending, drop the tokens whose cumulative
   probability is ``<= 1 - top_p`` (the most likely token always stays).

Dropped tokens get ``-inf``; the sample is drawn from ``softmax`` of what is left and its
log-prob is ``log_softmax`` of the same. This is vLLM's order (penalties, temperature, min-p,
top-k, top-p; ``logprobs_mode="processed_logprobs"``). With ``temperature == 0`` the engine is
greedy (argmax after the repetition penalty) and the log-prob is that of the penalised logits at
temperature 1 with no filter (what vLLM returns for greedy requests in processed mode).

Seeds: a request's samples are drawn from seeds that depend only on the request's seed and the
sample's index in its group, never on which engine or which batch runs it, so a pool of engines
returns the same groups as one engine (``request_seed`` / ``sample_seed``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal, Protocol, runtime_checkable

FinishReason = Literal["stop", "length"]
_MASK63 = (1 << 63) - 1


@dataclass(frozen=True)
class SamplingParams:
    """How to sample a group of completions (names follow GRPOConfig / vLLM)."""

    n: int = 1
    """Completions per prompt (``num_generations``)."""
    temperature: float = 1.0
    """Softmax temperature; 0 means greedy decoding."""
    top_p: float = 1.0
    """Nucleus sampling: smallest set of tokens with cumulative probability >= top_p; 1 = off."""
    top_k: int = 0
    """Keep the k most likely tokens; 0 (or -1) = off."""
    min_p: float = 0.0
    """Drop tokens with probability below min_p x the top probability; 0 = off."""
    repetition_penalty: float = 1.0
    """CTRL-style penalty on tokens of the prompt and the completion so far; 1 = off."""
    max_tokens: int = 256
    """Most new tokens per completion (``max_completion_length``)."""
    stop_token_ids: tuple[int, ...] | None = None
    """Token ids that end a completion (kept in it). None: the engine's EOS ids; () : never."""
    seed: int | None = None
    """Base seed: request i without its own seed uses ``request_seed(seed, i)``. None: random."""

    def __post_init__(self):
        _check(isinstance(self.n, int) and self.n >= 1, "n", "an integer >= 1", self.n)
        _check(self.temperature >= 0, "temperature", "a number >= 0", self.temperature)
        _check(0 < self.top_p <= 1, "top_p", "in (0, 1]", self.top_p)
        _check(isinstance(self.top_k, int) and self.top_k >= -1, "top_k", ">= -1", self.top_k)
        _check(0 <= self.min_p <= 1, "min_p", "in [0, 1]", self.min_p)
        _check(self.repetition_penalty > 0, "repetition_penalty", "> 0", self.repetition_penalty)
        _check(
            isinstance(self.max_tokens, int) and self.max_tokens >= 1,
            "max_tokens",
            "an integer >= 1",
            self.max_tokens,
        )
        if self.stop_token_ids is not None:
            ids = tuple(self.stop_token_ids)
            _check(
                all(isinstance(t, int) and t >= 0 for t in ids),
                "stop_token_ids",
                "non-negative token ids",
                self.stop_token_ids,
            )
            object.__setattr__(self, "stop_token_ids", ids)
        if self.top_k == -1:
            object.__setattr__(self, "top_k", 0)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @classmethod
    def from_config(cls, cfg: Any, **overrides) -> SamplingParams:
        """From a GRPOConfig-like object: num_generations, max_completion_length, temperature,
        top_p, top_k, min_p, repetition_penalty, seed (missing or None: the default here)."""
        names = {
            "n": "num_generations",
            "max_tokens": "max_completion_length",
            "temperature": "temperature",
            "top_p": "top_p",
            "top_k": "top_k",
            "min_p": "min_p",
            "repetition_penalty": "repetition_penalty",
            "seed": "seed",
        }
        kw = {}
        for ours, theirs in names.items():
            value = getattr(cfg, theirs, None)
            if value is not None:  # None (e.g. GRPOConfig's top_k / min_p): keep the default
                kw[ours] = value
        kw.update(overrides)
        return cls(**kw)

    def to_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["stop_token_ids"] = None if self.stop_token_ids is None else list(self.stop_token_ids)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SamplingParams:
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"SamplingParams: unknown field(s) {sorted(unknown)}")
        d = dict(d)
        if d.get("stop_token_ids") is not None:
            d["stop_token_ids"] = tuple(d["stop_token_ids"])
        return cls(**d)


@dataclass(frozen=True)
class RolloutRequest:
    """One prompt; the engine answers with a group of ``SamplingParams.n`` samples."""

    prompt_ids: tuple[int, ...]
    """Token ids of the prompt (chat template already applied), no padding."""
    seed: int | None = None
    """Seed of this group; None: derived from ``SamplingParams.seed`` and the request index."""
    request_id: str | None = None
    """Caller's label, returned unchanged on every sample of the group."""

    def __post_init__(self):
        ids = tuple(self.prompt_ids)
        if not ids:
            raise ValueError(f"RolloutRequest {self.request_id!r}: prompt_ids is empty")
        if not all(isinstance(t, int) and t >= 0 for t in ids):
            raise ValueError(
                f"RolloutRequest {self.request_id!r}: prompt_ids must be non-negative ints"
            )
        object.__setattr__(self, "prompt_ids", ids)


@dataclass
class Sample:
    """One completion and what the trainer needs to learn from it."""

    prompt_ids: list[int]
    completion_ids: list[int]
    """Generated ids, the stop token included when finish_reason == 'stop'."""
    logprobs: list[float]
    """Per completion token: log-prob under the distribution it was sampled from (module doc)."""
    finish_reason: FinishReason
    """'stop': a stop token was generated; 'length': max_tokens reached."""
    weight_version: int
    """Version of the weights that generated it (the last ``update_weights`` version)."""
    request_id: str | None = None
    index: int = 0
    """Position in its group."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "prompt_ids": list(self.prompt_ids),
            "completion_ids": list(self.completion_ids),
            "logprobs": [float(x) for x in self.logprobs],
            "finish_reason": self.finish_reason,
            "weight_version": int(self.weight_version),
            "request_id": self.request_id,
            "index": int(self.index),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Sample:
        return cls(**d)


@runtime_checkable
class RolloutEngine(Protocol):
    """Anything that samples groups of completions and takes new weights."""

    weight_version: int

    def generate(
        self, requests: Sequence[RolloutRequest], sampling: SamplingParams
    ) -> list[list[Sample]]: ...

    def update_weights(self, named_tensors: Iterable[tuple[str, Any]], version: int) -> None: ...


def _check(ok: bool, name: str, expected: str, got) -> None:
    if not ok:
        raise ValueError(f"SamplingParams.{name} must be {expected}, got {got!r}")


def _mix64(x: int) -> int:
    """splitmix64 finaliser: a well-spread 64-bit hash of ``x`` (Python ints, exact)."""
    x &= (1 << 64) - 1
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & ((1 << 64) - 1)
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & ((1 << 64) - 1)
    return x ^ (x >> 31)


def request_seed(base_seed: int, request_index: int) -> int:
    """Seed of request ``request_index`` of a batch sampled with ``SamplingParams.seed``."""
    return _mix64(_mix64(base_seed) + 0x9E3779B97F4A7C15 * (request_index + 1)) & _MASK63


def sample_seed(group_seed: int, sample_index: int) -> int:
    """Seed of sample ``sample_index`` of a group: depends on nothing else."""
    return _mix64(group_seed * 0x2545F4914F6CDD1D + sample_index + 1) & _MASK63


def resolve_seeds(
    requests: Sequence[RolloutRequest], sampling: SamplingParams
) -> list[RolloutRequest]:
    """Give every request an explicit seed (from ``sampling.seed`` and its index, or at random).

    Pools call this on the whole batch before splitting it, so each group's seed is the one a
    single engine would have used.
    """
    import secrets

    out = []
    for i, r in enumerate(requests):
        if r.seed is not None:
            out.append(r)
        elif sampling.seed is not None:
            out.append(replace(r, seed=request_seed(sampling.seed, i)))
        else:
            out.append(replace(r, seed=secrets.randbits(63)))
    return out


def as_requests(prompts: Iterable[Sequence[int] | RolloutRequest]) -> list[RolloutRequest]:
    """Accept plain token-id lists where requests are expected."""
    return [p if isinstance(p, RolloutRequest) else RolloutRequest(tuple(p)) for p in prompts]
