"""Tiny Hugging Face checkpoints of every supported architecture, built locally.

The demo and the tests use them in place of hub downloads: each is a real transformers model
(random weights from a fixed seed) saved with ``save_pretrained`` next to the demo tokenizer.
"""

from __future__ import annotations

import torch

from megagrpo.demo.tokenizer import save_demo_tokenizer

# Small, but with every feature that matters: GQA (4 heads, 2 groups), a vocabulary that is not a
# multiple of 128 (megatron pads it), llama3 RoPE scaling with non-default factors, Qwen3's
# head_dim different from hidden / heads, tied and untied embeddings.
_COMMON = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
)
TINY_CONFIGS: dict[str, dict] = {
    # the demo's model: a little wider, so it can learn additions in a few CPU minutes
    "qwen2-demo": dict(
        _COMMON,
        model_type="qwen2",
        hidden_size=128,
        intermediate_size=384,
        rope_theta=10000.0,
        tie_word_embeddings=True,
    ),
    "qwen2": dict(_COMMON, model_type="qwen2", rope_theta=1000000.0, tie_word_embeddings=False),
    "qwen2-tied": dict(_COMMON, model_type="qwen2", rope_theta=10000.0, tie_word_embeddings=True),
    "qwen3": dict(
        _COMMON, model_type="qwen3", head_dim=24, rope_theta=1000000.0, tie_word_embeddings=False
    ),
    "llama3": dict(
        _COMMON,
        model_type="llama",
        rope_theta=500000.0,
        tie_word_embeddings=True,
        rope_scaling=dict(
            rope_type="llama3",
            factor=32.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=64,
        ),
    ),
}


def tiny_hf_model(name: str, vocab_size: int, *, seed: int = 0, dtype=torch.float32):
    """A randomly initialised transformers model of the tiny config ``name``."""
    if name not in TINY_CONFIGS:
        raise ValueError(f"unknown tiny config {name!r}; expected one of {sorted(TINY_CONFIGS)}")
    return hf_model_from_config(TINY_CONFIGS[name], vocab_size, seed=seed, dtype=dtype)


def hf_model_from_config(config: dict, vocab_size: int, *, seed: int = 0, dtype=torch.float32):
    """A randomly initialised transformers model of ``config`` (a ``TINY_CONFIGS``-style dict:
    ``model_type`` and the config's fields), its norms and biases perturbed."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(config)
    model_type = cfg.pop("model_type")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(
        AutoConfig.for_model(model_type, vocab_size=vocab_size, **cfg)
    )
    # transformers initialises norm weights to exactly 1 and biases to 0; perturb them so that a
    # mapping mix-up between norms or a dropped bias shows up in the logits.
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model.to(dtype).eval()


def save_tiny_checkpoint(
    name: str,
    directory: str,
    *,
    seed: int = 0,
    dtype=torch.float32,
    max_shard_size: str | None = None,
):
    """Save tokenizer + tiny model ``name`` into ``directory``; returns the model."""
    tok = save_demo_tokenizer(directory)
    model = tiny_hf_model(name, len(tok), seed=seed, dtype=dtype)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(directory, **kwargs)
    return model
