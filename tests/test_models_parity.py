"""megatron-core models built from HF configs compute what transformers computes (one process)."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from conftest import ARCH_NAMES

from megagrpo.config import MegatronConfig
from megagrpo.conversion.hf_weights import load_hf_weights
from megagrpo.conversion.safetensors_io import SafetensorsDir
from megagrpo.demo.tiny_models import TINY_CONFIGS
from megagrpo.models.arch import ArchitectureError, arch_from_hf_config, load_arch
from megagrpo.models.builder import build_model, padded_vocab_size
from megagrpo.models.rope import rope_inv_freq


@pytest.fixture(scope="module")
def groups():
    from megagrpo.distributed import destroy_distributed, init_distributed

    g = init_distributed(MegatronConfig(), seed=7)
    yield g
    destroy_distributed()


def _megatron(hf_dir, groups, **par):
    arch = load_arch(hf_dir)
    model = build_model(arch, MegatronConfig(**par), pg_collection=groups.pg_collection)[0]
    load_hf_weights([model], SafetensorsDir(hf_dir), arch, groups)
    return arch, model.eval()


def test_local_spec_runs_megagrpos_norm_and_rope(tiny_checkpoint, groups):
    """Without Transformer Engine every norm (q / k and the final one too) is megagrpo's RMSNorm
    and RoPE goes through megatron's fused entry, filled with megagrpo's functions."""
    import importlib.util

    from megatron.core.models.common.embeddings import rope_utils

    from megagrpo.models.rms_norm import RMSNorm
    from megagrpo.models.rope_fusion import apply_rotary, apply_rotary_thd

    if importlib.util.find_spec("transformer_engine") is not None:
        pytest.skip("Transformer Engine's RoPE kernels take precedence where TE is installed")
    arch, model = _megatron(tiny_checkpoint("qwen3"), groups)
    norms = {
        n: type(m)
        for n, m in model.named_modules()
        if n.endswith("layernorm") and "cross_attn" not in n  # IdentityOp: no cross attention
    }
    assert len(norms) == 4 * arch.num_layers + 1 and "decoder.final_layernorm" in norms
    assert set(norms.values()) == {RMSNorm}
    assert model.config.apply_rope_fusion
    assert rope_utils.fused_apply_rotary_pos_emb is apply_rotary
    assert rope_utils.fused_apply_rotary_pos_emb_thd is apply_rotary_thd


@pytest.mark.parametrize("name", ARCH_NAMES)
def test_logits_match_transformers_fp32(name, tiny_checkpoint, groups):
    from transformers import AutoModelForCausalLM

    hf_dir = tiny_checkpoint(name)
    hf = AutoModelForCausalLM.from_pretrained(hf_dir).float().eval()
    arch, model = _megatron(hf_dir, groups)
    torch.manual_seed(1)
    # 200 positions: past llama3's original_max_position_embeddings (64) of the tiny config.
    ids = torch.randint(0, arch.vocab_size, (2, 200))
    with torch.no_grad():
        ours = model(ids, None, attention_mask=None)
        ref = hf(ids).logits
    assert ours.shape == (2, 200, padded_vocab_size(arch.vocab_size, 1))
    diff = (ours[..., : arch.vocab_size] - ref).abs().max().item()
    assert diff <= 1e-4, f"{name}: max |logits diff| = {diff}"
    # Padded vocabulary columns are -inf, so softmax over the padded vocab is unchanged.
    assert torch.isneginf(ours[..., arch.vocab_size :]).all()
    logp_ours = torch.log_softmax(ours.double(), -1)[..., : arch.vocab_size]
    assert (logp_ours - torch.log_softmax(ref.double(), -1)).abs().max() <= 1e-4


@pytest.mark.parametrize("name", ARCH_NAMES)
def test_logits_bf16_error_within_twice_transformers_bf16_error(name, tiny_checkpoint, groups):
    """bf16 has no exact answer: both implementations round differently. The tolerance is the
    error transformers itself makes in bf16 against its fp32 logits: megatron's bf16 error may
    be at most twice that, plus 0.02 (a few bf16 ulps at logits of magnitude ~1)."""
    from transformers import AutoModelForCausalLM

    hf_dir = tiny_checkpoint(name)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    hf32 = AutoModelForCausalLM.from_pretrained(hf_dir).float().eval().to(device)
    hf16 = AutoModelForCausalLM.from_pretrained(hf_dir).to(torch.bfloat16).eval().to(device)
    arch = load_arch(hf_dir)
    par = MegatronConfig()
    model = build_model(arch, par, pg_collection=groups.pg_collection, params_dtype="bfloat16")[0]
    load_hf_weights([model], SafetensorsDir(hf_dir), arch, groups)
    model = model.eval().to(device)
    torch.manual_seed(2)
    ids = torch.randint(0, arch.vocab_size, (2, 96), device=device)
    with torch.no_grad():
        ref = hf32(ids).logits.double()
        hf_err = (hf16(ids).logits.double() - ref).abs().max().item()
        ours = model(ids, None, attention_mask=None)[..., : arch.vocab_size]
        our_err = (ours.double() - ref).abs().max().item()
    assert ours.dtype == torch.bfloat16
    assert our_err <= 2 * hf_err + 0.02, f"{name}: megatron {our_err:.4f} vs HF {hf_err:.4f}"


def test_llama3_rope_scaling_is_the_checkpoints(tiny_checkpoint, groups):
    """The tiny llama3 config uses factor 32 and an original context of 64, unlike megatron's
    built-in llama3 defaults (8, 8192): the builder must install the checkpoint's frequencies."""
    arch, model = _megatron(tiny_checkpoint("llama3"), groups)
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = AutoConfig.from_pretrained(tiny_checkpoint("llama3"))
    hf_inv, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    assert torch.equal(model.rotary_pos_emb.inv_freq.cpu(), hf_inv.float())
    default = rope_inv_freq(type(arch.rope)(theta=arch.rope.theta), arch.head_dim)
    assert not torch.allclose(default, hf_inv.float())


def test_activation_recompute_gives_same_gradients(tiny_checkpoint, groups):
    hf_dir = tiny_checkpoint("qwen2")
    torch.manual_seed(3)
    ids = torch.randint(0, 105, (2, 24))
    labels = torch.randint(0, 105, (2, 24))
    grads = []
    for recompute in (None, "full", "selective"):
        _, model = _megatron(hf_dir, groups, recompute_granularity=recompute)
        model.train()
        model(ids, None, attention_mask=None, labels=labels).mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for other in grads[1:]:
        assert other.keys() == grads[0].keys()
        for n in grads[0]:
            torch.testing.assert_close(other[n], grads[0][n], rtol=1e-5, atol=1e-6, msg=n)


def _cfg(name):
    from transformers import AutoConfig

    cfg = dict(TINY_CONFIGS[name])
    return AutoConfig.for_model(cfg.pop("model_type"), vocab_size=105, **cfg).to_dict()


@pytest.mark.parametrize(
    "name,change,field",
    [
        ("qwen2", {"model_type": "mistral"}, "model_type"),
        ("qwen2", {"hidden_act": "gelu"}, "hidden_act"),
        ("qwen2", {"use_sliding_window": True}, "use_sliding_window"),
        ("llama3", {"attention_bias": True}, "attention_bias"),
        ("llama3", {"mlp_bias": True}, "mlp_bias"),
        ("qwen2", {"num_key_value_heads": 3}, "num_key_value_heads"),
        ("qwen2", {"hidden_size": None}, "hidden_size"),
        ("qwen2", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "rope_type"),
        ("llama3", {"rope_parameters": {"rope_type": "llama3", "factor": 8.0}}, "low_freq_factor"),
    ],
)
def test_unsupported_configs_name_the_field(name, change, field):
    cfg = _cfg(name)
    cfg.update(change)
    with pytest.raises(ArchitectureError, match=field):
        arch_from_hf_config(cfg, source="x/config.json")


def test_transformers4_rope_spelling_reads_the_same():
    new = _cfg("llama3")
    old = copy.deepcopy(new)
    params = old.pop("rope_parameters")
    old["rope_theta"] = params.pop("rope_theta")
    old["rope_scaling"] = params
    assert arch_from_hf_config(old).rope == arch_from_hf_config(new).rope
    assert arch_from_hf_config(new).rope.factor == 32.0


def test_load_arch_errors_name_the_file(tmp_path):
    with pytest.raises(ArchitectureError, match="config.json: not found"):
        load_arch(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ArchitectureError, match="not valid JSON"):
        load_arch(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    with pytest.raises(ArchitectureError, match="'hidden_size' is missing"):
        load_arch(str(tmp_path))
    assert os.path.basename(str(tmp_path))  # the message carries the path, checked above


def test_megatron_shards_of_another_layout_are_refused(tiny_checkpoint, groups, tmp_path):
    from megagrpo.conversion.convert import hf_to_megatron
    from megagrpo.conversion.hf_weights import load_megatron_shards

    hf_dir = tiny_checkpoint("qwen2")
    meg = str(tmp_path / "meg")
    hf_to_megatron(hf_dir, meg, tp=2)
    arch, model = _megatron(hf_dir, groups)
    with pytest.raises(ValueError, match="saved with TP=2 PP=1 VPP=None, the model runs TP=1"):
        load_megatron_shards([model], meg, arch, groups)


def test_padded_vocab_size():
    assert padded_vocab_size(151936, 1) == 151936
    assert padded_vocab_size(151936, 8) == 152576  # 1024 x 149
    assert padded_vocab_size(105, 2, 8) == 112
    assert padded_vocab_size(128256, 4) == 128512
