"""Write a large JSON Lines prompt dataset (``problem``, ``solution``) for loading measurements.

    python tools/make_prompt_jsonl.py /tmp/big.jsonl --rows 500000

Each row is a short arithmetic word problem (100-200 characters) with its answer, seeded, so that
the same command writes the same file. ``--bad-every N`` makes every N-th row's solution null
(to measure ``on_bad_rows: skip``). Used for the streaming numbers in docs/measurements.md.
"""

from __future__ import annotations

import argparse
import json
import random

NAMES = ["Ava", "Ben", "Chen", "Dara", "Eli", "Fatima", "Goran", "Hana", "Ivo", "Jun"]
THINGS = ["apples", "marbles", "stamps", "coins", "books", "pencils", "shells", "cards"]


def problem(rng: random.Random) -> tuple[str, str]:
    name, other = rng.sample(NAMES, 2)
    thing = rng.choice(THINGS)
    a, b, c = rng.randint(2, 999), rng.randint(2, 999), rng.randint(2, 9)
    text = (
        f"{name} has {a} {thing}. {other} gives {name} {b} more, and then {name} buys {c} times "
        f"as many {thing} as {name} had before. How many {thing} does {name} have now?"
    )
    return text, str((a + b) * (c + 1))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("path")
    p.add_argument("--rows", type=int, default=500_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bad-every", type=int, default=0, help="every N-th solution null (0: none)")
    args = p.parse_args(argv)
    rng = random.Random(args.seed)
    with open(args.path, "w", encoding="utf-8") as f:
        for i in range(args.rows):
            text, answer = problem(rng)
            bad = args.bad_every and (i + 1) % args.bad_every == 0
            f.write(json.dumps({"problem": text, "solution": None if bad else answer}) + "\n")


if __name__ == "__main__":
    main()
