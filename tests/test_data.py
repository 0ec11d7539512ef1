"""Prompt datasets from local files and mixtures, formatting, tokenization, sampling."""

from __future__ import annotations

import json

import pytest

from megagrpo.config import DatasetConfig as DatasetSpec
from megagrpo.config import DatasetMixtureConfig as MixtureSpec
from megagrpo.data.prompts import PromptError, PromptFormat, format_conversations, tokenize_prompts
from megagrpo.data.sampler import PromptSampler
from megagrpo.data.sources import DataError, load_mixture, load_source
from megagrpo.demo.tokenizer import build_demo_tokenizer

ROWS = [
    {"problem": f"What is {i} + {i}?", "solution": str(2 * i), "level": i % 3} for i in range(20)
]


@pytest.fixture()
def files(tmp_path):
    import datasets

    jsonl = tmp_path / "train.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    ds = datasets.Dataset.from_list(ROWS)
    ds.to_parquet(str(tmp_path / "p.parquet"))
    ds.to_csv(str(tmp_path / "c.csv"), index=False)
    ds.save_to_disk(str(tmp_path / "saved"))
    d = tmp_path / "dir"
    d.mkdir()
    (d / "train-0.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS[:10]))
    (d / "train-1.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS[10:]))
    (d / "test.jsonl").write_text(json.dumps(ROWS[0]) + "\n")
    return tmp_path


@pytest.mark.parametrize("name", ["train.jsonl", "p.parquet", "c.csv", "saved", "dir"])
def test_local_sources(files, name):
    ds = load_source(str(files / name))
    assert len(ds) == 20
    assert sorted(ds["problem"]) == sorted(r["problem"] for r in ROWS)
    assert sorted(str(s) for s in ds["solution"]) == sorted(r["solution"] for r in ROWS)


def test_directory_split_by_file_name(files):
    assert len(load_source(str(files / "dir"), split="test")) == 1


def test_source_errors(files, tmp_path, monkeypatch):
    with pytest.raises(DataError, match="no such file or directory"):
        load_source(str(tmp_path / "nope.jsonl"))
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(DataError, match="unsupported file type '.txt'"):
        load_source(str(tmp_path / "x.txt"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no dataset files"):
        load_source(str(empty))
    import datasets
    import huggingface_hub

    # The test machines have no hub; make that fast and certain (the flags are read at import).
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match="could not be loaded from the Hugging Face hub.*Offline"):
        load_source("some-org/some-dataset-that-is-not-here")


def test_mixture_weights_columns_and_test_split(files):
    mix = MixtureSpec(
        datasets=[
            DatasetSpec(str(files / "train.jsonl"), columns=["problem", "solution"], weight=0.5),
            DatasetSpec(str(files / "p.parquet"), columns=["problem", "solution"], weight=1.0),
        ],
        seed=3,
        test_split_size=0.2,
    )
    out = load_mixture(mix)
    assert len(out["train"]) + len(out["test"]) == 30 and len(out["test"]) == 6
    assert out["train"].column_names == ["problem", "solution"]
    again = load_mixture(mix)
    assert again["train"]["problem"] == out["train"]["problem"]  # seeded
    with pytest.raises(DataError, match=r"datasets\[0\].*weight=1.5 must be in \(0, 1\]"):
        load_mixture(MixtureSpec([DatasetSpec(str(files / "c.csv"), weight=1.5)]))
    with pytest.raises(DataError, match=r"columns \['answer'\] not found; columns present"):
        load_mixture(MixtureSpec([DatasetSpec(str(files / "c.csv"), columns=["answer"])]))
    with pytest.raises(DataError, match="different columns"):
        load_mixture(
            MixtureSpec(
                [
                    DatasetSpec(str(files / "c.csv")),
                    DatasetSpec(str(files / "c.csv"), columns=["problem"]),
                ]
            )
        )


def test_format_conversations_keeps_reward_columns(files):
    ds = load_source(str(files / "train.jsonl"))
    out = format_conversations(ds, PromptFormat(system_prompt="Think first."))
    assert sorted(out.column_names) == ["prompt", "solution"]
    assert out[3]["prompt"] == [
        {"role": "system", "content": "Think first."},
        {"role": "user", "content": "What is 3 + 3?"},
    ]
    assert out[3]["solution"] == "6"


def test_conversational_prompt_column():
    import datasets

    ds = datasets.Dataset.from_list(
        [{"messages": [{"role": "user", "content": "2+2?"}], "solution": "4"}]
    )
    out = format_conversations(ds, PromptFormat(prompt_column="messages", system_prompt="S"))
    assert out[0]["prompt"] == [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "2+2?"},
    ]


def test_missing_columns_list_the_columns_present(files):
    ds = load_source(str(files / "train.jsonl"))
    with pytest.raises(
        PromptError,
        match=r"\['question'\] not found \(dataset_prompt_column\); "
        r"columns present: \['problem', 'solution', 'level'\]",
    ):
        format_conversations(ds, PromptFormat(prompt_column="question"))
    with pytest.raises(PromptError, match=r"\['answer'\] not found \(reward column\)"):
        format_conversations(ds, PromptFormat(reward_columns=["answer"]))


def test_tokenize_and_long_prompts(files):
    tok = build_demo_tokenizer()
    ds = format_conversations(load_source(str(files / "train.jsonl")), PromptFormat())
    full = tokenize_prompts(ds, tok, PromptFormat())
    text = tok.apply_chat_template(ds[12]["prompt"], tokenize=False, add_generation_prompt=True)
    assert full.dataset[12]["prompt_ids"] == tok(text)["input_ids"]
    lengths = full.dataset["prompt_length"]
    limit = sorted(lengths)[9]  # rows 10-19 ('What is 1x + 1x?') are two tokens longer
    fmt = PromptFormat(max_prompt_length=limit)
    short = tokenize_prompts(ds, tok, fmt)
    assert short.skipped == sum(n > limit for n in lengths) > 0
    assert all(n <= limit for n in short.dataset["prompt_length"])
    with pytest.raises(PromptError, match=f"exceed max_prompt_length={limit} tokens"):
        tokenize_prompts(ds, tok, PromptFormat(max_prompt_length=limit, long_prompts="error"))


def test_sampler_covers_each_epoch_once_and_resumes():
    ranks = [PromptSampler(10, 4, dp_rank=r, dp_size=2, seed=1) for r in range(2)]
    epoch0 = [ranks[r].next_step() for _ in range(2) for r in range(2)]
    flat = [i for step in epoch0 for i in step]
    assert len(flat) == 8 and len(set(flat)) == 8  # disjoint across ranks and steps
    assert all(len(s) == 2 for s in epoch0)
    state = ranks[0].state_dict()
    nxt = ranks[0].next_step()  # epoch 1 (2 prompts left over are dropped)
    assert ranks[0].epoch == 1
    fresh = PromptSampler(10, 4, dp_rank=0, dp_size=2, seed=1)
    fresh.load_state_dict(state)
    assert fresh.next_step() == nxt
    # the stateless view agrees: step k of rank r
    again = [PromptSampler(10, 4, dp_rank=r, dp_size=2, seed=1) for r in range(2)]
    assert [again[r].rows_at(k) for k in range(2) for r in range(2)] == epoch0
    assert again[0].rows_at(2) == nxt
    with pytest.raises(ValueError, match="prompts_per_step=8.*silently change the data order"):
        PromptSampler(10, 8, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="do not split over 3 data-parallel ranks"):
        PromptSampler(10, 4, dp_size=3)
