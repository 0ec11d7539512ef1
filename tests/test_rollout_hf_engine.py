"""The embedded transformers engine against transformers itself: fused-decoder logits, greedy
tokens equal to ``model.generate``, sampler log-probs equal to a teacher-forced recompute with
transformers' logits processors, stop handling, seeds, chunking, weight updates."""

from __future__ import annotations

import pytest
import torch

from megagrpo.rollout.decoder import FusedDecoder
from megagrpo.rollout.hf_engine import TransformersEngine, TransformersEngineConfig
from megagrpo.rollout.protocol import RolloutEngine, RolloutRequest, SamplingParams

EOS = 2  # <|im_end|> of the demo tokenizer


def _hf_model(hf_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(hf_dir).float().eval()


def _requests(seed, lengths, ids=None):
    g = torch.Generator().manual_seed(seed)
    return [
        RolloutRequest(tuple(torch.randint(8, 263, (n,), generator=g).tolist()), request_id=f"r{i}")
        for i, n in enumerate(lengths)
    ]


def _left_pad(requests):
    p = max(len(r.prompt_ids) for r in requests)
    ids = torch.zeros(len(requests), p, dtype=torch.long)
    mask = torch.zeros(len(requests), p, dtype=torch.long)
    for i, r in enumerate(requests):
        ids[i, p - len(r.prompt_ids) :] = torch.tensor(r.prompt_ids)
        mask[i, p - len(r.prompt_ids) :] = 1
    return ids, mask


@pytest.fixture(scope="module")
def qwen2(tiny_checkpoint):
    hf_dir = tiny_checkpoint("qwen2")
    return hf_dir, TransformersEngine(_hf_model(hf_dir), model_dir=hf_dir)


@pytest.mark.parametrize("name", ["qwen2", "qwen2-tied", "qwen3", "llama3"])
def test_fused_decoder_logits_equal_transformers(name, tiny_checkpoint):
    model = _hf_model(tiny_checkpoint(name))
    dec = FusedDecoder(model)
    reqs = _requests(0, [5, 9, 3], None)
    steps = 6
    g = torch.Generator().manual_seed(1)
    cont = torch.randint(8, 263, (3, steps), generator=g)
    ids, mask = _left_pad(reqs)
    p = ids.shape[1]
    cache = dec.new_cache(3, p + steps)
    logits = [dec.prefill(ids, mask, cache)]
    bias = torch.zeros(3, p + steps).masked_fill_(
        torch.cat([mask == 0, torch.zeros(3, steps, dtype=torch.bool)], 1), -torch.inf
    )
    lens = torch.tensor([len(r.prompt_ids) for r in reqs])
    for t in range(steps - 1):
        logits.append(dec.decode(cont[:, t], lens + t, p + t, cache, bias))
    with torch.no_grad():
        for i, r in enumerate(reqs):
            full = torch.cat([torch.tensor(r.prompt_ids), cont[i]])[None]
            ref = model(full).logits[0, len(r.prompt_ids) - 1 : len(r.prompt_ids) - 1 + steps]
            ours = torch.stack([lg[i] for lg in logits])
            assert (ours - ref).abs().max().item() <= 1e-5, name


@pytest.mark.parametrize("name", ["qwen2", "qwen3", "llama3"])
def test_greedy_equals_model_generate(name, tiny_checkpoint):
    hf_dir = tiny_checkpoint(name)
    model = _hf_model(hf_dir)
    engine = TransformersEngine(model, model_dir=hf_dir)
    reqs = _requests(2, [3, 11, 7, 11, 1])
    groups = engine.generate(reqs, SamplingParams(n=2, temperature=0, max_tokens=24))
    ids, mask = _left_pad(reqs)
    with torch.no_grad():
        ref = model.generate(
            input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=24,
            eos_token_id=EOS, pad_token_id=0,
        )[:, ids.shape[1] :].tolist()  # fmt: skip
    for group, expected in zip(groups, ref):
        if EOS in expected:
            expected = expected[: expected.index(EOS) + 1]
        for s in group:  # both greedy samples of a group are the same
            assert s.completion_ids == expected
            assert s.finish_reason == ("stop" if expected[-1] == EOS else "length")
            assert len(s.logprobs) == len(expected) and all(lp <= 0 for lp in s.logprobs)


def test_greedy_with_repetition_penalty_equals_model_generate(qwen2):
    hf_dir, engine = qwen2
    model = engine.model
    reqs = _requests(3, [6, 6, 6])  # equal lengths: transformers would penalise padding too
    groups = engine.generate(
        reqs, SamplingParams(temperature=0, repetition_penalty=1.5, max_tokens=30)
    )
    ids = torch.tensor([r.prompt_ids for r in reqs])
    with torch.no_grad():
        ref = model.generate(
            input_ids=ids, do_sample=False, max_new_tokens=30, repetition_penalty=1.5,
            eos_token_id=EOS, pad_token_id=0,
        )[:, ids.shape[1] :].tolist()  # fmt: skip
    plain = engine.generate(reqs, SamplingParams(temperature=0, max_tokens=30))
    for g, expected in zip(groups, ref):
        if EOS in expected:
            expected = expected[: expected.index(EOS) + 1]
        assert g[0].completion_ids == expected
    assert any(g[0].completion_ids != p[0].completion_ids for g, p in zip(groups, plain))


def _hf_processors(sp: SamplingParams):
    """transformers' own processors, in the order protocol.py defines (vLLM's)."""
    import transformers.generation.logits_process as lp

    procs = []
    if sp.repetition_penalty != 1:
        procs.append(lp.RepetitionPenaltyLogitsProcessor(sp.repetition_penalty))
    procs.append(lp.TemperatureLogitsWarper(sp.temperature))
    if sp.min_p > 0:
        procs.append(lp.MinPLogitsWarper(sp.min_p))
    if sp.top_k > 0:
        procs.append(lp.TopKLogitsWarper(sp.top_k))
    if sp.top_p < 1:
        procs.append(lp.TopPLogitsWarper(sp.top_p))
    return procs


@pytest.mark.parametrize(
    "sp",
    [
        SamplingParams(
            n=3, temperature=0.7, top_k=20, top_p=0.9, min_p=0.05, repetition_penalty=1.2,
            max_tokens=24, seed=1,
        ),
        SamplingParams(n=3, temperature=1.3, max_tokens=24, seed=2),
    ],
)  # fmt: skip
def test_sampler_logprobs_equal_teacher_forced_recompute(sp, qwen2):
    _, engine = qwen2
    model = engine.model
    groups = engine.generate(_requests(4, [4, 13, 8]), sp)
    procs = _hf_processors(sp)
    worst = 0.0
    with torch.no_grad():
        for group in groups:
            for s in group:
                full = torch.tensor(s.prompt_ids + s.completion_ids)[None]
                logits = model(full).logits[0]
                p = len(s.prompt_ids)
                for t, (tok, ours) in enumerate(zip(s.completion_ids, s.logprobs)):
                    z = logits[p - 1 + t][None].clone()
                    for proc in procs:
                        z = proc(full[:, : p + t], z)
                    ref = torch.log_softmax(z, -1)[0, tok].item()
                    assert ref > -float("inf"), "a filtered-out token was sampled"
                    worst = max(worst, abs(ref - ours))
    print(f"max |sampler - recompute| = {worst:.2e}")
    assert worst <= 1e-4, worst


def test_stop_tokens_and_finish_reasons(qwen2):
    _, engine = qwen2
    reqs = _requests(5, [5, 8])
    free = engine.generate(reqs, SamplingParams(temperature=0, max_tokens=16, stop_token_ids=()))
    assert all(len(g[0].completion_ids) == 16 and g[0].finish_reason == "length" for g in free)
    stop = free[0][0].completion_ids[5]
    cut = engine.generate(
        reqs, SamplingParams(temperature=0, max_tokens=16, stop_token_ids=(stop,))
    )
    for f, c in zip(free, cut):
        ids = f[0].completion_ids
        if stop in ids:
            k = ids.index(stop) + 1
            assert c[0].completion_ids == ids[:k] and c[0].finish_reason == "stop"
            assert c[0].logprobs == pytest.approx(f[0].logprobs[:k], abs=1e-6)
        else:
            assert c[0].completion_ids == ids and c[0].finish_reason == "length"


def test_dropping_finished_rows_changes_no_sample(qwen2):
    hf_dir, engine = qwen2
    reqs = _requests(6, [4, 9, 6, 12])
    sp = SamplingParams(n=4, temperature=1.0, max_tokens=20, seed=3, stop_token_ids=(9, 20, 33))
    keep_all = TransformersEngine(engine.model, TransformersEngineConfig(compact_below=0.0))
    drop_often = TransformersEngine(engine.model, TransformersEngineConfig(compact_below=1.0))
    a, b = keep_all.generate(reqs, sp), drop_often.generate(reqs, sp)
    lengths = [len(s.completion_ids) for g in a for s in g]
    assert min(lengths) < 20 and max(lengths) == 20  # rows did finish early
    for ga, gb in zip(a, b):
        for x, y in zip(ga, gb):
            assert x.completion_ids == y.completion_ids and x.finish_reason == y.finish_reason
            assert x.logprobs == pytest.approx(y.logprobs, abs=1e-5)


def test_groups_depend_on_their_seed_only(qwen2):
    hf_dir, engine = qwen2
    reqs = [
        RolloutRequest(r.prompt_ids, seed=100 + i, request_id=r.request_id)
        for i, r in enumerate(_requests(7, [3, 10, 6, 8]))
    ]
    sp = SamplingParams(n=4, temperature=1.0, top_p=0.95, max_tokens=16)
    full = engine.generate(reqs, sp)
    alone = engine.generate([reqs[2]], sp)
    chunked = TransformersEngine(engine.model, TransformersEngineConfig(max_batch_size=5))
    assert [s.completion_ids for s in alone[0]] == [s.completion_ids for s in full[2]]
    assert [[s.completion_ids for s in g] for g in chunked.generate(reqs, sp)] == [
        [s.completion_ids for s in g] for g in full
    ]
    assert len({tuple(s.completion_ids) for s in full[1]}) == 4  # samples of a group differ
    assert [s.request_id for s in full[3]] == ["r3"] * 4 and [s.index for s in full[3]] == [
        0, 1, 2, 3,
    ]  # fmt: skip
    other = engine.generate([RolloutRequest(reqs[2].prompt_ids, seed=5)], sp)
    assert [s.completion_ids for s in other[0]] != [s.completion_ids for s in full[2]]


def test_update_weights_in_place_and_outputs_follow(tiny_checkpoint):
    hf_dir = tiny_checkpoint("qwen2")
    engine = TransformersEngine(_hf_model(hf_dir), model_dir=hf_dir)
    reqs = _requests(8, [5, 9])
    sp = SamplingParams(temperature=0, max_tokens=20, stop_token_ids=())
    before = engine.generate(reqs, sp)
    target = _hf_model(hf_dir)
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for p in target.parameters():
            p.add_(0.5 * p.std() * torch.randn(p.shape, generator=g))
    assert isinstance(engine, RolloutEngine)
    params = [id(p) for p in engine.model.parameters()]
    count = engine.update_weights(((n, p.detach()) for n, p in target.named_parameters()), 3)
    assert count == len(list(target.named_parameters()))
    assert params == [id(p) for p in engine.model.parameters()]  # in place
    for (n, p), (_, q) in zip(engine.model.named_parameters(), target.named_parameters()):
        assert torch.equal(p, q), n
    after = engine.generate(reqs, sp)
    assert all(s.weight_version == 3 for g in after for s in g)
    assert [g[0].completion_ids for g in after] != [g[0].completion_ids for g in before]
    ids, mask = _left_pad(reqs)
    with torch.no_grad():
        ref = target.generate(
            input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=20,
            min_new_tokens=20, eos_token_id=EOS, pad_token_id=0,
        )[:, ids.shape[1] :].tolist()  # fmt: skip
    assert [g[0].completion_ids for g in after] == ref


def test_bad_updates_and_inputs(qwen2):
    _, engine = qwen2
    w = engine.model.model.embed_tokens.weight
    with pytest.raises(KeyError, match="no parameter 'model.embed.weight'"):
        engine.update_weights([("model.embed.weight", w)], 1)
    with pytest.raises(ValueError, match=r"has shape \(263, 64\), the update \(64, 263\)"):
        engine.update_weights([("model.embed_tokens.weight", w.t())], 1)
    with pytest.raises(ValueError, match="version must be an int >= 0"):
        engine.update_weights([], -1)
    with pytest.raises(ValueError, match=r"'bad': token ids \[263\] are outside the vocabulary"):
        engine.generate([RolloutRequest((1, 263), request_id="bad")], SamplingParams())
    with pytest.raises(ValueError, match="TransformersEngineConfig.dtype"):
        TransformersEngineConfig(dtype="float8")
    with pytest.raises(ValueError, match="TransformersEngineConfig.max_batch_size"):
        TransformersEngineConfig(max_batch_size=0)
