"""Asynchronous rollout with a real engine: staleness 0 is the synchronous loop, staleness 1
generates batch k+1 during the update on batch k, versions recorded, errors handed over."""

from __future__ import annotations

import time

import pytest
import torch

from megagrpo.data.errors import DataError
from megagrpo.rollout.async_rollout import AsyncRollout, AsyncRolloutConfig
from megagrpo.rollout.hf_engine import TransformersEngine, TransformersEngineConfig
from megagrpo.rollout.protocol import RolloutRequest, SamplingParams

SP = SamplingParams(n=2, temperature=1.0, max_tokens=8, seed=0)


@pytest.fixture(scope="module")
def engine(tiny_checkpoint):
    return TransformersEngine.from_pretrained(
        TransformersEngineConfig(model=tiny_checkpoint("qwen2"))
    )


def _batches(count):
    for k in range(count):
        yield [RolloutRequest((10 + k, 20, 30)), RolloutRequest((40, 50 + k))], SP


def _weights(engine, step):
    g = torch.Generator().manual_seed(step)
    return [
        (n, p.detach() + 1e-3 * torch.randn(p.shape, generator=g))
        for n, p in engine.model.named_parameters()
    ]


def _events(rollout, name):
    return {i: t for e, i, t in rollout.timeline if e == name}


def _train(rollout, engine, steps, train_s):
    seen = []
    for k in range(steps):
        batch = rollout.get(timeout=120)
        versions = {s.weight_version for g in batch.groups for s in g}
        assert versions == {batch.weight_version}
        seen.append((batch.index, batch.updates_before, batch.weight_version))
        time.sleep(train_s)  # the trainer's update on this batch
        rollout.update_weights(_weights(engine, k + 1), k + 1)
    return seen


def test_staleness_zero_is_synchronous(engine):
    engine.update_weights(_weights(engine, 0), 0)
    rollout = AsyncRollout(engine, _batches(3), AsyncRolloutConfig(max_staleness=0))
    seen = _train(rollout, engine, 3, 0.05)
    rollout.close()
    assert seen == [(0, 0, 0), (1, 1, 1), (2, 2, 2)]  # every batch from the newest weights
    start, update_end = _events(rollout, "gen_start"), _events(rollout, "update_end")
    for k in (1, 2):
        assert start[k] >= update_end[k - 1]  # batch k waited for update k


def test_staleness_one_overlaps_generation_with_the_update(engine):
    engine.update_weights(_weights(engine, 0), 0)
    rollout = AsyncRollout(engine, _batches(4), AsyncRolloutConfig(max_staleness=1))
    seen = _train(rollout, engine, 4, 0.3)
    rollout.close()
    assert [s[0] for s in seen] == [0, 1, 2, 3]
    for index, updates_before, version in seen:
        assert index - updates_before <= 1  # never more than one update behind
        assert version == updates_before
    assert seen[1][2] == 0  # batch 1 was generated with the weights of batch 0 ...
    start, end = _events(rollout, "gen_start"), _events(rollout, "gen_end")
    update_start = _events(rollout, "update_start")
    assert start[1] < update_start[0] and end[1] < update_start[0]  # ... during its update
    assert start[3] >= _events(rollout, "update_end")[1]  # but batch 3 waited for update 2


def test_end_of_stream_errors_and_timeouts(engine):
    rollout = AsyncRollout(engine, _batches(1), AsyncRolloutConfig(max_staleness=0))
    rollout.get(timeout=60)
    with pytest.raises(StopIteration):
        rollout.get(timeout=60)
    rollout.close()

    rollout = AsyncRollout(engine, _batches(2), AsyncRolloutConfig(max_staleness=0))
    rollout.get(timeout=60)
    with pytest.raises(TimeoutError):  # staleness 0 and no update pushed: batch 1 never starts
        rollout.get(timeout=0.3)
    rollout.close()

    bad = [([RolloutRequest((1, 999))], SP)]
    rollout = AsyncRollout(engine, bad)
    with pytest.raises(RuntimeError, match="the rollout producer failed") as e:
        rollout.get(timeout=60)
    assert "outside the vocabulary" in str(e.value.__cause__)
    rollout.close()

    def bad_row():  # a streamed dataset's bad row met while making the requests: the user's
        raise DataError("a.jsonl: row 3 (0-based), line 4: column 'problem' holds int 7")
        yield

    rollout = AsyncRollout(engine, bad_row())
    with pytest.raises(DataError, match="^a.jsonl: row 3"):  # as it is, for the one-line report
        rollout.get(timeout=60)
    rollout.close()
    with pytest.raises(ValueError, match="AsyncRolloutConfig.max_staleness must be an int >= 0"):
        AsyncRolloutConfig(max_staleness=-1)
