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

Shapes: query [sq, b, heads, d], key and value [sk, b, groups, d] (heads and groups of this
tensor-parallel rank); output [sq, b, heads * d].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType


class SDPAttention(DotProductAttention):
    def _sdpa_applies(self, attention_mask, attn_mask_type, attention_bias, packed_seq_params):
        cfg = self.config
        return (
            attention_mask is None
            and attention_bias is None
            and packed_seq_params is None
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
        if not self._sdpa_applies(attention_mask, mask_type, attention_bias, packed_seq_params):
            return super().forward(
                query, key, value, attention_mask, attn_mask_type, attention_bias, packed_seq_params
            )
        sq, b, heads, d = query.shape
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, h, s, d]
        context = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=self.softmax_scale, enable_gqa=k.shape[1] != heads
        )
        return context.permute(2, 0, 1, 3).reshape(sq, b, heads * d)
