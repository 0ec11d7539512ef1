"""The local spec's SDPA core attention equals megatron-core's DotProductAttention (outputs and
gradients, GQA, tensor-parallel heads), and falls back to it for masks SDPA does not cover here."""

from __future__ import annotations

import torch
from _multiproc import run_ranks


def attention_worker():
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from megagrpo.config import MegatronConfig
    from megagrpo.distributed import init_distributed
    from megagrpo.models.sdpa_attention import SDPAttention

    groups = init_distributed(MegatronConfig(tensor_model_parallel_size=2), seed=0)
    cfg = TransformerConfig(
        num_layers=1,
        hidden_size=64,
        num_attention_heads=8,
        num_query_groups=2,
        kv_channels=16,
        attention_dropout=0.0,
        use_cpu_initialization=True,
    )
    args = dict(
        config=cfg,
        layer_number=1,
        attn_mask_type=AttnMaskType.causal,
        attention_type="self",
        pg_collection=groups.pg_collection,
    )
    ref, sdpa = DotProductAttention(**args), SDPAttention(**args)
    assert sdpa._sdpa_applies(None, AttnMaskType.causal, None, None)  # the fused path is taken
    assert not sdpa._sdpa_applies(torch.ones(1, dtype=torch.bool), AttnMaskType.causal, None, None)
    g = torch.Generator().manual_seed(groups.rank)
    s, b = 11, 3  # per TP rank: 4 query heads, 1 key-value group
    q = torch.randn(s, b, 4, 16, generator=g, dtype=torch.float64)
    k = torch.randn(s, b, 1, 16, generator=g, dtype=torch.float64)
    v = torch.randn(s, b, 1, 16, generator=g, dtype=torch.float64)
    ref, sdpa = ref.double(), sdpa.double()
    out = {}
    for name, mod in (("ref", ref), ("sdpa", sdpa)):
        qkv = [t.clone().requires_grad_() for t in (q, k, v)]
        o = mod(*qkv, None)
        (o * torch.linspace(-1, 1, o.numel(), dtype=o.dtype).view_as(o)).sum().backward()
        out[name] = (o.detach(), [t.grad for t in qkv])
    # a padding mask (True = masked) is not SDPA's path here: the result is megatron-core's
    mask = torch.zeros(b, 1, s, s, dtype=torch.bool)
    mask[:, :, :, -2:] = True
    mask |= torch.ones(s, s, dtype=torch.bool).triu(1)
    masked = (ref(q, k, v, mask), sdpa(q, k, v, mask))
    return out, masked


def test_sdpa_core_attention_equals_megatron_core_attention():
    for out, masked in run_ranks(2, attention_worker):
        ref_o, ref_g = out["ref"]
        o, grads = out["sdpa"]
        assert o.shape == (11, 3, 64)
        torch.testing.assert_close(o, ref_o, rtol=1e-10, atol=1e-10)
        for a, r in zip(grads, ref_g):
            torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(masked[1], masked[0], rtol=0, atol=0)
        assert not torch.allclose(masked[0], ref_o)  # the mask changed the result
