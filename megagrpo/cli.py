"""The ``megagrpo`` command: ``train``, ``demo``, ``convert``, ``rollout-server`` and ``bench``."""

from __future__ import annotations

import argparse
import sys
import warnings

_QUIET = (
    ".*Apex is not installed.*",
    ".*Transformer Engine and Apex are not installed.*",
    ".*full scope is deprecated.*",
    ".*CUDA_DEVICE_MAX_CONNECTIONS.*",
)


def _quiet_optional_dependency_warnings() -> None:
    """megatron-core warns at import about apex and Transformer Engine; megagrpo says once
    what is missing where it matters, so these are noise on CPU machines."""
    for pattern in _QUIET:
        warnings.filterwarnings("ignore", message=pattern)


def _cmd_demo(args) -> int:
    """GRPO on the embedded tiny demo (see megagrpo.demo.grpo_demo)."""
    import os
    import time

    from megagrpo.demo.grpo_demo import demo_recipe, learning_summary
    from megagrpo.demo.report import PLOT_FILE, before_after_table, plot_before_after
    from megagrpo.monitoring.metrics_log import METRICS_FILE, read_metrics
    from megagrpo.training import build_run, train

    print(
        f"megagrpo demo: GRPO on small additions with a tiny model (seed {args.seed}), "
        f"outputs in {args.output_dir}",
        flush=True,
    )
    overrides = [] if args.steps is None else ["--max_steps", str(max(args.steps, 1))]
    if args.steps == 0:  # the starting policy, not one resumed from an earlier demo's checkpoint
        overrides += ["--resume_from_checkpoint", "false"]
    t0 = time.perf_counter()
    # builds the data and the warm-started model for this seed
    recipe = demo_recipe(args.output_dir, overrides, seed=args.seed)
    t1 = time.perf_counter()
    run = build_run(recipe)
    if args.steps == 0:  # recipes take max_steps >= 1; train() then only evaluates and exports
        run.total_steps = 0
    train(run)
    t2 = time.perf_counter()
    if run.groups.rank == 0:
        out = run.recipe.training.output_dir
        records = read_metrics(os.path.join(out, METRICS_FILE))
        s = learning_summary(records)
        num_test = None if run.data.test is None else len(run.data.test)
        if "accuracy_first" not in s:
            print("no GRPO steps: the starting policy was evaluated and exported")
        print(before_after_table(s, num_test))
        plot = plot_before_after(
            records, os.path.join(out, PLOT_FILE), f"megagrpo demo, seed {args.seed}"
        )
        print(
            f"time: assets (data, tokenizer, warm-started model) {t1 - t0:.0f} s, GRPO training "
            f"with evaluations {t2 - t1:.0f} s, total {t2 - t0:.0f} s"
        )
        print(f"before/after plot: {plot}")
        print(
            f"metrics: {out}/{METRICS_FILE} (every curve: python tools/plot_metrics.py "
            f"{out}/{METRICS_FILE}); final model: {out}/final_model"
        )
    return 0


def _cmd_convert(args) -> int:
    import torch

    from megagrpo.conversion.convert import hf_to_megatron, megatron_to_hf

    dtype = getattr(torch, args.dtype) if args.dtype else None
    if args.direction == "hf-to-megatron":
        meta = hf_to_megatron(
            args.source,
            args.target,
            tp=args.tp,
            pp=args.pp,
            vpp=args.vpp,
            make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
            dtype=dtype,
        )
        print(f"wrote megatron shards TP={meta.tp} PP={meta.pp} VPP={meta.vpp} to {args.target}")
    else:
        files = megatron_to_hf(
            args.source, args.target, dtype=dtype, max_shard_bytes=int(args.max_shard_gb * 2**30)
        )
        print(f"wrote {len(files)} safetensors file(s) to {args.target}")
    return 0


def add_convert_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("direction", choices=["hf-to-megatron", "megatron-to-hf"])
    p.add_argument("source", help="HF model directory, or a megagrpo megatron checkpoint")
    p.add_argument("target", help="output directory")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size (hf-to-megatron)")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size (hf-to-megatron)")
    p.add_argument("--vpp", type=int, default=None, help="virtual pipeline stages per rank")
    p.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        default=None,
        help="cast tensors (default: keep each tensor's dtype, so round trips are bit-identical)",
    )
    p.add_argument(
        "--max-shard-gb",
        type=float,
        default=5.0,
        help="megatron-to-hf: file size limit when the source layout is unknown",
    )


def _cmd_train(args, rest: list[str]) -> int:
    """GRPO training from a recipe; with --dry-run print the plan and stop."""
    from megagrpo.config import load_recipe, validate_recipe

    recipe = load_recipe(args.config, rest)
    validate_recipe(recipe)
    if args.dry_run:
        return _dry_run(recipe, args)
    from megagrpo.training import build_run, train

    train(build_run(recipe))
    return 0


def _dry_run(recipe, args) -> int:
    """Resolved recipe, parallel layout and per-GPU memory estimate (printed by rank 0)."""
    import os

    from megagrpo.config import dump_recipe, validate_layout
    from megagrpo.models.known_configs import resolve_arch
    from megagrpo.planning.memory import GIB, estimate_memory

    world = args.world_size or recipe.megatron.world_size or int(os.environ.get("WORLD_SIZE", "1"))
    arch = resolve_arch(recipe.model.model_name_or_path)
    layout = validate_layout(recipe, world_size=world, **arch.layout_dims())
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun: rank 0 prints the plan
        return 0
    print("# resolved recipe")
    print(dump_recipe(recipe))
    print(
        f"# layout: world {layout.world_size} = TP {layout.tp} x PP {layout.pp} x "
        f"CP {layout.cp} x DP {layout.dp}"
    )
    print(
        f"# model: {arch.family}, {arch.num_layers} layers, hidden {arch.hidden_size}, "
        f"{arch.num_attention_heads} heads / {arch.num_query_groups} groups, "
        f"vocab {arch.vocab_size}"
    )
    est = estimate_memory(
        recipe, arch, dp=layout.dp, gpu_memory_bytes=int(args.gpu_memory_gb * GIB)
    )
    print("# per-GPU memory estimate")
    print(est.table())
    return 0


BENCHMARKS = {
    "kernels": "bench_kernels.py",
    "kernel-memory": "bench_kernel_memory.py",
    "rewards": "bench_rewards.py",
    "rollout": "bench_rollout.py",
    "e2e": "bench_e2e.py",
}


def _cmd_bench(args, rest: list[str]) -> int:
    """The benchmarks live in the source checkout's tools/ (they are not part of the wheel)."""
    import os
    import subprocess

    tools = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools")
    script = os.path.join(tools, BENCHMARKS[args.what])
    if not os.path.isfile(script):
        print(
            f"megagrpo bench: {script} not found; the benchmarks run from a source checkout "
            "(git clone, then pip install -e .)",
            file=sys.stderr,
        )
        return 2
    return subprocess.call([sys.executable, script, *rest])


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is not a count (0 or more)")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megagrpo", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the embedded tiny demo on this machine")
    demo.add_argument("--output-dir", default="outputs/demo")
    demo.add_argument(
        "--steps",
        type=_count,
        default=None,
        help="GRPO steps (default: the demo recipe's max_steps); 0 builds the assets, evaluates "
        "the starting policy on the held-out set and exports it",
    )
    demo.add_argument(
        "--seed",
        type=_count,
        default=0,
        help="seeds the held-out split, the warm start and GRPO's sampling (default 0); the "
        "assets in --output-dir are rebuilt when it changes",
    )
    convert = sub.add_parser("convert", help="convert checkpoints between HF and megatron")
    add_convert_arguments(convert)
    from megagrpo.rollout.server import add_server_arguments

    server = sub.add_parser("rollout-server", help="serve one rollout engine to a rollout pool")
    add_server_arguments(server)
    bench = sub.add_parser(
        "bench",
        help="run a benchmark from tools/; the tool's own options follow a --, e.g. "
        "megagrpo bench rewards -- --help",
    )
    bench.add_argument("what", choices=sorted(BENCHMARKS))
    train = sub.add_parser("train", help="GRPO training from a YAML recipe")
    train.add_argument("--config", help="YAML recipe (open-r1 style keys)")
    train.add_argument(
        "--dry-run",
        action="store_true",
        help="print the resolved recipe, layout and memory estimate, then stop",
    )
    train.add_argument(
        "--world-size",
        type=int,
        default=None,
        help="ranks to plan for (default: $WORLD_SIZE, else 1)",
    )
    train.add_argument(
        "--gpu-memory-gb",
        type=float,
        default=80.0,
        help="memory of one GPU, for the vLLM share in --dry-run",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    _quiet_optional_dependency_warnings()
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command == "bench":
        return _cmd_bench(args, rest)
    if rest and args.command != "train":
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    from megagrpo.config import ConfigError
    from megagrpo.conversion.safetensors_io import CheckpointError
    from megagrpo.data.errors import DataError
    from megagrpo.models.arch import ArchitectureError

    if args.command == "rollout-server":
        from megagrpo.rollout.server import run_server

        return run_server(args)
    try:
        if args.command == "train":
            return _cmd_train(args, rest)
        return {"demo": _cmd_demo, "convert": _cmd_convert}[args.command](args)
    except (ArchitectureError, CheckpointError, ConfigError, FileNotFoundError) as e:
        print(f"megagrpo {args.command}: error: {e}", file=sys.stderr)
        return 2
    except DataError as e:  # raised on every rank (training/prompt_data.py); rank 0 says it
        import torch.distributed as dist

        if not dist.is_initialized() or dist.get_rank() == 0:
            one_line = " ".join(str(e).splitlines())
            print(f"megagrpo {args.command}: error: {one_line}", file=sys.stderr, flush=True)
        if dist.is_initialized():  # torchrun stops all ranks at the first exit: say it first
            dist.barrier()
        return 2


if __name__ == "__main__":
    sys.exit(main())
