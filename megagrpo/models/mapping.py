"""The one HF <-> megatron name and shape mapping table, and where each layer lives under PP.

Everything that moves weights between the two worlds reads this table: the offline checkpoint
converter (both directions), loading a Hugging Face checkpoint straight into a sharded live model,
and the iterator of HF-named tensors of a live model that weight sync to the rollout engines is
built on.

Names: megatron names are those of megatron-core's local layer spec, with ``{i}`` the layer index
inside the model chunk; HF names use ``{i}`` for the global layer index. Under the Transformer
Engine spec the two pre-norms live inside the fused linear layers (``te_name``).
"""

from __future__ import annotations

from dataclasses import dataclass

from megagrpo.models.arch import ModelArch
from megagrpo.models.tp_codecs import (
    Codec,
    FusedGateUp,
    FusedQKV,
    Replicated,
    Split,
    VocabSplit,
)


@dataclass(frozen=True)
class WeightMap:
    """One megatron parameter and the HF tensor(s) it is made of."""

    megatron: str
    hf: tuple[str, ...]
    codec: Codec
    te_name: str | None = None
    exported: bool = True
    """False for the copy of tied embeddings on the last pipeline stage: the HF export takes the
    embedding from the first stage."""

    def megatron_name(self, layer: int | None = None, *, te: bool = False) -> str:
        name = self.te_name if (te and self.te_name) else self.megatron
        return name.format(i=layer) if layer is not None else name

    def hf_names(self, layer: int | None = None) -> tuple[str, ...]:
        return tuple(n.format(i=layer) for n in self.hf) if layer is not None else self.hf


@dataclass(frozen=True)
class ChunkPlan:
    """What one model chunk (a pipeline stage, or a virtual stage of it) holds."""

    pp_rank: int
    vp_stage: int
    layer_offset: int
    num_layers: int
    pre_maps: tuple[WeightMap, ...]
    layer_maps: tuple[WeightMap, ...]
    post_maps: tuple[WeightMap, ...]

    def items(self, *, te: bool = False):
        """(megatron name, HF names, map) for every parameter of the chunk, in order."""
        for m in self.pre_maps:
            yield m.megatron_name(te=te), m.hf_names(), m
        for local in range(self.num_layers):
            glob = self.layer_offset + local
            for m in self.layer_maps:
                yield m.megatron_name(local, te=te), m.hf_names(glob), m
        for m in self.post_maps:
            yield m.megatron_name(te=te), m.hf_names(), m


def layer_maps(arch: ModelArch) -> list[WeightMap]:
    p, a, mlp = "decoder.layers.{i}.", "model.layers.{i}.", "model.layers.{i}.mlp."
    qkv = FusedQKV(
        arch.num_query_groups, arch.num_attention_heads // arch.num_query_groups, arch.head_dim
    )
    attn = tuple(f"{a}self_attn.{x}_proj" for x in "qkv")
    maps = [
        WeightMap(
            p + "input_layernorm.weight",
            (a + "input_layernorm.weight",),
            Replicated(),
            te_name=p + "self_attention.linear_qkv.layer_norm_weight",
        ),
        WeightMap(p + "self_attention.linear_qkv.weight", tuple(n + ".weight" for n in attn), qkv),
    ]
    if arch.qkv_bias:
        maps.append(
            WeightMap(p + "self_attention.linear_qkv.bias", tuple(n + ".bias" for n in attn), qkv)
        )
    if arch.qk_norm:
        maps += [
            WeightMap(
                p + "self_attention.q_layernorm.weight",
                (a + "self_attn.q_norm.weight",),
                Replicated(),
            ),
            WeightMap(
                p + "self_attention.k_layernorm.weight",
                (a + "self_attn.k_norm.weight",),
                Replicated(),
            ),
        ]
    maps += [
        WeightMap(
            p + "self_attention.linear_proj.weight", (a + "self_attn.o_proj.weight",), Split(1)
        ),
        WeightMap(
            p + "pre_mlp_layernorm.weight",
            (a + "post_attention_layernorm.weight",),
            Replicated(),
            te_name=p + "mlp.linear_fc1.layer_norm_weight",
        ),
        WeightMap(
            p + "mlp.linear_fc1.weight",
            (mlp + "gate_proj.weight", mlp + "up_proj.weight"),
            FusedGateUp(),
        ),
        WeightMap(p + "mlp.linear_fc2.weight", (mlp + "down_proj.weight",), Split(1)),
    ]
    return maps


def layer_offsets(arch: ModelArch, pp: int, vpp: int | None) -> dict[tuple[int, int], range]:
    """Global layer indices of every (pp_rank, vp_stage), megatron's even split."""
    chunks = pp * (vpp or 1)
    if arch.num_layers % chunks:
        raise ValueError(
            f"num_hidden_layers={arch.num_layers} is not divisible by "
            f"pipeline_model_parallel_size={pp} x virtual stages={vpp or 1}"
        )
    per = arch.num_layers // chunks
    # The interleaved schedule deals chunk v of stage p the layers of global chunk v * pp + p.
    return {
        (p, v): range((v * pp + p) * per, (v * pp + p + 1) * per)
        for p in range(pp)
        for v in range(vpp or 1)
    }


def chunk_plans(
    arch: ModelArch, *, padded_vocab: int, pp: int = 1, vpp: int | None = None
) -> list[ChunkPlan]:
    """The plan of every model chunk, ordered by (pp_rank, vp_stage)."""
    vocab = VocabSplit(arch.vocab_size, padded_vocab)
    embed = WeightMap("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), vocab)
    final_norm = WeightMap("decoder.final_layernorm.weight", ("model.norm.weight",), Replicated())
    if not arch.tie_word_embeddings:
        output = WeightMap("output_layer.weight", ("lm_head.weight",), vocab)
    elif pp > 1:  # megatron keeps a synchronised copy of the embedding on the last stage
        output = WeightMap("output_layer.weight", embed.hf, vocab, exported=False)
    else:
        output = None
    nv = vpp or 1
    plans = []
    lmaps = tuple(layer_maps(arch))
    for (p, v), layers in sorted(layer_offsets(arch, pp, vpp).items()):
        first, last = (p, v) == (0, 0), (p, v) == (pp - 1, nv - 1)
        post = (final_norm,) + ((output,) if output else ()) if last else ()
        plans.append(
            ChunkPlan(p, v, layers.start, len(layers), (embed,) if first else (), lmaps, post)
        )
    return plans


def hf_tensor_names(arch: ModelArch) -> list[str]:
    """Every HF tensor name the architecture has, in checkpoint order (embedding first)."""
    names = []
    for plan in chunk_plans(arch, padded_vocab=arch.vocab_size):
        for _, hf, m in plan.items():
            if m.exported:
                names.extend(hf)
    return names


def hf_shapes(arch: ModelArch) -> dict[str, tuple[int, ...]]:
    """The shape of every HF tensor of the architecture."""
    h, d, v = arch.hidden_size, arch.head_dim, arch.vocab_size
    q, kv, f = arch.num_attention_heads * d, arch.num_query_groups * d, arch.ffn_hidden_size
    per_layer = {
        "input_layernorm.weight": (h,),
        "post_attention_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (q, h),
        "self_attn.k_proj.weight": (kv, h),
        "self_attn.v_proj.weight": (kv, h),
        "self_attn.q_proj.bias": (q,),
        "self_attn.k_proj.bias": (kv,),
        "self_attn.v_proj.bias": (kv,),
        "self_attn.q_norm.weight": (d,),
        "self_attn.k_norm.weight": (d,),
        "self_attn.o_proj.weight": (h, q),
        "mlp.gate_proj.weight": (f, h),
        "mlp.up_proj.weight": (f, h),
        "mlp.down_proj.weight": (h, f),
    }
    fixed = {
        "model.embed_tokens.weight": (v, h),
        "model.norm.weight": (h,),
        "lm_head.weight": (v, h),
    }
    shapes = {}
    for name in hf_tensor_names(arch):
        if name in fixed:
            shapes[name] = fixed[name]
        else:
            shapes[name] = per_layer[name.split(".", 3)[3]]
    return shapes
