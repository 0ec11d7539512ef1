"""Run a function on N real processes joined by a gloo process group, as torchrun would.

``run_ranks(n, fn, *args)`` spawns ``n`` processes with RANK / WORLD_SIZE / LOCAL_RANK /
MASTER_ADDR / MASTER_PORT set, calls ``fn(*args)`` in each (``fn`` must be importable: a
module-level function of a test module), and returns the per-rank return values in rank order.
A failure in any rank raises with that rank's traceback; a hang is killed after ``timeout``.
"""

from __future__ import annotations

import os
import pickle
import queue
import time
import traceback

import torch.multiprocessing as mp

from megagrpo.distributed import free_port


def _entry(rank, world, port, fn, args, results):
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
    )
    import torch

    torch.set_num_threads(1)
    try:
        # Plain pickle copies tensors into the message; torch's queue reductions would share
        # them through file descriptors that vanish when this process exits.
        results.put((rank, "ok", pickle.dumps(fn(*args))))
    except BaseException:  # noqa: BLE001 - reported to the parent
        results.put((rank, "error", traceback.format_exc()))
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


class RankDied(RuntimeError):
    """A rank's process ended without an answer (killed, crashed)."""

    def __init__(self, dead):
        self.dead = dead  # [(rank, exitcode)]
        super().__init__(f"ranks died: {dead}")


def run_ranks(world: int, fn, *args, timeout: float = 240.0):
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        # not daemonic: ranks start process pools of their own (reward workers, engines)
        ctx.Process(target=_entry, args=(r, world, port, fn, args, results), daemon=False)
        for r in range(world)
    ]
    for p in procs:
        p.start()
    out, errors = {}, []
    deadline = time.monotonic() + timeout
    try:
        while len(out) < world and not errors:
            try:
                rank, status, value = results.get(timeout=0.5)
            except queue.Empty:
                dead = [
                    (r, p.exitcode)
                    for r, p in enumerate(procs)
                    if p.exitcode not in (None, 0) and r not in out
                ]
                if dead:
                    raise RankDied(dead) from None
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"{fn.__name__}: no answer from all {world} ranks in {timeout}s"
                    ) from None
                continue
            if status == "ok":
                out[rank] = pickle.loads(value)
            else:
                errors.append(f"rank {rank}:\n{value}")
                break
    finally:
        for p in procs:
            p.join(timeout=5 if not errors else 0.5)
            if p.is_alive():
                p.kill()
                p.join()
    if errors:
        raise AssertionError("\n".join(errors))
    return [out[r] for r in range(world)]
