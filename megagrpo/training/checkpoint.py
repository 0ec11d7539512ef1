"""Training checkpoints: atomic, rotated, resumable.

```
<output_dir>/checkpoint-<step>/
    megagrpo_megatron.json, hf/, mp_rank_TT_PPP/model.safetensors   the policy (megatron shards)
    optimizer/mp_rank_TT_PPP.pt           optimizer state of that model-parallel rank
    optimizer/mp_rank_TT_PPP_params.pt    distributed optimizer only: parameter state (DP rank 0)
    rng/rank_NNNNN.pt                     python, numpy, torch, CUDA and megatron RNG states
    reference/                            sync_ref_model only, once synced: the reference model's
                                          megatron shards (as the policy's)
    trainer_state.json                    step, data position, layout, last metrics
    COMPLETE                              written last: the checkpoint is whole
```
Every rank writes its files into ``.checkpoint-<step>.tmp``; after a barrier global rank 0
writes the state and the marker, fsyncs, and renames the directory into place, then deletes the
oldest complete checkpoints beyond ``save_total_limit``. A crash at any point leaves either the
previous checkpoints untouched or a temporary directory that resuming ignores. The model part is
a megagrpo megatron checkpoint, so ``megagrpo convert megatron-to-hf`` turns any checkpoint into
Hugging Face files.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist

from megagrpo.conversion.hf_weights import load_megatron_shards, save_megatron_shards
from megagrpo.conversion.megatron_format import HF_FILES_DIR, rank_dir

PREFIX = "checkpoint-"
REFERENCE_DIR = "reference"
COMPLETE = "COMPLETE"
STATE_FILE = "trainer_state.json"
_NAME = re.compile(r"^checkpoint-(\d+)$")


@dataclass
class TrainerState:
    """What besides weights and optimizer a run needs to continue exactly."""

    step: int
    sampler: dict = field(default_factory=dict)
    layout: dict = field(default_factory=dict)
    """tp, pp, vpp, dp sizes the checkpoint was written with."""
    metrics: dict = field(default_factory=dict)
    """The last logged metrics (for the record)."""
    extra: dict = field(default_factory=dict)


def complete_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """(step, path) of every complete checkpoint under ``output_dir``, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        m = _NAME.match(name)
        path = os.path.join(output_dir, name)
        if m and os.path.isfile(os.path.join(path, COMPLETE)):
            found.append((int(m.group(1)), path))
    return sorted(found)


def remove_interrupted_saves(output_dir: str) -> list[str]:
    """Delete the temporary directories of saves a crash cut off; returns their names."""
    if not os.path.isdir(output_dir):
        return []
    stale = [n for n in os.listdir(output_dir) if n.startswith(f".{PREFIX}") and n.endswith(".tmp")]
    for name in stale:
        shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)
    return stale


def latest_checkpoint(output_dir: str) -> str | None:
    found = complete_checkpoints(output_dir)
    return found[-1][1] if found else None


def resolve_resume(output_dir: str, resume_from_checkpoint) -> str | None:
    """The checkpoint to resume from: an explicit path, or (True / None) the newest complete one
    under output_dir ("checks for existing checkpoints"), or nothing (False)."""
    if resume_from_checkpoint is False:
        return None
    if isinstance(resume_from_checkpoint, str):
        path = resume_from_checkpoint
        if not os.path.isdir(path):
            raise FileNotFoundError(f"resume_from_checkpoint={path!r}: no such directory")
        if not os.path.isfile(os.path.join(path, COMPLETE)):
            raise ValueError(
                f"resume_from_checkpoint={path!r}: the checkpoint is incomplete (no {COMPLETE} "
                "marker; the run that wrote it stopped while saving)"
            )
        return path
    return latest_checkpoint(output_dir)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _save_torch(obj, path: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _rng_state() -> dict:
    import numpy as np
    from megatron.core import tensor_parallel

    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "megatron": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    import numpy as np
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["megatron"])


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def save_checkpoint(
    output_dir: str,
    state: TrainerState,
    chunks,
    optimizer,
    arch,
    groups,
    *,
    save_total_limit: int | None = None,
    hf_source_dir: str | None = None,
    distributed_optimizer: bool = False,
    reference_chunks=None,
) -> str:
    """Save atomically; every rank calls it. Returns the checkpoint directory.
    ``reference_chunks``: a reference model whose weights moved (sync_ref_model), saved too."""
    final = os.path.join(output_dir, f"{PREFIX}{state.step}")
    tmp = os.path.join(output_dir, f".{PREFIX}{state.step}.tmp")
    if groups.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        for sub in ("optimizer", "rng"):
            os.makedirs(os.path.join(tmp, sub), exist_ok=True)
    _barrier()
    save_megatron_shards(chunks, tmp, arch, groups)
    if reference_chunks is not None:
        save_megatron_shards(reference_chunks, os.path.join(tmp, REFERENCE_DIR), arch, groups)
    mp_name = rank_dir(groups.tp_rank, groups.pp_rank)
    if distributed_optimizer:  # collective over DP; DP rank 0 writes
        optimizer.save_parameter_state(os.path.join(tmp, "optimizer", f"{mp_name}_params.pt"))
    if groups.dp_rank == 0 and groups.cp_rank == 0:
        _save_torch(optimizer.state_dict(), os.path.join(tmp, "optimizer", f"{mp_name}.pt"))
    _save_torch(_rng_state(), os.path.join(tmp, "rng", f"rank_{groups.rank:05d}.pt"))
    _barrier()
    if groups.rank == 0:
        if hf_source_dir:  # tokenizer and config files travel with every checkpoint
            from megagrpo.conversion.megatron_format import copy_side_files

            copy_side_files(hf_source_dir, os.path.join(tmp, HF_FILES_DIR))
        with open(os.path.join(tmp, STATE_FILE), "w", encoding="utf-8") as f:
            json.dump(asdict(state), f, indent=2, sort_keys=True, default=str)
            f.flush()
            os.fsync(f.fileno())
        with open(os.path.join(tmp, COMPLETE), "w") as f:
            f.write(f"{state.step}\n")
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(output_dir)
        if save_total_limit:
            for _, old in complete_checkpoints(output_dir)[:-save_total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def load_checkpoint(
    path: str, chunks, optimizer, arch, groups, *, distributed_optimizer: bool = False
) -> TrainerState:
    """Restore model, optimizer, RNG and trainer state saved by ``save_checkpoint``."""
    with open(os.path.join(path, STATE_FILE), encoding="utf-8") as f:
        state = TrainerState(**json.load(f))
    load_megatron_shards(chunks, path, arch, groups)
    mp_name = rank_dir(groups.tp_rank, groups.pp_rank)
    opt_path = os.path.join(path, "optimizer", f"{mp_name}.pt")
    optimizer.load_state_dict(torch.load(opt_path, weights_only=False))
    if distributed_optimizer:
        optimizer.load_parameter_state(os.path.join(path, "optimizer", f"{mp_name}_params.pt"))
    rng = os.path.join(path, "rng", f"rank_{groups.rank:05d}.pt")
    if os.path.isfile(rng):
        _set_rng_state(torch.load(rng, weights_only=False))
    return state


def load_reference(path: str, chunks, arch, groups) -> bool:
    """Restore a synced reference model's weights from checkpoint ``path``; False (nothing
    loaded) when the checkpoint holds none (the reference had not moved when it was saved)."""
    directory = os.path.join(path, REFERENCE_DIR)
    if not os.path.isdir(directory):
        return False
    load_megatron_shards(chunks, directory, arch, groups)
    return True
