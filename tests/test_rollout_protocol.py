"""Rollout protocol and sampling math: validation, seeds, the filters against transformers'
own logits processors and hand-computed cases, the inverse-CDF draw."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from megagrpo.rollout import wire
from megagrpo.rollout.protocol import (
    RolloutRequest,
    Sample,
    SamplingParams,
    request_seed,
    resolve_seeds,
    sample_seed,
)
from megagrpo.rollout.sampling import (
    apply_min_p,
    apply_repetition_penalty,
    apply_top_k,
    apply_top_p,
    draw,
    processed_logprobs,
    uniforms_for,
)

# -- validation ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field,value,expected",
    [
        ("n", 0, "an integer >= 1"),
        ("temperature", -0.1, ">= 0"),
        ("top_p", 0.0, "(0, 1]"),
        ("top_p", 1.5, "(0, 1]"),
        ("top_k", -2, ">= -1"),
        ("min_p", 1.5, "[0, 1]"),
        ("repetition_penalty", 0.0, "> 0"),
        ("max_tokens", 0, "an integer >= 1"),
        ("stop_token_ids", (1, -3), "non-negative token ids"),
    ],
)
def test_bad_sampling_params_name_the_field(field, value, expected):
    with pytest.raises(ValueError) as e:
        SamplingParams(**{field: value})
    assert f"SamplingParams.{field}" in str(e.value) and expected in str(e.value)


def test_sampling_params_normalise_and_round_trip():
    sp = SamplingParams(n=4, top_k=-1, stop_token_ids=[5, 2], seed=3)
    assert sp.top_k == 0 and sp.stop_token_ids == (5, 2)
    assert SamplingParams.from_dict(sp.to_dict()) == sp
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['best_of'\]"):
        SamplingParams.from_dict({**sp.to_dict(), "best_of": 2})


def test_sampling_params_from_a_grpo_config():
    cfg = SimpleNamespace(
        num_generations=8,
        max_completion_length=128,
        temperature=0.7,
        top_p=0.95,
        top_k=None,  # GRPOConfig's "off"
        min_p=None,
        repetition_penalty=1.1,
        seed=42,
    )
    sp = SamplingParams.from_config(cfg, max_tokens=64)
    assert (sp.n, sp.max_tokens, sp.temperature, sp.top_p) == (8, 64, 0.7, 0.95)
    assert (sp.top_k, sp.min_p, sp.repetition_penalty, sp.seed) == (0, 0.0, 1.1, 42)


def test_bad_requests():
    with pytest.raises(ValueError, match="'q1': prompt_ids is empty"):
        RolloutRequest((), request_id="q1")
    with pytest.raises(ValueError, match="non-negative ints"):
        RolloutRequest((1, -2))


# -- seeds -----------------------------------------------------------------------------------


def test_seeds_depend_only_on_their_inputs():
    assert request_seed(7, 3) == request_seed(7, 3)
    seeds = {request_seed(7, i) for i in range(1000)} | {request_seed(8, i) for i in range(1000)}
    assert len(seeds) == 2000
    assert len({sample_seed(123, j) for j in range(64)}) == 64
    assert all(0 <= s < 2**63 for s in seeds)


def test_resolve_seeds_uses_the_index_in_the_whole_batch():
    reqs = [RolloutRequest((1, 2)), RolloutRequest((3,), seed=99), RolloutRequest((4,))]
    out = resolve_seeds(reqs, SamplingParams(seed=5))
    assert [r.seed for r in out] == [request_seed(5, 0), 99, request_seed(5, 2)]
    random = resolve_seeds(reqs, SamplingParams())
    assert random[1].seed == 99 and random[0].seed is not None


def test_uniform_rows_are_per_sample():
    u = uniforms_for([11, 12], n=3, steps=5)
    alone = uniforms_for([12], n=3, steps=5)
    assert torch.equal(u[3:], alone)  # group 12's rows do not depend on group 11
    assert torch.equal(uniforms_for([11], n=2, steps=5), u[:2])
    assert ((u >= 0) & (u < 1)).all()


# -- the filters against transformers' processors and by hand -------------------------------


def _hf(name, *args):
    import transformers.generation.logits_process as lp

    return getattr(lp, name)(*args)


def test_filters_match_transformers_processors():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(6, 50, generator=g) * 3
    seen = torch.rand(6, 50, generator=g) < 0.3
    ids = torch.stack([torch.nonzero(s).squeeze(1)[:5] for s in seen])  # penalised ids
    seen_rows = torch.zeros_like(seen).scatter_(1, ids, True)
    ours = apply_repetition_penalty(z, seen_rows, 1.3)
    ref = _hf("RepetitionPenaltyLogitsProcessor", 1.3)(ids, z.clone())
    assert torch.equal(ours, ref)
    for ours_fn, name, arg in [
        (apply_top_k, "TopKLogitsWarper", 7),
        (apply_top_p, "TopPLogitsWarper", 0.8),
        (apply_min_p, "MinPLogitsWarper", 0.1),
    ]:
        assert torch.equal(ours_fn(z, arg), _hf(name, arg)(ids, z.clone())), name


def test_processed_logprobs_by_hand():
    # logits log([0.5, 0.25, 0.15, 0.1]): top_p = 0.7 keeps {0.5, 0.25} (0.5 alone < 0.7)
    z = torch.log(torch.tensor([[0.5, 0.25, 0.15, 0.1]]))
    lp = processed_logprobs(z, SamplingParams(top_p=0.7))
    assert torch.allclose(lp.exp(), torch.tensor([[2 / 3, 1 / 3, 0, 0]]), atol=1e-6)
    # temperature 0.5 first: p^2 renormalised = [0.725, 0.181, 0.065, 0.029]; min_p 0.2 then
    # drops p < 0.145, leaving {0.725, 0.181} -> [0.8, 0.2] (min_p 0.35 would leave one token)
    lp = processed_logprobs(z, SamplingParams(min_p=0.2, temperature=0.5))
    assert torch.allclose(lp.exp(), torch.tensor([[0.8, 0.2, 0, 0]]), atol=1e-6)
    lp = processed_logprobs(z, SamplingParams(min_p=0.35, temperature=0.5))
    assert torch.equal(lp.exp(), torch.tensor([[1.0, 0, 0, 0]]))
    # vLLM's order: min_p before top_p. min_p 0.25 keeps {0.5, 0.25, 0.15} (renormalised to
    # 0.556, 0.278, 0.167); top_p 0.8 on that keeps {0.5, 0.25} -> 2/3, 1/3
    lp = processed_logprobs(z, SamplingParams(min_p=0.25, top_p=0.8))
    assert torch.allclose(lp.exp(), torch.tensor([[2 / 3, 1 / 3, 0, 0]]), atol=1e-6)
    # top_k 3 then top_p 0.9 over {0.5, 0.25, 0.15}/0.9: cumulative ascending 0.167 <= 0.1? no,
    # so all three stay
    lp = processed_logprobs(z, SamplingParams(top_k=3, top_p=0.9))
    assert torch.allclose(lp.exp(), torch.tensor([[0.5, 0.25, 0.15, 0]]) / 0.9, atol=1e-6)
    # greedy: penalised logits at temperature 1, no filter
    seen = torch.tensor([[True, False, False, False]])
    lp = processed_logprobs(z, SamplingParams(temperature=0, top_k=1, repetition_penalty=2.0), seen)
    ref = torch.log_softmax(torch.cat([z[:, :1] * 2.0, z[:, 1:]], 1), -1)
    assert torch.allclose(lp, ref)
    with pytest.raises(ValueError, match="seen-token mask"):
        processed_logprobs(z, SamplingParams(repetition_penalty=1.2))


def test_draw_is_the_inverse_cdf():
    p = torch.tensor([[0.0, 0.5, 0.0, 0.3, 0.2]])
    logp = torch.log(p)
    cases = [(0.0, 1), (0.4999, 1), (0.5, 3), (0.7999, 3), (0.8, 4), (1 - 2**-24, 4)]
    for u, expected in cases:
        assert draw(logp, torch.tensor([u])).item() == expected, u
    # the last token has probability 0: even u -> 1 never picks it
    q = torch.log(torch.tensor([[0.25, 0.75, 0.0]]))
    assert draw(q, torch.tensor([1 - 2**-24])).item() == 1


def test_draw_frequencies_follow_the_distribution():
    g = torch.Generator().manual_seed(3)
    probs = torch.softmax(torch.randn(1, 12, generator=g), -1)
    probs[0, 4] = 0
    probs /= probs.sum()
    u = torch.rand(200_000, generator=g)
    tok = draw(torch.log(probs).expand(u.shape[0], -1), u)
    freq = torch.bincount(tok, minlength=12).double() / u.shape[0]
    assert freq[4] == 0
    # 5 sigma of a binomial proportion
    sigma = torch.sqrt(probs[0].double() * (1 - probs[0].double()) / u.shape[0])
    assert ((freq - probs[0].double()).abs() <= 5 * sigma + 1e-9).all()


# -- wire ------------------------------------------------------------------------------------


def test_wire_round_trips_samples_and_requests_exactly():
    s = Sample([1, 2], [3, 4], [-0.1234567890123, -math.pi], "stop", 7, "r1", 2)
    groups = wire.decode_groups(wire.encode_groups([[s]]))
    assert groups[0][0] == s
    reqs = [RolloutRequest((5, 6), seed=2**62 + 1, request_id="a")]
    assert wire.decode_requests(wire.encode_requests(reqs)) == reqs
    with pytest.raises(wire.ServerError, match="boom"):
        wire.check_reply({"ok": False, "error": "boom"})
