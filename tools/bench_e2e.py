"""End-to-end GRPO throughput and reward: megagrpo against TRL's GRPOTrainer, side by side.

    python tools/bench_e2e.py --steps 20                      # both, TRL from this python
    python tools/bench_e2e.py --steps 20 --trl-python /venv-with-trl/bin/python

Both train the same warm-started tiny Qwen2-architecture model (the embedded demo's) on the same
addition prompts with the same reward functions (megagrpo's accuracy, format and tag_count,
called by TRL as plain reward functions), num_generations, completion length, batch, learning
rate, beta and loss type (one micro-batch of all 64 completions per step in both), on this machine's
CPU, one after the other. Reported per engine: the
wall time of training (model set-up excluded), completions per second, and the mean reward and
accuracy of the last 5 steps.

TRL is not a megagrpo dependency: install it (``pip install trl``) in the environment whose
python ``--trl-python`` names.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
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


def _summary(history: list[dict], reward_key: str, acc_key: str) -> dict:
    last = history[-5:]
    return {
        "reward_last5": sum(h[reward_key] for h in last) / len(last),
        "accuracy_last5": sum(h[acc_key] for h in last) / len(last),
    }


def run_megagrpo(assets: str, steps: int, out: str) -> dict:
    from megagrpo.demo.grpo_demo import demo_recipe_at
    from megagrpo.training import build_run, train

    s = SETTINGS
    recipe = demo_recipe_at(
        assets,
        out,
        [
            "--max_steps",
            str(steps),
            "--num_generations",
            str(s["num_generations"]),
            "--per_device_train_batch_size",
            str(s["completions_per_step"]),
            "--micro_batch_size",  # TRL's one forward/backward pass over the 64
            str(s["completions_per_step"]),
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
        ],
    )
    run = build_run(recipe)
    t0 = time.perf_counter()
    history = train(run)
    seconds = time.perf_counter() - t0
    return {
        "engine": "megagrpo",
        "steps": steps,
        "train_seconds": seconds,
        "completions_per_second": steps * s["completions_per_step"] / seconds,
        **_summary(history, "reward", "rewards/accuracy_reward/mean"),
    }


def run_trl(assets: str, steps: int, out: str) -> dict:
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from megagrpo.demo.arithmetic import demo_messages
    from megagrpo.rewards import accuracy_reward, format_reward, tag_count_reward

    s = SETTINGS
    raw = datasets.load_dataset(
        "json", data_files=os.path.join(assets, "data", "train.jsonl"), split="train"
    )
    ds = raw.map(lambda r: {"prompt": demo_messages(r["problem"])})
    config = GRPOConfig(
        output_dir=out,
        max_steps=steps,
        num_generations=s["num_generations"],
        per_device_train_batch_size=s["completions_per_step"],
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
    )
    tok = AutoTokenizer.from_pretrained(os.path.join(assets, "model"))
    model = AutoModelForCausalLM.from_pretrained(os.path.join(assets, "model"))
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=[accuracy_reward, format_reward, tag_count_reward],
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
    }


def _side(engine: str, python: str, args) -> dict:
    cmd = [
        python,
        os.path.abspath(__file__),
        "--only",
        engine,
        "--steps",
        str(args.steps),
        "--output-dir",
        args.output_dir,
    ]
    r = subprocess.run(
        cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}
    )
    if r.returncode != 0:
        raise SystemExit(f"{engine} run failed:\n{r.stderr[-4000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--output-dir", default="outputs/bench_e2e")
    p.add_argument(
        "--trl-python",
        default=sys.executable,
        help="a python with trl installed (default: this one)",
    )
    p.add_argument("--only", choices=["megagrpo", "trl"], default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    assets = os.path.join(args.output_dir, "assets")
    if args.only:
        import warnings

        warnings.filterwarnings("ignore")
        from megagrpo.demo.grpo_demo import prepare_demo

        prepare_demo(assets)
        fn = run_megagrpo if args.only == "megagrpo" else run_trl
        result = fn(assets, args.steps, os.path.join(args.output_dir, args.only))
        print(json.dumps(result))
        return 0
    from megagrpo.demo.grpo_demo import prepare_demo

    prepare_demo(assets)  # once, before either side is timed
    rows = [_side("megagrpo", sys.executable, args), _side("trl", args.trl_python, args)]
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"python {platform.python_version()}; {args.steps} steps x "
        f"{SETTINGS['completions_per_step']} completions"
    )
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
