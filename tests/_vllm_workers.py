"""Per-rank bodies of the real-vLLM tests (vLLM's CPU build, in-process engines)."""

from __future__ import annotations

import os
import random

import numpy as np
import torch
from _train_workers import NO_WARMUP

TEMPERATURE = 0.8


def _policy(hf_dir):
    from megagrpo.config import MegatronConfig
    from megagrpo.conversion.hf_weights import load_hf_weights
    from megagrpo.conversion.safetensors_io import SafetensorsDir
    from megagrpo.distributed import init_distributed
    from megagrpo.models.arch import load_arch
    from megagrpo.models.builder import build_model
    from megagrpo.training.optimizer import wrap_ddp

    par = MegatronConfig()
    groups = init_distributed(par, seed=3)
    arch = load_arch(hf_dir)
    chunks = build_model(arch, par, pg_collection=groups.pg_collection)
    load_hf_weights(chunks, SafetensorsDir(hf_dir), arch, groups)
    return arch, groups, chunks, wrap_ddp(chunks, par)


def _trainer_logprobs(ddp, groups, samples, temperature):
    """Teacher-forced log-probs of the sampled tokens under the megatron policy (the trainer's
    own log-prob pass), per sample."""
    from megagrpo.training.batch import CompletionBatch, make_micro_batches
    from megagrpo.training.logprob_pass import fill_logprobs

    batch = CompletionBatch(
        prompt_ids=[s.prompt_ids for s in samples],
        completion_ids=[s.completion_ids for s in samples],
        finish_reasons=[s.finish_reason for s in samples],
        advantages_n=torch.zeros(len(samples)),
    )
    mbs = make_micro_batches(batch, len(samples), pad_token_id=0)
    fill_logprobs(ddp, mbs, groups, temperature=temperature, field="old_logp_bl")
    out = []
    for mb in mbs:
        for row in range(mb.mask_bl.shape[0]):
            keep = mb.mask_bl[row].bool()
            out.append(mb.old_logp_bl[row][keep].tolist())
    return out


def _max_gap(samples, reference) -> float:
    gaps = [abs(a - b) for s, r in zip(samples, reference) for a, b in zip(s.logprobs, r)]
    assert all(len(s.logprobs) == len(r) for s, r in zip(samples, reference))
    return max(gaps)


def _rng_states():
    return (random.getstate(), np.random.get_state()[1].tolist(), torch.get_rng_state())


def _same_rng(a, b) -> bool:
    return a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])


def colocated_engine_worker(hf_dir):
    """One trainer process with an in-process vLLM engine: construction arguments, samples and
    their log-probs against the trainer's, a weight update through the worker extension, the
    prefix-cache reset, sampling settings vLLM refuses."""
    from megagrpo.conversion.hf_weights import iter_hf_tensors
    from megagrpo.rollout.protocol import RolloutRequest, SamplingParams
    from megagrpo.rollout.vllm_engine import VLLMConfig, VLLMEngine
    from megagrpo.rollout.weight_sync import sync_weights_from_megatron, tensor_digest

    arch, groups, chunks, ddp = _policy(hf_dir)
    out = {}
    torch.manual_seed(1234)
    before = _rng_states()
    config = VLLMConfig(
        model=hf_dir, mode="colocate", dtype="float32", kv_cache_memory_bytes=32 * 2**20,
        max_model_len=192, max_num_seqs=12, seed=7, enforce_eager=True,
    )  # fmt: skip
    engine = VLLMEngine.from_config(config)
    out["rng_untouched"] = _same_rng(before, _rng_states())
    vc = engine.llm.llm_engine.vllm_config
    out["engine_args"] = {
        "max_model_len": vc.model_config.max_model_len,
        "max_num_seqs": vc.scheduler_config.max_num_seqs,
        "seed": vc.model_config.seed,
        "kv_cache_memory_bytes": vc.cache_config.kv_cache_memory_bytes,
        "logprobs_mode": str(vc.model_config.logprobs_mode),
        "enable_prefix_caching": vc.cache_config.enable_prefix_caching,
        "executor": vc.parallel_config.distributed_executor_backend,
        "dtype": str(vc.model_config.dtype),
        "worker_extension_cls": vc.parallel_config.worker_extension_cls,
        "block_size": vc.cache_config.block_size,
    }
    # the long prompt fills a whole KV block (128 tokens on CPU), which the prefix cache keeps
    prompts = [(1, 17, 29, 41, 5), (1, 60, 61), tuple(range(1, 1 + 140))]
    requests = [RolloutRequest(p, seed=11 + i, request_id=str(i)) for i, p in enumerate(prompts)]
    sampling = SamplingParams(n=4, temperature=TEMPERATURE, max_tokens=12)
    groups_v0 = engine.generate(requests, sampling)
    samples = [s for g in groups_v0 for s in g]
    out["shape"] = [[len(s.completion_ids) for s in g] for g in groups_v0]
    out["indices"] = [[s.index for s in g] for g in groups_v0]
    out["versions_v0"] = sorted({s.weight_version for s in samples})
    out["gap_v0"] = _max_gap(samples, _trainer_logprobs(ddp, groups, samples, TEMPERATURE))
    again = engine.generate(requests, sampling)
    out["deterministic"] = [[s.completion_ids for s in g] for g in again] == [
        [s.completion_ids for s in g] for g in groups_v0
    ]
    distinct = {tuple(s.completion_ids) for s in samples}
    out["distinct_samples"] = len(distinct)

    # a policy update: perturb every weight, then push it through the colocated sync path
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in chunks[0].parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    old_lp = _trainer_logprobs(ddp, groups, samples, TEMPERATURE)
    out["update_moves_logprobs"] = _max_gap(samples, old_lp)  # old vLLM vs new trainer
    engine.record_digests()
    sync_weights_from_megatron(chunks, arch, groups, engine, version=1)
    out["digest"] = engine.weights_digest()
    out["trainer_digest"] = {
        n: tensor_digest(t) for n, t in iter_hf_tensors(chunks, arch, groups, gather_pp=True)
    }
    groups_v1 = engine.generate(requests, sampling)
    samples_v1 = [s for g in groups_v1 for s in g]
    out["versions_v1"] = sorted({s.weight_version for s in samples_v1})
    out["gap_v1"] = _max_gap(samples_v1, _trainer_logprobs(ddp, groups, samples_v1, TEMPERATURE))

    # the same update without the prefix-cache reset: cached prompt KV of the old weights
    with torch.no_grad():
        for p in chunks[0].parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    engine._reset_prefix_cache = lambda: None
    sync_weights_from_megatron(chunks, arch, groups, engine, version=2)
    samples_v2 = [s for g in engine.generate(requests, sampling) for s in g]
    out["gap_without_reset"] = _max_gap(
        samples_v2, _trainer_logprobs(ddp, groups, samples_v2, TEMPERATURE)
    )
    errors = {}
    for name, bad in (
        ("hot", SamplingParams(n=2, temperature=2.5)),
        ("greedy_n", SamplingParams(n=3, temperature=0.0)),
    ):
        try:
            engine.generate(requests[:1], bad)
        except ValueError as e:
            errors[name] = str(e)
    out["errors"] = errors
    return out


def colocated_train_worker(demo_dir, out_dir, overrides, tp=1):
    """The demo recipe with colocated vLLM; every rank returns its history (the step data is
    broadcast, the update metrics reduced: they must agree over ranks) and its engine share."""
    from megagrpo.demo.grpo_demo import demo_recipe_at
    from megagrpo.training import build_run, train

    recipe = demo_recipe_at(
        demo_dir,
        out_dir,
        ["--tensor_model_parallel_size", str(tp), "--num_reward_workers", "1", "--use_vllm",
         "true", *NO_WARMUP, *overrides],
    )  # fmt: skip
    run = build_run(recipe)
    share = run.rollout.share
    history = train(run)
    return {
        "history": history,
        "share": (share.index, share.count, share.leader, share.is_root),
        "engine": type(run.rollout.engine).__name__,
    }


def server_pool_worker(hf_dir, log_dir):
    """A megatron trainer and a pool of two spawned vLLM rollout-servers: weights synced bit for
    bit, samples with the trainer's log-probs, a server killed with kill -9 in the middle of a
    batch restarted with the current weights, and the batch completed."""
    import signal
    import time

    from megagrpo.conversion.hf_weights import iter_hf_tensors
    from megagrpo.rollout.pool import RolloutPool, RolloutPoolConfig
    from megagrpo.rollout.protocol import RolloutRequest, SamplingParams
    from megagrpo.rollout.vllm_engine import VLLMConfig
    from megagrpo.rollout.weight_sync import sync_weights_from_megatron, tensor_digest

    arch, groups, chunks, ddp = _policy(hf_dir)
    vllm = VLLMConfig(
        mode="server", kv_cache_memory_bytes=32 * 2**20, max_model_len=160, max_num_seqs=16,
        enforce_eager=True,
    )  # fmt: skip
    pool = RolloutPool(
        RolloutPoolConfig(
            model=hf_dir, num_engines=2, engine="vllm", threads_per_engine=1, vllm=vllm,
            record_weight_digests=True, log_dir=log_dir,
        )
    )  # fmt: skip
    out = {}
    try:
        g = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for p in chunks[0].parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
        sync_weights_from_megatron(chunks, arch, groups, pool, version=1)
        trainer = {
            n: tensor_digest(t) for n, t in iter_hf_tensors(chunks, arch, groups, gather_pp=True)
        }
        out["digests_equal"] = [d == trainer for d in pool.weights_digests()]
        out["num_tensors"] = len(trainer)
        requests = [
            RolloutRequest(tuple(range(3 + i, 12 + 2 * i)), seed=100 + i, request_id=str(i))
            for i in range(6)
        ]
        sampling = SamplingParams(n=3, temperature=TEMPERATURE, max_tokens=10)
        groups_v1 = pool.generate(requests, sampling)
        samples = [s for gr in groups_v1 for s in gr]
        out["versions"] = sorted({s.weight_version for s in samples})
        out["gap"] = _max_gap(samples, _trainer_logprobs(ddp, groups, samples, TEMPERATURE))

        long = SamplingParams(n=4, temperature=1.0, max_tokens=120, stop_token_ids=())
        reference = pool.generate(requests, long)  # the batch, undisturbed
        victim = pool.engines[1]
        old_pid = victim.proc.pid

        # kill -9 the victim right after the pool handed it its shard: deterministic, where a
        # thread polling ``victim.busy`` could miss a shard that finished quickly and kill an idle
        # server after the batch (seen once in CI: no restart, then a dead socket)
        from megagrpo.rollout import wire

        send_msg = wire.send_msg

        def send_then_kill(sock, msg):
            send_msg(sock, msg)
            if sock is victim.sock and msg.get("cmd") == "generate" and victim.proc.pid == old_pid:
                os.kill(old_pid, signal.SIGKILL)

        wire.send_msg = send_then_kill
        try:
            again = pool.generate(requests, long)
        finally:
            wire.send_msg = send_msg
        out["restarts"] = pool.restart_count
        out["new_pid"] = victim.proc.pid != old_pid
        out["old_gone"] = not os.path.exists(f"/proc/{old_pid}")
        out["batch_equal"] = [[s.completion_ids for s in gr] for gr in again] == [
            [s.completion_ids for s in gr] for gr in reference
        ]
        out["versions_after"] = sorted({s.weight_version for gr in again for s in gr})
        # the restarted server was given the current weights (the pool's copy), bit for bit
        out["digests_after_restart"] = [d == trainer for d in pool.weights_digests()]
        with open(os.path.join(log_dir, "engine0.log"), errors="replace") as f:
            log = f.read()
        out["flags_reached_vllm"] = [  # vLLM logs its non-default engine arguments
            a in log for a in ("'max_model_len': 160", "'max_num_seqs': 16",
                               "'kv_cache_memory_bytes': 33554432", "'enforce_eager': True")
        ]  # fmt: skip
        groups_of_servers = {old_pid, *pool.engine_pids()}
    finally:
        pool.close()
    out["servers_left"] = [p for p in pool.engine_pids() if p and os.path.exists(f"/proc/{p}")]
    # nothing a server started (vLLM's engine core, its workers) outlives it, killed or not; a
    # process SIGKILLed in uninterruptible sleep takes a moment to go, so wait up to 10 s for it
    deadline = time.monotonic() + 10
    while True:
        left = [pid for pid, pgid in _process_groups().items() if pgid in groups_of_servers]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    out["group_members_left"] = left
    return out


def _process_groups() -> dict[int, int]:
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                if fields[0] != "Z":
                    out[int(entry)] = int(fields[2])
            except (OSError, IndexError, ValueError):
                pass
    return out
