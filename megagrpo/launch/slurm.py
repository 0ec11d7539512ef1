"""The command each node of a slurm job runs (used by ``launch/slurm/train.sbatch``).

    python -m megagrpo.launch.slurm --gpus-per-node 8 [--rollout-nodes K] -- <train args>

prints, for the node it runs on (``SLURM_NODEID``), the command line to execute:

- trainer nodes: ``torchrun`` with the rendezvous taken from slurm's environment (the first
  trainer node of ``SLURM_JOB_NODELIST`` hosts it, the job id names it) running
  ``megagrpo train <train args>``;
- with ``--rollout-nodes K``, the first K nodes instead run one ``megagrpo rollout-server`` per
  GPU (vLLM, tensor-parallel size from ``--rollout-tp``), and the trainer gets
  ``--use_vllm true --vllm_mode server --vllm_server_addresses`` listing all of them.

Only the standard slurm variables are read: SLURM_JOB_NODELIST, SLURM_NNODES, SLURM_NODEID,
SLURM_JOB_ID.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys

_RANGE = re.compile(r"^(\d+)-(\d+)$")


def expand_nodelist(nodelist: str) -> list[str]:
    """``node[01-03,07],gpu-a[1-2]`` -> the host names, as ``scontrol show hostnames`` would."""
    hosts, i, n = [], 0, len(nodelist)
    while i < n:
        j = i
        depth = 0
        while j < n and (nodelist[j] != "," or depth):
            depth += {"[": 1, "]": -1}.get(nodelist[j], 0)
            j += 1
        hosts += _expand_one(nodelist[i:j])
        i = j + 1
    return hosts


def _expand_one(item: str) -> list[str]:
    m = re.match(r"^([^\[]*)\[([^\]]+)\](.*)$", item)
    if not m:
        return [item] if item else []
    prefix, body, rest = m.groups()
    out = []
    for part in body.split(","):
        r = _RANGE.match(part)
        if r:
            lo, hi = r.groups()
            width = len(lo)
            names = [f"{prefix}{k:0{width}d}" for k in range(int(lo), int(hi) + 1)]
        else:
            names = [prefix + part]
        out += [name + tail for name in names for tail in _expand_one(rest) or [""]]
    return out


def _env(env, name: str) -> str:
    if name not in env:
        raise SystemExit(f"{name} is not set: run this inside a slurm allocation (sbatch/srun)")
    return env[name]


def node_command(
    env: dict,
    gpus_per_node: int,
    train_args: list[str],
    *,
    rollout_nodes: int = 0,
    rollout_tp: int = 1,
    port: int = 29500,
    server_port: int = 8000,
    model: str | None = None,
) -> list[str]:
    """The argv this node runs."""
    hosts = expand_nodelist(_env(env, "SLURM_JOB_NODELIST"))
    nnodes = int(_env(env, "SLURM_NNODES"))
    node_id = int(_env(env, "SLURM_NODEID"))
    job_id = _env(env, "SLURM_JOB_ID")
    if len(hosts) != nnodes:
        raise SystemExit(f"SLURM_JOB_NODELIST has {len(hosts)} hosts but SLURM_NNODES={nnodes}")
    if not 0 <= rollout_nodes < nnodes:
        raise SystemExit(
            f"--rollout-nodes={rollout_nodes} must leave at least one of the "
            f"{nnodes} nodes for training"
        )
    if gpus_per_node % rollout_tp:
        raise SystemExit(f"--rollout-tp={rollout_tp} must divide --gpus-per-node={gpus_per_node}")
    servers_per_node = gpus_per_node // rollout_tp
    addresses = [
        f"{h}:{server_port + k}" for h in hosts[:rollout_nodes] for k in range(servers_per_node)
    ]
    if node_id < rollout_nodes:
        if model is None:
            raise SystemExit("--rollout-nodes needs --model (the HF directory the servers load)")
        script = " & ".join(
            f"CUDA_VISIBLE_DEVICES={','.join(str(k * rollout_tp + g) for g in range(rollout_tp))}"
            f" megagrpo rollout-server --engine vllm --model {shlex.quote(model)}"
            f" --host 0.0.0.0 --port {server_port + k}"
            f" --vllm-tensor-parallel-size {rollout_tp}"
            for k in range(servers_per_node)
        )
        return ["bash", "-c", script + " & wait"]
    trainers = hosts[rollout_nodes:]
    extra = []
    if rollout_nodes:
        extra = [
            "--use_vllm",
            "true",
            "--vllm_mode",
            "server",
            "--vllm_server_addresses",
            ",".join(addresses),
        ]
    return [
        "torchrun",
        f"--nnodes={len(trainers)}",
        f"--nproc-per-node={gpus_per_node}",
        f"--node-rank={node_id - rollout_nodes}",
        f"--rdzv-id={job_id}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={trainers[0]}:{port}",
        "-m",
        "megagrpo.cli",
        "train",
        *train_args,
        *extra,
    ]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    train_args = argv[argv.index("--") + 1 :] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(prog="python -m megagrpo.launch.slurm", description=__doc__)
    p.add_argument("--gpus-per-node", type=int, required=True)
    p.add_argument("--rollout-nodes", type=int, default=0)
    p.add_argument("--rollout-tp", type=int, default=1)
    p.add_argument("--port", type=int, default=29500)
    p.add_argument("--server-port", type=int, default=8000)
    p.add_argument("--model", default=None)
    a = p.parse_args(own)
    cmd = node_command(
        dict(os.environ),
        a.gpus_per_node,
        train_args,
        rollout_nodes=a.rollout_nodes,
        rollout_tp=a.rollout_tp,
        port=a.port,
        server_port=a.server_port,
        model=a.model,
    )
    print(shlex.join(cmd))
    return 0


if __name__ == "__main__":
    sys.exit(main())
