"""Build a megatron-core GPTModel that computes what the Hugging Face model computes.

``build_model`` turns a ``ModelArch`` and the parallel settings (``MegatronConfig``) into the
model chunks of this rank: one chunk, or ``virtual_pipeline_model_parallel_size`` chunks for the
interleaved pipeline schedule. The Transformer Engine layer spec is used when TE is importable on
a CUDA machine, megatron-core's local spec otherwise; parameter names differ between the two only
in where the layer norms live (see ``mapping.py``).

Vocab padding: megatron's vocab-parallel embedding needs a vocabulary divisible by TP, so the
vocabulary is padded to a multiple of ``make_vocab_size_divisible_by x TP``. The padded rows carry
zeros and their logits are set to -inf by a forward hook on the output layer, so softmax,
log-probs and entropy over the padded vocabulary equal those over the real one.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch
import torch.nn.functional as F

from megagrpo.config.megatron import MegatronConfig
from megagrpo.models import rope_fusion
from megagrpo.models.arch import ModelArch
from megagrpo.models.rope import rope_inv_freq

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def transformer_engine_available() -> bool:
    """Transformer Engine is importable and a CUDA device exists."""
    return torch.cuda.is_available() and importlib.util.find_spec("transformer_engine") is not None


def apex_grad_accum_fusion_available() -> bool:
    """apex's ``fused_weight_gradient_mlp_cuda`` extension imports (megatron-core's own test)."""
    try:
        import fused_weight_gradient_mlp_cuda  # noqa: F401
    except ImportError:
        return False
    return True


def use_gradient_accumulation_fusion(use_te: bool) -> bool:
    """Whether to fuse the weight-gradient GEMM with the fp32 ``main_grad`` accumulation.

    megatron-core 0.16.1 raises in ``ColumnParallelLinear.__init__`` (GPTModel's output layer is
    always one) when the flag is on and apex's CUDA extension is missing; the ``gpu`` extra does
    not install apex (it is not on the package registry). So: on with TE layers and apex, off
    otherwise; off costs a separate ``main_grad.add_`` per weight, not correctness.
    """
    return use_te and apex_grad_accum_fusion_available()


def padded_vocab_size(vocab_size: int, tp_size: int, divisible_by: int = 128) -> int:
    """The vocabulary size megatron is built with: a multiple of ``divisible_by * tp_size``."""
    multiple = max(1, divisible_by) * tp_size
    return -(-vocab_size // multiple) * multiple


def resolve_use_te(transformer_impl: str) -> bool:
    """``MegatronConfig.transformer_impl`` -> whether to build Transformer Engine layers."""
    if transformer_impl == "local":
        return False
    if transformer_impl == "transformer_engine":
        if not transformer_engine_available():
            raise RuntimeError(
                "transformer_impl=transformer_engine but Transformer Engine is not importable on "
                "a CUDA machine here; install megagrpo[gpu] or use transformer_impl=auto/local"
            )
        return True
    if transformer_impl == "auto":
        return transformer_engine_available()
    raise ValueError(
        f"transformer_impl={transformer_impl!r}; expected auto, transformer_engine or local"
    )


def build_transformer_config(
    arch: ModelArch,
    par: MegatronConfig,
    *,
    params_dtype: torch.dtype = torch.float32,
    use_te: bool = False,
):
    """megatron-core TransformerConfig for ``arch`` under the megatron settings ``par``.

    ``par``'s recompute_* fields are used as they are: pass ``megatron.resolved(
    gradient_checkpointing)`` to apply TRL's gradient_checkpointing.
    """
    from megatron.core.transformer import TransformerConfig

    on_gpu = torch.cuda.is_available()
    fp8 = par.fp8
    if fp8 and not use_te:
        raise RuntimeError(
            "fp8 is set but Transformer Engine is not available on this machine; "
            "install megagrpo[gpu] on a CUDA machine or unset fp8"
        )
    recompute = par.recompute_granularity
    kwargs: dict[str, Any] = dict(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.ffn_hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_query_groups,
        kv_channels=arch.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=arch.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=arch.qkv_bias,
        qk_layernorm=arch.qk_norm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=arch.initializer_range,
        attention_softmax_in_fp32=True,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        tensor_model_parallel_size=par.tensor_model_parallel_size,
        pipeline_model_parallel_size=par.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=par.virtual_pipeline_model_parallel_size,
        context_parallel_size=par.context_parallel_size,
        sequence_parallel=par.sequence_parallel,
        # Fusions: jit-scripted ones on GPU; TE's with TE; apex's only where apex imports.
        bias_activation_fusion=False,
        bias_dropout_fusion=on_gpu,
        masked_softmax_fusion=use_te,
        apply_rope_fusion=True,  # TE's kernels, else megagrpo's (``rope_fusion``)
        gradient_accumulation_fusion=use_gradient_accumulation_fusion(use_te),
        persist_layer_norm=False,
        use_cpu_initialization=not on_gpu,
        recompute_granularity=recompute,
    )
    if recompute == "full":
        kwargs["recompute_method"] = par.recompute_method or "uniform"
        kwargs["recompute_num_layers"] = par.recompute_num_layers or 1
    if fp8:
        kwargs.update(
            fp8=fp8,
            fp8_recipe=par.fp8_scaling_recipe,
            fp8_margin=par.fp8_margin,
            fp8_amax_history_len=par.fp8_amax_history_len,
            fp8_amax_compute_algo=par.fp8_amax_compute_algo,
            fp8_param=par.fp8_param_gather,
        )
    if not use_te:
        rope_fusion.install()
    return TransformerConfig(**kwargs)


def layer_spec(arch: ModelArch, *, use_te: bool):
    """The transformer layer spec: Transformer Engine's, or megatron-core's local one with torch
    SDPA as its core attention (``sdpa_attention``) and megagrpo's RMSNorm (``rms_norm``)."""
    from megatron.core.models.gpt import gpt_layer_specs

    if use_te:
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=arch.qk_norm)
    import copy

    from megagrpo.models.rms_norm import RMSNorm
    from megagrpo.models.sdpa_attention import SDPAttention

    spec = copy.deepcopy(
        gpt_layer_specs.get_gpt_layer_local_spec(normalization="RMSNorm", qk_layernorm=arch.qk_norm)
    )
    layer, attention = spec.submodules, spec.submodules.self_attention.submodules
    attention.core_attention = SDPAttention
    layer.input_layernorm = layer.pre_mlp_layernorm = RMSNorm
    if arch.qk_norm:
        attention.q_layernorm = attention.k_layernorm = RMSNorm
    return spec


def decoder_spec(config, layer, *, use_te: bool, vp_stage: int | None, pp_rank: int):
    """What GPTModel builds its decoder from: the layer spec (megatron adds its final norm:
    Transformer Engine's with TE), or without TE the block of this stage's layers with
    megagrpo's RMSNorm as the final norm."""
    if use_te:
        return layer
    from megatron.core.transformer.transformer_block import (
        TransformerBlockSubmodules,
        get_num_layers_to_build,
    )

    from megagrpo.models.rms_norm import RMSNorm

    layers = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
    return TransformerBlockSubmodules(layer_specs=[layer] * layers, layer_norm=RMSNorm)


def _mask_padded_vocab_hook(true_vocab: int, tp_group):
    def hook(module, args, output):
        logits, bias = output
        local = logits.shape[-1]
        # A shard of the vocabulary, or the whole of it when the output was gathered.
        start = tp_group.rank() * local if local == module.output_size_per_partition else 0
        if start + local <= true_vocab:
            return output
        col = torch.arange(start, start + local, device=logits.device)
        return logits.masked_fill(col >= true_vocab, float("-inf")), bias

    return hook


def build_model(
    arch: ModelArch,
    par: MegatronConfig,
    *,
    pg_collection=None,
    params_dtype: torch.dtype | str = torch.float32,
    use_te: bool | None = None,
    pre_process: bool | None = None,
    post_process: bool | None = None,
) -> list[torch.nn.Module]:
    """The GPTModel chunks this rank holds (one per virtual pipeline stage).

    ``pg_collection`` holds the explicit process groups (``ParallelGroups.pg_collection``); it
    defaults to megatron's parallel_state groups. ``pre_process`` / ``post_process`` default to
    whether this rank holds the first / last pipeline stage.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.utils import get_pg_rank

    if isinstance(params_dtype, str):
        params_dtype = _DTYPES[params_dtype]
    use_te = resolve_use_te(par.transformer_impl) if use_te is None else use_te
    config = build_transformer_config(arch, par, params_dtype=params_dtype, use_te=use_te)
    spec = layer_spec(arch, use_te=use_te)
    if pg_collection is None:
        pg_collection = ProcessGroupCollection.use_mpu_process_groups()
    tp = config.tensor_model_parallel_size
    vocab = padded_vocab_size(arch.vocab_size, tp, par.make_vocab_size_divisible_by)
    vpp = config.virtual_pipeline_model_parallel_size or 1
    chunks = []
    for vp_stage in range(vpp):
        first = ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
        last = ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
        model = GPTModel(
            config=config,
            transformer_layer_spec=decoder_spec(
                config,
                spec,
                use_te=use_te,
                vp_stage=vp_stage if vpp > 1 else None,
                pp_rank=get_pg_rank(getattr(pg_collection, "pp", None)),
            ),
            vocab_size=vocab,
            max_sequence_length=arch.max_position_embeddings,
            pre_process=first if pre_process is None else pre_process,
            post_process=last if post_process is None else post_process,
            share_embeddings_and_output_weights=arch.tie_word_embeddings,
            position_embedding_type="rope",
            rotary_base=int(arch.rope.theta),
            pg_collection=pg_collection,
            vp_stage=vp_stage if vpp > 1 else None,
        )
        model.rotary_pos_emb.inv_freq = rope_inv_freq(arch.rope, arch.head_dim).to(
            model.rotary_pos_emb.inv_freq.device
        )
        if model.post_process and vocab != arch.vocab_size:
            model.output_layer.register_forward_hook(
                _mask_padded_vocab_hook(arch.vocab_size, pg_collection.tp)
            )
        chunks.append(model)
    return chunks
