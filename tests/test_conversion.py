"""Offline HF <-> megatron conversion: bit-identical round trips, streaming, clear errors."""

from __future__ import annotations

import filecmp
import json
import os
import shutil
import weakref

import pytest
import torch
from conftest import ARCH_NAMES
from safetensors.torch import load_file, save_file

from megagrpo.conversion import convert as convert_mod
from megagrpo.conversion.convert import hf_to_megatron, megatron_to_hf
from megagrpo.conversion.megatron_format import MegatronCheckpointMeta, rank_file
from megagrpo.conversion.safetensors_io import (
    INDEX_NAME,
    CheckpointError,
    SafetensorsDir,
    StreamingWriter,
)
from megagrpo.demo.tiny_models import save_tiny_checkpoint


def _assert_identical(a_dir, b_dir):
    a, b = SafetensorsDir(a_dir), SafetensorsDir(b_dir)
    assert sorted(a.names()) == sorted(b.names())
    for n in a.names():
        x, y = a.get(n), b.get(n)
        assert x.dtype == y.dtype, n
        assert x.shape == y.shape, n
        assert torch.equal(x.view(torch.uint8), y.view(torch.uint8)), n  # bit for bit
    for name in os.listdir(a_dir):  # config, tokenizer, generation config, index
        if not name.endswith(".safetensors"):
            assert filecmp.cmp(os.path.join(a_dir, name), os.path.join(b_dir, name), False), name


@pytest.mark.parametrize("name", ARCH_NAMES)
@pytest.mark.parametrize("sharded", [False, True])
@pytest.mark.parametrize("tp,pp,vpp", [(1, 1, None), (2, 2, None), (2, 2, 2)])
def test_round_trip_is_bit_identical(name, sharded, tp, pp, vpp, tiny_checkpoint, tmp_path):
    hf_dir = tiny_checkpoint(name, sharded)
    meg, back = str(tmp_path / "meg"), str(tmp_path / "back")
    hf_to_megatron(hf_dir, meg, tp=tp, pp=pp, vpp=vpp)
    megatron_to_hf(meg, back)
    _assert_identical(hf_dir, back)
    assert os.path.isfile(os.path.join(back, INDEX_NAME)) == sharded
    if sharded:  # the source's file layout is reproduced
        assert SafetensorsDir(back).weight_map == SafetensorsDir(hf_dir).weight_map


def test_bf16_tied_checkpoint_that_still_carries_lm_head(tmp_path):
    src = str(tmp_path / "src")
    model = save_tiny_checkpoint("llama3", src, dtype=torch.bfloat16)
    # Some tied checkpoints store lm_head.weight anyway; it must come back too.
    tensors = load_file(os.path.join(src, "model.safetensors"))
    assert "lm_head.weight" not in tensors
    tensors["lm_head.weight"] = model.get_input_embeddings().weight.detach().clone()
    save_file(tensors, os.path.join(src, "model.safetensors"), metadata={"format": "pt"})
    meg, back = str(tmp_path / "meg"), str(tmp_path / "back")
    meta = hf_to_megatron(src, meg, tp=2, pp=2)
    assert meta.hf_aliases == {"lm_head.weight": "model.embed_tokens.weight"}
    megatron_to_hf(meg, back)
    _assert_identical(src, back)
    assert SafetensorsDir(back).dtype("model.layers.0.mlp.up_proj.weight") == torch.bfloat16


def test_megatron_shards_hold_the_expected_slices(tiny_checkpoint, tmp_path):
    hf_dir = tiny_checkpoint("qwen2")
    meg = str(tmp_path / "meg")
    meta = hf_to_megatron(hf_dir, meg, tp=2, pp=2, make_vocab_size_divisible_by=8)
    assert meta.padded_vocab_size == 272  # 263 rounded up to a multiple of 8 x TP
    hf = load_file(os.path.join(hf_dir, "model.safetensors"))
    r0 = load_file(rank_file(meg, 0, 0))
    r1 = load_file(rank_file(meg, 1, 0))
    last = load_file(rank_file(meg, 1, 1))
    # Stage 0 holds the embedding and layers 0-1; stage 1 layers 2-3 (named 0-1), norm, head.
    assert set(k.split(".")[2] for k in r0 if k.startswith("decoder.layers")) == {"0", "1"}
    assert "embedding.word_embeddings.weight" in r0 and "output_layer.weight" not in r0
    assert "output_layer.weight" in last and "decoder.final_layernorm.weight" in last
    # Vocab rows: rank 1 holds rows 136..262 and 9 zero rows of padding.
    emb1 = r1["embedding.word_embeddings.weight"]
    assert emb1.shape[0] == 136
    assert torch.equal(emb1[:127], hf["model.embed_tokens.weight"][136:263])
    assert torch.count_nonzero(emb1[127:]) == 0
    # QKV of TP rank 1 = its query group: 2 q heads, then k, then v (head_dim 16).
    qkv = r1["decoder.layers.0.self_attention.linear_qkv.weight"]
    p = "model.layers.0.self_attn."
    assert torch.equal(qkv[:32], hf[p + "q_proj.weight"][32:64])
    assert torch.equal(qkv[32:48], hf[p + "k_proj.weight"][16:32])
    assert torch.equal(qkv[48:64], hf[p + "v_proj.weight"][16:32])
    bias = r1["decoder.layers.0.self_attention.linear_qkv.bias"]
    assert torch.equal(bias[32:48], hf[p + "k_proj.bias"][16:32])
    # fc1 of rank 0 = [gate rows 0..47; up rows 0..47]; fc2 / o_proj split by columns.
    fc1 = r0["decoder.layers.1.mlp.linear_fc1.weight"]
    assert torch.equal(fc1[:48], hf["model.layers.1.mlp.gate_proj.weight"][:48])
    assert torch.equal(fc1[48:], hf["model.layers.1.mlp.up_proj.weight"][:48])
    fc2 = r1["decoder.layers.1.mlp.linear_fc2.weight"]
    assert torch.equal(fc2, hf["model.layers.1.mlp.down_proj.weight"][:, 48:])
    # Layer 3 of HF is layer 1 of the second stage.
    st1 = load_file(rank_file(meg, 0, 1))
    assert torch.equal(
        st1["decoder.layers.1.input_layernorm.weight"], hf["model.layers.3.input_layernorm.weight"]
    )


class _TrackingSource(SafetensorsDir):
    """Records every tensor handed out, to measure what the converter keeps alive."""

    alive: list = []

    def slice(self, name, dim, start, stop):
        t = super().slice(name, dim, start, stop)
        _TrackingSource.alive.append(weakref.ref(t))
        return t

    def get(self, name):
        t = super().get(name)
        _TrackingSource.alive.append(weakref.ref(t))
        return t


def test_conversion_streams_one_entry_at_a_time(tiny_checkpoint, tmp_path, monkeypatch):
    """While writing, the tensors read from the source and still alive never exceed the
    largest single mapping entry (q+k+v of one layer, or the embedding)."""
    hf_dir = tiny_checkpoint("qwen2")
    monkeypatch.setattr(convert_mod, "SafetensorsDir", _TrackingSource)
    peak = {"bytes": 0}
    original_write = StreamingWriter.write

    def write(self, name, tensor):
        live = sum(
            t.numel() * t.element_size() for r in _TrackingSource.alive if (t := r()) is not None
        )
        peak["bytes"] = max(peak["bytes"], live)
        return original_write(self, name, tensor)

    monkeypatch.setattr(StreamingWriter, "write", write)
    src = SafetensorsDir(hf_dir)
    largest_entry = 263 * 64 * 4  # the embedding (q+k+v of a layer is 128 x 64 x 4 bytes)
    total = sum(src.get(n).numel() * 4 for n in src.names())
    _TrackingSource.alive = []
    hf_to_megatron(hf_dir, str(tmp_path / "meg"), tp=2, pp=1)
    assert 0 < peak["bytes"] <= largest_entry < total / 5
    peak["bytes"], _TrackingSource.alive = 0, []
    megatron_to_hf(str(tmp_path / "meg"), str(tmp_path / "back"))
    largest_shards = 512 * 64 * 4  # the embedding's two TP shards, vocab padded to 512
    assert 0 < peak["bytes"] <= largest_shards < total / 4


def test_streaming_writer_is_read_by_safetensors_and_checks_order(tmp_path):
    a, b = torch.randn(3, 5), torch.arange(7, dtype=torch.int64)
    c = torch.randn(2, 2).to(torch.bfloat16)
    path = str(tmp_path / "x.safetensors")
    entries = [("a", a.dtype, a.shape), ("b", b.dtype, b.shape), ("c", c.dtype, c.shape)]
    w = StreamingWriter(path, entries, {"format": "pt"})
    with pytest.raises(ValueError, match="got tensor 'b', expected a"):
        w.write("b", b)
    w.write("a", a)
    with pytest.raises(ValueError, match="header says"):
        w.write("b", b.float())
    w.write("b", b)
    with pytest.raises(ValueError, match=r"closed after 2 of 3 tensors; missing \['c'\]"):
        w.close()
    assert not os.path.exists(path) and not os.path.exists(path + ".tmp")
    w = StreamingWriter(path, entries, {"format": "pt"})
    for n, t in (("a", a), ("b", b), ("c", c)):
        w.write(n, t)
    w.close()
    got = load_file(path)
    assert torch.equal(got["a"], a) and torch.equal(got["b"], b) and torch.equal(got["c"], c)


def test_source_errors_name_the_path(tmp_path, tiny_checkpoint):
    with pytest.raises(CheckpointError, match="neither model.safetensors nor"):
        SafetensorsDir(str(tmp_path))
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="convert it to safetensors first"):
        SafetensorsDir(str(tmp_path))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.safetensors").write_bytes((100).to_bytes(8, "little") + b"{broken")
    with pytest.raises(CheckpointError, match="corrupt safetensors header"):
        SafetensorsDir(str(bad))
    sharded = tmp_path / "sharded"
    shutil.copytree(tiny_checkpoint("qwen3", True), sharded)
    victim = sorted(p for p in os.listdir(sharded) if p.endswith(".safetensors"))[3]
    os.unlink(sharded / victim)
    with pytest.raises(CheckpointError, match=f"{victim}: listed in the index but missing"):
        SafetensorsDir(str(sharded))


def _edit_checkpoint(src, dst, edit):
    shutil.copytree(src, dst)
    path = os.path.join(dst, "model.safetensors")
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def test_missing_and_unknown_tensors_are_errors(tiny_checkpoint, tmp_path):
    src = tiny_checkpoint("qwen2")
    missing = str(tmp_path / "missing")
    _edit_checkpoint(src, missing, lambda t: t.pop("model.layers.2.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing, e.g. \['model.layers.2.mlp.up_proj"):
        hf_to_megatron(missing, str(tmp_path / "o1"))
    unknown = str(tmp_path / "unknown")
    _edit_checkpoint(src, unknown, lambda t: t.update({"model.extra.weight": torch.ones(2)}))
    with pytest.raises(CheckpointError, match=r"does not know how to map, e.g. \['model.extra"):
        hf_to_megatron(unknown, str(tmp_path / "o2"))
    rotary = str(tmp_path / "rotary")  # buffers of old checkpoints are dropped, not an error
    _edit_checkpoint(
        src,
        rotary,
        lambda t: t.update({"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)}),
    )
    hf_to_megatron(rotary, str(tmp_path / "o3"))


def test_layout_and_format_errors(tiny_checkpoint, tmp_path):
    src = tiny_checkpoint("qwen2")
    with pytest.raises(
        ValueError, match="tensor parallel size 4 must divide.*num_key_value_heads=2"
    ):
        hf_to_megatron(src, str(tmp_path / "o"), tp=4)
    with pytest.raises(ValueError, match="num_hidden_layers=4 is not divisible"):
        hf_to_megatron(src, str(tmp_path / "o"), pp=3)
    with pytest.raises(FileNotFoundError, match="is not a megagrpo megatron checkpoint"):
        megatron_to_hf(str(tmp_path), str(tmp_path / "back"))
    meg = str(tmp_path / "meg")
    hf_to_megatron(src, meg)
    meta_path = os.path.join(meg, "megagrpo_megatron.json")
    data = json.load(open(meta_path))
    data["format_version"] = 99
    json.dump(data, open(meta_path, "w"))
    with pytest.raises(ValueError, match="format_version=99, expected 1"):
        MegatronCheckpointMeta.load(meg)
