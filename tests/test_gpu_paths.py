"""CPU tests of what surrounds the GPU-only calls: the rules that decide them, and the calls
megagrpo makes into megatron around them (observed through spies)."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from megagrpo.models import builder


@pytest.mark.parametrize("apex", [True, False])
def test_gradient_accumulation_fusion_needs_apex(monkeypatch, apex):
    # sys.modules[name] = None makes ``import name`` raise ImportError
    module = types.ModuleType("fused_weight_gradient_mlp_cuda") if apex else None
    monkeypatch.setitem(sys.modules, "fused_weight_gradient_mlp_cuda", module)
    assert builder.apex_grad_accum_fusion_available() is apex
    assert builder.use_gradient_accumulation_fusion(use_te=True) is apex
    assert builder.use_gradient_accumulation_fusion(use_te=False) is False


def test_local_spec_config_never_fuses_gradient_accumulation(monkeypatch):
    from megagrpo.config.megatron import MegatronConfig
    from megagrpo.demo.tiny_models import TINY_CONFIGS
    from megagrpo.models.arch import arch_from_hf_config

    monkeypatch.setitem(
        sys.modules, "fused_weight_gradient_mlp_cuda", types.ModuleType("fused_weight")
    )
    arch = arch_from_hf_config(dict(TINY_CONFIGS["qwen2"], vocab_size=100))
    config = builder.build_transformer_config(arch, MegatronConfig(), use_te=False)
    assert config.gradient_accumulation_fusion is False


def test_megatron_ddp_param_sync_takes_force_sync():
    import inspect

    from megatron.core.distributed import DistributedDataParallel

    assert "force_sync" in inspect.signature(DistributedDataParallel.start_param_sync).parameters


class _SpyChunk:
    """Stands in for a megatron DDP chunk: records the forced param all-gathers."""

    def __init__(self, events, overlap):
        self.events = events
        self.ddp_config = types.SimpleNamespace(
            use_distributed_optimizer=overlap, overlap_param_gather=overlap
        )

    def start_param_sync(self, *unused, force_sync=False):
        self.events.append(f"param_sync(force_sync={force_sync})")

    def zero_grad_buffer(self):
        pass

    def parameters(self):
        return iter(())


class _SpyOptimizer:
    def __init__(self, events):
        self.events = events
        self.param_groups = [{}]

    def zero_grad(self):
        pass

    def step(self):
        self.events.append("optimizer.step")
        return True, 1.0, None


def _spied_run(tmp_path, monkeypatch, events, *, overlap, total_steps=2, num_iterations=1):
    """A run whose model, data and I/O are spies, driven by the real ``loop.train``."""
    import megagrpo.conversion.hf_weights as hf_weights
    import megagrpo.training.evaluation as evaluation
    from megagrpo.config.recipe import Recipe
    from megagrpo.training import loop

    recipe = Recipe()
    t = recipe.training
    t.output_dir = str(tmp_path)
    t.num_iterations = num_iterations
    t.eval_strategy, t.eval_steps = "steps", 1
    t.save_strategy, t.save_steps = "steps", 1
    mb = types.SimpleNamespace(num_tokens=3)
    mb.to = lambda device: mb
    record = lambda name, result=None: lambda *a, **k: events.append(name) or result
    monkeypatch.setattr(loop, "broadcast_step", lambda *a: types.SimpleNamespace(metrics={}))
    monkeypatch.setattr(loop, "local_batch", lambda *a: None)
    monkeypatch.setattr(loop, "make_micro_batches", lambda *a, **k: [mb])
    monkeypatch.setattr(loop, "grpo_update", record("forward_backward", []))
    monkeypatch.setattr(loop, "reduce_metrics", lambda *a: {"loss": 0.0})
    monkeypatch.setattr(loop, "sync_weights_from_megatron", record("push"))
    monkeypatch.setattr(loop, "save_checkpoint", record("save"))
    monkeypatch.setattr(evaluation, "evaluate", record("eval", {}))
    monkeypatch.setattr(hf_weights, "save_megatron_shards", record("export"))
    groups = types.SimpleNamespace(
        rank=1, world_size=1, dp_size=1, dp_rank=0, tp_size=1, pp_size=1, vpp_size=1, cp_size=1
    )
    from megagrpo.training.generation_steps import GenerationSchedule

    return types.SimpleNamespace(
        recipe=recipe,
        generation=GenerationSchedule(parts=1, num_iterations=num_iterations),
        start_step=0,
        total_steps=total_steps,
        steps_per_epoch=total_steps,
        rollout=None,
        groups=groups,
        micro_batch_size=1,
        token_budget=None,
        tokenizer=types.SimpleNamespace(pad_token_id=0),
        device="cpu",
        needs_old_logprobs=False,
        reference=None,
        policy=[_SpyChunk(events, overlap), _SpyChunk(events, overlap)],
        modules=[],
        optimizer=_SpyOptimizer(events),
        loss_spec=types.SimpleNamespace(objective="clip"),
        importance_sampling=None,
        entropy_bonus=None,
        loss_type=None,
        schedule=types.SimpleNamespace(lr=lambda i: 1e-3),
        logger=types.SimpleNamespace(log=lambda *a: None, close=lambda: None),
        arch=None,
        model_dir=str(tmp_path),
        data=None,
    )


def test_param_gather_forced_before_push_save_eval_and_export(tmp_path, monkeypatch):
    from megagrpo.training import loop

    events: list[str] = []
    run = _spied_run(tmp_path, monkeypatch, events, overlap=True, num_iterations=2, total_steps=4)
    loop.train(run)
    sync = "param_sync(force_sync=True)"
    step = ["forward_backward", "optimizer.step", sync, sync]  # both chunks, after each step
    # two optimizer steps per generation batch (num_iterations=2): push, evaluation and save
    # after the second, though eval_steps = save_steps = 1
    assert events == (
        ["eval"]  # step 0: the starting weights, before any optimizer step
        + (step * 2 + ["push", "eval", "save"]) * 2
        + ["export"]
    )


def test_param_gather_not_forced_without_overlap(tmp_path, monkeypatch):
    from megagrpo.training import loop

    events: list[str] = []
    loop.train(_spied_run(tmp_path, monkeypatch, events, overlap=False, total_steps=1))
    assert events == [
        "eval",
        "forward_backward",
        "optimizer.step",
        "push",
        "eval",
        "save",
        "export",
    ]


@pytest.mark.parametrize(
    "fp8, fp8_recipe, expected",
    [(None, None, None), ("e4m3", None, "delayed"), ("hybrid", "tensorwise", "tensorwise")],
)
def test_fp8_settings_reach_megatrons_ddp_and_optimizer_configs(fp8, fp8_recipe, expected):
    from megagrpo.config.megatron import MegatronConfig
    from megagrpo.training.optimizer import OptimizerSettings, ddp_config, optimizer_config

    mc = MegatronConfig(
        fp8=fp8,
        fp8_recipe=fp8_recipe,
        fp8_param_gather=fp8 is not None,
        use_distributed_optimizer=True,
    )
    ddp = ddp_config(mc, on_gpu=True)
    assert ddp.fp8_param_gather is (fp8 is not None) and ddp.use_distributed_optimizer
    opt = optimizer_config(
        OptimizerSettings(learning_rate=1e-6), mc, params_dtype=torch.bfloat16, on_gpu=True
    )
    assert opt.fp8_recipe == expected and opt.use_distributed_optimizer and opt.bf16
    assert mc.fp8_scaling_recipe == expected
    # CPU: no distributed optimizer (it needs CUDA tensors)
    assert not ddp_config(mc, on_gpu=False).use_distributed_optimizer


class _FakeFloat8Tensor:
    """What matters of TE's Float8Tensor here: its module and ``dequantize``."""

    __module__ = "transformer_engine.pytorch.tensor.float8_tensor"

    def __init__(self, value):
        self.value = value

    def dequantize(self):
        return self.value


def test_fp8_parameters_are_dequantized_before_save_and_gather():
    from megagrpo.conversion.hf_weights import dequantized

    plain = torch.randn(3, 4, dtype=torch.bfloat16)
    assert dequantized(plain) is plain
    assert dequantized(_FakeFloat8Tensor(plain)) is plain


class _CountHostSyncs(torch.overrides.TorchFunctionMode):
    """Records the tensor methods that copy a device value to the host."""

    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types_, args=(), kwargs=None):
        if func in (torch.Tensor.item, torch.Tensor.__bool__, torch.Tensor.tolist):
            self.calls.append(func.__name__)
        return func(*args, **(kwargs or {}))


def test_host_sync_counter_sees_the_old_per_parameter_check():
    with _CountHostSyncs() as syncs:
        assert _old_gradients_are_finite(_chunks_with_main_grads())
    assert syncs.calls == ["__bool__"] * 5  # five parameters with a main_grad


def _old_gradients_are_finite(chunks) -> bool:
    """The check as it was: one device-to-host sync per parameter."""
    for m in chunks:
        for p in m.parameters():
            grad = getattr(p, "main_grad", None)
            if grad is not None and not torch.isfinite(grad).all():
                return False
    return True


def _chunks_with_main_grads(seed=0):
    gen = torch.Generator().manual_seed(seed)
    chunks = [
        torch.nn.Linear(4, 3),
        torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.LayerNorm(5)),
    ]
    for m in chunks:
        for p in m.parameters():
            p.main_grad = torch.randn(p.shape, generator=gen)
    frozen = chunks[1][1].bias  # a parameter without main_grad (frozen / not in a DDP buffer)
    del frozen.main_grad
    return chunks


@pytest.mark.parametrize("bad_value", [None, float("nan"), float("inf"), float("-inf")])
def test_gradients_are_finite_is_one_fused_check(bad_value):
    from megagrpo.training.loop import gradients_are_finite

    params = [
        p for m in _chunks_with_main_grads() for p in m.parameters() if hasattr(p, "main_grad")
    ]
    targets = [None] if bad_value is None else range(len(params))
    for target in targets:
        chunks = _chunks_with_main_grads()
        with_grad = [p for m in chunks for p in m.parameters() if hasattr(p, "main_grad")]
        if target is not None:
            with_grad[target].main_grad.view(-1)[-1] = bad_value
        before = [p.main_grad.clone() for p in with_grad]
        groups = types.SimpleNamespace(world_size=1)
        with _CountHostSyncs() as syncs:
            finite = gradients_are_finite(chunks, groups, "cpu")
        assert finite is (target is None) is _old_gradients_are_finite(chunks)
        assert syncs.calls == ["item"]  # one device-to-host copy, not one per parameter
        for p, b in zip(with_grad, before):  # the check leaves the gradients as they were
            torch.testing.assert_close(p.main_grad, b, equal_nan=True, rtol=0, atol=0)


def test_gpu_check_plan_lists_the_checks_on_any_machine():
    import os
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run(
        ["bash", os.path.join(root, "tools", "gpu_check.sh"), "--plan"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    for check in ("Triton kernels vs fp64", "bf16 logits vs transformers", "GRPO demo steps"):
        assert check in done.stdout
    assert "peak memory of one update" in done.stdout
