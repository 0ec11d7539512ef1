"""The code rewards (issue 15 items 2-4): code_format on open-r1's and hand-made cases, code and
binary_code on correct and partly correct programs, and adversarial programs run in the local
sandbox: each scores 0 (or None) within its limits, leaves no process behind and leaves this
process's files, environment and network untouched."""

from __future__ import annotations

import os
import signal
import socket
import time

import pytest

from megagrpo.rewards.code_execution import (
    extract_code,
    get_code_reward,
    outputs_match,
    parse_verification_info,
)
from megagrpo.rewards.code_format import get_code_format_reward
from megagrpo.rewards.sandbox import SandboxConfig, run_programs, sandbox_features

LIMITS = dict(timeout_seconds=2.0, cpu_seconds=1, memory_mb=256, max_output_bytes=65536)


def _c(text):
    return [{"role": "assistant", "content": text}]


def _answer(code: str) -> str:
    return f"<think>\nplan\n</think>\n<answer>\n```python\n{code}\n```\n</answer>"


# ---- code_format ----
OPEN_R1_INCORRECT = [
    "```python\ndef hello():\n    print('world')\n```",
    "<think>Some thinking</think><answer>Just plain text</answer>",
    "<think>Analysis</think><answer>```javascript\nconsole.log('hello');\n```</answer>",
    "<think>Analysis</think><answer>```\ndef hello(): pass\n```</answer>",
    "<answer>```python\ndef hello(): pass\n```</answer><think>Analysis</think>",
]


def test_code_format_open_r1_cases_and_strictness():
    py, js = get_code_format_reward("python"), get_code_format_reward("javascript")
    correct = (
        "<think>\nLet's solve this\nStep 1: First step\n</think>\n<answer>\n```python\n"
        "def hello():\n    print('world')\n```\n</answer>"
    )
    two_blocks = (
        "<think>\nHere's an example:\n```python\nx = 1\n```\nNow the solution:\n</think>\n"
        "<answer>\n```python\ndef solution():\n    return 42\n```\n</answer>"
    )
    js_answer = (
        "<think>\nAnalysis\n</think>\n<answer>\n```javascript\nconsole.log('hello');\n```\n"
        "</answer>"
    )
    assert py([_c(correct), _c(two_blocks), _c(js_answer)]) == [1.0, 1.0, 0.0]
    assert js([_c(js_answer)]) == [1.0]
    assert py([_c(t) for t in OPEN_R1_INCORRECT]) == [0.0] * 5
    # megagrpo's strictness (open-r1 accepts all three): text after </answer>, ```pythonic,
    # the block only in <think>
    assert py(
        [
            _c(correct + "\nmore"),
            _c(correct.replace("```python", "```pythonic")),
            _c("<think>\n```python\nx=1\n```\n</think>\n<answer>\nx=1\n</answer>"),
        ]
    ) == [0.0, 0.0, 0.0]
    assert py([_c(correct + "\n  ")]) == [1.0]  # trailing whitespace is fine
    with pytest.raises(ValueError, match=r"code_language='c p p'"):
        get_code_format_reward("c p p")


# ---- parsing and comparison ----
def test_extract_code_and_outputs_match():
    text = "```python\na = 1\n```\nthen\n```python\nprint(2)\n```\n```js\nx\n```"
    assert extract_code(text) == "print(2)\n"  # the last Python block, as open-r1
    assert extract_code("no code") is None
    assert outputs_match("3\n", "3") and outputs_match(" 3 \n\n", "3\n")
    assert outputs_match("1\n2\n", "1 \n 2")
    assert not outputs_match("1\n", "1\n2\n")  # open-r1's zip() would pass this
    assert not outputs_match("1\n2\n3\n", "1\n2\n")
    assert outputs_match("", "\n")


PY = "python"


@pytest.mark.parametrize(
    "value, message",
    [
        (None, "holds NoneType; expected {'language': ..., 'test_cases': [...]}"),
        ("{bad json", "is a string that is not valid JSON"),
        ({"test_cases": []}, "has no 'language' string"),
        ({"language": "cpp", "test_cases": []},
         "has language 'cpp': the local code sandbox runs python programs only"),
        ({"language": PY, "test_cases": []}, "has no 'test_cases' list with at least one"),
        ({"language": PY, "test_cases": [{"input": "1"}]},
         "test_cases[0]['output'] is missing; expected a string"),
        ({"language": PY, "test_cases": [{"input": 1, "output": "1"}]},
         "test_cases[0]['input'] is int"),
        ({"language": PY, "test_cases": [{"input": "", "output": "", "type": "function_call"}]},
         "only 'stdin_stdout' tests"),
    ],
)  # fmt: skip
def test_bad_verification_info_names_sample_and_column(value, message):
    fn = get_code_reward(**LIMITS)
    with pytest.raises(ValueError) as err:
        fn([_c(_answer("print(1)"))], verification_info=[value])
    assert str(err.value).startswith("verification_info of sample 0 ")
    assert message in str(err.value)
    with pytest.raises(ValueError, match=r"needs the dataset column 'verification_info'"):
        fn([_c("x")], solution=["1"])


def test_refused_providers_and_modes():
    for provider in ("e2b", "morph"):
        with pytest.raises(ValueError, match=rf"code_provider='{provider}': megagrpo runs"):
            get_code_reward(provider=provider)
    with pytest.raises(ValueError, match=r"code_eval_scoring_mode='best'"):
        get_code_reward(scoring_mode="best")
    with pytest.raises(ValueError, match=r"code_memory_mb=8; expected an integer >= 32"):
        get_code_reward(memory_mb=8)


# ---- scoring ----
ADD = {
    "language": "python",
    "test_cases": [
        {"input": "1 2\n", "output": "3\n"},
        {"input": "5 5\n", "output": "10\n"},
        {"input": "20 22\n", "output": "42\n"},
    ],
}
CORRECT = "a, b = map(int, input().split())\nprint(a + b)"
TWO_OF_THREE = "a, b = map(int, input().split())\nprint(a + b if a < 10 else 0)"
ONE_OF_THREE = "a, b = map(int, input().split())\nprint(3)"


def test_correct_and_partial_programs_per_scoring_mode():
    programs = [CORRECT, TWO_OF_THREE, ONE_OF_THREE, "raise SystemExit(1)"]
    completions = [_c(_answer(p)) for p in programs] + [_c("no program at all")]
    cols = {"verification_info": [ADD] * 5}
    partial = get_code_reward(scoring_mode="partial", test_batch_size=3, **LIMITS)
    assert partial(completions, **cols) == pytest.approx([1.0, 2 / 3, 1 / 3, 0.0, 0.0])
    weighted = get_code_reward(scoring_mode="weighted_sum", test_batch_size=-1, **LIMITS)
    assert weighted(completions, **cols) == pytest.approx([1.1, 0.2 / 3, 0.1 / 3, 0.0, 0.0])
    binary = get_code_reward(binary=True, scoring_mode="partial", **LIMITS)  # binary wins
    assert binary(completions, **cols) == [1.0, 0.0, 0.0, 0.0, 0.0]
    # a JSON string works as well as a dict
    import json

    assert partial([completions[1]], verification_info=[json.dumps(ADD)]) == pytest.approx([2 / 3])


def test_pass_fail_stops_after_the_first_failing_batch(tmp_path):
    # the program appends to a file of its own directory; each run has a fresh empty one, so
    # the count of runs shows in the wall time instead: 3 sleeping runs in batches of 1 stop
    # after the first failure
    sleepy = "import time\ntime.sleep(0.5)\nprint(0)"
    fn = get_code_reward(scoring_mode="pass_fail", test_batch_size=1, **LIMITS)
    t0 = time.monotonic()
    assert fn([_c(_answer(sleepy))], verification_info=[ADD]) == [0.0]
    assert time.monotonic() - t0 < 1.4  # one run (~0.6 s), not three


# ---- the sandbox against hostile programs ----
def _leftovers() -> list[int]:
    """Pids of processes still running a sandbox (launcher or program)."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        if b"megagrpo-sandbox-" in cmd:
            found.append(int(pid))
    return found


def _listener(kind):
    s = socket.socket(socket.AF_INET, kind)
    s.bind(("127.0.0.1", 0))
    if kind == socket.SOCK_STREAM:
        s.listen(4)
    s.setblocking(False)
    return s


def test_sandbox_isolation_is_available():
    assert {"userns", "pidns", "netns", "seccomp"} <= set(sandbox_features(strict=True))


def test_hostile_programs_score_zero_within_limits_and_leave_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("MEGAGRPO_TEST_SECRET", "hunter2")
    victim = tmp_path / "trainer_file.txt"
    victim.write_text("precious")
    tcp, udp = _listener(socket.SOCK_STREAM), _listener(socket.SOCK_DGRAM)
    me = os.getpid()
    hostile = {
        "infinite loop": "while True:\n    pass",
        "sleep forever": "import time\ntime.sleep(10**6)",
        "fork bomb": "import os\nwhile True:\n    os.fork()",
        "subprocess": "import subprocess\nprint(subprocess.run(['echo', 'OK'], "
                      "capture_output=True).stdout.decode())",
        "10 GB allocation": "x = bytearray(10 * 2**30)\nprint('OK')",
        "write outside": f"open({str(victim)!r}, 'w').write('pwned')\n"
                         f"open({str(tmp_path / 'new.txt')!r}, 'w').write('x')\nprint('OK')",
        "write /tmp": "open('/tmp/megagrpo-escape.txt', 'w').write('x')\nprint('OK')",
        "read trainer env": "import os\nprint(os.environ.get('MEGAGRPO_TEST_SECRET'))",
        "read trainer /proc environ": f"print(open('/proc/{me}/environ', 'rb').read())",
        "tcp socket": f"import socket\nsocket.create_connection(('127.0.0.1', "
                      f"{tcp.getsockname()[1]}), timeout=1)\nprint('OK')",
        "udp socket": "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
                      f"s.sendto(b'x', ('127.0.0.1', {udp.getsockname()[1]}))\nprint('OK')",
        "kill parent": "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\nprint('OK')",
        "kill trainer": f"import os, signal\nos.kill({me}, signal.SIGKILL)\nprint('OK')",
        "kill everything": "import os, signal\nos.kill(-1, signal.SIGKILL)\nprint('OK')",
        "output flood": "while True:\n    print('x' * 4096)",
        "escape the group": "import os\nos.setsid()\nprint('OK')",
    }  # fmt: skip
    # the expected output is what a successful attack would print: a pass would mean an escape
    tests = {"language": "python", "test_cases": [{"input": "", "output": "OK\n"}]}
    env_case = {"language": "python", "test_cases": [{"input": "", "output": "hunter2\n"}]}
    infos = [env_case if "env" in name else tests for name in hostile]
    fn = get_code_reward(test_batch_size=1, **LIMITS)
    t0 = time.monotonic()
    scores = fn([_c(_answer(p)) for p in hostile.values()], verification_info=infos)
    elapsed = time.monotonic() - t0
    assert dict(zip(hostile, scores)) == {name: 0.0 for name in hostile}
    assert elapsed < 3 * LIMITS["timeout_seconds"] + 10, elapsed  # two runs hit the wall limit
    assert _leftovers() == []
    assert victim.read_text() == "precious" and not (tmp_path / "new.txt").exists()
    assert not os.path.exists("/tmp/megagrpo-escape.txt")
    assert os.environ["MEGAGRPO_TEST_SECRET"] == "hunter2"
    with pytest.raises(BlockingIOError):
        tcp.accept()
    with pytest.raises(BlockingIOError):
        udp.recvfrom(16)
    tcp.close()
    udp.close()


def test_runs_end_for_the_right_reason_within_limits():
    jobs = [
        ("import time\ntime.sleep(100)", ""),
        ("x = bytearray(10 * 2**30)", ""),
        ("while True:\n    print('x' * 4096)", ""),
        ("import os, sys\nprint(sorted(os.environ), os.getcwd() == os.environ['HOME'], "
         "os.listdir('.'), sys.stdin.read())", "in put"),
    ]  # fmt: skip
    limits = SandboxConfig(timeout_seconds=2.5, cpu_seconds=1, memory_mb=256, max_output_bytes=8192)
    results = run_programs(jobs, limits)
    assert [r.status for r in results] == ["timeout", "error", "output_limit", "ok"]
    assert 2.4 < results[0].seconds < 4.0
    assert "MemoryError" in results[1].stderr
    assert len(results[2].stdout) == 8192
    assert results[3].stdout == (
        "['HOME', 'LANG', 'LC_ALL', 'PATH', 'TMPDIR'] True ['main.py'] in put\n"
    )
    assert all(not os.path.exists(r.workdir) for r in results)  # directories deleted
    # a busy loop ends on its CPU time (1 s, SIGXCPU) long before a generous wall limit, however
    # loaded the machine is
    (loop,) = run_programs(
        [("while True:\n    pass", "")], SandboxConfig(timeout_seconds=30, cpu_seconds=1)
    )
    assert loop.status == "cpu_limit" and loop.returncode == 128 + signal.SIGXCPU
    assert _leftovers() == []


def test_scores_are_computed_in_the_pool_and_a_stuck_sample_costs_one_timeout():
    """Inside reward-pool workers: correct, partial and hostile programs score as in-process;
    a program slow on every test case runs past the pool's limit (None, the worker replaced)
    and its sandboxes die with the worker."""
    from megagrpo.rewards.calls import SCORED, TIMEOUT
    from megagrpo.rewards.pool import RewardPool, RewardPoolConfig
    from megagrpo.rewards.registry import RewardFunction

    fn = RewardFunction(
        "code_reward",
        "megagrpo.rewards.code_execution:get_code_reward",
        {"test_batch_size": 1, **LIMITS, "timeout_seconds": 1.0},
    )
    slow = "import time\ntime.sleep(100)"
    programs = [CORRECT, TWO_OF_THREE, "import os\nwhile True:\n    os.fork()", slow]
    with RewardPool([fn], RewardPoolConfig(num_workers=1, timeout_seconds=2.5)) as pool:
        scores = pool.score(
            [_c(_answer(p)) for p in programs], {"verification_info": [ADD] * len(programs)}
        )
        assert scores.by_name()["code_reward"][:3] == pytest.approx([1.0, 2 / 3, 0.0])
        assert scores.by_name()["code_reward"][3] is None
        assert scores.status_nk[:, 0].tolist() == [SCORED, SCORED, SCORED, TIMEOUT]
        assert _wait_until(lambda: not _leftovers(), 5), _leftovers()
        # the replacement worker scores the next batch
        again = pool.score([_c(_answer(CORRECT))], {"verification_info": [ADD]})
        assert again.by_name()["code_reward"] == [1.0]


def _wait_until(condition, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)
    return condition()


def test_sandbox_killed_with_its_parent():
    """A sandboxed program outlives nothing: SIGKILL of the process that launched it takes the
    launcher, the PID namespace's init and the program with it."""
    import subprocess
    import sys

    import psutil

    code = (
        "from megagrpo.rewards.sandbox import run_programs, SandboxConfig\n"
        "run_programs([('import time\\ntime.sleep(100)', '')], SandboxConfig(timeout_seconds=60))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    parent = subprocess.Popen([sys.executable, "-c", code], env=env)

    def sandbox():  # launcher, PID-namespace init, program
        try:
            kids = psutil.Process(parent.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        return [k.pid for k in kids if k.pid in _leftovers()]

    assert _wait_until(lambda: len(sandbox()) == 3, 30), "the sandbox did not start"
    pids = sandbox()
    parent.send_signal(signal.SIGKILL)
    parent.wait()

    def alive():
        return [p for p in pids if psutil.pid_exists(p) and p in _leftovers()]

    assert _wait_until(lambda: not alive(), 5), alive()


def test_parse_verification_info_reads_dicts_and_json():
    cases = parse_verification_info(ADD)
    assert [(c.input, c.output) for c in cases][0] == ("1 2\n", "3\n")
