"""The decoder architectures megagrpo builds, read from a Hugging Face ``config.json``.

``ModelArch`` is the one description of a dense decoder that both the megatron-core builder and
the HF <-> megatron weight mapping read. It is parsed from the plain ``config.json`` dictionary
(not from a transformers config object) so that transformers 4.x and 5.x checkpoints, which spell
the RoPE settings differently (``rope_theta`` + ``rope_scaling`` vs ``rope_parameters``), read
the same.

Supported: Qwen2 / Qwen2.5 (bias on q, k, v), Qwen3 (RMSNorm on q and k per head), Llama-3 dense
(llama3 RoPE scaling); GQA, tied or untied embeddings, RMSNorm, SwiGLU.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any

_FAMILIES = {
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "llama": "LlamaForCausalLM",
}
_SUPPORTED_ROPE = ("default", "linear", "llama3")


class ArchitectureError(ValueError):
    """A Hugging Face config that megagrpo cannot build; the message names the field."""


@dataclass(frozen=True)
class RopeSpec:
    """Rotary position embedding settings."""

    theta: float
    """Base of the inverse frequencies (``rope_theta``)."""
    rope_type: str = "default"
    """``default``, ``linear`` or ``llama3``."""
    factor: float = 1.0
    """Scaling factor (``linear`` and ``llama3``)."""
    low_freq_factor: float = 1.0
    """llama3: wavelengths above original_max_position_embeddings / low_freq_factor are scaled."""
    high_freq_factor: float = 4.0
    """llama3: wavelengths below original_max_position_embeddings / high_freq_factor are kept."""
    original_max_position_embeddings: int = 8192
    """llama3: the context length the model was pre-trained with."""


@dataclass(frozen=True)
class ModelArch:
    """A dense decoder-only transformer, as megagrpo needs to know it."""

    family: str
    """``qwen2``, ``qwen3`` or ``llama`` (the HF ``model_type``)."""
    vocab_size: int
    """Rows of the HF embedding matrix (before megatron's vocab padding)."""
    hidden_size: int
    ffn_hidden_size: int
    """``intermediate_size`` of the SwiGLU MLP."""
    num_layers: int
    num_attention_heads: int
    num_query_groups: int
    """``num_key_value_heads`` (GQA); equal to the heads for plain multi-head attention."""
    head_dim: int
    """Channels per attention head (``kv_channels`` in megatron)."""
    rms_norm_eps: float
    rope: RopeSpec
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    """Bias on the q, k and v projections (Qwen2)."""
    qk_norm: bool
    """RMSNorm over head_dim on q and k before RoPE (Qwen3)."""
    initializer_range: float = 0.02
    torch_dtype: str | None = None
    """The dtype the checkpoint was saved in, as config.json names it."""
    extra: dict[str, Any] = field(default_factory=dict, compare=False)
    """config.json as read, for carrying it over unchanged."""

    @property
    def hf_architecture(self) -> str:
        return _FAMILIES[self.family]

    def layout_dims(self) -> dict[str, int]:
        """The sizes ``config.validate_layout`` checks a parallel layout against."""
        return {
            "num_layers": self.num_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_query_groups": self.num_query_groups,
        }

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("extra")
        return d


def _require(cfg: dict, key: str, source: str):
    if key not in cfg or cfg[key] is None:
        raise ArchitectureError(f"{source}: field '{key}' is missing")
    return cfg[key]


def _rope_from_config(cfg: dict, source: str) -> RopeSpec:
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and params:  # transformers >= 5 spelling
        scaling = dict(params)
        theta = scaling.pop("rope_theta", None) or cfg.get("rope_theta") or 10000.0
    else:
        theta = cfg.get("rope_theta") or 10000.0
        scaling = dict(cfg.get("rope_scaling") or {})
    rope_type = scaling.get("rope_type", scaling.get("type", "default")) or "default"
    if rope_type not in _SUPPORTED_ROPE:
        raise ArchitectureError(
            f"{source}: rope_scaling.rope_type={rope_type!r} is not supported; "
            f"expected one of {list(_SUPPORTED_ROPE)}"
        )
    if rope_type == "default":
        return RopeSpec(theta=float(theta))
    factor = float(_require(scaling, "factor", f"{source} rope_scaling"))
    if rope_type == "linear":
        return RopeSpec(theta=float(theta), rope_type="linear", factor=factor)
    return RopeSpec(
        theta=float(theta),
        rope_type="llama3",
        factor=factor,
        low_freq_factor=float(_require(scaling, "low_freq_factor", f"{source} rope_scaling")),
        high_freq_factor=float(_require(scaling, "high_freq_factor", f"{source} rope_scaling")),
        original_max_position_embeddings=int(
            _require(scaling, "original_max_position_embeddings", f"{source} rope_scaling")
        ),
    )


def arch_from_hf_config(cfg: dict, source: str = "config.json") -> ModelArch:
    """Parse a Hugging Face ``config.json`` dictionary; errors name the field and the file."""
    family = cfg.get("model_type")
    if family not in _FAMILIES:
        raise ArchitectureError(
            f"{source}: model_type={family!r} is not supported; expected one of "
            f"{sorted(_FAMILIES)} (Qwen2/Qwen2.5, Qwen3, Llama-3 dense)"
        )
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise ArchitectureError(f"{source}: hidden_act={act!r}; only 'silu' (SwiGLU) is supported")
    for flag in ("use_sliding_window",):
        if cfg.get(flag):
            raise ArchitectureError(f"{source}: {flag}=true is not supported (full attention only)")
    if family in ("llama", "qwen3") and cfg.get("attention_bias"):
        raise ArchitectureError(
            f"{source}: attention_bias=true is not supported for {family} "
            "(megatron's qkv bias covers q, k, v but not the output projection)"
        )
    if cfg.get("mlp_bias"):
        raise ArchitectureError(f"{source}: mlp_bias=true is not supported")
    if float(cfg.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ArchitectureError(f"{source}: partial_rotary_factor must be 1.0")
    if family == "llama" and cfg.get("pretraining_tp", 1) != 1:
        raise ArchitectureError(f"{source}: pretraining_tp={cfg['pretraining_tp']} (expected 1)")

    hidden = int(_require(cfg, "hidden_size", source))
    heads = int(_require(cfg, "num_attention_heads", source))
    groups = int(cfg.get("num_key_value_heads") or heads)
    head_dim = cfg.get("head_dim")
    if head_dim is None:
        if hidden % heads:
            raise ArchitectureError(
                f"{source}: hidden_size={hidden} is not divisible by num_attention_heads={heads} "
                "and no head_dim is given"
            )
        head_dim = hidden // heads
    if heads % groups:
        raise ArchitectureError(
            f"{source}: num_key_value_heads={groups} must divide num_attention_heads={heads}"
        )
    return ModelArch(
        family=family,
        vocab_size=int(_require(cfg, "vocab_size", source)),
        hidden_size=hidden,
        ffn_hidden_size=int(_require(cfg, "intermediate_size", source)),
        num_layers=int(_require(cfg, "num_hidden_layers", source)),
        num_attention_heads=heads,
        num_query_groups=groups,
        head_dim=int(head_dim),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope=_rope_from_config(cfg, source),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=family == "qwen2",
        qk_norm=family == "qwen3",
        initializer_range=float(cfg.get("initializer_range", 0.02)),
        torch_dtype=cfg.get("torch_dtype", cfg.get("dtype")),
        extra=dict(cfg),
    )


def load_arch(model_dir: str) -> ModelArch:
    """Read ``<model_dir>/config.json``."""
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        raise ArchitectureError(f"{path}: not found (expected a Hugging Face model directory)")
    with open(path, encoding="utf-8") as f:
        try:
            cfg = json.load(f)
        except json.JSONDecodeError as e:
            raise ArchitectureError(f"{path}: not valid JSON ({e})") from None
    return arch_from_hf_config(cfg, source=path)
