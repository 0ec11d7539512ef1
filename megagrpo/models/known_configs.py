"""config.json of the models the shipped recipes use, for planning without the hub.

``megagrpo train --dry-run`` and the recipe tests need a model's shape (layers, heads, sizes) on
machines that cannot download it. These are the published configs' shape fields; for training
the checkpoint's own config.json is always the one read.
"""

from __future__ import annotations

import json
import os

from megagrpo.models.arch import ArchitectureError, ModelArch, arch_from_hf_config, load_arch

_LLAMA31_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def _qwen2(hidden, inter, layers, heads, kv, vocab, tied, max_pos=32768):
    return {
        "model_type": "qwen2",
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "vocab_size": vocab,
        "tie_word_embeddings": tied,
        "rope_theta": 1000000.0,
        "max_position_embeddings": max_pos,
        "rms_norm_eps": 1e-6,
        "hidden_act": "silu",
    }


def _llama(hidden, inter, layers, heads, kv, tied, rope):
    return {
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "vocab_size": 128256,
        "tie_word_embeddings": tied,
        "rope_theta": 500000.0,
        "rope_scaling": rope,
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5,
        "hidden_act": "silu",
    }


KNOWN_CONFIGS: dict[str, dict] = {
    "Qwen/Qwen2.5-0.5B-Instruct": _qwen2(896, 4864, 24, 14, 2, 151936, True),
    "Qwen/Qwen2.5-1.5B-Instruct": _qwen2(1536, 8960, 28, 12, 2, 151936, True),
    "Qwen/Qwen2.5-7B-Instruct": _qwen2(3584, 18944, 28, 28, 4, 152064, False),
    "Qwen/Qwen2.5-32B-Instruct": _qwen2(5120, 27648, 64, 40, 8, 152064, False),
    "Qwen/Qwen3-8B": {
        "model_type": "qwen3",
        "hidden_size": 4096,
        "intermediate_size": 12288,
        "num_hidden_layers": 36,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "vocab_size": 151936,
        "tie_word_embeddings": False,
        "rope_theta": 1000000.0,
        "max_position_embeddings": 40960,
        "rms_norm_eps": 1e-6,
        "hidden_act": "silu",
    },
    "meta-llama/Llama-3.1-8B-Instruct": _llama(4096, 14336, 32, 32, 8, False, _LLAMA31_ROPE),
    "meta-llama/Llama-3.3-70B-Instruct": _llama(8192, 28672, 80, 64, 8, False, _LLAMA31_ROPE),
}
# The base models share their instruct variants' shapes.
for _name in list(KNOWN_CONFIGS):
    if _name.endswith("-Instruct"):
        KNOWN_CONFIGS.setdefault(_name[: -len("-Instruct")], KNOWN_CONFIGS[_name])


def resolve_arch(model_name_or_path: str) -> ModelArch:
    """A local model directory's config.json, else the built-in shape of a known hub id."""
    if os.path.isdir(model_name_or_path):
        return load_arch(model_name_or_path)
    if model_name_or_path in KNOWN_CONFIGS:
        return arch_from_hf_config(
            json.loads(json.dumps(KNOWN_CONFIGS[model_name_or_path])), source=model_name_or_path
        )
    raise ArchitectureError(
        f"model_name_or_path={model_name_or_path!r}: not a local directory and not one of the "
        f"built-in model shapes {sorted(KNOWN_CONFIGS)}; download the model first "
        "(huggingface-cli download ...) and point model_name_or_path at the directory"
    )
