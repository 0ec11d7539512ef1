"""Model settings: which Hugging Face checkpoint to start from (TRL's ``ModelConfig``).

PEFT / LoRA and bitsandbytes quantisation fields of TRL's ModelConfig are recognised but not used
(megagrpo trains all parameters of a megatron-core model); see ``megagrpo.config.known_keys``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from megagrpo.config.fields import option


@dataclass
class ModelConfig:
    """The policy checkpoint and how to load it."""

    model_name_or_path: str | None = option(
        None, help="Hub id or local directory of the Hugging Face policy checkpoint."
    )
    model_revision: str = option("main", help="Branch, tag or commit of the checkpoint.")
    torch_dtype: Literal["auto", "bfloat16", "float16", "float32"] = option(
        "auto",
        help="dtype of the rollout engines (the embedded engine, vLLM); 'auto' samples in the "
        "trainer's parameter dtype (fp32 on CPU, else bf16 / fp16 as set). Also accepted as "
        "`dtype` (TRL's current name). Training precision comes from bf16 / fp16.",
    )
    trust_remote_code: bool = option(
        False,
        help="Allow checkpoints and tokenizers that ship their own Python code (newer TRL keeps "
        "this key in GRPOConfig; the recipe key is the same).",
    )
    attn_implementation: str | None = option(
        None,
        help="transformers' attention kernel. Not used: megatron-core, the embedded engine's "
        "decoder and vLLM each choose their own (a recipe that sets it gets a warning).",
    )
