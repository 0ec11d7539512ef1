"""tools/bench_e2e.py's realistic workload: its assets at tiny size, its options, its report."""

from __future__ import annotations

import importlib.util
import json
import os
import random
import subprocess
import sys

import pytest

from megagrpo.demo.arithmetic import split_problems, worked_solution
from megagrpo.demo.realistic_workload import (
    VOCAB_SIZE,
    RealisticWarmStart,
    prepare_realistic,
)
from megagrpo.demo.tokenizer import VOCAB_SIZE as TOKENIZER_SIZE
from megagrpo.demo.tokenizer import build_demo_tokenizer
from megagrpo.demo.variable_reasoning import ReasoningLengths, reasoning_solution, reasoning_targets
from megagrpo.rewards import accuracy_reward, format_reward

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "bench_e2e.py")


def _tool():
    spec = importlib.util.spec_from_file_location("bench_e2e", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_help_lists_the_workloads():
    out = subprocess.run(
        [sys.executable, TOOL, "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "--workload" in out and "realistic" in out and "--max-tokens-per-micro-batch" in out


def test_demo_workload_keeps_one_micro_batch_of_64_and_trls_schedule():
    args = _tool()._megagrpo_overrides("demo", 20, 512)
    assert args[args.index("--micro_batch_size") + 1] == "64"
    assert "--max_tokens_per_micro_batch" not in args
    # the same learning-rate schedule as TRL's side (constant, no warmup) in both workloads
    for workload in ("demo", "realistic"):
        w = _tool()._megagrpo_overrides(workload, 20, 512)
        assert w[w.index("--lr_scheduler_type") + 1] == "constant"
        assert w[w.index("--warmup_ratio") + 1] == "0"
    realistic = _tool()._megagrpo_overrides("realistic", 5, 512)
    assert realistic[realistic.index("--max_tokens_per_micro_batch") + 1] == "512"
    assert realistic[realistic.index("--max_completion_length") + 1] == "256"


def test_qwen25_vocabulary():
    assert VOCAB_SIZE == RealisticWarmStart().vocab_size == 151_936


def test_targets_spread_from_under_16_tokens_to_near_the_cap():
    tok = build_demo_tokenizer()
    train, _ = split_problems(0)
    rows, targets = reasoning_targets(train, ReasoningLengths(), random.Random(0), variants=2)
    lengths = sorted(len(tok(t + tok.eos_token)["input_ids"]) for t in targets)
    assert lengths[0] < 16 and 240 <= lengths[-1] <= 256
    assert 22 <= lengths[len(lengths) // 2] <= 128  # most are short, as sampled completions are
    row = train[0]
    assert reasoning_solution(row, 0) == worked_solution(row)
    texts = [reasoning_solution(row, 5), reasoning_solution(row, None)]
    completions = [[{"role": "assistant", "content": t}] for t in texts]
    assert format_reward(completions) == [1.0, 0.0]
    assert accuracy_reward(completions, solution=[row["solution"]] * 2) == [1.0, 1.0]


@pytest.mark.filterwarnings("ignore")
def test_assets_at_tiny_size(tmp_path):
    from transformers import AutoConfig, AutoTokenizer

    config = RealisticWarmStart(
        steps=2, batch_size=2, pad_steps=3, pad_batch_size=1, variants=1, vocab_size=1024
    )
    data_dir, model_dir = prepare_realistic(str(tmp_path), config=config)
    assert os.path.isfile(os.path.join(data_dir, "train.jsonl"))
    assert AutoConfig.from_pretrained(model_dir).vocab_size == 1024
    assert len(AutoTokenizer.from_pretrained(model_dir)) == TOKENIZER_SIZE
    with open(os.path.join(model_dir, "assets.json")) as f:
        assets = json.load(f)
    assert assets["pad_probability"] < assets["pad_probability_before"]
    mtime = os.path.getmtime(os.path.join(model_dir, "model.safetensors"))
    prepare_realistic(str(tmp_path), config=config)  # same settings: reused
    assert os.path.getmtime(os.path.join(model_dir, "model.safetensors")) == mtime


def test_length_report():
    tool = _tool()
    log = tool.LengthLog()
    log.add([[5] * 10, [7] * 20, [3] * 255 + [300]])
    assert log.result() == {"lengths": [10, 20, 256], "max_token_id": 300, "outside": 1}
    line = tool.length_distribution(log.lengths, 256)
    assert line.startswith("n=3 min 10 ") and "[0,16): 1" in line and "=256: 1" in line


def test_peak_memory_is_the_sides_own_not_its_parents():
    """A side runs in a process the benchmark starts after building the assets in-process;
    its reported peak must be its own (Linux carries a parent's ru_maxrss over exec)."""
    ballast = bytearray(600 * 2**20)
    ballast[::4096] = b"\1" * len(ballast[::4096])  # resident in this (the parent) process
    code = (
        "import importlib.util, json; "
        f"spec = importlib.util.spec_from_file_location('bench_e2e', {TOOL!r}); "
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); "
        "print(json.dumps(m._memory()))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    own = json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_gib"]
    assert 0.005 < own < 0.4, own  # the interpreter and the tool's imports, not the 0.6 GiB
    del ballast
