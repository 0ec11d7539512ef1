"""A static-KV-cache forward pass for the decoders megagrpo supports, on an HF model's weights.

``FusedDecoder(model)`` runs Qwen2 / Qwen3 / Llama-3 transformers models without going through
their ``forward``: q, k and v are one matmul, gate and up are one matmul, the KV cache is
preallocated once per generation (``KVCache``) and written in place, and one decode step is a
few dozen tensor calls. It reads the weights of the HF model it was built from; after the model's
parameters change (``update_weights``) call ``refresh()`` to rebuild the fused copies.

Prompts are left-padded: every row writes its next key/value into the same cache column, and
padding columns carry ``-inf`` in a per-row key bias so no real query ever attends to them.
Positions are counted over real tokens only (as ``model.generate`` does with an attention mask).

Legend: ``b`` rows, ``p`` prompt positions, ``l`` cache columns, ``h`` query heads, ``g`` key /
value heads, ``d`` head dim, ``e`` hidden size, ``v`` vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

SUPPORTED_MODEL_TYPES = ("qwen2", "qwen3", "llama")


def fused_decoder_unsupported(model) -> str | None:
    """Why ``FusedDecoder`` cannot run ``model`` (None when it can)."""
    cfg = model.config
    mt = getattr(cfg, "model_type", None)
    if mt not in SUPPORTED_MODEL_TYPES:
        return f"model_type {mt!r} (the fused decoder runs {SUPPORTED_MODEL_TYPES})"
    if getattr(cfg, "use_sliding_window", False):
        return "sliding-window attention"
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"hidden_act {cfg.hidden_act!r}"
    layer = model.model.layers[0]
    if getattr(layer.mlp.gate_proj, "bias", None) is not None:
        return "bias on the MLP projections"
    if getattr(layer.self_attn.o_proj, "bias", None) is not None:
        return "bias on o_proj"
    return None


@dataclass
class _Layer:
    ln1: torch.Tensor
    ln2: torch.Tensor
    wqkv: torch.Tensor
    bqkv: torch.Tensor | None
    wo: torch.Tensor
    wgu: torch.Tensor
    wdown: torch.Tensor
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None


class KVCache:
    """Per-layer key and value buffers ``[b, g, l, d]``, allocated once per generation."""

    def __init__(self, num_layers, rows, kv_heads, length, head_dim, dtype, device):
        shape = (rows, kv_heads, length, head_dim)
        self.k = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.length = length

    def keep_rows(self, rows_idx: torch.Tensor) -> None:
        """Drop the rows not in ``rows_idx`` (finished samples), keeping their order."""
        self.k = [k.index_select(0, rows_idx) for k in self.k]
        self.v = [v.index_select(0, rows_idx) for v in self.v]


class FusedDecoder:
    """Prefill and single-token decode steps over a preallocated KV cache."""

    def __init__(self, model):
        why = fused_decoder_unsupported(model)
        if why is not None:
            raise ValueError(f"FusedDecoder cannot run this model: {why}")
        cfg = model.config
        self.model = model
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = getattr(cfg, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.num_heads
        self.hidden = cfg.hidden_size
        self.eps = cfg.rms_norm_eps
        self.scale = self.head_dim**-0.5
        self._cos = self._sin = None
        self.refresh()

    @torch.no_grad()
    def refresh(self) -> None:
        """Rebuild the fused weight copies from the model's current parameters."""
        m = self.model
        self.embed = m.model.embed_tokens.weight
        self.norm = m.model.norm.weight
        self.lm_head = m.lm_head.weight
        self.layers = []
        for layer in m.model.layers:
            a, mlp = layer.self_attn, layer.mlp
            biases = [a.q_proj.bias, a.k_proj.bias, a.v_proj.bias]
            has_bias = any(b is not None for b in biases)
            if has_bias:
                biases = [
                    b if b is not None else torch.zeros(p.weight.shape[0], dtype=p.weight.dtype)
                    for b, p in zip(biases, (a.q_proj, a.k_proj, a.v_proj))
                ]
            self.layers.append(
                _Layer(
                    ln1=layer.input_layernorm.weight,
                    ln2=layer.post_attention_layernorm.weight,
                    wqkv=torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]),
                    bqkv=torch.cat(biases) if has_bias else None,
                    wo=a.o_proj.weight,
                    wgu=torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]),
                    wdown=mlp.down_proj.weight,
                    q_norm=getattr(getattr(a, "q_norm", None), "weight", None),
                    k_norm=getattr(getattr(a, "k_norm", None), "weight", None),
                )
            )
        self._cos = self._sin = None

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    @property
    def device(self) -> torch.device:
        return self.embed.device

    def new_cache(self, rows: int, length: int) -> KVCache:
        return KVCache(
            len(self.layers),
            rows,
            self.num_kv_heads,
            length,
            self.head_dim,
            self.dtype,
            self.device,
        )

    @torch.no_grad()
    def _rope_tables(self, length: int):
        """cos / sin ``[positions, d]`` from the model's own rotary module (any RoPE scaling)."""
        if self._cos is None or self._cos.shape[0] < length:
            n = max(length, 2 * (0 if self._cos is None else self._cos.shape[0]), 256)
            pos = torch.arange(n, device=self.device)[None]
            probe = torch.zeros(1, 1, self.hidden, dtype=self.dtype, device=self.device)
            cos, sin = self.model.model.rotary_emb(probe, pos)
            self._cos, self._sin = cos[0].to(self.dtype), sin[0].to(self.dtype)
        return self._cos, self._sin

    def _rope(self, x, cos, sin):
        half = x.shape[-1] // 2
        rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rot * sin

    def _qkv(self, lw: _Layer, h):
        qkv = F.linear(h, lw.wqkv, lw.bqkv)
        hd, gd = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = qkv.split([hd, gd, gd], dim=-1)
        q = q.unflatten(-1, (self.num_heads, self.head_dim))
        k = k.unflatten(-1, (self.num_kv_heads, self.head_dim))
        v = v.unflatten(-1, (self.num_kv_heads, self.head_dim))
        if lw.q_norm is not None:
            q = F.rms_norm(q, (self.head_dim,), lw.q_norm, self.eps)
            k = F.rms_norm(k, (self.head_dim,), lw.k_norm, self.eps)
        return q, k, v

    def _mlp_residual(self, lw: _Layer, x):
        h = F.rms_norm(x, (self.hidden,), lw.ln2, self.eps)
        gate, up = F.linear(h, lw.wgu).chunk(2, dim=-1)
        return x + F.linear(F.silu(gate) * up, lw.wdown)

    def _logits(self, x):
        return F.linear(F.rms_norm(x, (self.hidden,), self.norm, self.eps), self.lm_head)

    @torch.no_grad()
    def prefill(self, ids_bp: torch.Tensor, mask_bp: torch.Tensor, cache: KVCache):
        """Run the left-padded prompts, fill cache columns ``[0, p)``; last-position logits."""
        b, p = ids_bp.shape
        real_bp = mask_bp.bool()
        pos_bp = (real_bp.long().cumsum(-1) - 1).clamp_min(0)
        cos_t, sin_t = self._rope_tables(int(pos_bp.max()) + 1)
        cos, sin = cos_t[pos_bp][:, :, None, :], sin_t[pos_bp][:, :, None, :]
        causal = torch.ones(p, p, dtype=torch.bool, device=ids_bp.device).tril()
        eye = torch.eye(p, dtype=torch.bool, device=ids_bp.device)
        # Real queries see real keys up to themselves; a padding query sees only itself (so its
        # row stays finite and never leaks into real rows).
        allowed = causal[None] & (real_bp[:, None, :] | eye[None])
        allowed = allowed[:, None]
        x = F.embedding(ids_bp, self.embed)
        for lw, kc, vc in zip(self.layers, cache.k, cache.v):
            h = F.rms_norm(x, (self.hidden,), lw.ln1, self.eps)
            q, k, v = self._qkv(lw, h)
            q, k = self._rope(q, cos, sin), self._rope(k, cos, sin)
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            kc[:, :, :p] = k
            vc[:, :, :p] = v
            o = F.scaled_dot_product_attention(
                q, k, v, attn_mask=allowed, scale=self.scale, enable_gqa=True
            )
            x = x + F.linear(o.transpose(1, 2).flatten(2), lw.wo)
            x = self._mlp_residual(lw, x)
        return self._logits(x[:, -1])

    @torch.no_grad()
    def decode(self, tok_b, pos_b, col: int, cache: KVCache, key_bias_bl: torch.Tensor):
        """Feed one token per row at cache column ``col``; logits ``[b, v]`` for the next one.

        ``key_bias_bl``: 0 for real columns, -inf for padding, at least ``col + 1`` wide.
        """
        b = tok_b.shape[0]
        cos_t, sin_t = self._rope_tables(int(pos_b.max()) + 1)
        cos, sin = cos_t[pos_b][:, None, :], sin_t[pos_b][:, None, :]
        width = col + 1
        bias = key_bias_bl[:, None, None, :width]
        groups = self.num_heads // self.num_kv_heads
        x = F.embedding(tok_b, self.embed)
        for lw, kc, vc in zip(self.layers, cache.k, cache.v):
            h = F.rms_norm(x, (self.hidden,), lw.ln1, self.eps)
            q, k, v = self._qkv(lw, h)
            q, k = self._rope(q, cos, sin), self._rope(k, cos, sin)
            kc[:, :, col] = k
            vc[:, :, col] = v
            qg = q.view(b, self.num_kv_heads, groups, self.head_dim)
            s = torch.matmul(qg, kc[:, :, :width].transpose(-1, -2)).mul_(self.scale).add_(bias)
            o = torch.matmul(torch.softmax(s, dim=-1), vc[:, :, :width])
            x = x + F.linear(o.reshape(b, -1), lw.wo)
            x = self._mlp_residual(lw, x)
        return self._logits(x)
