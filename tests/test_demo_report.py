"""The demo's task (the 100 addition facts in five phrasings, one unseen phrasing of each held
out by the seed), its worked solutions, and the before/after report (table and PNG)."""

from __future__ import annotations

import json

import matplotlib
import pytest

matplotlib.use("Agg")

from megagrpo.demo.arithmetic import (  # noqa: E402
    TEMPLATES,
    addition_problems,
    operands,
    split_problems,
    worked_solution,
    write_addition_dataset,
)
from megagrpo.demo.grpo_demo import learning_summary  # noqa: E402
from megagrpo.demo.report import before_after_table, plot_before_after  # noqa: E402


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


def test_every_fact_in_every_phrasing_and_one_unseen_phrasing_of_each_held_out(tmp_path):
    rows = addition_problems()
    assert len(rows) == 100 * len(TEMPLATES) == 500
    assert {"problem": "What is the sum of 3 and 5?", "solution": "8"} in rows
    assert all(
        operands(r["problem"]) in {(a, b) for a in range(10) for b in range(10)} for r in rows
    )
    assert worked_solution({"problem": "Add 7 and 5.", "solution": "12"}) == (
        "<think>\n7+5\n</think>\n<answer>\n\\boxed{12}\n</answer>"
    )
    paths = write_addition_dataset(str(tmp_path / "s3"), seed=3)
    split = {}
    for name, path in paths.items():
        with open(path) as f:
            split[name] = [json.loads(line)["problem"] for line in f]
    assert len(split["test"]) == 100 and len(split["train"]) == 400
    assert not set(split["test"]) & set(split["train"])
    facts = sorted(operands(p) for p in split["test"])
    assert facts == sorted({operands(p) for p in split["test"]})  # each fact once
    train_facts = [operands(p) for p in split["train"]]
    assert all(train_facts.count(f) == len(TEMPLATES) - 1 for f in facts)  # in the 4 others
    assert split_problems(3) == split_problems(3) and split_problems(3) != split_problems(4)
    with pytest.raises(ValueError, match="not a demo addition problem"):
        operands("What is two + 3?")


def test_before_after_table_and_plot(tmp_path):
    s = learning_summary(_records())
    assert s["eval_accuracy_before"] == 0.1 and s["eval_accuracy_after"] == pytest.approx(0.4)
    table = before_after_table(s, 100).splitlines()
    assert table[0].split() == ["before", "after", "change"]
    assert table[1].split()[-3:] == ["0.100", "0.400", "+0.300"]
    assert "held-out (100 problems) greedy accuracy" in table[1]
    s.pop("eval_mean_k_after")
    assert before_after_table(s, 100).splitlines()[2].split()[-3:] == ["0.050", "-", "-"]
    path = plot_before_after(_records(), str(tmp_path / "p" / "before_after.png"))
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
