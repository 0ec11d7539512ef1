"""Samples per second of accuracy scoring: serial in one process against the reward pool.

Workload: ``--samples`` (default 4096) R1-format completions generated deterministically (the
seed is the repeat index): samples / 8 problems x 8 generations (group-major), gold answers of
the forms math datasets hold (integers, negatives, decimals, fractions, roots, pi, percentages,
sets, intervals, expressions), completions of 2-40 reasoning sentences with a ``\\boxed{}``
answer inside ``<answer>`` that is right about half the time, written in a different but
equivalent form now and then (0.5 for 1/2), sometimes unboxed ``$...$``, sometimes missing.
Serial: ``score_serial`` (each function on the whole batch, the way TRL calls it). Pool:
``RewardPool`` with W = os.cpu_count() workers, timed after the workers are up (startup is
reported apart). The two sides alternate ``--repeats`` times (the machine may be shared: both
see the same load); besides wall time the CPU seconds per sample of each side are reported
(workers' from /proc), whose ratio is the speed-up W free cores would give.

    python tools/bench_rewards.py [--samples 4096] [--workers W] [--repeats 2] [--funcs accuracy]
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

# (gold, equivalent forms a model may write, wrong forms)
_ANSWERS = [
    ("{a}", ["{a}"], ["{a1}", "{b}"]),
    ("-{a}", ["-{a}"], ["{a}"]),
    ("\\frac{{{a}}}{{{b}}}", ["\\frac{{{a}}}{{{b}}}", "{a}/{b}"], ["\\frac{{{b}}}{{{a}}}"]),
    ("\\frac{{1}}{{2}}", ["0.5", "\\frac{{1}}{{2}}"], ["0.25", "2"]),
    ("{a}.25", ["{a}.25", "{a}\\frac{{1}}{{4}}"], ["{a}.5"]),
    ("\\sqrt{{{c}}}", ["\\sqrt{{{c}}}"], ["{c}", "\\sqrt{{{c1}}}"]),
    ("{a}\\pi", ["{a}\\pi"], ["{a1}\\pi", "{a}"]),
    ("{a}\\%", ["{a}\\%", "\\frac{{{a}}}{{100}}"], ["{a1}\\%"]),
    ("\\{{{a}, {b}\\}}", ["\\{{{b}, {a}\\}}"], ["\\{{{a}\\}}"]),
    ("(0, {a}]", ["(0, {a}]"], ["[0, {a}]", "(0, {a})"]),
    ("x^2 + {a}x", ["x^2 + {a}x", "x(x + {a})"], ["x^2 - {a}x"]),
    ("{a}\\text{{ cm}}", ["{a}"], ["{a1}"]),
]
_SENTENCES = [
    "Let me restate the problem in my own words.",
    "We substitute the given values into the expression.",
    "Multiplying both sides by {b} gives a simpler equation.",
    "So the sum of the first {a} terms is what we need.",
    "Wait, let me double-check this step.",
    "The discriminant is {c}, which is positive.",
    "Therefore the two cases must be handled separately.",
    "Next, we simplify the fraction $\\frac{{{a}}}{{{b}}}$.",
    "Step {a}: collect like terms and factor.",
    "Checking with a small example, the pattern holds.",
]


def make_workload(samples: int, seed: int = 0, group: int = 8):
    """Deterministic (completions, solutions, completion_ids) for ``samples`` completions."""
    rng = random.Random(seed)
    completions, solutions, ids = [], [], []
    for p in range((samples + group - 1) // group):
        a, b, c = rng.randint(2, 99), rng.randint(2, 60), rng.choice([2, 3, 5, 6, 7, 10, 11])
        v = dict(a=a, a1=a + 1, b=b, c=c, c1=c + 1)
        gold_t, right, wrong = _ANSWERS[p % len(_ANSWERS)]
        gold = "$" + gold_t.format(**v) + "$"
        for _ in range(group):
            if len(completions) == samples:
                break
            steps = " ".join(rng.choice(_SENTENCES).format(**v) for _ in range(rng.randint(2, 40)))
            answer = rng.choice(right if rng.random() < 0.5 else wrong).format(**v)
            shape = rng.random()
            if shape < 0.8:
                final = f"The final answer is $\\boxed{{{answer}}}$."
            elif shape < 0.9:
                final = f"The final answer is ${answer}$."
            else:
                final = "I am not sure about the final answer."
            text = f"<think>\n{steps}\n</think>\n<answer>\n{final}\n</answer>"
            completions.append([{"role": "assistant", "content": text}])
            solutions.append(gold)
            ids.append(list(range(len(text) // 4)))
    return completions, solutions, ids


def machine() -> str:
    model = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"{model}; os.cpu_count()={os.cpu_count()}; Python {platform.python_version()}; "
        f"{platform.system()} {platform.release()}; load average {load}"
    )


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=4096)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--funcs", default="accuracy", help="comma-separated reward_funcs")
    ap.add_argument("--timeout", type=float, default=10.0, help="pool per-call timeout, s")
    args = ap.parse_args(argv)

    from megagrpo.config.script_args import GRPOScriptArguments
    from megagrpo.rewards.math_accuracy import warm_up
    from megagrpo.rewards.pool import RewardPool, RewardPoolConfig
    from megagrpo.rewards.registry import build_reward_functions
    from megagrpo.rewards.scores import score_serial

    fns = build_reward_functions(GRPOScriptArguments(reward_funcs=args.funcs.split(",")))
    print(f"machine: {machine()}")
    print(f"workload: {args.samples} completions, functions {[f.name for f in fns]}")

    warm_up()
    config = RewardPoolConfig(num_workers=args.workers, timeout_seconds=args.timeout)
    t = time.perf_counter()
    serial, serial_cpu, pooled, pool_cpu = [], [], [], []
    with RewardPool(fns, config) as pool:
        pool.wait_ready()
        startup = time.perf_counter() - t
        # Interleaved so that both sides see the same load on a shared machine.
        for rep in range(args.repeats):
            # A fresh workload per repeat: no side may answer from a cache of the previous one.
            completions, solutions, ids = make_workload(args.samples, seed=rep)
            columns = {"solution": solutions, "completion_ids": ids}
            t, c = time.perf_counter(), time.process_time()
            ref = score_serial(fns, completions, columns, num_generations=8)
            serial.append(time.perf_counter() - t)
            serial_cpu.append(time.process_time() - c)
            t, c, w = time.perf_counter(), time.process_time(), _cpu_seconds(pool.pids())
            got = pool.score(completions, columns, num_generations=8)
            pooled.append(time.perf_counter() - t)
            pool_cpu.append(time.process_time() - c + _cpu_seconds(pool.pids()) - w)
    same = bool(
        ((got.rewards_nk == ref.rewards_nk) | (got.rewards_nk.isnan() & ref.rewards_nk.isnan()))
        .all()
        .item()
    )
    n = args.samples
    s_rate, p_rate = n / min(serial), n / min(pooled)
    print(
        f"serial: best {min(serial):.2f} s, mean {statistics.mean(serial):.2f} s -> "
        f"{s_rate:.0f} samples/s; CPU {1e3 * min(serial_cpu) / n:.3f} ms/sample "
        f"(mean {fns[0].name} = {float(ref.rewards_nk[:, 0].nanmean()):.3f})"
    )
    print(
        f"pool W={args.workers}: startup {startup:.2f} s; best {min(pooled):.2f} s, mean "
        f"{statistics.mean(pooled):.2f} s -> {p_rate:.0f} samples/s; CPU (workers + parent) "
        f"{1e3 * min(pool_cpu) / n:.3f} ms/sample; timeouts {got.timeouts}, errors "
        f"{got.errors}, crashes {got.crashes}, restarts {got.restarts}"
    )
    print(
        f"speed-up pool/serial: {p_rate / s_rate:.2f}x best-of-{args.repeats}, "
        f"{statistics.mean(serial) / statistics.mean(pooled):.2f}x of the means, with "
        f"W={args.workers} (target >= {0.8 * args.workers:.1f}x = 0.8 x workers); CPU-time "
        f"efficiency serial/pool {min(serial_cpu) / min(pool_cpu):.2f} (the speed-up W cores "
        f"would give on an idle machine: {args.workers * min(serial_cpu) / min(pool_cpu):.2f}x); "
        f"scores identical: {same}"
    )


def _cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of live processes (Linux /proc), 0 for any that is gone."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
        except (OSError, IndexError, ValueError):
            pass
    return total


if __name__ == "__main__":
    main()
