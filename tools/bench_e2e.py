"""End-to-end GRPO throughput and reward: megagrpo against TRL's GRPOTrainer, side by side.

    python tools/bench_e2e.py --steps 20                      # both, TRL from this python
    python tools/bench_e2e.py --steps 20 --trl-python /venv-with-trl/bin/python
    python tools/bench_e2e.py --workload realistic            # Qwen2.5 vocabulary, spread lengths

Both train the same warm-started tiny Qwen2-architecture model (the embedded demo's) on the same
addition prompts with the same reward functions (megagrpo's accuracy, format and tag_count,
called by TRL as plain reward functions), num_generations, completion length, batch, learning
rate and schedule (constant: TRL's default here; megagrpo's demo recipe would otherwise warm up and
decay it), beta and loss type (one micro-batch of all 64 completions per step in both), on this
machine's CPU, one after the other. Reported per engine: the
wall time of training (model set-up excluded), completions per second, and the mean reward and
accuracy of the last 5 steps.

``--workload realistic`` (``megagrpo/demo/realistic_workload.py``): the same prompts, tokenizer and
reward functions, a model with Qwen2.5's 151,936-row vocabulary and hidden size 256, warm-started
on reasoning of variable length, so completions spread from under 16 tokens to the 256-token cap.
There each side trains the 64 completions of a step in micro-batches (a single pass's logits over
the padded vocabulary would take about 12 GB): TRL in 4 gradient-accumulation passes of 16
completions (one generation of 64 per optimizer step, as ``steps_per_generation`` does by
default), megagrpo in packed micro-batches of at most ``--max-tokens-per-micro-batch`` tokens (0:
padded micro-batches of 16). It reports, in addition, the
completion tokens generated per second, the peak resident memory of each side's process (and of
its largest child process: megagrpo's reward workers) and the completion length distribution.

TRL is not a megagrpo dependency: install it (``pip install trl``) in the environment whose
python ``--trl-python`` names.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SETTINGS = dict(
    num_generations=8,
    completions_per_step=64,  # one generation batch and one optimizer step, one micro-batch
    max_completion_length=32,
    learning_rate=3e-4,
    beta=0.0,
    loss_type="dapo",
    temperature=1.0,
    reward_funcs=["accuracy", "format", "tag_count"],
    reward_weights=[1.0, 0.5, 0.5],
)
REALISTIC = dict(
    SETTINGS,
    max_completion_length=256,
    micro_batch_size=16,  # completions per padded micro-batch (TRL's gradient-accumulation pass)
)
WORKLOADS = {"demo": SETTINGS, "realistic": REALISTIC}
DEFAULT_STEPS = {"demo": 20, "realistic": 4}


def _prepare(workload: str, assets: str) -> None:
    if workload == "realistic":
        from megagrpo.demo.realistic_workload import prepare_realistic

        prepare_realistic(assets)
    else:
        from megagrpo.demo.grpo_demo import prepare_demo

        prepare_demo(assets)


class LengthLog:
    """Every sampled completion's length and the largest token id, from inside either trainer."""

    def __init__(self, tokenizer_size: int = 263):
        self.lengths: list[int] = []
        self.max_token_id = -1
        self.tokenizer_size = tokenizer_size
        self.outside = 0  # sampled ids the tokenizer does not have (it decodes them to nothing)

    def add(self, completion_ids) -> None:
        for ids in completion_ids:
            ids = list(map(int, ids))
            self.lengths.append(len(ids))
            self.max_token_id = max([self.max_token_id, *ids])
            self.outside += sum(t >= self.tokenizer_size for t in ids)

    def result(self) -> dict:
        return {"lengths": self.lengths, "max_token_id": self.max_token_id, "outside": self.outside}


def _peak_rss_kib() -> float:
    """This process's peak resident set size, KiB: Linux's VmHWM, the high-water mark of this
    program's own address space. (``ru_maxrss`` would not do: Linux carries the parent's peak
    over ``exec``, so a side started by the benchmark after it built the assets in-process
    reported at least the asset build's peak.)"""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return float(line.split()[1])
    except OSError:
        pass
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)  # not Linux


def _memory() -> dict:
    """Peak resident set sizes of this process and of its largest waited-for child (that one
    is ``ru_maxrss``: an upper bound that counts the pages a forked child shares with this
    process)."""
    return {
        "peak_rss_gib": _peak_rss_kib() / 2**20,
        "peak_rss_child_gib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20,
    }


def _summary(history: list[dict], reward_key: str, acc_key: str) -> dict:
    last = history[-5:]
    return {
        "reward_last5": sum(h[reward_key] for h in last) / len(last),
        "accuracy_last5": sum(h[acc_key] for h in last) / len(last),
    }


def _megagrpo_overrides(workload: str, steps: int, max_tokens: int) -> list[str]:
    s = WORKLOADS[workload]
    micro = [
        "--micro_batch_size",  # TRL's one forward/backward pass over the 64
        str(s["completions_per_step"]),
    ]
    extra = ["--lr_scheduler_type", "constant", "--warmup_ratio", "0"]  # TRL's schedule
    if workload == "realistic":
        micro = ["--micro_batch_size", str(s["micro_batch_size"])]
        if max_tokens:
            micro += ["--max_tokens_per_micro_batch", str(max_tokens)]
    return [
        "--max_steps",
        str(steps),
        "--num_generations",
        str(s["num_generations"]),
        "--per_device_train_batch_size",
        str(s["completions_per_step"]),
        *micro,
        "--max_completion_length",
        str(s["max_completion_length"]),
        "--learning_rate",
        str(s["learning_rate"]),
        "--beta",
        str(s["beta"]),
        "--loss_type",
        s["loss_type"],
        "--temperature",
        str(s["temperature"]),
        "--reward_funcs",
        ",".join(s["reward_funcs"]),
        "--reward_weights",
        ",".join(map(str, s["reward_weights"])),
        "--save_strategy",
        "no",
        "--eval_strategy",
        "no",
        "--log_completions",
        "false",
        *extra,
    ]


def run_megagrpo(assets: str, steps: int, out: str, workload: str = "demo", max_tokens=0) -> dict:
    from megagrpo.demo.grpo_demo import demo_recipe_at
    from megagrpo.training import build_run, rollout_step, train

    s = WORKLOADS[workload]
    recipe = demo_recipe_at(assets, out, _megagrpo_overrides(workload, steps, max_tokens))
    log = LengthLog()
    metrics = rollout_step.completion_metrics

    def recorded(completion_ids, finish_reasons):
        log.add(completion_ids)
        return metrics(completion_ids, finish_reasons)

    rollout_step.completion_metrics = recorded
    run = build_run(recipe)
    t0 = time.perf_counter()
    history = train(run)
    seconds = time.perf_counter() - t0
    times = sorted({k for h in history for k in h if k.startswith("time/")} | {"step_time"})
    later = history[1:] or history  # the first step also warms up
    return {
        "engine": "megagrpo",
        "steps": steps,
        "train_seconds": seconds,
        "completions_per_second": steps * s["completions_per_step"] / seconds,
        **_summary(history, "reward", "rewards/accuracy_reward/mean"),
        **log.result(),
        **_memory(),
        "seconds_per_step": {k: sum(h.get(k, 0.0) for h in later) / len(later) for k in times},
        "first_step_seconds": history[0].get("step_time"),
    }


def run_trl(assets: str, steps: int, out: str, workload: str = "demo", max_tokens=0) -> dict:
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from megagrpo.demo.arithmetic import demo_messages
    from megagrpo.rewards import accuracy_reward, format_reward, tag_count_reward

    s = WORKLOADS[workload]
    raw = datasets.load_dataset(
        "json", data_files=os.path.join(assets, "data", "train.jsonl"), split="train"
    )
    ds = raw.map(lambda r: {"prompt": demo_messages(r["problem"])})
    passes = dict(per_device_train_batch_size=s["completions_per_step"])
    if workload == "realistic":  # the 64 of a generation in 4 passes of 16, one optimizer step
        passes = dict(
            per_device_train_batch_size=s["micro_batch_size"],
            gradient_accumulation_steps=s["completions_per_step"] // s["micro_batch_size"],
        )
    config = GRPOConfig(
        output_dir=out,
        max_steps=steps,
        num_generations=s["num_generations"],
        max_completion_length=s["max_completion_length"],
        learning_rate=s["learning_rate"],
        beta=s["beta"],
        loss_type=s["loss_type"],
        temperature=s["temperature"],
        reward_weights=s["reward_weights"],
        lr_scheduler_type="constant",
        gradient_checkpointing=False,
        bf16=False,
        use_cpu=True,
        report_to="none",
        logging_steps=1,
        save_strategy="no",
        seed=42,
        use_vllm=False,
        **passes,
    )
    log = LengthLog()

    @functools.wraps(accuracy_reward)  # TRL names the metric after the function
    def accuracy_recorded(completions, completion_ids=None, **kwargs):
        log.add(completion_ids)
        return accuracy_reward(completions, **kwargs)

    tok = AutoTokenizer.from_pretrained(os.path.join(assets, "model"))
    model = AutoModelForCausalLM.from_pretrained(os.path.join(assets, "model"))
    generating = [0.0]
    generate = model.generate

    def timed_generate(*a, **kw):  # TRL calls the model's generate for its rollouts
        t = time.perf_counter()
        try:
            return generate(*a, **kw)
        finally:
            generating[0] += time.perf_counter() - t

    model.generate = timed_generate
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=[accuracy_recorded, format_reward, tag_count_reward],
        args=config,
        train_dataset=ds,
        processing_class=tok,
    )
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    history = [h for h in trainer.state.log_history if "reward" in h]
    return {
        "engine": f"TRL {__import__('trl').__version__}",
        "steps": steps,
        "train_seconds": seconds,
        "completions_per_second": steps * s["completions_per_step"] / seconds,
        **_summary(history, "reward", "rewards/accuracy_reward/mean"),
        **log.result(),
        **_memory(),
        "generation_seconds": generating[0],
    }


def _side(engine: str, python: str, args) -> dict:
    cmd = [
        python,
        os.path.abspath(__file__),
        "--only",
        engine,
        "--workload",
        args.workload,
        "--steps",
        str(args.steps),
        "--max-tokens-per-micro-batch",
        str(args.max_tokens_per_micro_batch),
        "--output-dir",
        args.output_dir,
    ]
    path = os.pathsep.join([ROOT, *filter(None, [os.environ.get("PYTHONPATH")])])
    r = subprocess.run(
        cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": path}
    )
    if r.returncode != 0:
        raise SystemExit(f"{engine} run failed:\n{r.stderr[-4000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def length_distribution(lengths: list[int], cap: int) -> str:
    """min / p10 / p50 / p90 / max, the mean, and a coarse histogram (the last bin: at the cap)."""
    xs = sorted(lengths)

    def q(p):
        return xs[min(len(xs) - 1, int(p * len(xs)))]

    edges = [0, 16, 32, 64, 128, cap]
    bins = [f"[{lo},{hi}): {sum(lo <= x < hi for x in xs)}" for lo, hi in zip(edges, edges[1:])]
    bins.append(f"={cap}: {sum(x >= cap for x in xs)}")
    return (
        f"n={len(xs)} min {xs[0]} p10 {q(0.1)} p50 {q(0.5)} p90 {q(0.9)} max {xs[-1]} "
        f"mean {sum(xs) / len(xs):.1f}; " + ", ".join(bins)
    )


def _report_realistic(rows: list[dict], args) -> None:
    cap = WORKLOADS["realistic"]["max_completion_length"]
    with open(os.path.join(args.output_dir, "assets", "model", "assets.json")) as f:
        pad = json.load(f)["pad_probability"]
    print(f"{'engine':<12} {'tok/s':>9} {'peak RSS GiB':>13} {'largest child GiB':>18}")
    for r in rows:
        tokens = sum(r["lengths"]) / r["train_seconds"]
        print(
            f"{r['engine']:<12} {tokens:>9.1f} {r['peak_rss_gib']:>13.2f} "
            f"{r['peak_rss_child_gib']:>18.2f}"
        )
    for r in rows:
        print(f"completion lengths, {r['engine']}: {length_distribution(r['lengths'], cap)}")
        print(
            f"  largest sampled token id {r['max_token_id']}; {r['outside']} of "
            f"{sum(r['lengths'])} sampled tokens outside the tokenizer's 263 ids"
        )
    print(f"warm start: largest probability on the padded vocabulary rows {pad:.2e}")
    print(
        "megagrpo seconds per step (steps 2..): "
        + ", ".join(f"{k} {v:.2f}" for k, v in rows[0]["seconds_per_step"].items())
        + f"; step 1 {rows[0]['first_step_seconds']:.2f}"
    )
    trl = rows[1]
    print(
        f"TRL seconds per step: generation {trl['generation_seconds'] / trl['steps']:.2f}, "
        f"the rest (rewards, forward/backward, optimizer) "
        f"{(trl['train_seconds'] - trl['generation_seconds']) / trl['steps']:.2f}"
    )
    print(f"memory ratio megagrpo / TRL: {rows[0]['peak_rss_gib'] / rows[1]['peak_rss_gib']:.2f}x")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workload", choices=sorted(WORKLOADS), default="demo")
    p.add_argument("--steps", type=int, default=None, help="default: 20 (demo), 4 (realistic)")
    p.add_argument("--output-dir", default=None, help="default: outputs/bench_e2e[_realistic]")
    p.add_argument(
        "--max-tokens-per-micro-batch",
        type=int,
        default=512,
        help="realistic workload: megagrpo's packed micro-batches (0: padded micro-batches of 16)",
    )
    p.add_argument(
        "--trl-python",
        default=sys.executable,
        help="a python with trl installed (default: this one)",
    )
    p.add_argument("--only", choices=["megagrpo", "trl"], default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.steps = args.steps or DEFAULT_STEPS[args.workload]
    suffix = "" if args.workload == "demo" else f"_{args.workload}"
    args.output_dir = args.output_dir or f"outputs/bench_e2e{suffix}"
    assets = os.path.join(args.output_dir, "assets")
    if args.only:
        import warnings

        warnings.filterwarnings("ignore")
        _prepare(args.workload, assets)
        fn = run_megagrpo if args.only == "megagrpo" else run_trl
        out = os.path.join(args.output_dir, args.only)
        result = fn(assets, args.steps, out, args.workload, args.max_tokens_per_micro_batch)
        print(json.dumps(result))
        return 0
    t0 = time.perf_counter()
    _prepare(args.workload, assets)  # once, before either side is timed
    prepared = time.perf_counter() - t0
    rows = [_side("megagrpo", sys.executable, args), _side("trl", args.trl_python, args)]
    s = WORKLOADS[args.workload]
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"python {platform.python_version()}; {args.steps} steps x "
        f"{s['completions_per_step']} completions; load average at the end "
        + " ".join(f"{x:.1f}" for x in os.getloadavg())
    )
    if args.workload != "demo":
        print(f"workload {args.workload}: assets ready in {prepared:.1f} s")
    print(f"{'engine':<12} {'train s':>9} {'compl/s':>9} {'reward(last5)':>14} {'acc(last5)':>11}")
    for r in rows:
        print(
            f"{r['engine']:<12} {r['train_seconds']:>9.1f} {r['completions_per_second']:>9.1f} "
            f"{r['reward_last5']:>14.3f} {r['accuracy_last5']:>11.3f}"
        )
    print(
        f"throughput ratio megagrpo / TRL: "
        f"{rows[0]['completions_per_second'] / rows[1]['completions_per_second']:.2f}x"
    )
    if args.workload != "demo":
        _report_realistic(rows, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
