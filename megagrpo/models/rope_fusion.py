"""Rotary embeddings in two passes over q / k, for megatron-core without Transformer Engine.

megatron-core's unfused RoPE (``rope_utils._apply_rotary_pos_emb_bshd``) builds
``t * cos + rotate_half(t) * sin`` from a negated half, a ``cat`` into a new tensor, two products,
a sum and a final ``cat`` with the (empty) pass-through part; autograd then runs the backward of
each. On the CPU that is 6 passes over q and k per layer, forward and backward (the profile's
"rotary cat"). ``RotaryFunction`` writes each half of the result straight into its place:

    out[..., :h] = x1 * cos1 - x2 * sin1        out[..., h:] = x2 * cos2 + x1 * sin2

with ``x1, x2`` the halves of ``t`` (``cos1, cos2`` / ``sin1, sin2`` those of ``cos(freqs)`` /
``sin(freqs)``), and the transpose in the backward. The same values as megatron's function.

megatron calls its "fused" RoPE (``config.apply_rope_fusion``) through two module-level names of
``rope_utils``, Transformer Engine's kernels when TE is installed. ``install()`` fills them with
the functions here when TE left them empty, so ``apply_rope_fusion`` holds on every path:
``apply_rotary`` for ``[s, b, h, d]`` and ``apply_rotary_thd`` for packed ``[t, h, d]`` sequences
(positions restart at every ``cu_seqlens`` start; under context parallelism a rank holds its two
chunks of each sequence, as in megatron's ``_get_thd_freqs_on_this_cp_rank``).
"""

from __future__ import annotations

import torch

from megagrpo.distributed.context_parallel import packed_positions


class RotaryFunction(torch.autograd.Function):
    """``t * cos + rotate_half(t) * sin`` over the first ``cos.shape[-1]`` channels of ``t``
    (non-interleaved halves); the rest of ``t`` passes through."""

    @staticmethod
    def forward(ctx, t, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rotate(t, cos, sin, sign=1.0)

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        return _rotate(grad, cos, sin, sign=-1.0), None, None


def _rotate(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: float) -> torch.Tensor:
    """sign 1: the rotation; -1: its transpose (the rotation's backward)."""
    rot = cos.shape[-1]
    half = rot // 2
    out = torch.empty_like(t, memory_format=torch.contiguous_format)
    x1, x2 = t[..., :half], t[..., half:rot]
    o1, o2 = out[..., :half], out[..., half:rot]
    if sign > 0:  # o1 = x1 cos1 - x2 sin1, o2 = x2 cos2 + x1 sin2
        torch.mul(x1, cos[..., :half], out=o1)
        o1.addcmul_(x2, sin[..., :half], value=-1.0)
        torch.mul(x2, cos[..., half:], out=o2)
        o2.addcmul_(x1, sin[..., half:])
    else:  # g1 = o1' cos1 + o2' sin2, g2 = o2' cos2 - o1' sin1
        torch.mul(x1, cos[..., :half], out=o1)
        o1.addcmul_(x2, sin[..., half:])
        torch.mul(x2, cos[..., half:], out=o2)
        o2.addcmul_(x1, sin[..., :half], value=-1.0)
    if rot < t.shape[-1]:
        out[..., rot:] = t[..., rot:]
    return out


def apply_rotary(t: torch.Tensor, freqs: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    """``t`` [s, b, h, d] rotated by ``freqs`` [s, 1, 1, d_rot] (Transformer Engine's
    ``fused_apply_rotary_pos_emb`` signature, non-interleaved only)."""
    if interleaved:
        raise NotImplementedError(
            "megagrpo's RoPE without Transformer Engine supports non-interleaved rotary only"
        )
    return RotaryFunction.apply(t, torch.cos(freqs).to(t.dtype), torch.sin(freqs).to(t.dtype))


def thd_positions(cu_seqlens: torch.Tensor, cp_size: int = 1, cp_rank: int = 0) -> torch.Tensor:
    """long [t / cp_size]: the position within its sequence of each token this CP rank holds of
    the sequences at ``cu_seqlens`` (whole sequences' boundaries)."""
    cu = cu_seqlens.long().cpu()
    starts = torch.repeat_interleave(cu[:-1], (cu[1:] - cu[:-1]) // cp_size)
    if cp_size == 1:  # every position, in one vectorised step (this runs for every q and k)
        return torch.arange(int(cu[-1])) - starts
    return packed_positions(cu, cp_rank, cp_size) - starts


def apply_rotary_thd(
    t: torch.Tensor,
    cu_seqlens: torch.Tensor,
    freqs: torch.Tensor,
    cp_size: int = 1,
    cp_rank: int = 0,
) -> torch.Tensor:
    """Packed ``t`` [t, h, d] rotated by ``freqs`` [max_s, 1, 1, d_rot] at each token's position
    in its sequence (Transformer Engine's ``fused_apply_rotary_pos_emb_thd`` signature)."""
    positions = thd_positions(cu_seqlens, cp_size, cp_rank).to(freqs.device)
    return apply_rotary(t.unsqueeze(1), freqs[positions]).squeeze(1)


def install() -> None:
    """Make megatron-core's ``apply_rope_fusion`` call the functions here where Transformer
    Engine's kernels are absent (idempotent)."""
    from megatron.core.models.common.embeddings import rope_utils

    if rope_utils.fused_apply_rotary_pos_emb is None:
        rope_utils.fused_apply_rotary_pos_emb = apply_rotary
    if rope_utils.fused_apply_rotary_pos_emb_thd is None:
        rope_utils.fused_apply_rotary_pos_emb_thd = apply_rotary_thd
