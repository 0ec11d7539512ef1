"""Distributed start-up and the CPU redirection of megatron-core's CUDA assumptions."""

from __future__ import annotations

import pytest
import torch
from _multiproc import run_ranks

from megagrpo.config import MegatronConfig
from megagrpo.distributed import cpu_shim


def test_shim_refuses_to_run_where_cuda_exists(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(RuntimeError, match="must never be active on a GPU"):
        cpu_shim.enable()
    assert cpu_shim.enable_if_no_cuda() is False
    assert not cpu_shim.is_enabled()


def test_shim_redirects_cuda_devices_and_undoes_itself():
    original = torch.cuda.current_device
    cpu_shim.enable()
    try:
        assert cpu_shim.is_enabled()
        assert torch.empty(3, device="cuda").device.type == "cpu"
        assert torch.zeros(2, device=torch.device("cuda", 0)).device.type == "cpu"
        assert torch.ones(2, device=0).device.type == "cpu"
        x = torch.arange(4.0)
        assert x.cuda() is x
        assert x.to("cuda").device.type == "cpu"
        assert x.to("cuda:1", torch.float64).dtype == torch.float64
        assert torch.cuda.current_device() == "cpu"
        torch.cuda.manual_seed(5)
        state = torch.cuda.get_rng_state()
        a = torch.rand(3)
        torch.cuda.set_rng_state(state)
        assert torch.equal(torch.rand(3), a)
        # backward runs with the redirection active (megatron's recompute creates CUDA tensors)
        seen = []

        class Probe(torch.autograd.Function):
            @staticmethod
            def forward(ctx, t):
                return t * 2

            @staticmethod
            def backward(ctx, g):
                seen.append(torch.empty(1, device="cuda").device.type)
                return g * 2

        y = torch.ones(2, requires_grad=True)
        Probe.apply(y).sum().backward()
        assert seen == ["cpu"] and torch.equal(y.grad, torch.full((2,), 2.0))
        z = torch.ones(2, requires_grad=True)
        torch.autograd.backward([(Probe.apply(z) * 3).sum()])
        assert torch.equal(z.grad, torch.full((2,), 6.0))
    finally:
        cpu_shim.disable()
    assert not cpu_shim.is_enabled()
    assert torch.cuda.current_device is original


def _layout_worker(tp, pp, cp):
    from megagrpo.distributed import init_distributed

    g = init_distributed(
        MegatronConfig(
            tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, context_parallel_size=cp
        )
    )
    return (g.rank, g.tp_rank, g.pp_rank, g.cp_rank, g.dp_rank, g.dp_size, g.tp.size(), g.pp.size())


def test_four_ranks_form_the_megatron_grid():
    got = run_ranks(4, _layout_worker, 2, 1, 1)
    # megatron's default order tp-cp-ep-dp-pp: consecutive ranks share a TP group.
    assert [r[1] for r in got] == [0, 1, 0, 1]
    assert [r[4] for r in got] == [0, 0, 1, 1]
    assert all(r[5] == 2 and r[6] == 2 and r[7] == 1 for r in got)
    got = run_ranks(4, _layout_worker, 1, 2, 1)
    assert [r[2] for r in got] == [0, 0, 1, 1] and [r[4] for r in got] == [0, 1, 0, 1]


def _bad_world_worker():
    from megagrpo.distributed import init_distributed

    with pytest.raises(ValueError, match="world size 2 is not divisible by tensor_model_parallel"):
        init_distributed(MegatronConfig(tensor_model_parallel_size=4))
    return True


def test_world_size_must_fit_the_layout():
    assert run_ranks(2, _bad_world_worker) == [True, True]


def test_multi_rank_needs_torchrun_env(monkeypatch):
    from megagrpo.distributed import init_distributed

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(RuntimeError, match="MASTER_ADDR is not set; launch with torchrun"):
        init_distributed(MegatronConfig())
    cpu_shim.disable()
