"""The local code sandbox: run untrusted Python programs on test inputs, each in its own jail.

``run_programs([(source, stdin), ...], SandboxConfig(...)) -> [RunResult, ...]`` runs the programs
concurrently, each as a fresh process:

- in its own new, empty temporary directory (its working directory, ``HOME`` and ``TMPDIR``),
  deleted afterwards; the program is ``main.py`` there, stdin is the test input (a file);
- with a scrubbed environment (``PATH``, ``HOME``, ``TMPDIR``, ``LANG``, ``LC_ALL``: nothing of
  the trainer's), under the base interpreter with ``-I`` (no ``PYTHON*`` variables, no user
  site-packages, not the trainer's virtual environment);
- in new user, PID and network namespaces, under Landlock and a seccomp filter, with limits on
  CPU time, address space, file size and open files (``sandbox_launch.py`` says how);
- its stdout read up to ``max_output_bytes`` and its wall time bounded by ``timeout_seconds``:
  past either, its whole process group is killed with SIGKILL, and the PID namespace dies with it.

With ``strict`` (the default), a machine that lacks one of the isolation features (namespaces,
Landlock, seccomp) makes every run fail with ``SandboxUnavailable``; ``sandbox_features`` says
what a machine has. See docs/rewards.md for what is and is not guaranteed.
"""

from __future__ import annotations

import functools
import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

LAUNCHER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_launch.py")
SETUP_FAILED = 125
_FEATURES_LINE = "megagrpo-sandbox-features: "
_STDERR_KEPT = 4096

#: Directories the program may read (and execute from), besides the interpreter's prefix.
SYSTEM_READ_PATHS = ("/usr", "/lib", "/lib64", "/lib32", "/bin", "/etc")
#: Device files the program may read and write.
DEVICE_FILES = ("/dev/null", "/dev/zero", "/dev/urandom", "/dev/random")


class SandboxUnavailable(RuntimeError):
    """The sandbox could not be set up on this machine (a missing isolation feature)."""


@dataclass(frozen=True)
class SandboxConfig:
    """Limits of one program run in the local sandbox (the ``code_*`` script arguments)."""

    timeout_seconds: float = 5.0
    """Wall time of one run (``code_timeout_seconds``); past it the run is killed."""
    cpu_seconds: int = 5
    """CPU time of the program's process (RLIMIT_CPU, ``code_cpu_seconds``)."""
    memory_mb: int = 512
    """Address space of the program's process (RLIMIT_AS, ``code_memory_mb``)."""
    max_output_bytes: int = 1 << 20
    """Most stdout bytes read (``code_max_output_bytes``); past it the run is killed."""
    max_file_bytes: int = 16 << 20
    """Largest file the program may write in its directory (RLIMIT_FSIZE)."""
    strict: bool = True
    """Refuse to run when namespaces, Landlock or seccomp are missing (``code_sandbox_strict``)."""

    def __post_init__(self):
        checks = (
            ("code_timeout_seconds", self.timeout_seconds, 0, float),
            ("code_cpu_seconds", self.cpu_seconds, 1, int),
            ("code_memory_mb", self.memory_mb, 32, int),
            ("code_max_output_bytes", self.max_output_bytes, 1, int),
            ("max_file_bytes", self.max_file_bytes, 0, int),
        )
        for name, value, low, kind in checks:
            ok = not isinstance(value, bool) and isinstance(
                value, (int, float) if kind is float else int
            )
            if not ok or not value >= low or (kind is float and not value > 0):
                what = "a number > 0" if kind is float else f"an integer >= {low}"
                raise ValueError(f"{name}={value!r}; expected {what}")


@dataclass
class RunResult:
    """How one program run ended."""

    status: str
    """``ok`` (exit 0), ``error`` (non-zero exit), ``timeout`` (wall time), ``cpu_limit``
    (CPU time), ``output_limit`` (too much stdout) or ``killed`` (another signal)."""
    returncode: int | None
    """The program's exit code (128 + signal when a signal ended it); None when it was killed
    for a limit."""
    stdout: str
    stderr: str
    """The first few KiB of stderr."""
    seconds: float
    workdir: str
    """The run's directory (deleted when the run ends)."""


def _python() -> str:
    """The base interpreter (not a virtual environment's), with symlinks resolved."""
    return os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)


def _read_paths(python: str) -> list[str]:
    paths = [*SYSTEM_READ_PATHS, sys.base_prefix, os.path.dirname(python)]
    return list(dict.fromkeys(os.path.realpath(p) for p in paths if os.path.exists(p)))


_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}


class _Run:
    """One launched program: its process, pipes, collected output and deadline."""

    def __init__(self, source: str, stdin: str, config: SandboxConfig, report: bool):
        self.config = config
        self.workdir = tempfile.mkdtemp(prefix="megagrpo-sandbox-")
        os.chmod(self.workdir, 0o700)
        program = os.path.join(self.workdir, "main.py")
        with open(program, "w", encoding="utf-8") as f:
            f.write(source)
        python = _python()
        env = {**_ENV, "HOME": self.workdir, "TMPDIR": self.workdir}
        launch = {
            "parent": os.getpid(),
            "program": program,
            "python": python,
            "workdir": self.workdir,
            "cpu_seconds": config.cpu_seconds,
            "memory_bytes": config.memory_mb << 20,
            "file_bytes": config.max_file_bytes,
            "read_paths": _read_paths(python),
            "device_files": list(DEVICE_FILES),
            "strict": config.strict,
            "report": report,
            "env": env,
        }
        with tempfile.TemporaryFile() as stdin_file:  # a file: no pipe to feed, no deadlock
            stdin_file.write(stdin.encode("utf-8"))
            stdin_file.seek(0)
            self.proc = subprocess.Popen(
                [python, "-I", "-S", LAUNCHER, json.dumps(launch)],
                stdin=stdin_file,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                cwd=self.workdir,
                env=env,
                start_new_session=True,  # its own process group: one killpg takes all of it
                close_fds=True,
            )
        self.started = time.monotonic()
        self.deadline = self.started + config.timeout_seconds
        self.out, self.err = bytearray(), bytearray()
        self.open_pipes = 2
        self.limit: str | None = None
        self.ended: float | None = None

    def kill(self) -> None:
        """SIGKILL the process group (the launcher is not reaped yet, so its pgid is ours)."""
        if self.ended is None:
            self.ended = time.monotonic()
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def on_data(self, fileobj, data: bytes) -> None:
        if fileobj is self.proc.stdout:
            self.out += data
            if len(self.out) > self.config.max_output_bytes and self.limit is None:
                self.limit = "output_limit"
                self.kill()
        elif len(self.err) < _STDERR_KEPT:
            self.err += data[: _STDERR_KEPT - len(self.err)]

    def finish(self) -> RunResult:
        self.kill()  # stragglers of a program that closed its stdout, or one past a limit
        code = self.proc.wait()
        self.proc.stdout.close()
        self.proc.stderr.close()
        shutil.rmtree(self.workdir, ignore_errors=True)
        stderr = self.err.decode("utf-8", "replace")
        if self.limit is None and code == SETUP_FAILED and "megagrpo-sandbox:" in stderr:
            line = next(x for x in stderr.splitlines() if x.startswith("megagrpo-sandbox:"))
            raise SandboxUnavailable(
                f"the local code sandbox cannot run here: {line.partition(': ')[2]} "
                "(code_sandbox_strict: false runs programs with the isolation this machine has; "
                "see docs/rewards.md)"
            )
        if self.limit is not None:
            status, code = self.limit, None
        elif code == 0:
            status = "ok"
        elif code < 0 or code > 128:
            sig = -code if code < 0 else code - 128
            status = "cpu_limit" if sig == signal.SIGXCPU else "killed"
        else:
            status = "error"
        out = bytes(self.out[: self.config.max_output_bytes]).decode("utf-8", "replace")
        seconds = self.ended - self.started
        return RunResult(status, code, out, stderr, seconds, self.workdir)


def run_programs(jobs, config: SandboxConfig | None = None, *, report: bool = False):
    """Run every ``(source, stdin)`` of ``jobs`` at once in the sandbox; their ``RunResult``s."""
    config = config or SandboxConfig()
    runs: list[_Run] = []
    sel = selectors.DefaultSelector()
    try:
        for source, stdin in jobs:
            run = _Run(source, stdin, config, report)
            runs.append(run)
            for pipe in (run.proc.stdout, run.proc.stderr):
                os.set_blocking(pipe.fileno(), False)
                sel.register(pipe, selectors.EVENT_READ, run)
        while any(r.open_pipes and r.limit is None for r in runs):
            now = time.monotonic()
            for r in runs:
                if r.open_pipes and r.limit is None and now >= r.deadline:
                    r.limit = "timeout"
                    r.kill()
            waiting = [r.deadline for r in runs if r.open_pipes and r.limit is None]
            if not waiting:
                break
            for key, _ in sel.select(max(0.0, min(waiting) - now) + 0.001):
                run = key.data
                try:
                    data = os.read(key.fileobj.fileno(), 65536)
                except BlockingIOError:
                    continue
                if data:
                    run.on_data(key.fileobj, data)
                else:
                    sel.unregister(key.fileobj)
                    run.open_pipes -= 1
                    if not run.open_pipes and run.ended is None:
                        run.ended = time.monotonic()
    except BaseException:
        for r in runs:
            r.kill()
            r.proc.wait()
            shutil.rmtree(r.workdir, ignore_errors=True)
        raise
    finally:
        sel.close()
    return [r.finish() for r in runs]


@functools.lru_cache(maxsize=4)
def sandbox_features(strict: bool = False) -> tuple[str, ...]:
    """The isolation features this machine gives the sandbox (``userns``, ``pidns``, ``netns``,
    ``landlock=<abi>``, ``seccomp``); with ``strict``, raises SandboxUnavailable if any is
    missing."""
    (result,) = run_programs([("", "")], SandboxConfig(strict=strict), report=True)
    for line in result.stderr.splitlines():
        if line.startswith(_FEATURES_LINE):
            return tuple(f for f in line[len(_FEATURES_LINE) :].split(",") if f)
    raise SandboxUnavailable(f"the sandbox did not start: {result.status} {result.stderr!r:.300}")
