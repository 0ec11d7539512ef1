"""Weights of a live, sharded megatron model, by the mapping table.

- ``load_hf_weights``: fill this rank's chunks from a Hugging Face checkpoint (each rank reads
  only its slices of the memory-mapped safetensors).
- ``load_megatron_shards`` / ``save_megatron_shards``: this rank's part of a megagrpo megatron
  checkpoint (see ``megatron_format``).
- ``iter_hf_tensors``: the model as (HF name, full tensor) pairs, gathered over TP and, if asked,
  broadcast over PP, one tensor at a time. Weight sync to the rollout engines is built on it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import torch
import torch.distributed as dist

from megagrpo.conversion.megatron_format import (
    MegatronCheckpointMeta,
    chunk_prefix,
    rank_file,
)
from megagrpo.conversion.safetensors_io import SafetensorsDir, StreamingWriter
from megagrpo.models.arch import ModelArch
from megagrpo.models.mapping import ChunkPlan, chunk_plans, hf_shapes
from megagrpo.models.tp_codecs import Replicated, TensorSource


def dequantized(t: torch.Tensor) -> torch.Tensor:
    """A Transformer Engine FP8 parameter (``fp8_param_gather``: a ``QuantizedTensor`` such as
    ``Float8Tensor``) as a plain tensor of its nominal dtype; any other tensor as it is. Saving,
    all-gathering and casting then work on ordinary tensors."""
    if type(t).__module__.startswith("transformer_engine"):
        return t.dequantize()
    return t


def uses_te_names(chunk: torch.nn.Module) -> bool:
    """Whether the chunk was built with Transformer Engine's spec (norms fused into linears)."""
    return any(n.endswith("layer_norm_weight") for n, _ in chunk.named_parameters())


def _plans_for(chunks, arch: ModelArch, groups) -> list[ChunkPlan]:
    padded = chunks[0].vocab_size
    plans = chunk_plans(arch, padded_vocab=padded, pp=groups.pp_size, vpp=groups.vpp_size)
    mine = [p for p in plans if p.pp_rank == groups.pp_rank]
    if len(mine) != len(chunks):
        raise ValueError(f"{len(chunks)} model chunks on this rank, the layout implies {len(mine)}")
    for plan, chunk in zip(mine, chunks):
        first_layer = chunk.decoder.layers[0].layer_number - 1 if len(chunk.decoder.layers) else 0
        if len(chunk.decoder.layers) != plan.num_layers or first_layer != plan.layer_offset:
            raise ValueError(
                f"chunk (pp {plan.pp_rank}, vp {plan.vp_stage}) holds layers from "
                f"{first_layer} x{len(chunk.decoder.layers)}, the mapping expects "
                f"{plan.layer_offset} x{plan.num_layers}"
            )
    return mine


def _check_all_filled(chunk, filled: set[str], where: str) -> None:
    params = {n for n, _ in chunk.named_parameters()}
    left = sorted(params - filled)
    if left:
        raise ValueError(f"{where}: parameters the mapping did not fill: {left[:5]}")


@torch.no_grad()
def load_hf_weights(chunks, source: TensorSource, arch: ModelArch, groups) -> None:
    """Copy this rank's shards of the HF tensors in ``source`` into the model chunks."""
    for plan, chunk in zip(_plans_for(chunks, arch, groups), chunks):
        params = dict(chunk.named_parameters())
        te = uses_te_names(chunk)
        filled = set()
        for name, hf, m in plan.items(te=te):
            shard = m.codec.shard(source, hf, groups.tp_rank, groups.tp_size)
            _copy_into(params, name, shard)
            filled.add(name)
        _check_all_filled(chunk, filled, "load_hf_weights")


def _copy_into(params: dict, name: str, value: torch.Tensor) -> None:
    if name not in params:
        raise KeyError(f"the model has no parameter '{name}'")
    p = params[name]
    if tuple(p.shape) != tuple(value.shape):
        raise ValueError(f"'{name}': model shape {tuple(p.shape)}, source {tuple(value.shape)}")
    p.data.copy_(value)


@torch.no_grad()
def load_megatron_shards(chunks, directory: str, arch: ModelArch, groups) -> None:
    """Load this rank's file of a megagrpo megatron checkpoint with the same TP x PP layout."""
    meta = MegatronCheckpointMeta.load(directory)
    if (meta.tp, meta.pp, meta.vpp) != (groups.tp_size, groups.pp_size, groups.vpp_size):
        raise ValueError(
            f"{directory}: saved with TP={meta.tp} PP={meta.pp} VPP={meta.vpp}, the model runs "
            f"TP={groups.tp_size} PP={groups.pp_size} VPP={groups.vpp_size}; convert it to "
            "this layout (megatron-to-hf, then hf-to-megatron) or load the HF checkpoint"
        )
    src = SafetensorsDir(os.path.dirname(rank_file(directory, groups.tp_rank, groups.pp_rank)))
    for plan, chunk in zip(_plans_for(chunks, arch, groups), chunks):
        params = dict(chunk.named_parameters())
        te = uses_te_names(chunk)
        prefix = chunk_prefix(plan.vp_stage, groups.vpp_size)
        filled = set()
        for name, _, m in plan.items(te=te):
            stored = prefix + m.megatron_name(_layer_of(name), te=False)
            _copy_into(params, name, src.get(stored))
            filled.add(name)
        _check_all_filled(chunk, filled, f"load_megatron_shards({directory})")


def _layer_of(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[2]) if parts[:2] == ["decoder", "layers"] else None


def save_megatron_shards(chunks, directory: str, arch: ModelArch, groups) -> None:
    """Write this rank's file (DP rank 0 of each model-parallel rank writes; rank 0 the meta)."""
    if groups.dp_rank == 0 and groups.cp_rank == 0:
        entries, tensors = [], []
        for plan, chunk in zip(_plans_for(chunks, arch, groups), chunks):
            params = dict(chunk.named_parameters())
            prefix = chunk_prefix(plan.vp_stage, groups.vpp_size)
            for name, _, m in plan.items(te=uses_te_names(chunk)):
                p = dequantized(params[name].detach())
                stored = prefix + m.megatron_name(_layer_of(name), te=False)
                entries.append((stored, p.dtype, tuple(p.shape)))
                tensors.append((stored, p))
        w = StreamingWriter(rank_file(directory, groups.tp_rank, groups.pp_rank), entries)
        for stored, p in tensors:
            w.write(stored, p)
        w.close()
    if groups.rank == 0:
        MegatronCheckpointMeta(
            hf_config=dict(arch.extra),
            tp=groups.tp_size,
            pp=groups.pp_size,
            vpp=groups.vpp_size,
            padded_vocab_size=chunks[0].vocab_size,
        ).save(directory)


def _gather_tp(param: torch.Tensor, m, groups) -> list[torch.Tensor]:
    if groups.tp_size == 1 or isinstance(m.codec, Replicated):
        return [param]
    parts = [torch.empty_like(param) for _ in range(groups.tp_size)]
    dist.all_gather(parts, param.contiguous(), group=groups.tp)
    return parts


@torch.no_grad()
def iter_hf_tensors(
    chunks, arch: ModelArch, groups, *, gather_pp: bool = True, dtype: torch.dtype | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, full tensor) for every HF tensor, in checkpoint order.

    Every rank of a TP group must iterate together (the shards are all-gathered). With
    ``gather_pp`` every PP rank yields every tensor (broadcast from the stage that owns it, so all
    ranks of a PP group must iterate together); without it each rank yields its own stage's
    tensors. One tensor is materialised at a time.
    """
    mine = {
        (p.pp_rank, p.vp_stage): (p, c) for p, c in zip(_plans_for(chunks, arch, groups), chunks)
    }
    all_plans = chunk_plans(
        arch, padded_vocab=chunks[0].vocab_size, pp=groups.pp_size, vpp=groups.vpp_size
    )
    shapes = hf_shapes(arch)
    first = next(chunks[0].parameters())
    model_dtype, device = first.dtype, first.device
    out_dtype = dtype or model_dtype
    for plan in all_plans:
        local = mine.get((plan.pp_rank, plan.vp_stage))
        if local is None and not gather_pp:
            continue
        params = dict(local[1].named_parameters()) if local else {}
        te = uses_te_names(local[1]) if local else False
        for name, hf, m in plan.items(te=te):
            if not m.exported:
                continue
            if local:
                full = m.codec.merge(_gather_tp(dequantized(params[name].detach()), m, groups))
            else:
                full = [torch.empty(shapes[n], dtype=model_dtype, device=device) for n in hf]
            if gather_pp and groups.pp_size > 1:
                src = dist.get_global_rank(groups.pp, plan.pp_rank)
                for t in full:
                    dist.broadcast(t, src=src, group=groups.pp)
            for n, t in zip(hf, full):
                yield n, t.to(out_dtype)
