"""The demo's before/after report: a table on stdout and one PNG of reward and held-out accuracy.

Both read the run's logged records (metrics.jsonl) through ``learning_summary``'s numbers: the
training reward and accuracy over the first and last steps, the held-out evaluation at step 0
and at the end.
"""

from __future__ import annotations

import os

from megagrpo.monitoring.curves import draw, series

PLOT_FILE = "before_after.png"


def before_after_table(summary: dict, num_test: int | None = None) -> str:
    """The table ``megagrpo demo`` prints; rows for what was measured, '-' where nothing was."""

    def cell(key):
        v = summary.get(key)
        return "-" if v is None else f"{v:.3f}"

    k = summary.get("eval_k", "k")
    held_out = f"held-out ({num_test} problems)" if num_test else "held-out"
    rows = [
        (f"{held_out} greedy accuracy", "eval_accuracy_before", "eval_accuracy_after"),
        (f"{held_out} mean@{k} accuracy", "eval_mean_k_before", "eval_mean_k_after"),
        ("training reward (10-step mean)", "reward_first", "reward_last"),
        ("training accuracy (10-step mean)", "accuracy_first", "accuracy_last"),
    ]
    width = max(len(r[0]) for r in rows)
    lines = [f"{'':<{width}}  {'before':>7}  {'after':>7}  {'change':>7}"]
    for name, before, after in rows:
        b, a = summary.get(before), summary.get(after)
        change = "-" if b is None or a is None else f"{a - b:+.3f}"
        lines.append(f"{name:<{width}}  {cell(before):>7}  {cell(after):>7}  {change:>7}")
    return "\n".join(lines)


def plot_before_after(records: list[dict], path: str, title: str = "megagrpo demo") -> str:
    """Two panels: the training reward per step (and training accuracy) with moving averages,
    and the held-out greedy and mean@k accuracy at each evaluation; returns ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for key in ("reward", "rewards/accuracy_reward/mean"):
        steps, values = series(records, key)
        if steps:
            draw(left, steps, values, "training accuracy" if "accuracy" in key else key)
    left.set_title("training reward per step")
    evals = [k for k in sorted({k for r in records for k in r}) if k.startswith("eval/mean@")]
    for key, label in (("eval/accuracy", "greedy accuracy"), *((k, k[5:]) for k in evals)):
        steps, values = series(records, key)
        if steps:
            draw(right, steps, values, label)
            right.annotate(
                f"{values[0]:.2f}",
                (steps[0], values[0]),
                textcoords="offset points",
                xytext=(4, 6),
                fontsize=8,
            )
            right.annotate(
                f"{values[-1]:.2f}",
                (steps[-1], values[-1]),
                textcoords="offset points",
                xytext=(-10, 6),
                fontsize=8,
            )
    right.set_title("held-out accuracy (before training, then every eval_steps)")
    right.set_ylim(0.0, 1.0)
    for ax in (left, right):
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
