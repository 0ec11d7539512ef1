"""The reward pool's worker process: score chunks of samples, one reward call at a time.

Shared memory with the parent (created by the parent, one set per worker):

- ``progress`` (4 doubles): [busy, position in chunk, function index, start time]. ``busy`` is
  written last before a call and cleared first after it, so a parent that reads ``busy == 1``
  reads that call's start time (``time.monotonic`` is system-wide on Linux).
- ``values`` / ``status`` (chunk capacity x K): each call's value and status, written as soon as
  the call returns, so a parent that kills this process mid-chunk keeps every finished call.

The worker sends ``("ready", pid)`` once its functions are built, ``("done", task_id, errors)``
after each chunk, ``("fatal", message)`` if a function cannot be built. It stops on ``None`` or
when the parent's end of the pipe closes.
"""

from __future__ import annotations

import os
import signal
import time
import traceback

from megagrpo.rewards.calls import call_one

BUSY, POS, FUNC, START = 0, 1, 2, 3
MAX_ERRORS_PER_CHUNK = 8


def _limit_memory(limit_bytes: int | None) -> None:
    if limit_bytes:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (limit_bytes, limit_bytes))


def worker_main(conn, functions, progress, values, status, math_timeout, memory_limit) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    os.setpgid(0, 0)  # own process group: a kill also takes whatever a reward function started
    try:
        from megagrpo.rewards.math_accuracy import configure_math_timeout

        configure_math_timeout(math_timeout)
        fns = [f.load() for f in functions]
        if any(f.hang_group == "math_verify" for f in functions):
            from megagrpo.rewards.math_accuracy import warm_up

            warm_up()
        _limit_memory(memory_limit)
    except BaseException:  # noqa: BLE001 - reported to the parent, which raises it
        conn.send(("fatal", traceback.format_exc()))
        return
    conn.send(("ready", os.getpid()))
    k_total = len(functions)
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return  # the parent is gone
        if msg is None:
            return
        task_id, items = msg
        errors: list[str] = []
        for pos, (i, completion, row, funcs) in enumerate(items):
            for k in funcs:
                progress[START] = time.monotonic()
                progress[POS] = pos
                progress[FUNC] = k
                progress[BUSY] = 1.0
                st, value, err = call_one(fns[k], completion, row)
                values[pos * k_total + k] = value
                status[pos * k_total + k] = st
                progress[BUSY] = 0.0
                if err and len(errors) < MAX_ERRORS_PER_CHUNK:
                    errors.append(f"{functions[k].name} on sample {i}: {err}")
        conn.send(("done", task_id, errors))
