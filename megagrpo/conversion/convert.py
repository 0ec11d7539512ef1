"""Offline checkpoint conversion: Hugging Face safetensors <-> megatron TP x PP shards.

Both directions stream: source tensors are memory-mapped and read by slices, each output file is
written tensor by tensor (``StreamingWriter``), and at any time the converter holds the tensors
of one mapping entry (one megatron parameter and its HF pieces), never a whole model. Tensors keep
their dtype unless ``dtype`` is given, so HF -> megatron -> HF is bit-identical.
"""

from __future__ import annotations

import os
import shutil
from contextlib import ExitStack

import torch

from megagrpo.conversion.megatron_format import (
    HF_FILES_DIR,
    MegatronCheckpointMeta,
    chunk_prefix,
    copy_side_files,
    rank_file,
)
from megagrpo.conversion.safetensors_io import (
    INDEX_NAME,
    SINGLE_NAME,
    CheckpointError,
    SafetensorsDir,
    StreamingWriter,
)
from megagrpo.models.arch import arch_from_hf_config, load_arch
from megagrpo.models.builder import padded_vocab_size
from megagrpo.models.mapping import chunk_plans, hf_shapes, hf_tensor_names

_DROPPABLE_SUFFIX = ".rotary_emb.inv_freq"  # buffers some old checkpoints carry; recomputed


def _check_source_names(src: SafetensorsDir, expected: list[str], tied: bool) -> dict[str, str]:
    present = set(src.names())
    missing = [n for n in expected if n not in present]
    if missing:
        raise CheckpointError(
            f"{src.directory}: {len(missing)} tensor(s) the config implies are missing, "
            f"e.g. {missing[:5]}"
        )
    aliases = {}
    extra = sorted(present - set(expected))
    if tied and "lm_head.weight" in extra:
        aliases["lm_head.weight"] = "model.embed_tokens.weight"
        extra.remove("lm_head.weight")
    unknown = [n for n in extra if not n.endswith(_DROPPABLE_SUFFIX)]
    if unknown:
        raise CheckpointError(
            f"{src.directory}: {len(unknown)} tensor(s) megagrpo does not know how to map, "
            f"e.g. {unknown[:5]} (is config.json's architecture right?)"
        )
    return aliases


def _source_dtype(src, names, dtype):
    dtypes = {src.dtype(n) for n in names}
    if len(dtypes) != 1:
        raise CheckpointError(f"{src.directory}: tensors fused together differ in dtype: {names}")
    return dtype or dtypes.pop()


def hf_to_megatron(
    hf_dir: str,
    out_dir: str,
    *,
    tp: int = 1,
    pp: int = 1,
    vpp: int | None = None,
    make_vocab_size_divisible_by: int = 128,
    dtype: torch.dtype | None = None,
) -> MegatronCheckpointMeta:
    """Convert the HF checkpoint in ``hf_dir`` to megatron shards for a TP x PP layout."""
    arch = load_arch(hf_dir)
    src = SafetensorsDir(hf_dir)
    aliases = _check_source_names(src, hf_tensor_names(arch), arch.tie_word_embeddings)
    if arch.num_attention_heads % tp or arch.num_query_groups % tp:
        raise ValueError(
            f"tensor parallel size {tp} must divide num_attention_heads="
            f"{arch.num_attention_heads} and num_key_value_heads={arch.num_query_groups}"
        )
    padded = padded_vocab_size(arch.vocab_size, tp, make_vocab_size_divisible_by)
    plans = chunk_plans(arch, padded_vocab=padded, pp=pp, vpp=vpp)
    os.makedirs(out_dir, exist_ok=True)
    for pp_rank in range(pp):
        stage = [
            (chunk_prefix(p.vp_stage, vpp) + meg, hf, m)
            for p in plans
            if p.pp_rank == pp_rank
            for meg, hf, m in p.items()
        ]
        with ExitStack() as stack:
            writers = []
            for tp_rank in range(tp):
                entries = [
                    (
                        name,
                        _source_dtype(src, hf, dtype),
                        m.codec.shard_shape([src.shape(n) for n in hf], tp),
                    )
                    for name, hf, m in stage
                ]
                w = StreamingWriter(rank_file(out_dir, tp_rank, pp_rank), entries, {"format": "pt"})
                stack.callback(w.abort)
                writers.append(w)
            for name, hf, m in stage:
                for tp_rank, w in enumerate(writers):
                    shard = m.codec.shard(src, hf, tp_rank, tp)
                    w.write(name, shard.to(dtype) if dtype else shard)
            for w in writers:
                w.close()
    copy_side_files(hf_dir, os.path.join(out_dir, HF_FILES_DIR))
    meta = MegatronCheckpointMeta(
        hf_config=dict(arch.extra),
        tp=tp,
        pp=pp,
        vpp=vpp,
        padded_vocab_size=padded,
        hf_weight_map=dict(src.weight_map),
        hf_index_metadata=src.index_metadata,
        hf_file_metadata={f: src.file_metadata(f) for f in sorted(set(src.weight_map.values()))},
        hf_aliases=aliases,
        hf_sharded=os.path.isfile(os.path.join(hf_dir, INDEX_NAME)),
    )
    meta.save(out_dir)
    return meta


def _hf_layout(meta, names: list[str], sizes: dict[str, int], max_shard_bytes: int):
    """HF file of every output tensor: the source's layout when known, else by size."""
    if meta.hf_weight_map and set(meta.hf_weight_map) >= set(names):
        return {n: meta.hf_weight_map[n] for n in names}, meta.hf_sharded
    files, current, used = {}, 0, 0
    for n in names:
        if used and used + sizes[n] > max_shard_bytes:
            current, used = current + 1, 0
        files[n] = current
        used += sizes[n]
    count = current + 1
    if count == 1:
        return {n: SINGLE_NAME for n in names}, False
    return {n: f"model-{i + 1:05d}-of-{count:05d}.safetensors" for n, i in files.items()}, True


def megatron_to_hf(
    megatron_dir: str,
    out_dir: str,
    *,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = 5 * 1024**3,
) -> list[str]:
    """Convert megatron shards back to a Hugging Face checkpoint; returns the files written."""
    meta = MegatronCheckpointMeta.load(megatron_dir)
    arch = arch_from_hf_config(meta.hf_config, source=f"{megatron_dir} hf_config")
    plans = chunk_plans(arch, padded_vocab=meta.padded_vocab_size, pp=meta.pp, vpp=meta.vpp)
    ranks = {
        (t, p): SafetensorsDir(os.path.dirname(rank_file(megatron_dir, t, p)))
        for t in range(meta.tp)
        for p in range(meta.pp)
    }
    order = [
        (p, chunk_prefix(p.vp_stage, meta.vpp) + meg, hf, m)
        for p in plans
        for meg, hf, m in p.items()
        if m.exported
    ]
    aliases_of = {
        t: [a for a, tt in meta.hf_aliases.items() if tt == t] for t in meta.hf_aliases.values()
    }
    # Production order: each tensor, then the copies stored under other names.
    names = [x for *_, hf, _m in order for n in hf for x in (n, *aliases_of.get(n, []))]
    shapes = hf_shapes(arch)
    dtypes = {}
    for plan, meg, hf, _m in order:
        for n in hf:
            dtypes[n] = dtype or ranks[(0, plan.pp_rank)].dtype(meg)
    for a, target in meta.hf_aliases.items():
        shapes[a], dtypes[a] = shapes[target], dtypes[target]
    sizes = {n: torch.Size(shapes[n]).numel() * dtypes[n].itemsize for n in names}
    layout, sharded = _hf_layout(meta, names, sizes, max_shard_bytes)

    os.makedirs(out_dir, exist_ok=True)
    file_names = list(dict.fromkeys(layout[n] for n in names))
    with ExitStack() as stack:
        writers = {}
        for f in file_names:
            entries = [(n, dtypes[n], shapes[n]) for n in names if layout[n] == f]
            w = StreamingWriter(
                os.path.join(out_dir, f), entries, meta.hf_file_metadata.get(f, {"format": "pt"})
            )
            stack.callback(w.abort)
            writers[f] = w
        for plan, meg, hf, m in order:
            shards = [ranks[(t, plan.pp_rank)].get(meg) for t in range(meta.tp)]
            for n, tensor in zip(hf, m.codec.merge(shards)):
                tensor = tensor.to(dtypes[n]).contiguous()
                writers[layout[n]].write(n, tensor)
                for a in aliases_of.get(n, []):
                    writers[layout[a]].write(a, tensor)
        for w in writers.values():
            w.close()
    if sharded:
        _write_index(out_dir, layout, sizes, meta.hf_index_metadata)
    side = os.path.join(megatron_dir, HF_FILES_DIR)
    if os.path.isdir(side):
        for name in sorted(os.listdir(side)):
            shutil.copy2(os.path.join(side, name), os.path.join(out_dir, name))
    return file_names


def _write_index(out_dir, layout, sizes, metadata):
    import json

    index = {
        "metadata": {**metadata, "total_size": sum(sizes.values())},
        "weight_map": dict(sorted(layout.items())),
    }
    with open(os.path.join(out_dir, INDEX_NAME), "w", encoding="utf-8") as f:
        json.dump(index, f, indent=2)
        f.write("\n")
