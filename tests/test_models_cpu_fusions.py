"""megagrpo's RoPE and RMSNorm for megatron-core's local spec equal megatron-core's unfused RoPE
and torch's RMSNorm, forward and backward (fp32), also for packed sequences under context
parallelism and for a partial rotary dimension (``test_models_parity.py`` checks that the local
spec's model is built with them and matches transformers)."""

from __future__ import annotations

import pytest
import torch
from megatron.core.models.common.embeddings import rope_utils

from megagrpo.models.rms_norm import RMSNorm, RMSNormFunction
from megagrpo.models.rope_fusion import apply_rotary, apply_rotary_thd, thd_positions


def _freqs(s: int, rot: int, base: float = 10000.0) -> torch.Tensor:
    inv = 1.0 / base ** (torch.arange(0, rot, 2).double() / rot)
    f = torch.outer(torch.arange(s).double(), inv).float()
    return torch.cat([f, f], -1)[:, None, None, :]  # megatron's [s, 1, 1, rot]


def _value_and_grad(fn, t, grad):
    t = t.clone().requires_grad_()
    y = fn(t)
    (g,) = torch.autograd.grad(y, t, grad)
    return y.detach(), g


@pytest.mark.parametrize("rot", [32, 16])
def test_rotary_equals_megatron_unfused(rot):
    torch.manual_seed(0)
    t = torch.randn(7, 3, 4, 32)
    freqs = _freqs(7, rot)
    grad = torch.randn_like(t)
    want = _value_and_grad(lambda x: rope_utils._apply_rotary_pos_emb_bshd(x, freqs), t, grad)
    got = _value_and_grad(lambda x: apply_rotary(x, freqs), t, grad)
    for w, g in zip(want, got):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)
    # the rotation moves values (not a copy), and the pass-through channels stay as they were
    assert (got[0][..., :rot] - t[..., :rot]).abs().max() > 0.1
    torch.testing.assert_close(got[0][..., rot:], t[..., rot:], rtol=0, atol=0)


class _Group:
    def __init__(self, size, rank):
        self._size, self._rank = size, rank

    def size(self):
        return self._size

    def rank(self):
        return self._rank


@pytest.mark.parametrize("cp_size", [1, 2])
def test_rotary_thd_equals_megatron_unfused_per_cp_rank(cp_size):
    """Packed sequences (positions restart per sequence); under CP each rank holds 2 chunks of
    every sequence: the same values as megatron's unfused THD RoPE on that rank."""
    torch.manual_seed(1)
    cu = torch.tensor([0, 8, 12, 24, 32], dtype=torch.int32)
    freqs = _freqs(12, 16)
    for rank in range(cp_size):
        t = torch.randn(32 // cp_size, 2, 16)
        grad = torch.randn_like(t)
        want = _value_and_grad(
            lambda x, r=rank: rope_utils._apply_rotary_pos_emb_thd(
                x, cu, freqs, cp_group=_Group(cp_size, r)
            ),
            t,
            grad,
        )
        got = _value_and_grad(lambda x, r=rank: apply_rotary_thd(x, cu, freqs, cp_size, r), t, grad)
        for w, g in zip(want, got):
            torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)


def test_thd_positions():
    cu = torch.tensor([0, 3, 5, 9], dtype=torch.int32)
    assert thd_positions(cu).tolist() == [0, 1, 2, 0, 1, 0, 1, 2, 3]
    # CP=2: sequences of 4 and 8 in chunks of 1 and 2; rank 0 holds chunks 0 and 3
    cu = torch.tensor([0, 4, 12], dtype=torch.int32)
    assert thd_positions(cu, 2, 0).tolist() == [0, 3, 0, 1, 6, 7]
    assert thd_positions(cu, 2, 1).tolist() == [1, 2, 2, 3, 4, 5]


def test_interleaved_rotary_is_refused():
    with pytest.raises(NotImplementedError, match="non-interleaved"):
        apply_rotary(torch.zeros(2, 1, 1, 4), _freqs(2, 4), interleaved=True)


def test_rms_norm_equals_torch():
    torch.manual_seed(2)
    x = torch.randn(5, 3, 16, requires_grad=True)
    w = torch.randn(16, requires_grad=True)
    grad = torch.randn(5, 3, 16)
    ref = torch.nn.functional.rms_norm(x, (16,), w, 1e-6)
    got = RMSNormFunction.apply(x, w, 1e-6)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    want = torch.autograd.grad(ref, (x, w), grad)
    have = torch.autograd.grad(got, (x, w), grad)
    for h, r in zip(have, want):
        torch.testing.assert_close(h, r, rtol=1e-5, atol=1e-5)


def test_rms_norm_bf16_computes_in_fp32_like_hugging_face():
    torch.manual_seed(3)
    x = torch.randn(4, 64).to(torch.bfloat16)
    w = (1 + 0.1 * torch.randn(64)).to(torch.bfloat16)
    x32 = x.float()
    hf = w * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6)).to(torch.bfloat16)
    got = RMSNormFunction.apply(x, w, 1e-6)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, hf, rtol=0, atol=0)


def test_rms_norm_rejects_what_it_does_not_implement():
    from types import SimpleNamespace

    base = dict(
        normalization="RMSNorm",
        layernorm_zero_centered_gamma=False,
        use_cpu_initialization=True,
        params_dtype=torch.float32,
        sequence_parallel=True,
    )
    norm = RMSNorm(SimpleNamespace(**base), 8, eps=1e-6)
    assert norm.weight.sequence_parallel  # finalize_model_grads sums it over TP
    with pytest.raises(ValueError, match="LayerNorm"):
        RMSNorm(SimpleNamespace(**{**base, "normalization": "LayerNorm"}), 8)
    with pytest.raises(ValueError, match="zero_centered_gamma"):
        RMSNorm(SimpleNamespace(**{**base, "layernorm_zero_centered_gamma": True}), 8)
