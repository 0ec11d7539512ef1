"""The Python side of ``tools/gpu_check.sh``: checks of the GPU path that need a CUDA device.

    python tools/gpu_check.py parity           # megatron-core bf16 logits vs transformers
    python tools/gpu_check.py demo --steps 20  # GRPO demo steps on CUDA + peak memory of an update

Each check prints one line ``RESULT|<check>|<pass or FAIL>|<numbers>`` that gpu_check.sh turns
into a row of ``$OUT/gpu_check.md``; it exits 0 when the check passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch

GIB = 1024**3


def result(check: str, ok: bool, numbers: str) -> int:
    print(f"RESULT|{check}|{'pass' if ok else 'FAIL'}|{numbers}", flush=True)
    return 0 if ok else 1


def check_parity(args) -> int:
    """The rule of test_logits_bf16_error_within_twice_transformers_bf16_error, on CUDA, for
    every tiny architecture: megatron's bf16 error against transformers' fp32 logits is at most
    twice transformers' own bf16 error, plus 0.02."""
    from transformers import AutoModelForCausalLM

    from megagrpo.config.megatron import MegatronConfig
    from megagrpo.conversion.hf_weights import load_hf_weights
    from megagrpo.conversion.safetensors_io import SafetensorsDir
    from megagrpo.demo.tiny_models import TINY_CONFIGS, save_tiny_checkpoint
    from megagrpo.distributed import destroy_distributed, init_distributed
    from megagrpo.models.arch import load_arch
    from megagrpo.models.builder import build_model

    groups = init_distributed(MegatronConfig(), seed=7)
    ok, parts = True, []
    try:
        for name in sorted(TINY_CONFIGS):
            hf_dir = tempfile.mkdtemp(prefix=f"gpu-check-{name}-")
            save_tiny_checkpoint(name, hf_dir)
            hf32 = AutoModelForCausalLM.from_pretrained(hf_dir).float().eval().cuda()
            hf16 = AutoModelForCausalLM.from_pretrained(hf_dir).to(torch.bfloat16).eval().cuda()
            arch = load_arch(hf_dir)
            model = build_model(
                arch, MegatronConfig(), pg_collection=groups.pg_collection, params_dtype="bfloat16"
            )[0]
            load_hf_weights([model], SafetensorsDir(hf_dir), arch, groups)
            model = model.eval().cuda()
            torch.manual_seed(2)
            ids = torch.randint(0, arch.vocab_size, (2, 96), device="cuda")
            with torch.no_grad():
                ref = hf32(ids).logits.double()
                hf_err = (hf16(ids).logits.double() - ref).abs().max().item()
                ours = model(ids, None, attention_mask=None)[..., : arch.vocab_size]
                our_err = (ours.double() - ref).abs().max().item()
            good = ours.dtype == torch.bfloat16 and our_err <= 2 * hf_err + 0.02
            ok = ok and good
            parts.append(f"{name}: {our_err:.4f} vs HF {hf_err:.4f}{'' if good else ' FAIL'}")
    finally:
        destroy_distributed()
    return result("megatron bf16 logits vs transformers (CUDA)", ok, "; ".join(parts))


def check_demo(args) -> int:
    """``args.steps`` GRPO steps of the demo on CUDA (Triton kernels on, the default backend on
    CUDA): no NaN in the logged loss / reward, reward of the last 5 steps above the first 5. The
    peak CUDA memory of each policy update (``optimizer_step``) is compared with the dry-run
    planner's ``total during the policy update`` for the same recipe."""
    import importlib.util

    if importlib.util.find_spec("datasets") is None or importlib.util.find_spec("pyarrow") is None:
        # megagrpo's data loader reads the demo's jsonl through ``datasets``, which the GPU
        # machine lacks; .whl/gpu_site.tar.xz (tools/fetch_gpu_wheels.sh) brings it.
        why = "datasets / pyarrow not installed: run tools/fetch_gpu_wheels.sh before gpu_check.sh"
        print(f"RESULT|GRPO demo on CUDA|skipped|{why}", flush=True)
        print("RESULT|peak memory of one update vs --dry-run planner|skipped|needs the demo")
        return 0
    import datasets  # noqa: F401 - installed but broken (e.g. huggingface_hub too old): fail here

    from megagrpo.demo.grpo_demo import demo_recipe
    from megagrpo.models.arch import load_arch
    from megagrpo.planning.memory import estimate_memory
    from megagrpo.training import build_run, loop, train

    out = args.output_dir or tempfile.mkdtemp(prefix="gpu-check-demo-")
    recipe = demo_recipe(
        out,
        [
            "--max_steps",
            str(args.steps),
            "--eval_strategy",
            "no",
            "--save_strategy",
            "no",
            "--log_completions",
            "false",  # tables of completions (parquet, printed with rich) are not checked here
            "--resume_from_checkpoint",
            "false",
        ],
    )
    peaks: list[int] = []
    original = loop.optimizer_step

    def measured_step(run, mbs, ctx, update_index):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        metrics = original(run, mbs, ctx, update_index)
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated())
        return metrics

    loop.optimizer_step = measured_step
    run = build_run(recipe)
    assert next(run.policy[0].parameters()).is_cuda, "the policy is not on CUDA"
    history = train(run)
    rewards = [h["reward"] for h in history]
    losses = [h["loss"] for h in history]
    finite = all(x == x and abs(x) != float("inf") for x in rewards + losses)
    k = min(5, len(rewards) // 2) or 1
    first, last = sum(rewards[:k]) / k, sum(rewards[-k:]) / k
    rc = result(
        f"GRPO demo, {len(history)} steps on CUDA",
        finite and last > first,
        f"reward first {k} steps {first:.3f} -> last {k} {last:.3f}; no NaN/Inf: {finite}",
    )
    est = estimate_memory(recipe, load_arch(recipe.model.model_name_or_path), dp=1)
    peak = max(peaks) if peaks else 0
    ratio = peak / max(est.update_total, 1)
    # The planner counts weights, gradients, optimizer state, activations and logits; the
    # measurement also holds the CUDA context's allocations, the rollout engine's copy of the
    # model and the allocator's slack. Within 0.5x..2x is what a planner can be asked for.
    rc |= result(
        "peak memory of one update vs --dry-run planner",
        0.5 <= ratio <= 2.0,
        f"measured {peak / GIB:.3f} GiB, planned {est.update_total / GIB:.3f} GiB (x{ratio:.2f})",
    )
    return rc


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="check", required=True)
    sub.add_parser("parity")
    demo = sub.add_parser("demo")
    demo.add_argument("--steps", type=int, default=20)
    demo.add_argument("--output-dir", default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check.py needs a CUDA device", file=sys.stderr)
        return 2
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return {"parity": check_parity, "demo": check_demo}[args.check](args)


if __name__ == "__main__":
    sys.exit(main())
