"""CPU tests of what surrounds the GPU-only calls: the rules that decide them, and the calls
megagrpo makes into megatron around them (observed through spies)."""

from __future__ import annotations

import sys
import types

import pytest

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
