"""``dataset_streaming``: lazy reading of JSON Lines / Parquet files and mixtures, the buffered
seeded shuffle, exact resume from a checkpoint's data position, and the same bad-row rules
(one error naming file, row, line and column; ``on_bad_rows: skip`` counts each row once)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from _data_files import ROOT, ROWS, cli_env, with_row, write_jsonl

from megagrpo.config import ConfigError, load_recipe, validate_recipe
from megagrpo.data.errors import DataError
from megagrpo.data.stream_sampler import PromptStream
from megagrpo.data.stream_sources import open_member, open_members
from megagrpo.demo.grpo_demo import DEMO_RECIPE
from megagrpo.demo.tokenizer import build_demo_tokenizer
from megagrpo.training.prompt_data import load_prompt_data


@pytest.fixture(scope="module")
def tok():
    return build_demo_tokenizer()


def _recipe(dataset, *argv):
    return load_recipe(
        DEMO_RECIPE,
        ["--dataset_name", str(dataset), "--eval_strategy", "no", "--dataset_streaming", "true"]
        + list(argv),
    )


def _load(tok, dataset, *argv):
    """The streamed prompt data (8 prompts a step), evaluation off."""
    return load_prompt_data(_recipe(dataset, *argv), tok, dp_size=1)


def _mixture(*ids, weights=None, seed=0):
    members = ", ".join(
        f"{{id: '{i}', weight: {w}}}" for i, w in zip(ids, weights or [1.0] * len(ids))
    )
    return ["--dataset_mixture", f"{{datasets: [{members}], seed: {seed}}}"]


def _problem_index(row: dict) -> int:
    return int(row["problem"].split()[2]) if isinstance(row["problem"], str) else -1


def _stream(members, n=4, *, seed=3, buffer_size=6, **kw):
    """A stream of the raw rows (no tokenizer): a row is bad when its problem is not a str."""

    def prepare(row):
        if not isinstance(row.get("problem"), str):
            return "prompt_type", "column 'problem' is not a string"
        return dict(row)

    return PromptStream(members, prepare, n, seed=seed, buffer_size=buffer_size, **kw)


# ---- order and epochs ---------------------------------------------------------------------------


def test_each_epoch_visits_every_row_once_in_a_new_seeded_order(tmp_path):
    path = write_jsonl(
        tmp_path / "a.jsonl", ROWS + [{"problem": "What is 20 + 20?", "solution": "40"}]
    )
    member = open_member(path)
    stream = _stream([member])
    epochs = [[stream.rows_at(e * 5 + k) for k in range(5)] for e in range(3)]
    for steps in epochs:  # 21 rows, 4 a step: 5 steps an epoch, its last row dropped
        flat = [i for s in steps for i in s]
        assert len(set(flat)) == 20 and set(flat) <= set(range(21))
    assert epochs[0] != epochs[1] != epochs[2]
    assert stream.row(epochs[2][4][0])["problem"] == ROWS[epochs[2][4][0]]["problem"]
    # the same seed gives the same order; another seed another one
    assert [_stream([open_member(path)]).rows_at(k) for k in range(5)] == epochs[0]
    assert [_stream([open_member(path)], seed=4).rows_at(k) for k in range(5)] != epochs[0]
    # buffered: a step's 4 rows come from one or two buffers of 6 consecutive rows
    assert all(len({i // 6 for i in step}) <= 2 for steps in epochs for step in steps)


def test_parquet_rows_and_directory_of_files(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(ROWS)
    pq.write_table(table, tmp_path / "p.parquet", row_group_size=3)
    d = tmp_path / "dir"
    d.mkdir()
    write_jsonl(d / "train-0.jsonl", ROWS[:7])
    write_jsonl(d / "train-1.jsonl", ROWS[7:])
    write_jsonl(d / "test.jsonl", ROWS[:1])
    for name in (str(tmp_path / "p.parquet"), str(d)):
        member = open_member(name)
        assert len(member) == 20 and member.columns == ["problem", "solution"]
        stream = _stream([member], 5, buffer_size=7)
        for k in range(8):
            for i in stream.rows_at(k):
                assert stream.row(i) == ROWS[i]
    assert open_member(str(d)).where(9) == f"{d / 'train-1.jsonl'}: row 2 (0-based), line 3"


def test_mixture_interleaves_members_and_keeps_the_weighted_rows(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", ROWS)
    b = write_jsonl(tmp_path / "b.jsonl", [{**r, "problem": "B" + r["problem"]} for r in ROWS])
    recipe = _recipe("null", *_mixture(a, b, weights=[1.0, 0.5], seed=7))
    members = open_members(recipe.script)
    assert [len(m) for m in members] == [20, 10] and members[1].base == 20
    # the same rows of b as without streaming: ds.shuffle(seed).select(range(k))
    assert members[1].kept.tolist() == sorted(np.random.default_rng(7).permutation(20)[:10])
    stream = _stream(members, 6, buffer_size=10)
    epoch = [i for k in range(5) for i in stream.rows_at(k)]
    assert sorted(epoch) == list(range(20)) + sorted(20 + members[1].kept)
    assert any(i >= 20 for i in stream.rows_at(0))  # a buffer holds rows of both members
    assert stream.row(epoch[0])["problem"].startswith("B" if epoch[0] >= 20 else "W")


# ---- resume -------------------------------------------------------------------------------------


@pytest.mark.parametrize("mixture", [False, True])
def test_resume_continues_exactly_where_an_uninterrupted_run_goes(tmp_path, mixture):
    rows = [dict(r) for r in ROWS]
    for i in (2, 9, 15):
        rows[i]["problem"] = i  # skipped: the position depends on the rows before it
    a = write_jsonl(tmp_path / "a.jsonl", rows)
    b = write_jsonl(tmp_path / "b.jsonl", ROWS[:13])

    def members():
        return [open_member(a), open_member(b, weight=0.7, seed=1)] if mixture else [open_member(a)]

    def stream():
        return _stream(members(), 5, buffer_size=7, on_bad_rows="skip")

    whole = stream()
    expected = [whole.rows_at(k) for k in range(14)]  # several epochs
    states = {k: json.loads(json.dumps(whole.state_before(k))) for k in range(14)}
    assert {s["epoch"] for s in states.values()} >= {0, 1, 2}
    for cut in range(14):
        resumed = stream()
        resumed.load_state_dict(states[cut])
        assert [resumed.rows_at(k) for k in range(cut, 14)] == expected[cut:]
        assert resumed.row(expected[-1][0]) == whole.row(expected[-1][0])
        assert resumed.skipped.counts == whole.skipped.counts == {"prompt_type": 3}
    # the skip counts of the first pass travel with the position
    assert states[13]["skipped"]["counts"] == {"prompt_type": 3}


def test_resume_refuses_a_position_of_another_order(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", ROWS)
    state = _stream([open_member(path)]).state_before(2)
    with pytest.raises(ValueError, match="buffer_size=6, this run has buffer_size=5.*silently"):
        _stream([open_member(path)], buffer_size=5).load_state_dict(state)
    shorter = write_jsonl(tmp_path / "b.jsonl", ROWS[:19])
    with pytest.raises(ValueError, match=r"rows=\[20\], this run has rows=\[19\]"):
        _stream([open_member(shorter)]).load_state_dict(state)
    with pytest.raises(ValueError, match="no streaming data position"):
        _stream([open_member(path)]).load_state_dict({"epoch": 0, "position": 8})


def test_prompt_data_saves_and_resumes_the_position(tmp_path, tok):
    path = write_jsonl(tmp_path / "a.jsonl", with_row(5, solution=None))
    args = ("--on_bad_rows", "skip", "--dataset_shuffle_buffer_size", "8")
    whole = _load(tok, path, *args)
    expected = [whole.sampler.rows_at(k) for k in range(6)]
    saved = json.loads(json.dumps(whole.position(3)))  # as trainer_state.json holds it
    resumed = _load(tok, path, *args)
    resumed.resume(saved, 3)
    assert [resumed.sampler.rows_at(k) for k in range(3, 6)] == expected[3:]
    row = expected[4][0]
    assert resumed.train[row]["prompt_ids"] == whole.train[row]["prompt_ids"]
    with pytest.raises(ValueError, match="before generation batch 3, but the run resumes at .* 2"):
        _load(tok, path, *args).resume(saved, 2)


# ---- the prompts, bad rows and skip counts ------------------------------------------------------


def test_streamed_prompts_are_those_of_the_loaded_dataset(tmp_path, tok):
    path = write_jsonl(tmp_path / "a.jsonl", ROWS)
    loaded = load_prompt_data(
        load_recipe(DEMO_RECIPE, ["--dataset_name", path, "--eval_strategy", "no"]), tok, dp_size=1
    )
    streamed = _load(tok, path)
    assert streamed.total_steps == loaded.total_steps == 250  # the recipe's max_steps
    assert streamed.prompts_per_step == 8
    for k in range(4):
        for i in streamed.sampler.rows_at(k):
            row = streamed.train[i]
            assert row["prompt_ids"] == loaded.train[i]["prompt_ids"]
            assert row["prompt"] == loaded.train[i]["prompt"]
            assert row["solution"] == ROWS[i]["solution"]
    with pytest.raises(TypeError, match="no length"):
        len(streamed.train)


def test_a_bad_row_names_file_row_line_and_column(tmp_path, tok):
    path = write_jsonl(tmp_path / "a.jsonl", with_row(13, problem={"text": "x"}))
    with pytest.raises(DataError) as e:  # when the row is read: the first step, or later
        data = _load(tok, path)
        for k in range(3):  # two steps an epoch: the third reads the rest of the first
            data.sampler.rows_at(k)
    assert str(e.value) == (
        f"{path}: row 13 (0-based), line 14: column 'problem' holds dict {{'text': 'x'}}; "
        "expected a string or a list of chat messages [{'role': ..., 'content': ...}] "
        "(on_bad_rows: skip drops such rows)"
    )
    bad_json = write_jsonl(tmp_path / "b.jsonl", ROWS, raw={6: '{"problem": "x", '})
    with pytest.raises(DataError, match=rf"^{bad_json}: line 7: not valid JSON \(Expecting"):
        data = _load(tok, bad_json)
        for k in range(3):
            data.sampler.rows_at(k)


def test_mixture_member_with_a_bad_row(tmp_path, tok):
    good = write_jsonl(tmp_path / "a.jsonl", ROWS)
    bad = write_jsonl(tmp_path / "b.jsonl", with_row(7, solution=None))
    # a seed whose half of b.jsonl holds the bad row (the rows ds.shuffle(seed) puts first)
    seed = next(s for s in range(100) if 7 in np.random.default_rng(s).permutation(20)[:10])
    mix = _mixture(good, bad, weights=[1.0, 0.5], seed=seed)
    assert 7 in open_members(_recipe("null", *mix).script)[1].kept.tolist()
    with pytest.raises(DataError) as e:
        data = _load(tok, "null", *mix)
        for k in range(4):  # 30 rows, 8 a step: step 3 starts the second epoch
            data.sampler.rows_at(k)
    assert str(e.value).startswith(
        f"{bad}: row 7 (0-based), line 8: column 'solution' is null; expected the reference answer"
    )
    data = _load(tok, "null", *mix, "--on_bad_rows", "skip")
    for k in range(4):
        data.sampler.rows_at(k)
    assert data.step_metrics(3) == {"data/skipped_rows": 1, "data/skipped_rows/null_solution": 1}
    assert data.stream.skipped.first == {"null_solution": [f"{bad}: row 7 (0-based), line 8"]}


def test_skip_counts_each_row_once_as_without_streaming(tmp_path, tok, capsys):
    rows = [dict(r) for r in ROWS]
    for i in (1, 4, 7, 10):
        rows[i]["solution"] = None
    rows[12]["problem"] = 12
    rows[3]["problem"] = "What is " + " + ".join(["1"] * 200) + "?"
    path = write_jsonl(tmp_path / "a.jsonl", rows)
    loaded = load_prompt_data(
        load_recipe(
            DEMO_RECIPE,
            ["--dataset_name", path, "--eval_strategy", "no", "--on_bad_rows", "skip"],
        ),
        tok,
        dp_size=1,
    )
    data = _load(tok, path, "--on_bad_rows", "skip")
    assert "megagrpo: skipped" not in capsys.readouterr().out  # not before the first pass ends
    metrics = [data.step_metrics(k) for k in range(6)]  # 14 good prompts: one step an epoch
    assert metrics[-1] == loaded.skipped.metrics()
    assert loaded.skipped.counts == {"null_solution": 4, "prompt_too_long": 1, "prompt_type": 1}
    assert data.stream.skipped.counts == loaded.skipped.counts  # epochs 2.. count nothing again
    # named: the first rows met in the shuffled order (without streaming: the lowest rows)
    nulls = {f"{path}: row {i} (0-based), line {i + 1}" for i in (1, 4, 7, 10)}
    assert len(data.stream.skipped.first["null_solution"]) == 3
    assert set(data.stream.skipped.first["null_solution"]) <= nulls
    out = capsys.readouterr().out
    assert out.count("megagrpo: skipped 6 row(s): ") == 1 and "first pass" in out


def test_too_few_prompts_and_long_prompt_errors(tmp_path, tok):
    path = write_jsonl(tmp_path / "a.jsonl", ROWS)
    with pytest.raises(DataError) as e:
        _load(tok, path, "--max_prompt_length", "8")
    assert str(e.value).endswith(
        "0 training prompt(s), fewer than the 8 one generation batch needs "
        "(per_device_train_batch_size x steps_per_generation (default: "
        "gradient_accumulation_steps) x data-parallel ranks / num_generations); 20 were loaded "
        "and 20 dropped: 20 longer than max_prompt_length=8 tokens (raise max_prompt_length)"
    )
    with pytest.raises(
        DataError, match=rf"^{path}: row \d+ \(0-based\), line \d+: prompt of \d+ tokens exceeds "
    ):
        _load(tok, path, "--max_prompt_length", "8", "--long_prompts", "error")


def test_streamed_test_split_in_file_order(tmp_path, tok):
    d = tmp_path / "d"
    d.mkdir()
    write_jsonl(d / "train.jsonl", ROWS)
    write_jsonl(d / "test.jsonl", with_row(0, solution=None)[:6])
    recipe = load_recipe(
        DEMO_RECIPE,
        ["--dataset_name", str(d), "--dataset_streaming", "true", "--on_bad_rows", "skip"]
        + ["--eval_max_prompts", "3"],
    )
    data = load_prompt_data(recipe, tok, dp_size=1)
    assert [r["solution"] for r in data.test] == ["2", "4", "6"]
    assert data.skipped.counts == {"null_solution": 1}


# ---- what streaming refuses ---------------------------------------------------------------------


def test_settings_streaming_cannot_honour_are_refused(tmp_path, tok):
    path = write_jsonl(tmp_path / "a.jsonl", ROWS)
    with pytest.raises(ConfigError) as e:
        validate_recipe(
            _recipe(
                path,
                *("--max_steps", "-1", "--save_strategy", "epoch", "--dynamic_sampling", "true"),
            )
        )
    text = str(e.value)
    assert "dataset_streaming=True needs max_steps > 0 (got -1)" in text
    assert "save_strategy='epoch' with dataset_streaming=True" in text
    assert "dynamic_sampling=True with dataset_streaming=True" in text
    csv = tmp_path / "c.csv"
    csv.write_text("problem,solution\nx,1\n")
    with pytest.raises(DataError, match=r"c.csv: dataset_streaming reads JSON Lines \(.jsonl\)"):
        _load(tok, csv)
    with pytest.raises(DataError, match="not hub datasets"):
        _load(tok, "AI-MO/NuminaMath-TIR")
    with pytest.raises(DataError, match="no such file or directory"):
        _load(tok, tmp_path / "missing.jsonl")


# ---- through the training loop ------------------------------------------------------------------


def test_a_streamed_run_resumes_exactly_through_the_checkpoint(demo_dir, tmp_path):
    """The demo streamed: 4 steps uninterrupted, and 2 steps (the run stopped there) resumed from
    checkpoint-2 for steps 3-4; the resumed steps train on the same prompts (the same rewards,
    losses and gradient norms), from the position the checkpoint saved."""
    from _multiproc import run_ranks
    from _train_workers import demo_run_worker

    stream = ["--dataset_streaming", "true", "--dataset_shuffle_buffer_size", "64"]
    quiet = [
        "--eval_strategy",
        "no",
        "--log_completions",
        "false",
        "--lr_scheduler_type",
        "constant",
    ]
    full = run_ranks(
        1, demo_run_worker, demo_dir, str(tmp_path / "a"),
        [*stream, *quiet, "--save_strategy", "no", "--max_steps", "4"],
    )[0]  # fmt: skip
    out = str(tmp_path / "b")
    saving = [*stream, *quiet, "--save_steps", "2", "--max_steps", "4"]
    run_ranks(1, demo_run_worker, demo_dir, out, [*saving, "--max_steps", "2"])
    with open(os.path.join(out, "checkpoint-2", "trainer_state.json")) as f:
        position = json.load(f)["sampler"]
    assert position["step"] == 2 and position["epoch"] == 0  # the stream's, before batch 2
    resumed = run_ranks(1, demo_run_worker, demo_dir, out, saving)[0]
    assert [h["step"] for h in resumed] == [3, 4]
    for a, b in zip(full[2:], resumed):
        for key in ("reward", "loss", "grad_norm", "completions/mean_length"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), key


def test_a_bad_row_reached_mid_run_stops_every_rank_under_torchrun(tmp_path, tiny_checkpoint):
    """Streamed, a bad row is met when a later step reads it, not before training: under torchrun
    with TP=2 (rank 0 reads the data, rank 1 waits for its batch) rank 0 says it in one line and
    every rank stops, with no traceback and no rank left waiting in a collective."""
    import signal
    import subprocess

    rows = [{"problem": f"What is {i} + {i}?", "solution": str(2 * i)} for i in range(200)]
    path = write_jsonl(tmp_path / "train.jsonl", with_row(60, rows, problem=7))
    out = tmp_path / "run"
    args = ["--config", DEMO_RECIPE, "--model_name_or_path", tiny_checkpoint("qwen2-demo")]
    args += ["--dataset_name", path, "--output_dir", str(out), "--max_steps", "40"]
    args += ["--dataset_streaming", "true", "--dataset_shuffle_buffer_size", "8"]
    args += ["--eval_strategy", "no", "--save_strategy", "no", "--log_completions", "false"]
    args += ["--max_completion_length", "8", "--tensor_model_parallel_size", "2"]
    # its own session: a hang (the failure this test is about) is killed whole, ranks included
    with subprocess.Popen(
        [os.path.join(ROOT, "launch", "train.sh"), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cli_env(NPROC="2"),
        start_new_session=True,
    ) as p:
        try:
            _, stderr = p.communicate(timeout=400)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            raise
    r = subprocess.CompletedProcess(p.args, p.returncode, "", stderr)
    assert r.returncode != 0
    errors = [line for line in r.stderr.splitlines() if line.startswith("megagrpo train: error:")]
    assert errors == [
        f"megagrpo train: error: {path}: row 60 (0-based), line 61: column 'problem' holds int 7; "
        "expected a string or a list of chat messages [{'role': ..., 'content': ...}] "
        "(on_bad_rows: skip drops such rows)"
    ], r.stderr[-3000:]
    assert "DataError" not in r.stderr and "megagrpo/" not in r.stderr, r.stderr[-3000:]
    with open(out / "metrics.jsonl") as f:
        steps = [json.loads(line)["step"] for line in f if '"reward"' in line]
    assert steps and max(steps) < 40, steps  # trained until the step that reads the bad row
