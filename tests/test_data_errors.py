"""Bad data: one DataError line naming file, row (0-based) or line (1-based), column and what was
expected; ``on_bad_rows: skip`` drops and counts; rank 0's error reaches every rank; the
``megagrpo train`` command prints it as one line without a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
from _data_files import ROOT, ROWS, cli_env, with_row, write_jsonl
from _multiproc import run_ranks

from megagrpo.config import load_recipe
from megagrpo.data.errors import DataError
from megagrpo.data.sources import open_source
from megagrpo.demo.grpo_demo import DEMO_RECIPE
from megagrpo.demo.tokenizer import build_demo_tokenizer
from megagrpo.training.prompt_data import load_prompt_data, share_prompt_data


@pytest.fixture(scope="module")
def tok():
    return build_demo_tokenizer()


def _load(tok, dataset, *argv):
    """The run's prompt data (8 prompts a step) from ``dataset``, evaluation off."""
    recipe = load_recipe(
        DEMO_RECIPE, ["--dataset_name", str(dataset), "--eval_strategy", "no", *argv]
    )
    return load_prompt_data(recipe, tok, dp_size=1)


def _mixture(*ids, weights=None, seed=0):
    members = ", ".join(
        f"{{id: '{i}', weight: {w}}}" for i, w in zip(ids, weights or [1.0] * len(ids))
    )
    return [
        "--dataset_name",
        "null",
        "--dataset_mixture",
        f"{{datasets: [{members}], seed: {seed}}}",
    ]


# ---- files that do not load -------------------------------------------------------------------


def test_jsonl_with_one_bad_line_names_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", ROWS, raw={6: '{"problem": "x", oops}'})
    with pytest.raises(DataError) as e:
        open_source(path)
    assert str(e.value).startswith(f"{path}: line 7: not valid JSON (")


def test_jsonl_line_that_is_not_an_object(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", ROWS, raw={2: "[1, 2]"})
    with pytest.raises(DataError, match=rf"^{path}: line 3: a JSON list where an object"):
        open_source(path)


def test_json_file_that_does_not_parse(tmp_path):
    path = tmp_path / "train.json"
    path.write_text('[\n{"problem": "a", "solution": "1"},\n{"problem": "b" "solution": "2"}\n]')
    with pytest.raises(DataError, match=rf"^{path}: line 3: not valid JSON"):
        open_source(str(path))


def test_csv_with_an_extra_field_names_the_line(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text('problem,solution\n"a\nstill a",1\nb,2,3\n')
    with pytest.raises(DataError, match=rf"^{path}: line 4: 3 fields where the header has 2"):
        open_source(str(path))


def test_parquet_that_is_not_parquet(tmp_path):
    path = tmp_path / "train.parquet"
    path.write_text("not parquet")
    with pytest.raises(DataError, match=rf"^{path}: not a readable Parquet file"):
        open_source(str(path))


def test_empty_and_unreadable_files(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match=rf"^{empty}: the file is empty$"):
        open_source(str(empty))
    if os.geteuid() != 0:  # root reads anything
        locked = write_jsonl(tmp_path / "locked.jsonl", ROWS)
        os.chmod(locked, 0)
        with pytest.raises(DataError, match=rf"^{locked}: cannot be read \(Permission denied\)"):
            open_source(locked)


def test_directory_names_the_bad_file(tmp_path):
    d = tmp_path / "dir"
    d.mkdir()
    write_jsonl(d / "train-0.jsonl", ROWS[:10])
    bad = write_jsonl(d / "train-1.jsonl", ROWS[10:], raw={4: "{"})
    with pytest.raises(DataError, match=rf"^{bad}: line 5: not valid JSON"):
        open_source(str(d))


def test_dataset_name_that_does_not_exist(tmp_path, tok):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(DataError, match=rf"^dataset_name='{missing}': no such file or directory$"):
        _load(tok, missing)


# ---- rows that do not fit -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "row,value,expected",
    [
        (1, 7, "column 'problem' holds int 7; expected a string or a list of chat messages"),
        (4, None, "column 'problem' holds null None; expected a string or a list"),
        (5, [], "column 'problem' holds an empty list of chat messages"),
        (2, [{"role": "user"}], "column 'problem': message 0 has 'content' missing; expected a"),
        (3, ["hi"], "column 'problem': message 0 is str 'hi'; expected {'role': ..., 'content'"),
        (
            0,
            [{"role": "user", "content": 5}],
            "column 'problem': message 0 has 'content' int; expected a string",
        ),
    ],
)
def test_bad_prompt_names_file_row_line_and_column(tmp_path, tok, row, value, expected):
    path = write_jsonl(tmp_path / "train.jsonl", with_row(row, problem=value))
    with pytest.raises(DataError) as e:
        _load(tok, path)
    assert str(e.value).startswith(f"{path}: row {row} (0-based), line {row + 1}: {expected}")


def test_error_counts_every_bad_row(tmp_path, tok):
    rows = with_row(3, problem=1)
    rows[9]["problem"] = 2
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    with pytest.raises(
        DataError, match=r"row 3 \(0-based\).*\(2 bad rows in all; on_bad_rows: skip"
    ):
        _load(tok, path)


def test_null_solution_only_where_it_is_needed(tmp_path, tok):
    path = write_jsonl(tmp_path / "train.jsonl", with_row(2, solution=None))
    with pytest.raises(DataError) as e:
        _load(tok, path)  # the demo's rewards include accuracy
    assert str(e.value).startswith(
        f"{path}: row 2 (0-based), line 3: column 'solution' is null; expected the reference answer"
    )
    assert (
        len(
            _load(tok, path, "--reward_funcs", "format,tag_count", "--reward_weights", "null").train
        )
        == 20
    )
    # the evaluation reads the test split's answers
    d = tmp_path / "dir"
    d.mkdir()
    write_jsonl(d / "train.jsonl", ROWS)
    test = write_jsonl(d / "test.jsonl", with_row(5, solution=None)[:8])
    with pytest.raises(DataError, match=rf"^{test}: row 5 \(0-based\), line 6: column 'solution'"):
        _load(
            tok,
            d,
            "--eval_strategy",
            "steps",
            "--reward_funcs",
            "format",
            "--reward_weights",
            "null",
        )


def test_solution_of_the_wrong_type(tmp_path, tok):
    path = write_jsonl(tmp_path / "train.jsonl", with_row(8, solution=["4", "5"]))
    with pytest.raises(
        DataError,
        match=rf"^{path}: row 8 \(0-based\), line 9: column 'solution' holds list \['4', '5'\]; "
        "expected a string or a number",
    ):
        _load(tok, path)


def test_directory_rows_are_named_in_their_file(tmp_path, tok):
    d = tmp_path / "dir"
    d.mkdir()
    write_jsonl(d / "train-0.jsonl", ROWS[:10])
    bad = write_jsonl(d / "train-1.jsonl", with_row(14, problem=None)[10:])
    with pytest.raises(DataError, match=rf"^{bad}: row 4 \(0-based\), line 5: column 'problem'"):
        _load(tok, d)
    with pytest.raises(DataError, match=rf"^{d}: column\(s\) \['question'\] not found"):
        _load(tok, d, "--dataset_prompt_column", "question")


def test_directory_files_with_different_column_types(tmp_path):
    d = tmp_path / "dir"
    d.mkdir()
    first = write_jsonl(d / "train-0.jsonl", ROWS[:10])
    other = write_jsonl(d / "train-1.jsonl", with_row(14, problem={"text": "x"})[10:])
    with pytest.raises(
        DataError,
        match=rf"^{other}: column 'problem' holds Json\(.*\) but Value\('string'\) in {first}",
    ):
        open_source(str(d))


def test_parquet_and_csv_rows(tmp_path, tok):
    import datasets

    parquet = str(tmp_path / "train.parquet")
    datasets.Dataset.from_list(with_row(6, solution=None)).to_parquet(parquet)
    with pytest.raises(DataError, match=rf"^{parquet}: row 6 \(0-based\): column 'solution' is"):
        _load(tok, parquet)
    csv = tmp_path / "train.csv"  # a quoted field over two lines: row 2 starts on line 5
    lines = ["problem,solution", '"What is\n1 + 1?",2', "a,1", "b,", "c,3"] + [
        f"p{i},{i}" for i in range(10)
    ]
    csv.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=rf"^{csv}: row 2 \(0-based\), line 5: column 'solution'"):
        _load(tok, csv)


def test_missing_column_names_file_and_columns(tmp_path, tok):
    path = write_jsonl(tmp_path / "train.jsonl", ROWS)
    with pytest.raises(
        DataError,
        match=rf"^{path}: column\(s\) \['question'\] not found \(dataset_prompt_column\); "
        r"columns present: \['problem', 'solution'\]",
    ):
        _load(tok, path, "--dataset_prompt_column", "question")


# ---- on_bad_rows: skip, too-long prompts, too few left ------------------------------------------


def test_skip_drops_counts_and_names_the_first_rows(tmp_path, tok, capsys):
    rows = [dict(r) for r in ROWS]
    for i in (1, 4, 7, 10):
        rows[i]["solution"] = None
    rows[12]["problem"] = 12
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    recipe = load_recipe(
        DEMO_RECIPE, ["--dataset_name", str(path), "--eval_strategy", "no", "--on_bad_rows", "skip"]
    )
    one_rank = SimpleNamespace(rank=0, dp_size=1)
    data, _, _ = share_prompt_data(recipe, tok, one_rank, lambda value, groups: value)
    assert len(data.train) == 15
    assert data.skipped.counts == {"null_solution": 4, "prompt_type": 1}
    assert data.skipped.first["null_solution"] == [
        f"{path}: row {i} (0-based), line {i + 1}" for i in (1, 4, 7)
    ]
    assert data.skipped.metrics() == {
        "data/skipped_rows": 5,
        "data/skipped_rows/null_solution": 4,
        "data/skipped_rows/prompt_type": 1,
    }
    out = capsys.readouterr().out
    assert out.count("megagrpo: skipped 5 row(s): ") == 1
    assert f"1 prompt is not a string or a list of chat messages (first: {path}: row 12" in out


def test_too_long_prompts_are_reported_the_same_way(tmp_path, tok):
    rows = [dict(r) for r in ROWS]
    rows[3]["problem"] = "What is " + " + ".join(["1"] * 200) + "?"
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    data = _load(tok, path)  # long_prompts: skip (the default)
    assert data.skipped.counts == {"prompt_too_long": 1}
    assert data.skipped.first["prompt_too_long"] == [f"{path}: row 3 (0-based), line 4"]
    assert data.skipped_long_prompts == 1 and len(data.train) == 19
    with pytest.raises(
        DataError,
        match=rf"^{path}: row 3 \(0-based\), line 4: prompt of \d+ tokens; 1 prompt\(s\) exceed "
        r"max_prompt_length=128 tokens",
    ):
        _load(tok, path, "--long_prompts", "error")


def test_too_few_prompts_left_says_how_many_were_dropped_and_why(tmp_path, tok):
    path = write_jsonl(tmp_path / "train.jsonl", ROWS)
    with pytest.raises(DataError) as e:
        _load(tok, path, "--max_prompt_length", "8")
    assert str(e.value) == (
        f"{path}: 0 training prompt(s), fewer than the 8 one generation batch needs "
        "(per_device_train_batch_size x steps_per_generation (default: "
        "gradient_accumulation_steps) x data-parallel ranks / num_generations); 20 were loaded "
        "and 20 dropped: 20 longer than max_prompt_length=8 "
        "tokens (raise max_prompt_length)"
    )
    rows = [dict(r) for r in ROWS]
    for r in rows[:15]:
        r["solution"] = None
    path = write_jsonl(tmp_path / "nulls.jsonl", rows)
    with pytest.raises(
        DataError,
        match=r"5 training prompt\(s\), fewer than the 8 .*; 20 were "
        r"loaded and 15 dropped: 15: solution is null \(fix those rows\)",
    ):
        _load(tok, path, "--on_bad_rows", "skip")
    with pytest.raises(DataError, match="use more data or lower per_device_train_batch_size"):
        _load(tok, write_jsonl(tmp_path / "few.jsonl", ROWS[:5]))


# ---- mixtures -----------------------------------------------------------------------------------


def test_mixture_names_the_member_file_row_and_column(tmp_path, tok):
    good = write_jsonl(tmp_path / "a.jsonl", ROWS)
    bad = write_jsonl(tmp_path / "b.jsonl", with_row(13, problem={"text": "x"}))
    with pytest.raises(DataError) as e:
        _load(tok, "null", *_mixture(good, bad))
    assert str(e.value).startswith(
        f"{bad}: row 13 (0-based), line 14: column 'problem' holds dict {{'text': 'x'}}; "
        "expected a string or a list of chat messages"
    )


def test_mixture_subset_rows_are_named_in_their_file(tmp_path, tok):
    good = write_jsonl(tmp_path / "a.jsonl", ROWS)
    bad_row = 7
    bad = write_jsonl(tmp_path / "b.jsonl", with_row(bad_row, solution=None))
    # a seed whose half of b.jsonl holds the bad row (the rows ds.shuffle(seed) puts first)
    seed = next(s for s in range(100) if bad_row in np.random.default_rng(s).permutation(20)[:10])
    with pytest.raises(DataError, match=rf"^{bad}: row {bad_row} \(0-based\), line 8: column"):
        _load(tok, "null", *_mixture(good, bad, weights=[1.0, 0.5], seed=seed))
    data = _load(
        tok, "null", *_mixture(good, bad, weights=[1.0, 0.5], seed=seed), "--on_bad_rows", "skip"
    )
    assert len(data.train) == 29
    assert data.skipped.first == {"null_solution": [f"{bad}: row {bad_row} (0-based), line 8"]}


def test_mixture_members_with_different_column_types(tmp_path, tok):
    good = write_jsonl(tmp_path / "a.jsonl", ROWS)
    ints = write_jsonl(tmp_path / "b.jsonl", [{**r, "solution": 2 * i} for i, r in enumerate(ROWS)])
    with pytest.raises(
        DataError,
        match=r"^dataset_mixture: column 'solution' holds Value\('string'\) in datasets\[0\] "
        rf"\({good}\) but Value\('int64'\) in datasets\[1\] \({ints}\)",
    ):
        _load(tok, "null", *_mixture(good, ints))


# ---- every rank stops; the command prints one line ----------------------------------------------


def share_worker(argv, bug: bool):
    """share_prompt_data on every rank; what each rank raised."""
    import torch.distributed as dist

    from megagrpo.training import prompt_data
    from megagrpo.training.build import _broadcast_from_rank0

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    groups = type("Groups", (), {"rank": rank, "world_size": world, "dp_size": world})()
    if bug and rank == 0:

        def load_prompt_data(*args, **kwargs):
            raise KeyError("a bug")

        prompt_data.load_prompt_data = load_prompt_data
    recipe = load_recipe(DEMO_RECIPE, argv)
    try:
        prompt_data.share_prompt_data(recipe, build_demo_tokenizer(), groups, _broadcast_from_rank0)
    except Exception as e:  # noqa: BLE001 - the test compares them
        return type(e).__name__, str(e)
    return None


def test_data_error_on_rank0_stops_every_rank(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", with_row(1, problem=7))
    argv = ["--dataset_name", path, "--eval_strategy", "no"]
    results = run_ranks(2, share_worker, argv, False, timeout=180)
    expected = f"{path}: row 1 (0-based), line 2: column 'problem' holds int 7"
    assert [r[0] for r in results] == ["DataError", "DataError"]
    assert all(r[1].startswith(expected) for r in results)
    # a bug on rank 0 keeps its traceback there and stops the other rank too
    results = run_ranks(2, share_worker, argv, True, timeout=180)
    assert results[0] == ("KeyError", "'a bug'")
    assert results[1] == (
        "RuntimeError",
        "rank 0 failed while loading the prompt data: KeyError: 'a bug'",
    )


def _cli_args(tmp_path, model_dir, dataset):
    args = ["--config", DEMO_RECIPE, "--model_name_or_path", model_dir]
    return args + ["--dataset_name", dataset, "--output_dir", str(tmp_path / "run")]


def test_cli_prints_one_error_line_without_traceback(tmp_path, tiny_checkpoint):
    path = write_jsonl(tmp_path / "train.jsonl", ROWS, raw={6: "{not json"})
    cli = [sys.executable, "-m", "megagrpo.cli", "train"]
    args = _cli_args(tmp_path, tiny_checkpoint("qwen2-demo"), path)
    r = subprocess.run([*cli, *args], capture_output=True, text=True, env=cli_env(), timeout=300)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    errors = [line for line in r.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, r.stderr
    assert errors[0].startswith(f"megagrpo train: error: {path}: line 7: not valid JSON ("), (
        r.stderr
    )
    assert not os.path.exists(tmp_path / "run" / "metrics.jsonl")  # stopped before training


def test_cli_under_torchrun_rank0_says_it_once_and_every_rank_stops(tmp_path, tiny_checkpoint):
    """torchrun stops the other ranks at the first exit and prints its own summary (with the
    launcher's traceback); no rank prints a traceback of the DataError, rank 0 prints the line."""
    path = write_jsonl(tmp_path / "train.jsonl", with_row(1, problem=7))
    r = subprocess.run(
        [
            os.path.join(ROOT, "launch", "train.sh"),
            *_cli_args(tmp_path, tiny_checkpoint("qwen2-demo"), path),
        ],
        capture_output=True,
        text=True,
        env=cli_env(NPROC="2"),
        timeout=300,
    )
    assert r.returncode != 0
    errors = [line for line in r.stderr.splitlines() if line.startswith("megagrpo train: error:")]
    assert errors == [
        f"megagrpo train: error: {path}: row 1 (0-based), line 2: column 'problem' holds int 7; "
        "expected a string or a list of chat messages [{'role': ..., 'content': ...}]"
    ], r.stderr[-3000:]
    assert "DataError" not in r.stderr and "megagrpo/" not in r.stderr, r.stderr[-3000:]
