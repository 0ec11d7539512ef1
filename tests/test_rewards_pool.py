"""The reward pool: same scores as in-process scoring, in input order, and a step that never hangs.

Adversarial calls run in real spawned workers: a power tower math-verify cannot finish, a reward
that sleeps forever, one that calls ``os._exit``, one that segfaults through ctypes, one that
raises, one that allocates 64 GiB under a memory limit. Each batch must come back within the
timeout plus a small margin with every other score intact, and the pool must keep serving.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import threading
import time

import pytest
import torch

from megagrpo.config.script_args import REWARD_FUNCS, GRPOScriptArguments
from megagrpo.rewards.calls import CRASH, ERROR, SCORED, TIMEOUT
from megagrpo.rewards.pool import RewardPool, RewardPoolConfig
from megagrpo.rewards.registry import RewardFunction, build_reward_functions, reward_function
from megagrpo.rewards.scores import score_serial

TIMEOUT_S = 1.5
MARGIN_S = 2.0  # spawn-free detection is ~ms; the margin absorbs a loaded 2-core machine
OK = "<think>\nStep 1: 6*7.\n</think>\n<answer>\n$\\boxed{42}$\n</answer>"
WRONG = "<think>\nhmm\n</think>\n<answer>\n$\\boxed{41}$\n</answer>"
TOWER = "<think>\nbig\n</think>\n<answer>\n$\\boxed{9^{9^{9^{9}}}}$\n</answer>"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is not alive
        return f.read().split()[2] != "Z"


@pytest.fixture(scope="module")
def pool():
    fns = [
        reward_function("accuracy"),
        reward_function("format"),
        reward_function("_reward_fns:adversarial"),
    ]
    # math-verify's own alarm (5 s) is longer than the pool's limit: the kill must do the work.
    config = RewardPoolConfig(
        num_workers=2, timeout_seconds=TIMEOUT_S, math_timeout_seconds=5, memory_limit_mb=4096
    )
    with RewardPool(fns, config) as p:
        p.wait_ready()
        yield p
    assert not any(_alive(pid) for pid in p.pids())


def _batch(texts):
    return texts, {"solution": ["42"] * len(texts)}


def _expected_row(text):
    acc = 1.0 if "$\\boxed{42}$" in text else 0.0
    fmt = 1.0 if text.startswith("<think>\n") and text.rstrip().endswith("</answer>") else 0.0
    return [acc, fmt, float(len(text))]


def _check_intact(scores, texts, skip):
    for i, text in enumerate(texts):
        if i not in skip:
            assert scores.rewards_nk[i].tolist() == _expected_row(text), (i, text)
            assert scores.status_nk[i].tolist() == [SCORED] * 3


def test_power_tower_is_killed_and_the_rest_survives(pool):
    texts = [OK, WRONG, TOWER, OK, WRONG, OK, OK, WRONG]
    t = time.monotonic()
    scores = pool.score(*_batch(texts))
    elapsed = time.monotonic() - t
    assert elapsed < TIMEOUT_S + MARGIN_S, elapsed
    assert scores.status_nk[2].tolist() == [TIMEOUT, SCORED, SCORED]
    assert math.isnan(scores.rewards_nk[2, 0])
    assert scores.rewards_nk[2, 1:].tolist() == [1.0, float(len(TOWER))]  # format, custom intact
    _check_intact(scores, texts, skip={2})
    assert (scores.timeouts, scores.crashes, scores.errors, scores.restarts) == (1, 0, 0, 1)
    assert "accuracy_reward on sample 2: timed out after 1.5 s" in scores.error_messages


def test_sleep_forever_is_killed(pool):
    texts = [OK] * 3 + ["SLEEP " + OK] + [WRONG] * 4
    t = time.monotonic()
    scores = pool.score(*_batch(texts))
    assert time.monotonic() - t < TIMEOUT_S + MARGIN_S
    assert scores.status_nk[3].tolist() == [SCORED, SCORED, TIMEOUT]
    assert scores.rewards_nk[3, :2].tolist() == [1.0, 0.0]  # finished before the hang: kept
    _check_intact(scores, texts, skip={3})
    assert scores.timeouts == 1 and scores.restarts == 1


def test_a_timeout_also_kills_what_the_function_started(pool, tmp_path):
    texts = [OK, "SPAWN"]
    pidfile = str(tmp_path / "grandchild.pid")
    columns = {"solution": ["42", "42"], "pidfile": [pidfile, pidfile]}
    scores = pool.score(texts, columns)
    assert scores.status_nk[1].tolist() == [SCORED, SCORED, TIMEOUT]
    grandchild = int(open(pidfile).read())
    deadline = time.monotonic() + 2.0  # reaped by init once killed
    while _alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(grandchild)


def test_exit_and_segfault_are_crashes(pool):
    texts = [OK, "EXIT", WRONG, OK, "SEGV " + OK, WRONG]
    before = set(pool.pids())
    t = time.monotonic()
    scores = pool.score(*_batch(texts))
    assert time.monotonic() - t < TIMEOUT_S + MARGIN_S
    assert scores.status_nk[1].tolist() == [SCORED, SCORED, CRASH]
    assert scores.status_nk[4].tolist() == [SCORED, SCORED, CRASH]
    assert scores.rewards_nk[4, :2].tolist() == [1.0, 0.0]
    _check_intact(scores, texts, skip={1, 4})
    assert (scores.crashes, scores.timeouts, scores.restarts) == (2, 0, 2)
    assert any("exit code 3" in m for m in scores.error_messages)
    assert any("exit code -11" in m for m in scores.error_messages)  # SIGSEGV
    assert before != set(pool.pids())


def test_raise_and_out_of_memory_are_errors_without_restart(pool):
    texts = [OK, "RAISE", "ALLOC", WRONG]
    scores = pool.score(*_batch(texts))
    assert scores.status_nk[1].tolist() == [SCORED, SCORED, ERROR]
    assert scores.status_nk[2].tolist() == [SCORED, SCORED, ERROR]
    _check_intact(scores, texts, skip={1, 2})
    assert (scores.errors, scores.restarts) == (2, 0)
    assert any(
        "RuntimeError: adversarial reward raised on purpose" in m for m in scores.error_messages
    )
    assert any("MemoryError" in m for m in scores.error_messages)


def test_pool_keeps_serving_a_large_batch_in_order(pool):
    texts = [OK if i % 3 == 0 else WRONG + " " * (i % 7) for i in range(200)]
    scores = pool.score(*_batch(texts))
    _check_intact(scores, texts, skip=set())
    assert scores.restarts == 0 and scores.error_messages == []


def test_pool_equals_serial_with_every_builtin():
    fns = build_reward_functions(
        GRPOScriptArguments(
            reward_funcs=list(REWARD_FUNCS), max_completion_len=40, soft_punish_cache=20
        )
    )
    texts, golds, ids = [], [], []
    forms = [
        OK,
        WRONG,
        "1. a\n2. b\n$\\boxed{0.5}$",
        "",
        "the the the the $\\boxed{42}$",
        "<think>\nx\n</think>\n<answer>\n$\\boxed{\\frac{1}{2}}$\n</answer>\nextra",
    ]
    for i in range(48):
        texts.append([{"role": "assistant", "content": forms[i % len(forms)]}])
        golds.append(["42", "$\\frac{1}{2}$", "no gold"][(i // 4) % 3])
        ids.append(list(range((i * 7) % 53)))
    case = {"language": "python", "test_cases": [{"input": "1 2\n", "output": "3\n"}]}
    columns = {
        "solution": golds,
        "completion_ids": ids,
        "verification_info": [case] * 48,  # the code rewards' (no completion holds a program)
        "unused": list(range(48)),
    }
    ref = score_serial(fns, texts, columns, num_generations=4)
    with RewardPool(fns, RewardPoolConfig(num_workers=2, max_chunk=5)) as p:
        got = p.score(texts, columns, num_generations=4)
        pids = p.pids()
    assert torch.equal(got.status_nk, ref.status_nk)
    same = (got.rewards_nk == ref.rewards_nk) | (got.rewards_nk.isnan() & ref.rewards_nk.isnan())
    assert bool(same.all())
    assert got.nones > 0 and got.errors == 0  # the "no gold" prompts
    assert not any(_alive(pid) for pid in pids)
    assert not set(pids) & {c.pid for c in multiprocessing.active_children()}


def test_close_and_bad_input():
    p = RewardPool([reward_function("_reward_fns:constant_half")], RewardPoolConfig(num_workers=1))
    with pytest.raises(ValueError, match="column 'solution' has 1 entries for 2 completions"):
        p.score(["a", "b"], {"solution": ["x"]})
    with pytest.raises(ValueError, match="not whole groups of num_generations=2"):
        p.score(["a", "b", "c"], {}, num_generations=2)
    assert p.score(["a", "b"], {}).rewards_nk.tolist() == [[0.5], [0.5]]
    assert p.score([], {}).rewards_nk.shape == (0, 1)
    pids = p.pids()
    p.close()
    p.close()  # idempotent
    assert not any(_alive(pid) for pid in pids)
    assert not set(pids) & {c.pid for c in multiprocessing.active_children()}
    with pytest.raises(RuntimeError, match="closed"):
        p.score(["a"], {})


def test_a_function_that_cannot_be_built_in_the_worker_is_reported():
    # Built in the worker: the factory call fails there (the parent never called it).
    bad = RewardFunction("bad", "_reward_fns:constant_half", kwargs={"bogus": 1})
    p = RewardPool([bad], RewardPoolConfig(num_workers=1))
    with pytest.raises(RuntimeError, match="could not build the reward functions"):
        p.score(["a"], {})
    assert p.closed


def test_math_verify_alarm_is_the_first_line_on_the_main_thread_only():
    from megagrpo.rewards.math_accuracy import accuracy_reward, configure_math_timeout

    configure_math_timeout(1)
    try:
        t = time.monotonic()
        assert accuracy_reward([TOWER], solution=["5"]) == [None]  # alarm -> cannot score
        assert time.monotonic() - t < 10
        got = []
        th = threading.Thread(target=lambda: got.append(accuracy_reward([OK], solution=["42"])))
        th.start()
        th.join()
        assert got == [[1.0]]  # off the main thread: no signal use, no ValueError
    finally:
        configure_math_timeout(5)


def test_pool_config_from_script_args_and_errors():
    s = GRPOScriptArguments(num_reward_workers=3, reward_timeout_seconds=7.5)
    c = RewardPoolConfig.from_script_args(s, max_chunk=8)
    assert (c.num_workers, c.timeout_seconds, c.max_chunk, c.math_alarm) == (3, 7.5, 8, 2)
    assert RewardPoolConfig(timeout_seconds=1.5).math_alarm == 1
    assert RewardPoolConfig(math_timeout_seconds=0).math_alarm == 0
    with pytest.raises(ValueError, match="num_workers=0 must be >= 1"):
        RewardPoolConfig(num_workers=0)
    with pytest.raises(ValueError, match="timeout_seconds=0 must be > 0"):
        RewardPoolConfig(timeout_seconds=0)
    with pytest.raises(ValueError, match="at least one reward function"):
        RewardPool([])


def test_bench_rewards_runs_and_agrees(capsys):
    import importlib.util

    path = os.path.join(os.path.dirname(__file__), "..", "tools", "bench_rewards.py")
    spec = importlib.util.spec_from_file_location("bench_rewards", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    a, b = bench.make_workload(16, seed=3), bench.make_workload(16, seed=3)
    assert a == b and len(a[0]) == 16 and a != bench.make_workload(16, seed=4)
    bench.main(["--samples", "48", "--workers", "1", "--repeats", "1"])
    out = capsys.readouterr().out
    assert "scores identical: True" in out and "machine:" in out
