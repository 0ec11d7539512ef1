"""Per-rank bodies of the multi-process model tests (spawned by tests/_multiproc.py)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from megagrpo.config import MegatronConfig
from megagrpo.conversion.hf_weights import iter_hf_tensors, load_hf_weights, load_megatron_shards
from megagrpo.conversion.safetensors_io import SafetensorsDir
from megagrpo.distributed import init_distributed
from megagrpo.models.arch import load_arch
from megagrpo.models.builder import build_model


def _setup(hf_dir, tp, pp, vpp=None, recompute=None, vocab_multiple=128):
    par = MegatronConfig(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        recompute_granularity=recompute,
        make_vocab_size_divisible_by=vocab_multiple,
    )
    groups = init_distributed(par, seed=1234)
    arch = load_arch(hf_dir)
    chunks = build_model(arch, par, pg_collection=groups.pg_collection)
    load_hf_weights(chunks, SafetensorsDir(hf_dir), arch, groups)
    return arch, groups, chunks


def _gather_vocab(logits_local, groups):
    if groups.tp_size == 1:
        return logits_local
    parts = [torch.empty_like(logits_local) for _ in range(groups.tp_size)]
    dist.all_gather(parts, logits_local.contiguous(), group=groups.tp)
    return torch.cat(parts, dim=-1)


def _run_schedule(chunks, groups, batches, *, forward_only, labels=None):
    """megatron-core's forward_backward_func over micro-batches; returns last-stage outputs."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    mbs = [(ids, None if labels is None else labels[i]) for i, ids in enumerate(batches)]

    def forward_step(data_iterator, model):
        ids, lab = next(data_iterator)
        out = model(ids, None, attention_mask=None, labels=lab)

        def loss_func(output):
            if lab is None:
                return torch.zeros(()), {"logits": output.detach()}
            loss = output.float().mean()
            # megatron divides the returned loss in place by the number of micro-batches
            return loss, {"loss": loss.detach().clone()}

        return out, loss_func

    # The interleaved schedule reads micro-batches once per model chunk.
    iters = [iter(mbs) for _ in chunks]
    return get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iters if len(chunks) > 1 else iters[0],
        model=chunks if len(chunks) > 1 else chunks[0],
        num_microbatches=len(mbs),
        seq_length=batches[0].shape[1],
        micro_batch_size=batches[0].shape[0],
        forward_only=forward_only,
    )


def logits_worker(hf_dir, tp, pp, vpp, batches, megatron_dir=None):
    """Full-vocab logits of every micro-batch (on the last stage, TP rank 0), else None."""
    arch, groups, chunks = _setup(hf_dir, tp, pp, vpp)
    if megatron_dir is not None:  # reload from the offline-converted shards instead
        for c in chunks:
            for p in c.parameters():
                p.data.zero_()
        load_megatron_shards(chunks, megatron_dir, arch, groups)
    for c in chunks:
        c.eval()
    with torch.no_grad():
        outs = _run_schedule(chunks, groups, batches, forward_only=True)
    if not groups.is_last_stage:
        return None
    full = [_gather_vocab(o["logits"], groups) for o in outs]
    return [f[..., : arch.vocab_size] for f in full] if groups.tp_rank == 0 else None


def hf_iter_worker(hf_dir, tp, pp, vpp):
    """Compare iter_hf_tensors against the HF files bit for bit; returns mismatching names."""
    arch, groups, chunks = _setup(hf_dir, tp, pp, vpp)
    src = SafetensorsDir(hf_dir)
    seen, bad = [], []
    for name, tensor in iter_hf_tensors(chunks, arch, groups):
        seen.append(name)
        ref = src.get(name)
        if ref.dtype != tensor.dtype or not torch.equal(ref, tensor):
            bad.append(name)
    return {"seen": seen, "bad": bad}


def _vocab_rows(name, p, arch, groups):
    """Rows of a vocab-parallel parameter on this rank that are real (not padding)."""
    if not name.endswith(("word_embeddings.weight", "output_layer.weight")):
        return None
    start = groups.tp_rank * p.shape[0]
    return max(0, min(p.shape[0], arch.vocab_size - start))


def train_step_worker(hf_dir, tp, pp, batches, labels, recompute=None, vocab_multiple=8):
    """One backward pass through megatron's DDP and schedule, then an AdamW step.

    Returns the mean loss over micro-batches (last stage), the parameters whose real part did
    not change, the vocab-padding rows that are no longer zero, and this rank's gradients.
    """
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )

    arch, groups, chunks = _setup(
        hf_dir, tp, pp, recompute=recompute, vocab_multiple=vocab_multiple
    )
    config = chunks[0].config
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False)
    model = [
        DistributedDataParallel(config=config, ddp_config=ddp_config, module=c) for c in chunks
    ]
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = model[0].no_sync
    for m in model:
        m.zero_grad_buffer()
    before = {n: p.detach().clone() for m in model for n, p in m.named_parameters()}
    outs = _run_schedule(model, groups, batches, forward_only=False, labels=labels)
    params = [p for m in model for p in m.parameters()]
    grads = {}
    for m in model:
        for n, p in m.named_parameters():
            p.grad = p.main_grad.to(p.dtype)
            grads[n] = p.grad.clone()
    torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0).step()
    unchanged, padding_moved = [], []
    for m in model:
        for n, p in m.named_parameters():
            real = _vocab_rows(n, p, arch, groups)
            if real is not None and real < p.shape[0] and p[real:].abs().max() != 0:
                padding_moved.append(n)
            cut = p.shape[0] if real is None else real
            if cut == 0:  # this rank's shard is all padding
                continue
            if torch.equal(p[:cut], before[n][:cut]):
                unchanged.append(n)
    loss = torch.stack([o["loss"] for o in outs]).mean().item() if groups.is_last_stage else None
    return {
        "loss": loss,
        "unchanged": unchanged,
        "padding_moved": padding_moved,
        "grads": grads,
        "tp_rank": groups.tp_rank,
        "pp_rank": groups.pp_rank,
    }
