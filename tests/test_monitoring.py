"""Metrics JSONL, offline wandb, completions tables and the plot tool."""

from __future__ import annotations

import glob
import math
import os
import subprocess
import sys

import pytest

from megagrpo.monitoring.completions_table import write_completions_table
from megagrpo.monitoring.metrics_log import MetricsLogger, WandbSettings, read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_jsonl_appends_and_resume_overwrites_steps(tmp_path):
    printed = []
    log = MetricsLogger(str(tmp_path), print_fn=printed.append)
    log.log(1, {"reward": 0.25, "kl": float("nan"), "rewards/accuracy/mean": 0.5})
    log.log(2, {"reward": 0.5})
    log.close()
    log = MetricsLogger(str(tmp_path), print_fn=printed.append)  # a resumed run
    log.log(2, {"reward": 0.75})
    log.close()
    recs = read_metrics(str(tmp_path / "metrics.jsonl"))
    assert [r["step"] for r in recs] == [1, 2]
    assert recs[0]["kl"] is None and recs[0]["rewards/accuracy/mean"] == 0.5
    assert recs[1]["reward"] == 0.75
    assert printed[0].startswith("step 1 | reward=0.25")


def test_other_ranks_write_nothing(tmp_path):
    log = MetricsLogger(str(tmp_path / "x"), enabled=False)
    log.log(1, {"reward": 1.0})
    log.close()
    assert not os.path.exists(tmp_path / "x")


def test_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="unknown target"):
        MetricsLogger(str(tmp_path), report_to=["tensorboard"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"step": 1}\nnot json\n')
    with pytest.raises(ValueError, match="bad.jsonl:2: not a JSON line"):
        read_metrics(str(bad))


def test_wandb_offline_run(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    log = MetricsLogger(
        str(tmp_path),
        report_to=["wandb"],
        wandb=WandbSettings(project="p", group="g", run_name="r", config={"lr": 1e-6}),
        print_fn=lambda s: None,
    )
    log.log(1, {"reward": 0.5})
    log.close()
    runs = glob.glob(str(tmp_path / "wandb" / "offline-run-*"))
    assert len(runs) == 1 and glob.glob(os.path.join(runs[0], "*.wandb"))


def test_completions_table(tmp_path):
    import pyarrow.parquet as pq

    path = write_completions_table(
        str(tmp_path),
        7,
        ["p1", "p1"],
        ["c1", "c2"],
        {"accuracy": [1.0, None]},
        [1.0, 0.0],
        [0.7, -0.7],
        ["stop", "length"],
    )
    t = pq.read_table(path).to_pydict()
    assert t["step"] == [7, 7] and t["completion"] == ["c1", "c2"]
    assert t["rewards/accuracy"][0] == 1.0 and math.isnan(t["rewards/accuracy"][1])
    assert t["finish_reason"] == ["stop", "length"]
    with pytest.raises(ValueError, match="column 'advantage' has 1 rows, expected 2"):
        write_completions_table(str(tmp_path), 8, ["p"] * 2, ["c"] * 2, {}, [0.0] * 2, [0.0])


def test_plot_tool(tmp_path):
    log = MetricsLogger(str(tmp_path), print_fn=lambda s: None)
    for step in range(1, 4):
        log.log(
            step,
            {
                "reward": step / 3,
                "rewards/format/mean": 0.1 * step,
                "kl": 0.01 * step,
                "completions/mean_length": 30 + step,
                "clip_ratio/region_mean": 0.0,
            },
        )
    log.close()
    out = tmp_path / "plots"
    r = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "tools", "plot_metrics.py"),
            str(tmp_path / "metrics.jsonl"),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(out)) == ["clip_ratios.png", "kl.png", "lengths.png", "rewards.png"]
    assert (out / "rewards.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
