"""Per-rank bodies of the multi-process rollout tests (spawned by tests/_multiproc.py)."""

from __future__ import annotations

import os

import torch

from megagrpo.rollout.weight_sync import (
    GroupSpec,
    StatelessGroup,
    receive_weights,
    send_weights,
    sync_weights_from_megatron,
)


def sync_test_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    """Tensors of every dtype weights come in, odd shapes, and one larger than a bucket."""
    g = torch.Generator().manual_seed(seed)
    return {
        "a.weight": torch.randn(7, 13, generator=g),
        "b.bias": torch.randn(5, generator=g).to(torch.bfloat16),
        "c.weight": torch.randn(3, 3, 3, generator=g).to(torch.float16),
        "d.big": torch.randn(64, 40, generator=g),  # 10240 bytes: larger than the bucket
        "e.index": torch.randint(-(2**40), 2**40, (9,), generator=g),
        "f.scalar": torch.tensor(float("nan")),
        "g.weight": torch.randn(1, 1, generator=g).to(torch.bfloat16),
    }


def broadcast_worker(port: int, world: int, bucket_bytes: int, version: int):
    """Rank 0 sends ``sync_test_tensors``; the others return what they received (copied)."""
    rank = int(os.environ["RANK"])
    spec = GroupSpec("127.0.0.1", port, world, "gloo", 60.0, group_id="test")
    group = StatelessGroup(spec, rank)
    try:
        if rank == 0:
            stats = send_weights(group, sync_test_tensors().items(), version, bucket_bytes)
            return {"stats": stats.__dict__}
        return {n: t.clone() for n, t in receive_weights(group, version)}
    finally:
        group.close()


class _Sender:
    """What a pool does on trainer rank 0, reduced to the broadcast."""

    def __init__(self, group, bucket_bytes):
        self.group, self.bucket_bytes = group, bucket_bytes

    def update_weights(self, named_tensors, version):
        send_weights(self.group, named_tensors, version, self.bucket_bytes)


def megatron_to_engine_worker(
    trainer_dir, engine_dir, trainer_port, sync_port, bucket_bytes, tp, pp
):
    """Ranks 0-1: a TP x PP = 2 megatron model of ``trainer_dir``; rank 2: a transformers
    engine started from ``engine_dir`` (other weights). Rank 0 broadcasts the live model's HF
    tensors to the engine, rank 1 runs the iterator alongside. The engine returns its weights."""
    rank = int(os.environ["RANK"])
    spec = GroupSpec("127.0.0.1", sync_port, 2, "gloo", 120.0, group_id="megatron-sync")
    if rank == 2:
        from megagrpo.rollout.hf_engine import TransformersEngine, TransformersEngineConfig

        engine = TransformersEngine.from_pretrained(TransformersEngineConfig(model=engine_dir))
        group = StatelessGroup(spec, 1)
        count = engine.update_weights(receive_weights(group, 1), 1)
        group.close()
        return {"count": count, "params": engine.state_dict_copy(), "version": 1}
    os.environ.update(WORLD_SIZE="2", MASTER_PORT=str(trainer_port))
    from megagrpo.config import MegatronConfig
    from megagrpo.conversion.hf_weights import load_hf_weights
    from megagrpo.conversion.safetensors_io import SafetensorsDir
    from megagrpo.distributed import init_distributed
    from megagrpo.models.arch import load_arch
    from megagrpo.models.builder import build_model

    par = MegatronConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    groups = init_distributed(par, seed=1234)
    arch = load_arch(trainer_dir)
    chunks = build_model(arch, par, pg_collection=groups.pg_collection)
    load_hf_weights(chunks, SafetensorsDir(trainer_dir), arch, groups)
    sender = None
    if rank == 0:
        sender = _Sender(StatelessGroup(spec, 0), bucket_bytes)
    sync_weights_from_megatron(chunks, arch, groups, sender, 1)
    if sender is not None:
        sender.group.close()
    return None


class FakeModel(torch.nn.Module):
    """Stands in for a vLLM model: ``load_weights`` records copies of what it is given."""

    def __init__(self):
        super().__init__()
        self.loaded: dict[str, torch.Tensor] = {}

    def load_weights(self, weights):
        for name, t in weights:
            self.loaded[name] = t.clone()


def vllm_extension_worker(port: int, world: int, bucket_bytes: int):
    """Rank 0 sends; ranks 1.. are vLLM workers of one instance (rank offset 1) that receive
    through ``WeightSyncExtension`` into their (fake) model, as ``collective_rpc`` would run."""
    from types import SimpleNamespace

    from megagrpo.rollout.vllm_worker import WeightSyncExtension

    rank = int(os.environ["RANK"])
    spec = GroupSpec("127.0.0.1", port, world, "gloo", 60.0, group_id="vllm-ext")
    if rank == 0:
        group = StatelessGroup(spec, 0)
        for version in (1, 2):  # two updates over the same group
            tensors = {n: t + version for n, t in sync_test_tensors().items()}
            send_weights(group, tensors.items(), version, bucket_bytes)
        group.close()
        return None

    class Worker(WeightSyncExtension):
        """What the extension uses of a vLLM worker: its model, vLLM's in-place reload, its
        tensor-parallel rank (the real worker is tested in test_rollout_vllm*.py)."""

        def __init__(self, rank_in_instance):
            self.rank = rank_in_instance
            self.model_runner = SimpleNamespace(model=FakeModel())

        def reload_weights(self, weights_iterator, is_checkpoint_format):
            assert is_checkpoint_format
            self.model_runner.model.load_weights(weights_iterator)

        def _megagrpo_rank_in_instance(self):
            return self.rank

    worker = Worker(rank - 1)
    counts = [worker.megagrpo_receive_weights(spec.to_dict(), 1, v) for v in (1, 2)]
    loaded = worker.model_runner.model.loaded
    worker._megagrpo_sync_group.close()
    return {"counts": counts, "loaded": loaded}
