"""Core attention for megatron-core's local layer spec through ``torch.nn.functional.
scaled_dot_product_attention``.

megatron-core's local ``DotProductAttention`` materialises the [b, heads, s, s] score matrix,
masks it with ``masked_fill`` and runs softmax and two batched matmuls; torch's SDPA computes the
same causal attention with its fused kernels (flash attention on CPU, flash or memory-efficient
attention on CUDA) without keeping that matrix for the backward. This is the core attention of the
local spec, which megagrpo uses where Transformer Engine is not installed (every CPU machine).
Cases SDPA does not cover here (an explicit attention mask, a non-causal mask type, attention
dropout while training, softmax offsets, query-key layer scaling) fall back to megatron-core's
implementation.

Packed sequences (``PackedSeqParams`` with ``qkv_format="thd"``, what Transformer Engine takes on
GPU; megatron's local attention refuses them): query [t, heads, d], key and value [t, groups, d],
the sequences back to back at the offsets ``cu_seqlens_q``. Each sequence attends causally to
itself only. The tokens are scattered into a right-padded [sequences, heads, max_seqlen, d] batch,
attended with ``is_causal`` (a right-padded sequence's real queries never see its padding), and
gathered back: the padded attention's cost, while the rest of the model runs on the t real tokens.
Measured on the demo's model against one SDPA call with a block-diagonal causal mask [t, t] and a
loop of per-sequence SDPA calls (``docs/measurements.md``).

Context parallelism (``distributed/context_parallel.py``): this rank holds L / C positions of
each sequence, in megatron's load-balanced order (rotary positions already applied by megatron
for exactly those positions). The keys and values of the whole sequences are all-gathered over
the CP group (their gradients summed back), this rank's queries are placed at their positions of
the whole sequences (zeros elsewhere), attended as above, and this rank's rows kept: C times the
attention's arithmetic, a correctness path for CPU (on GPU Transformer Engine's ring attention
is CP's real implementation). megatron-core's local attention refuses CP, so the parent class is
built with a copy of the config that has none.

Shapes: query [sq, b, heads, d], key and value [sk, b, groups, d] (heads and groups of this
tensor-parallel rank); output [sq, b, heads * d]; packed: [t, heads, d] in, [t, heads * d] out.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType

from megagrpo.distributed.context_parallel import ContextParallel, gather_summed


class SDPAttention(DotProductAttention):
    def __init__(self, config, *args, **kwargs):
        cp_size = config.context_parallel_size
        if cp_size > 1:
            no_cp = copy.copy(config)
            no_cp.context_parallel_size = 1
            super().__init__(no_cp, *args, **kwargs)
            self.config = config
            group = getattr(self.pg_collection, "cp", None)
            if group is None:
                from megatron.core import parallel_state

                group = parallel_state.get_context_parallel_group()
            self.cp = ContextParallel(group, group.rank(), cp_size)
        else:
            super().__init__(config, *args, **kwargs)
            self.cp = None

    def _sdpa_applies(self, attention_mask, attn_mask_type, attention_bias, packed_seq_params):
        cfg = self.config
        return (
            attention_mask is None
            and attention_bias is None
            and (packed_seq_params is None or packed_seq_params.qkv_format == "thd")
            and attn_mask_type == AttnMaskType.causal
            and self.softmax_offset is None
            and not getattr(cfg, "apply_query_key_layer_scaling", False)
            and not (self.training and cfg.attention_dropout > 0)
        )

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
        applies = self._sdpa_applies(attention_mask, mask_type, attention_bias, packed_seq_params)
        if self.cp is not None:
            if not applies:
                raise NotImplementedError(
                    "context parallelism on the local layer spec covers causal self-attention "
                    "without masks, bias, dropout or query-key layer scaling"
                )
            return self._context_parallel(query, key, value, packed_seq_params)
        if not applies:
            return super().forward(
                query, key, value, attention_mask, attn_mask_type, attention_bias, packed_seq_params
            )
        if packed_seq_params is not None:
            return self._packed(query, key, value, packed_seq_params)
        return self._causal(query, key, value)

    def _context_parallel(self, query, key, value, packed_seq_params) -> torch.Tensor:
        cp = self.cp
        if packed_seq_params is None:  # [L / C, b, n, d]
            cu, own = None, cp.positions(query.shape[0] * cp.size)
        else:  # [t / C, n, d]; cu_seqlens of the whole sequences
            cu = packed_seq_params.cu_seqlens_q
            own = cp.packed_positions(cu).to(query.device)
        key, value = (gather_summed(x, cp, 0, cu) for x in (key, value))
        whole_q = query.new_zeros(key.shape[0], *query.shape[1:]).index_copy(
            0, own.to(query.device), query
        )
        if packed_seq_params is None:
            context = self._causal(whole_q, key, value)
        else:
            context = self._packed(whole_q, key, value, packed_seq_params)
        return context.index_select(0, own.to(context.device))

    def _causal(self, query, key, value) -> torch.Tensor:
        sq, b, heads, d = query.shape
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, h, s, d]
        context = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=self.softmax_scale, enable_gqa=k.shape[1] != heads
        )
        return context.permute(2, 0, 1, 3).reshape(sq, b, heads * d)

    def _packed(self, query, key, value, params) -> torch.Tensor:
        t, heads, d = query.shape
        if not torch.equal(params.cu_seqlens_q, params.cu_seqlens_kv):
            raise ValueError("packed self-attention: cu_seqlens_q and cu_seqlens_kv differ")
        slot_t, num_seqs, width = _padded_slots(params.cu_seqlens_q, params.max_seqlen_q)

        def pad(x):  # [t, n, d] -> [S, n, width, d]
            buf = x.new_zeros(num_seqs * width, *x.shape[1:]).index_copy(0, slot_t, x)
            return buf.view(num_seqs, width, *x.shape[1:]).transpose(1, 2)

        context = F.scaled_dot_product_attention(
            pad(query),
            pad(key),
            pad(value),
            is_causal=True,
            scale=self.softmax_scale,
            enable_gqa=key.shape[1] != heads,
        )  # [S, heads, width, d]
        flat = context.transpose(1, 2).reshape(num_seqs * width, heads * d)
        return flat.index_select(0, slot_t)


def _padded_slots(cu_seqlens: torch.Tensor, max_seqlen: int):
    """``(slot_t, S, width)``: the row of each packed token in a [S x width] right-padded layout."""
    cu = cu_seqlens.long()
    lengths = cu[1:] - cu[:-1]
    num_seqs, width = lengths.numel(), int(max_seqlen)
    seq_t = torch.repeat_interleave(torch.arange(num_seqs, device=cu.device), lengths)
    offset_t = torch.arange(int(cu[-1]), device=cu.device) - cu[:-1][seq_t]
    return seq_t * width + offset_t, num_seqs, width
