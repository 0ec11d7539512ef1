"""A pool of real engine processes (``megagrpo rollout-server``): the same groups as one engine,
weights broadcast bit-identical over gloo, an engine killed mid-batch, clean shutdown."""

from __future__ import annotations

import hashlib
import os
import signal
import threading
import time

import pytest
import torch

from megagrpo.rollout import wire
from megagrpo.rollout.hf_engine import TransformersEngine, TransformersEngineConfig
from megagrpo.rollout.pool import EngineCrashed, RolloutPool, RolloutPoolConfig
from megagrpo.rollout.protocol import RolloutEngine, RolloutRequest, SamplingParams


def _requests(seed, n):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 16, (n,), generator=g).tolist()
    return [
        RolloutRequest(tuple(torch.randint(8, 263, (k,), generator=g).tolist()), request_id=str(i))
        for i, k in enumerate(lengths)
    ]


def _alive(pid: int) -> bool:
    return os.path.exists(f"/proc/{pid}")


def _sha(t: torch.Tensor) -> str:
    return hashlib.sha256(
        t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    ).hexdigest()


def _assert_same_groups(a, b):
    assert len(a) == len(b)
    for ga, gb in zip(a, b):
        assert [s.completion_ids for s in ga] == [s.completion_ids for s in gb]
        assert [s.finish_reason for s in ga] == [s.finish_reason for s in gb]
        assert [s.request_id for s in ga] == [s.request_id for s in gb]
        for x, y in zip(ga, gb):
            assert x.logprobs == pytest.approx(y.logprobs, abs=1e-5)


@pytest.fixture(scope="module")
def setup(tiny_checkpoint):
    hf_dir = tiny_checkpoint("qwen2")
    engine = TransformersEngine.from_pretrained(TransformersEngineConfig(model=hf_dir))
    pool = RolloutPool(RolloutPoolConfig(model=hf_dir, num_engines=2, threads_per_engine=1))
    yield hf_dir, engine, pool
    pool.close()


def test_two_engines_return_the_groups_of_one(setup):
    hf_dir, engine, pool = setup
    reqs = _requests(0, 9)
    sp = SamplingParams(n=4, temperature=0.9, top_p=0.95, top_k=50, max_tokens=24, seed=11)
    assert isinstance(pool, RolloutEngine)
    out = pool.generate(reqs, sp)
    _assert_same_groups(out, engine.generate(reqs, sp))
    assert len({tuple(s.completion_ids) for g in out for s in g}) > 30  # real sampling
    assert all(s.weight_version == pool.weight_version for g in out for s in g)


def test_weights_broadcast_bit_identical_and_followed(setup):
    hf_dir, engine, pool = setup
    g = torch.Generator().manual_seed(3)
    new = {
        n: (p + 0.3 * p.std() * torch.randn(p.shape, generator=g)).detach()
        for n, p in engine.model.named_parameters()
    }
    stats = pool.update_weights(new.items(), 4)
    assert stats.tensors == len(new) and pool.weight_version == 4
    for digests in pool.weights_digests():
        assert {n: d[2] for n, d in digests.items()} == {n: _sha(t) for n, t in new.items()}
    engine.update_weights(new.items(), 4)
    reqs = _requests(1, 6)
    sp = SamplingParams(n=2, temperature=0.8, max_tokens=20, seed=5)
    out = pool.generate(reqs, sp)
    _assert_same_groups(out, engine.generate(reqs, sp))
    assert {s.weight_version for gr in out for s in gr} == {4}


def test_an_engine_killed_mid_batch_is_replaced_and_the_batch_completes(setup):
    hf_dir, engine, pool = setup
    reqs = _requests(2, 8)
    sp = SamplingParams(n=4, temperature=1.0, max_tokens=400, stop_token_ids=(), seed=9)
    victim = pool.engines[1]
    old_pid = victim.proc.pid
    killed = []

    def kill_when_busy():
        deadline = time.monotonic() + 60
        while not victim.busy and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(0.1)
        os.kill(old_pid, signal.SIGKILL)
        killed.append(time.monotonic())

    before = pool.restart_count
    t = threading.Thread(target=kill_when_busy)
    t.start()
    out = pool.generate(reqs, sp)
    t.join()
    assert killed and pool.restart_count == before + 1
    assert victim.proc.pid != old_pid and not _alive(old_pid)
    # the new process got the pool's current weights (version 4 if the test above ran)
    _assert_same_groups(out, engine.generate(reqs, sp))
    assert {s.weight_version for g in out for s in g} == {pool.weight_version}
    # and it takes part in the next broadcast (the sync group was rebuilt)
    current = engine.state_dict_copy()
    pool.update_weights(current.items(), pool.weight_version + 1)
    for digests in pool.weights_digests():
        assert {n: d[2] for n, d in digests.items()} == {n: _sha(t) for n, t in current.items()}


def test_an_engine_dead_between_calls_is_replaced_at_the_next_update(setup):
    hf_dir, engine, pool = setup
    old_pid = pool.engines[0].proc.pid
    os.kill(old_pid, signal.SIGKILL)
    pool.engines[0].proc.wait()
    current = engine.state_dict_copy()
    before = pool.restart_count
    pool.update_weights(current.items(), pool.weight_version + 1)
    assert pool.restart_count == before + 1 and pool.engines[0].proc.pid != old_pid
    for digests in pool.weights_digests():
        assert {n: d[2] for n, d in digests.items()} == {n: _sha(t) for n, t in current.items()}


def test_server_errors_come_back_and_the_engine_stays_up(setup):
    hf_dir, engine, pool = setup
    with pytest.raises(wire.ServerError, match=r"'x': token ids \[999\] are outside"):
        pool.generate([RolloutRequest((3, 999), request_id="x")], SamplingParams(max_tokens=4))
    with pytest.raises(wire.ServerError, match="unknown command 'dance'"):
        wire.call(pool.engines[0].sock, {"cmd": "dance"})
    assert len(pool.generate(_requests(3, 2), SamplingParams(max_tokens=4))) == 2


def test_shutdown_leaves_no_process(tiny_checkpoint, tmp_path):
    pool = RolloutPool(
        RolloutPoolConfig(
            model=tiny_checkpoint("qwen2"), num_engines=2, threads_per_engine=1,
            log_dir=str(tmp_path),
        )
    )  # fmt: skip
    pids = pool.engine_pids()
    assert all(_alive(p) for p in pids)
    # Without a kept copy, an engine restarted after an update cannot get the current weights.
    pool.config.keep_weights_copy = False
    pool.update_weights([("model.norm.weight", torch.ones(64))], 1)  # a partial update
    os.kill(pids[1], signal.SIGKILL)
    with pytest.raises(EngineCrashed, match=r"restarted after weight updates \(version 1\)"):
        pool.generate(_requests(4, 2), SamplingParams(max_tokens=4))
    pids += [p for p in pool.engine_pids() if p not in pids]  # the replacement process
    assert len(pids) == 3
    pool.close()
    assert not any(_alive(p) for p in pids)
    assert (
        "rollout-server: transformers engine on 127.0.0.1:"
        in (tmp_path / "engine0.log").read_text()
    )


def test_an_engine_that_cannot_start_is_reported(tmp_path):
    with pytest.raises(EngineCrashed, match="exited with code 1 while starting(.|\n)*no_model"):
        RolloutPool(RolloutPoolConfig(model=str(tmp_path / "no_model"), num_engines=1))
    with pytest.raises(ValueError, match="server_addresses: 'nohost' is not host:port"):
        RolloutPoolConfig(server_addresses=["nohost"])
