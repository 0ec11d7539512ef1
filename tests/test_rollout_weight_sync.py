"""Weight sync: buckets bounded and reassembled bit for bit, a real gloo broadcast to several
receivers, megatron (TP=2) -> transformers engine end to end, and the vLLM worker extension."""

from __future__ import annotations

import pytest
import torch
from _multiproc import run_ranks
from _rollout_workers import (
    broadcast_worker,
    megatron_to_engine_worker,
    sync_test_tensors,
    vllm_extension_worker,
)

from megagrpo.distributed import free_port
from megagrpo.rollout.weight_sync import (
    GroupSpec,
    WeightSyncConfig,
    receive_weights,
    send_weights,
)


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
    )


class _Recorder:
    """An in-process stand-in for the group: rank 0 records, a receiver replays."""

    device = torch.device("cpu")

    def __init__(self, rank=0, log=None):
        self.rank, self.log = rank, [] if log is None else log
        self.pos = 0

    def broadcast_json(self, obj=None, src=0):
        if self.rank == 0:
            self.log.append(("json", obj))
            return obj
        kind, value = self.log[self.pos]
        self.pos += 1
        return value

    def broadcast(self, tensor, src=0):
        if self.rank == 0:
            self.log.append(("data", tensor.clone()))
        else:
            kind, value = self.log[self.pos]
            self.pos += 1
            tensor.copy_(value)


def test_buckets_are_bounded_and_reassemble_bit_for_bit():
    tensors = sync_test_tensors()
    sender = _Recorder()
    stats = send_weights(sender, tensors.items(), 5, bucket_bytes=1024)
    sizes = [v.numel() for k, v in sender.log if k == "data"]
    headers = [v for k, v in sender.log if k == "json"]
    assert headers[-1] == {"version": 5, "last": True, "nbytes": 0, "entries": []}
    big = tensors["d.big"].numel() * 4
    assert sorted(sizes)[-1] == big and all(s <= 1024 for s in sizes if s != big)
    assert stats.tensors == 7 and stats.buckets == len(sizes) >= 3
    assert stats.bytes == sum(sizes)
    got = {n: t.clone() for n, t in receive_weights(_Recorder(1, sender.log), 5)}
    assert list(got) == list(tensors)  # order kept
    for n in tensors:
        assert _bits_equal(got[n], tensors[n]), n


def test_a_receiver_refuses_another_version():
    sender = _Recorder()
    send_weights(sender, sync_test_tensors().items(), 2, bucket_bytes=4096)
    with pytest.raises(RuntimeError, match="expected version 3, the sender sends 2"):
        list(receive_weights(_Recorder(1, sender.log), 3))


def test_bad_sync_settings():
    with pytest.raises(ValueError, match="WeightSyncConfig.bucket_bytes must be >= 64"):
        WeightSyncConfig(bucket_bytes=8)
    with pytest.raises(ValueError, match="WeightSyncConfig.backend must be auto, gloo or nccl"):
        WeightSyncConfig(backend="mpi")
    with pytest.raises(ValueError, match="rank 3 is outside world size 2"):
        from megagrpo.rollout.weight_sync import StatelessGroup

        StatelessGroup(GroupSpec("127.0.0.1", free_port(), 2), 3)


def test_gloo_broadcast_to_two_receivers_is_bit_identical():
    out = run_ranks(3, broadcast_worker, free_port(), 3, 1024, 7)
    tensors = sync_test_tensors()
    assert out[0]["stats"]["tensors"] == 7
    for received in out[1:]:
        assert list(received) == list(tensors)
        for n, t in tensors.items():
            assert _bits_equal(received[n], t), n


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_megatron_weights_reach_an_engine_bit_identical(tp, pp, tiny_checkpoint, tmp_path):
    """The trainer's live TP=2 or PP=2 model (seed 0 weights) replaces an engine's weights."""
    from megagrpo.conversion.safetensors_io import SafetensorsDir
    from megagrpo.demo.tiny_models import save_tiny_checkpoint

    trainer_dir = tiny_checkpoint("qwen2")
    engine_dir = str(tmp_path / "other")
    save_tiny_checkpoint("qwen2", engine_dir, seed=1)
    ports = free_port(), free_port()
    out = run_ranks(3, megatron_to_engine_worker, trainer_dir, engine_dir, *ports, 4096, tp, pp)
    engine = out[2]
    src = SafetensorsDir(trainer_dir)
    assert engine["count"] == len(src.names())
    assert sorted(engine["params"]) == sorted(src.names())
    for n in src.names():
        assert _bits_equal(engine["params"][n], src.get(n)), n


def test_vllm_worker_extension_receives_every_bucket():
    out = run_ranks(3, vllm_extension_worker, free_port(), 3, 512)
    expected = {n: t + 2 for n, t in sync_test_tensors().items()}  # the second update
    for worker in out[1:]:
        assert worker["counts"] == [7, 7]
        for n, t in expected.items():
            assert _bits_equal(worker["loaded"][n], t), n
