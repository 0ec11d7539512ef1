"""The demo's before/after report and the curve drawing shared with tools/plot_metrics.py:
moving averages over noisy per-step series, evaluations as markers, identical series named
instead of hidden, and the task's worked solutions and split."""

from __future__ import annotations

import importlib.util
import json
import os

import matplotlib
import pytest

matplotlib.use("Agg")

from megagrpo.demo.arithmetic import sum_problems, worked_solution, write_sum_dataset  # noqa: E402
from megagrpo.demo.report import before_after_table, plot_before_after  # noqa: E402
from megagrpo.monitoring.curves import draw, moving_average, smoothing_window  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _records(steps=60, every=20):
    recs = []
    for s in range(0, steps + 1):
        r = {"step": s}
        if s:
            r.update(reward=1.0 + (s % 2) * 0.5, **{"rewards/accuracy_reward/mean": s % 2})
        if s % every == 0:
            acc = 0.1 + s / 200
            r.update(**{"eval/accuracy": acc, "eval/rewards/accuracy_reward/mean": acc})
            r["eval/mean@8"] = acc / 2
        recs.append(r)
    return recs


def test_moving_average_is_centred_and_shrinks_at_the_ends():
    assert moving_average([0, 1, 0, 1, 0], 3) == pytest.approx([0.5, 1 / 3, 2 / 3, 1 / 3, 0.5])
    assert moving_average([2.0, 4.0], 1) == [2.0, 4.0]
    assert smoothing_window(5) == 1 and smoothing_window(100) == 11
    assert smoothing_window(10**4) == 25
    with pytest.raises(ValueError, match="window"):
        moving_average([1.0], 0)


def test_dense_series_get_a_bold_moving_average_over_faint_points_sparse_ones_markers():
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    draw(ax, list(range(40)), [float(i % 2) for i in range(40)], "zig-zag")
    draw(ax, [0, 20, 40], [0.1, 0.2, 0.3], "eval")
    raw, smooth, sparse = ax.get_lines()
    assert raw.get_alpha() < 0.5 and raw.get_label().startswith("_")  # faint, not in the legend
    assert "moving average" in smooth.get_label() and smooth.get_linewidth() > raw.get_linewidth()
    assert max(smooth.get_ydata()) - min(smooth.get_ydata()) < 0.4  # raw range 1.0
    assert sparse.get_marker() == "o" and list(sparse.get_ydata()) == [0.1, 0.2, 0.3]
    plt.close(fig)


def test_plot_metrics_names_an_identical_series_instead_of_hiding_it():
    spec = importlib.util.spec_from_file_location(
        "plot_metrics", os.path.join(ROOT, "tools", "plot_metrics.py")
    )
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    kept = tool._distinct(
        _records(), ["eval/accuracy", "eval/mean@8", "eval/rewards/accuracy_reward/mean"]
    )
    assert [(k, same) for k, _, same in kept] == [
        ("eval/accuracy", ["eval/rewards/accuracy_reward/mean"]),
        ("eval/mean@8", []),
    ]


def test_before_after_table_and_plot(tmp_path):
    s = {
        "reward_first": 1.0,
        "reward_last": 1.5,
        "accuracy_first": 0.2,
        "accuracy_last": 0.6,
        "eval_accuracy_before": 0.25,
        "eval_accuracy_after": 0.7,
        "eval_mean_k_before": 0.1,
        "eval_k": "8",
    }
    table = before_after_table(s, 100).splitlines()
    assert table[0].split() == ["before", "after", "change"]
    assert table[1].split()[-3:] == ["0.250", "0.700", "+0.450"]
    assert "held-out (100 problems) greedy accuracy" in table[1]
    assert table[2].split()[-3:] == ["0.100", "-", "-"]  # no evaluation after training
    path = plot_before_after(_records(), str(tmp_path / "p" / "before_after.png"))
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_sum_problems_split_and_worked_solutions(tmp_path):
    rows = sum_problems()
    assert len(rows) == 1000 and rows[123] == {"problem": "What is 1 + 2 + 3?", "solution": "6"}
    assert worked_solution({"problem": "What is 7 + 5 + 9?", "solution": "21"}) == (
        "<think>\n7+5=12\n12+9=21\n</think>\n<answer>\n\\boxed{21}\n</answer>"
    )
    paths = write_sum_dataset(str(tmp_path), seed=3)
    split = {}
    for name, path in paths.items():
        with open(path) as f:
            split[name] = [json.loads(line)["problem"] for line in f]
    assert len(split["test"]) == 100 and len(split["train"]) == 900
    assert not set(split["test"]) & set(split["train"])
    assert write_sum_dataset(str(tmp_path / "again"), seed=3) and split["test"] == [
        json.loads(line)["problem"] for line in open(tmp_path / "again" / "test.jsonl")
    ]
    with pytest.raises(ValueError, match="test_size"):
        write_sum_dataset(str(tmp_path), test_size=1000)
    with pytest.raises(ValueError, match="not a demo sum problem"):
        worked_solution({"problem": "What is two + 3?", "solution": "5"})
