"""Draw a run's training curves from its metrics.jsonl as PNG files.

    python tools/plot_metrics.py outputs/demo/metrics.jsonl --out outputs/demo/plots

One PNG per panel: rewards (total and per reward function), accuracy (training, and held-out
greedy, mean@k and pass@k), KL, completion lengths, clip ratios, entropy and step time; a panel
is skipped when the run logged none of its metrics. Per-step series are noisy: they are drawn as
faint raw points under a bold moving average. Evaluations (every eval_steps) are drawn as
markers. A series identical to one already in its panel (``eval/rewards/accuracy_reward/mean``
is ``eval/accuracy``) is named in that one's legend entry instead of hiding under it.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megagrpo.monitoring.curves import draw, series  # noqa: E402
from megagrpo.monitoring.metrics_log import read_metrics  # noqa: E402

PANELS = {
    "rewards": lambda k: k == "reward" or (k.startswith("rewards/") and k.endswith("/mean")),
    "accuracy": lambda k: (
        ("accuracy" in k and not k.endswith("/std")) or k.startswith(("eval/mean@", "eval/pass@"))
    ),
    "kl": lambda k: k == "kl",
    "lengths": lambda k: k.startswith("completions/") and "length" in k,
    "clip_ratios": lambda k: k.startswith("clip_ratio/"),
    "entropy": lambda k: k == "entropy",
    "step_time": lambda k: k == "step_time" or k.startswith("time/"),
}


def _distinct(records: list[dict], keys: list[str]):
    """(key, (steps, values), [keys with exactly the same points]) per distinct series."""
    kept: list[tuple[str, tuple, list[str]]] = []
    for key in keys:
        pts = series(records, key)
        twin = next((k for k in kept if k[1] == pts), None)
        if twin is None:
            kept.append((key, pts, []))
        else:
            twin[2].append(key)
    return kept


def plot(records: list[dict], out_dir: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    keys = sorted({k for r in records for k, v in r.items() if isinstance(v, (int, float))})
    written = []
    for panel, wanted in PANELS.items():
        series_keys = [k for k in keys if wanted(k)]
        if not series_keys:
            continue
        fig, ax = plt.subplots(figsize=(7, 4))
        for key, (steps, values), same in _distinct(records, series_keys):
            draw(ax, steps, values, " = ".join([key, *same]))
        ax.set_xlabel("step")
        ax.set_title(panel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        path = os.path.join(out_dir, f"{panel}.png")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("metrics", help="metrics.jsonl of a run")
    p.add_argument("--out", default=None, help="output directory (default: next to the file)")
    args = p.parse_args(argv)
    if not os.path.isfile(args.metrics):
        print(f"{args.metrics}: not found", file=sys.stderr)
        return 2
    records = read_metrics(args.metrics)
    if not records:
        print(f"{args.metrics}: no records", file=sys.stderr)
        return 2
    out = args.out or os.path.join(os.path.dirname(args.metrics), "plots")
    for path in plot(records, out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
