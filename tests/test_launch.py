"""torchrun and slurm launchers: the one-node script under real torchrun, the slurm command."""

from __future__ import annotations

import os
import stat
import subprocess

import pytest

from megagrpo.launch.slurm import expand_nodelist, node_command

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(ROOT, "launch", "configs", "qwen2.5-1.5b-openr1-demo.yaml")


def test_train_sh_dry_run_under_torchrun_with_two_processes():
    env = {**os.environ, "NPROC": "2", "OMP_NUM_THREADS": "1"}
    r = subprocess.run(
        [os.path.join(ROOT, "launch", "train.sh"), "--config", RECIPE, "--dry-run"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    # WORLD_SIZE=2 came from torchrun; only rank 0 printed the plan
    assert r.stdout.count("# layout: world 2 = TP 1 x PP 1 x CP 1 x DP 2") == 1


@pytest.mark.parametrize(
    "nodelist,expected",
    [
        ("gpu-[01-03]", ["gpu-01", "gpu-02", "gpu-03"]),
        ("a[1,3-4],b7", ["a1", "a3", "a4", "b7"]),
        ("n[008-010]", ["n008", "n009", "n010"]),
        ("single", ["single"]),
        ("r[1-2]-c[1-2]", ["r1-c1", "r1-c2", "r2-c1", "r2-c2"]),
    ],
)
def test_expand_nodelist(nodelist, expected):
    assert expand_nodelist(nodelist) == expected


SLURM = {"SLURM_JOB_NODELIST": "gpu-[01-03]", "SLURM_NNODES": "3", "SLURM_JOB_ID": "4242"}


def test_trainer_node_command():
    cmd = node_command({**SLURM, "SLURM_NODEID": "1"}, 8, ["--config", "r.yaml"])
    assert cmd == [
        "torchrun",
        "--nnodes=3",
        "--nproc-per-node=8",
        "--node-rank=1",
        "--rdzv-id=4242",
        "--rdzv-backend=c10d",
        "--rdzv-endpoint=gpu-01:29500",
        "-m",
        "megagrpo.cli",
        "train",
        "--config",
        "r.yaml",
    ]


def test_rollout_nodes():
    env = {**SLURM, "SLURM_NODEID": "0"}
    server = node_command(env, 8, [], rollout_nodes=1, rollout_tp=4, model="/m")
    assert server[:2] == ["bash", "-c"]
    assert (
        "CUDA_VISIBLE_DEVICES=0,1,2,3 megagrpo rollout-server --engine vllm --model /m" in server[2]
        and "CUDA_VISIBLE_DEVICES=4,5,6,7" in server[2]
        and "--port 8001" in server[2]
    )
    trainer = node_command(
        {**SLURM, "SLURM_NODEID": "2"},
        8,
        ["--config", "r.yaml"],
        rollout_nodes=1,
        rollout_tp=4,
        model="/m",
    )
    assert "--nnodes=2" in trainer and "--node-rank=1" in trainer
    assert "--rdzv-endpoint=gpu-02:29500" in trainer
    assert trainer[-6:] == [
        "--use_vllm",
        "true",
        "--vllm_mode",
        "server",
        "--vllm_server_addresses",
        "gpu-01:8000,gpu-01:8001",
    ]


def test_bad_slurm_environment():
    with pytest.raises(SystemExit, match="SLURM_NODEID is not set"):
        node_command(SLURM, 8, [])
    with pytest.raises(SystemExit, match="has 3 hosts but SLURM_NNODES=2"):
        node_command({**SLURM, "SLURM_NNODES": "2", "SLURM_NODEID": "0"}, 8, [])
    with pytest.raises(SystemExit, match="must leave at least one"):
        node_command({**SLURM, "SLURM_NODEID": "0"}, 8, [], rollout_nodes=3)


def _fake(bin_dir, name, body):
    path = bin_dir / name
    path.write_text("#!/usr/bin/env bash\n" + body + "\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def test_sbatch_script_builds_the_torchrun_line(tmp_path):
    """Run the sbatch script with fake srun (runs the task here, as node 2 of 3) and torchrun."""
    fake = tmp_path / "bin"
    fake.mkdir()
    _fake(fake, "srun", 'while [[ "$1" == --* ]]; do shift; done; exec "$@"')
    _fake(fake, "torchrun", 'echo "TORCHRUN $*"')
    env = {
        **os.environ,
        **SLURM,
        "SLURM_NODEID": "2",
        "PATH": f"{fake}:{os.environ['PATH']}",
        "GPUS_PER_NODE": "4",
    }
    r = subprocess.run(
        [
            "bash",
            os.path.join(ROOT, "launch", "slurm", "train.sbatch"),
            "--config",
            "my recipe.yaml",
            "--learning_rate",
            "1e-6",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == (
        "TORCHRUN --nnodes=3 --nproc-per-node=4 --node-rank=2 --rdzv-id=4242 "
        "--rdzv-backend=c10d --rdzv-endpoint=gpu-01:29500 -m megagrpo.cli train "
        "--config my recipe.yaml --learning_rate 1e-6"
    )


def test_megagrpo_bench_runs_the_tools_benchmark_with_its_arguments():
    import re
    import sys

    cli = [sys.executable, "-m", "megagrpo.cli", "bench"]
    out = subprocess.run(
        [*cli, "kernel-memory", "--", "--n", "512", "--v", "32000"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    ratios = re.findall(
        r"(fwd|fwdbwd): chunked / eager\(fp32 upcast\) peak extra = ([\d.]+)%", out.stdout
    )
    assert [r[0] for r in ratios] == ["fwd", "fwdbwd"], out.stdout
    # the chunked reference needs less than the eager log_softmax + gather it replaces
    assert all(float(r[1]) < 100.0 for r in ratios), out.stdout
    bad = subprocess.run([*cli, "nonsense"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "kernel-memory" in bad.stderr
