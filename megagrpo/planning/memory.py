"""Per-GPU memory estimate of a recipe, for ``megagrpo train --dry-run``.

All figures are bytes on the busiest GPU (the first pipeline stage, or the last when the output
layer makes it heavier) during the policy update. Notation: h hidden, a heads, g query groups,
d head dim, F ffn hidden, V padded vocab, L layers, t TP, p PP, s sequence length (prompt +
completion), b micro-batch (completions), M micro-batches per step, e bytes per element of the
parameter dtype (2 for bf16/fp16, 4 for fp32).

- parameters: e x this stage's parameters (shardable ones / t, norms replicated).
- gradients: 4 bytes per parameter (megatron's fp32 gradient buffers).
- optimizer: Adam's two moments in fp32 (8 bytes) plus an fp32 master copy when the
  parameters are bf16/fp16 (4 bytes); divided by DP with the distributed optimizer.
- activations, per layer and micro-batch, in elements (x e):
  2 s b h (the two norm inputs) + 2 s b h (QKV and fc1 inputs) [all four / t with sequence
  parallelism] + s b (a d + 2 g d) / t (q, k, v kept for attention's backward; megatron's local
  attention expands k and v to all heads: 3 s b a d / t) + a s^2 b / t (softmax probabilities;
  local attention only, flash attention keeps none) + s b a d / t (output projection input)
  + 3 s b F / t (gate and up outputs, and their SwiGLU product).
  Full recompute keeps only each recompute chunk's input (s b h, / t with sequence parallelism)
  plus one chunk recomputed in full; selective recompute drops the softmax term. The 1F1B
  schedule keeps min(p, M) micro-batches in flight on the first stage.
- logits: s b V / t elements of logits plus their gradient, both in the parameter dtype (the
  fused log-prob kernel never materialises an fp32 N x V tensor).
- reference model: e x this stage's parameters when beta > 0 (0 when kept in CPU memory).
- vLLM (colocated): vllm_gpu_memory_utilization x GPU memory while generating; with sleep mode
  it is released during the update, so it is reported beside the update total, not added.
"""

from __future__ import annotations

from dataclasses import dataclass

from megagrpo.models.arch import ModelArch
from megagrpo.models.builder import padded_vocab_size

GIB = 1024**3


@dataclass(frozen=True)
class MemoryEstimate:
    parameters: int
    gradients: int
    optimizer: int
    activations: int
    activations_no_recompute: int
    activations_full_recompute: int
    logits: int
    reference: int
    vllm: int
    notes: tuple[str, ...] = ()

    @property
    def update_total(self) -> int:
        return (
            self.parameters
            + self.gradients
            + self.optimizer
            + self.activations
            + self.logits
            + self.reference
        )

    def table(self) -> str:
        rows = [
            ("parameters", self.parameters),
            ("gradients (fp32 buffers)", self.gradients),
            ("optimizer state", self.optimizer),
            ("activations (this recipe's recompute)", self.activations),
            ("  without recompute", self.activations_no_recompute),
            ("  with full recompute", self.activations_full_recompute),
            ("logits + their gradient", self.logits),
            ("reference model", self.reference),
            ("total during the policy update", self.update_total),
            ("vLLM colocated (while generating)", self.vllm),
        ]
        lines = [f"{name:<40} {value / GIB:>10.2f} GiB" for name, value in rows]
        return "\n".join(lines + [f"note: {n}" for n in self.notes])


def stage_parameters(arch: ModelArch, tp: int, pp: int, padded_vocab: int) -> tuple[int, int]:
    """Parameters per GPU on the first and on the last pipeline stage."""
    h, d, a, g, f = (
        arch.hidden_size,
        arch.head_dim,
        arch.num_attention_heads,
        arch.num_query_groups,
        arch.ffn_hidden_size,
    )
    qkv_rows = a * d + 2 * g * d
    sharded = h * qkv_rows + (qkv_rows if arch.qkv_bias else 0) + a * d * h + 3 * h * f
    replicated = 2 * h + (2 * d if arch.qk_norm else 0)
    per_layer = sharded // tp + replicated
    layers = arch.num_layers // pp
    vocab_shard = padded_vocab * h // tp
    first = layers * per_layer + vocab_shard
    has_output = (not arch.tie_word_embeddings) or pp > 1
    last = layers * per_layer + h + (vocab_shard if has_output else 0)
    if pp == 1:
        return first + (last - layers * per_layer), first + (last - layers * per_layer)
    return first, last


def layer_activation_elements(
    arch: ModelArch,
    s: int,
    b: int,
    tp: int,
    *,
    sequence_parallel: bool,
    flash: bool,
    key_length: int | None = None,
) -> dict[str, int]:
    """Elements one layer keeps for its backward, for ``s`` query positions of ``b`` sequences
    (``key_length``: the keys each attends over, ``s`` unless context parallelism splits the
    queries)."""
    h, d, a, g, f = (
        arch.hidden_size,
        arch.head_dim,
        arch.num_attention_heads,
        arch.num_query_groups,
        arch.ffn_hidden_size,
    )
    hidden = s * b * h // (tp if sequence_parallel else 1)
    return {
        "norm_inputs": 2 * hidden,
        "linear_inputs": 2 * hidden,
        "qkv": s * b * ((a * d + 2 * g * d) if flash else 3 * a * d) // tp,
        "softmax": 0 if flash else a * s * (key_length or s) * b // tp,
        "proj_input": s * b * a * d // tp,
        "mlp": 3 * s * b * f // tp,
    }


def estimate_memory(
    recipe,
    arch: ModelArch,
    *,
    dp: int,
    gpu_memory_bytes: int = 80 * GIB,
    flash_attention: bool = True,
    reference_on_cpu: bool = False,
) -> MemoryEstimate:
    mc, tr = recipe.megatron, recipe.training
    tp, pp = mc.tensor_model_parallel_size, mc.pipeline_model_parallel_size
    cp = mc.context_parallel_size
    notes = []
    e = 2 if (tr.bf16 is not False or tr.fp16) else 4
    padded = padded_vocab_size(arch.vocab_size, tp, mc.make_vocab_size_divisible_by)
    first, last = stage_parameters(arch, tp, pp, padded)
    params = max(first, last)
    master = 4 if e == 2 else 0
    optimizer = params * (8 + master)
    if mc.use_distributed_optimizer:  # sharded over DP x CP (megatron's intra-DP-CP group)
        optimizer //= dp * cp
    prompt = tr.max_prompt_length
    if prompt is None:
        prompt = 512
        notes.append("max_prompt_length is not set: assumed 512 prompt tokens")
    s = prompt + tr.max_completion_length
    b = mc.micro_batch_size or tr.per_device_train_batch_size
    micro_batches = tr.per_device_train_batch_size * tr.gradient_accumulation_steps // b
    if mc.max_tokens_per_micro_batch is not None:
        # a pack of N tokens: at most N tokens through the layers and N x s attention scores, as
        # N / s sequences of the longest length s (logits: gathered into [sequences, longest])
        b = -(-mc.max_tokens_per_micro_batch // s)
        micro_batches = pp  # packs per step depend on the lengths: assume the pipeline is full
        notes.append(
            f"max_tokens_per_micro_batch={mc.max_tokens_per_micro_batch}: activations and logits "
            f"sized as {b} sequences of {s} tokens per micro-batch"
        )
    full_s = s
    if cp > 1:  # this rank's positions of every sequence (its logits too)
        s = -(-s // cp)
        notes.append(
            f"context_parallel_size={cp}: activations and logits of {s} of each sequence's "
            f"{full_s} positions per rank"
        )
    in_flight = min(pp, micro_batches)
    layers = arch.num_layers // pp
    parts = layer_activation_elements(
        arch,
        s,
        b,
        tp,
        sequence_parallel=mc.sequence_parallel,
        flash=flash_attention,
        key_length=full_s,
    )
    full_layer = sum(parts.values()) * e
    chunk_input = s * b * arch.hidden_size // (tp if mc.sequence_parallel else 1) * e
    rc = mc.recompute(tr.gradient_checkpointing)
    no_recompute = layers * full_layer
    n = min(rc.recompute_num_layers or 1, layers)
    full_recompute = -(-layers // n) * chunk_input + n * full_layer
    if rc.recompute_granularity == "full":
        act = full_recompute
    elif rc.recompute_granularity == "selective":
        act = layers * (full_layer - parts["softmax"] * e)
    else:
        act = no_recompute
    logits = s * b * padded // tp * 2 * e
    reference = 0 if (tr.beta == 0 or reference_on_cpu) else params * e
    vllm = 0
    if tr.use_vllm and tr.vllm_mode == "colocate":
        vllm = int(tr.vllm_gpu_memory_utilization * gpu_memory_bytes)
    return MemoryEstimate(
        parameters=params * e,
        gradients=params * 4,
        optimizer=optimizer,
        activations=act * in_flight,
        activations_no_recompute=no_recompute * in_flight,
        activations_full_recompute=full_recompute * in_flight,
        logits=logits,
        reference=reference,
        vllm=vllm,
        notes=tuple(notes),
    )
