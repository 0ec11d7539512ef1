"""The sandbox's launcher: run as a script (``python -I -S sandbox_launch.py CONFIG_JSON``) by
``megagrpo.rewards.sandbox``, never imported. It imports nothing from megagrpo.

Three processes (legend: L = this launcher, P1 = init of the new PID namespace, P2 = the program):

1. L dies with its parent (``PR_SET_PDEATHSIG``), then unshares a user, a PID and a network
   namespace: the program gets no capability on the host, sees no other process and has no
   network interface but a loopback that is down.
2. L forks P1, the PID namespace's init. When P1 exits or is killed, the kernel kills every
   process left in the namespace; P1 also dies with L.
3. P1 forks P2, which limits itself (CPU time, address space, file size, open files, no core),
   restricts its file system access with Landlock (read: the interpreter and system directories;
   write: the work directory only; no TCP bind/connect; no signals or abstract sockets outside),
   forbids new processes and session changes with a seccomp filter, and execs the interpreter on
   the program with a scrubbed environment.

Exit status: the program's (128 + signal when a signal ended it); 125 with a
``megagrpo-sandbox:`` line on stderr when the sandbox could not be set up (with ``strict``, any
missing isolation feature is such a failure).
"""

import ctypes
import json
import os
import platform
import resource
import signal
import struct
import sys

SETUP_FAILED = 125
PR_SET_PDEATHSIG, PR_SET_SECCOMP, PR_SET_NO_NEW_PRIVS = 1, 22, 38
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
CLONE_THREAD = 0x00010000
SYS_LANDLOCK_CREATE, SYS_LANDLOCK_ADD_RULE, SYS_LANDLOCK_RESTRICT = 444, 445, 446
SYS_CLONE3 = 435
# arch -> (AUDIT_ARCH, clone, fork, vfork, setsid, setpgid); None: no such syscall
ARCHES = {
    "x86_64": (0xC000003E, 56, 57, 58, 112, 109),
    "aarch64": (0xC00000B7, 220, None, None, 157, 154),
}
EAGAIN, EPERM, ENOSYS = 11, 1, 38

libc = ctypes.CDLL(None, use_errno=True)


def fail(message: str) -> None:
    os.write(2, f"megagrpo-sandbox: {message}\n".encode())
    os._exit(SETUP_FAILED)


def _arg(a):
    return (
        a if a is None or isinstance(a, (ctypes._SimpleCData, ctypes.Array)) else ctypes.c_long(a)
    )


def syscall(nr: int, *args) -> int:
    r = libc.syscall(ctypes.c_long(nr), *[_arg(a) for a in args])
    if r < 0:
        raise OSError(ctypes.get_errno(), f"syscall {nr}: {os.strerror(ctypes.get_errno())}")
    return r


def prctl(option: int, arg=0) -> None:
    zero = ctypes.c_ulong(0)
    arg = arg if isinstance(arg, ctypes.Array) else ctypes.c_ulong(arg)
    if libc.prctl(ctypes.c_int(option), arg, zero, zero, zero) != 0:
        raise OSError(ctypes.get_errno(), f"prctl {option}: {os.strerror(ctypes.get_errno())}")


def die_with_parent(parent: int, outside: bool = False) -> None:
    """Get SIGKILL when the parent dies; ``outside``: the parent is outside this process's PID
    namespace (its pid reads 0 here)."""
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != (0 if outside else parent):  # the parent died before the line above
        os._exit(SETUP_FAILED)


# ---- Landlock ----
FS_EXECUTE, FS_WRITE_FILE, FS_READ_FILE, FS_READ_DIR = 1, 2, 4, 8


def landlock(workdir: str, read_paths: list, device_files: list) -> int:
    """Restrict this process (and what it execs) to reading ``read_paths``, reading and writing
    ``device_files``, and everything under ``workdir``; returns the Landlock ABI (0: none)."""
    try:
        abi = syscall(SYS_LANDLOCK_CREATE, None, 0, 1)  # LANDLOCK_CREATE_RULESET_VERSION
    except OSError:
        return 0
    handled = (1 << 13) - 1  # ABI 1: execute .. make_sym
    if abi >= 2:
        handled |= 1 << 13  # refer
    if abi >= 3:
        handled |= 1 << 14  # truncate
    if abi >= 5:
        handled |= 1 << 15  # ioctl_dev
    net = 0b11 if abi >= 4 else 0  # bind_tcp, connect_tcp: no rule allows either
    scoped = 0b11 if abi >= 6 else 0  # abstract unix sockets, signals
    size = 8 if abi < 4 else 16 if abi < 6 else 24
    attr = ctypes.create_string_buffer(struct.pack("QQQ", handled, net, scoped)[:size], size)
    ruleset = syscall(SYS_LANDLOCK_CREATE, attr, size, 0)

    def allow(path: str, access: int) -> None:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        try:
            rule = ctypes.create_string_buffer(struct.pack("=Qi", access, fd), 12)
            syscall(SYS_LANDLOCK_ADD_RULE, ruleset, 1, rule, 0)  # LANDLOCK_RULE_PATH_BENEATH
        finally:
            os.close(fd)

    for path in read_paths:
        if os.path.isdir(path):
            allow(path, FS_EXECUTE | FS_READ_FILE | FS_READ_DIR)
        elif os.path.exists(path):
            allow(path, FS_EXECUTE | FS_READ_FILE)
    for path in device_files:
        if os.path.exists(path):
            allow(path, FS_READ_FILE | FS_WRITE_FILE)
    allow(workdir, handled)
    syscall(SYS_LANDLOCK_RESTRICT, ruleset, 0)
    os.close(ruleset)
    return abi


# ---- seccomp: no new processes, no new session or process group ----
def _bpf(code: int, jt: int, jf: int, k: int) -> bytes:
    return struct.pack("HBBI", code, jt, jf, k)


def seccomp_no_processes() -> bool:
    spec = ARCHES.get(platform.machine())
    if spec is None:
        return False
    audit_arch, clone, fork, vfork, setsid, setpgid = spec
    ld_w_abs, jeq, jge, jset, ret = 0x20, 0x15, 0x35, 0x45, 0x06
    allow, kill = 0x7FFF0000, 0x80000000
    errno = lambda e: 0x00050000 | e  # noqa: E731
    denied = [(n, EAGAIN) for n in (fork, vfork) if n is not None]
    denied += [(setsid, EPERM), (setpgid, EPERM), (SYS_CLONE3, ENOSYS)]  # glibc falls back to clone
    prog = [_bpf(ld_w_abs, 0, 0, 4), _bpf(jeq, 1, 0, audit_arch), _bpf(ret, 0, 0, kill)]
    prog += [_bpf(ld_w_abs, 0, 0, 0), _bpf(jge, 0, 1, 0x40000000), _bpf(ret, 0, 0, kill)]
    for nr, err in denied:
        prog += [_bpf(jeq, 0, 1, nr), _bpf(ret, 0, 0, errno(err))]
    # clone: threads only (CLONE_THREAD in the low word of the flags, args[0] at offset 16)
    prog += [_bpf(jeq, 0, 3, clone), _bpf(ld_w_abs, 0, 0, 16), _bpf(jset, 1, 0, CLONE_THREAD)]
    prog += [_bpf(ret, 0, 0, errno(EAGAIN)), _bpf(ret, 0, 0, allow)]
    code = b"".join(prog)
    buf = ctypes.create_string_buffer(code, len(code))
    fprog = ctypes.create_string_buffer(struct.pack("HP", len(prog), ctypes.addressof(buf)))
    zero = ctypes.c_ulong(0)
    mode_filter = ctypes.c_ulong(2)  # SECCOMP_MODE_FILTER
    return libc.prctl(ctypes.c_int(PR_SET_SECCOMP), mode_filter, fprog, zero, zero) == 0


def limit(cfg: dict) -> None:
    cpu = int(cfg["cpu_seconds"])
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))  # SIGXCPU, then SIGKILL
    resource.setrlimit(resource.RLIMIT_AS, (cfg["memory_bytes"], cfg["memory_bytes"]))
    resource.setrlimit(resource.RLIMIT_FSIZE, (cfg["file_bytes"], cfg["file_bytes"]))
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def program(cfg: dict, features: list) -> None:
    """P2: limit, confine and exec the program (never returns)."""
    strict = cfg["strict"]
    die_with_parent(cfg["p1"])
    os.chdir(cfg["workdir"])
    limit(cfg)
    prctl(PR_SET_NO_NEW_PRIVS, 1)
    abi = landlock(cfg["workdir"], cfg["read_paths"], cfg["device_files"])
    if abi:
        features.append(f"landlock={abi}")
    elif strict:
        fail("Landlock is not available (Linux >= 5.13 with the landlock LSM enabled)")
    if seccomp_no_processes():
        features.append("seccomp")
    elif strict:
        fail(f"seccomp filters are not available on this machine ({platform.machine()})")
    if cfg.get("report"):
        os.write(2, f"megagrpo-sandbox-features: {','.join(features)}\n".encode())
    argv = [cfg["python"], "-I", "-B", cfg["program"]]
    os.execve(cfg["python"], argv, cfg["env"])


def wait_exit(pid: int) -> None:
    """Exit like process ``pid`` did (128 + signal when a signal ended it)."""
    while True:
        try:
            _, status = os.waitpid(pid, 0)
            break
        except ChildProcessError:
            os._exit(SETUP_FAILED)
        except InterruptedError:
            continue
    if os.WIFSIGNALED(status):
        os._exit(128 + os.WTERMSIG(status))
    os._exit(os.WEXITSTATUS(status))


def main() -> None:
    cfg = json.loads(sys.argv[1])
    die_with_parent(cfg["parent"])
    features = []
    try:
        if libc.unshare(ctypes.c_int(CLONE_NEWUSER | CLONE_NEWPID | CLONE_NEWNET)) != 0:
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
        features += ["userns", "pidns", "netns"]
    except OSError as e:
        if cfg["strict"]:
            fail(f"cannot create user, PID and network namespaces (unshare: {e.strerror})")
    die_with_parent(cfg["parent"])  # entering a user namespace cleared the parent-death signal
    me = os.getpid()
    p1 = os.fork()
    if p1:
        wait_exit(p1)
    try:
        die_with_parent(me, outside="pidns" in features)
        cfg["p1"] = os.getpid()
        p2 = os.fork()
        if p2 == 0:
            program(cfg, features)
        wait_exit(p2)
    except BaseException as e:  # noqa: BLE001 - any set-up failure is reported, never run past
        fail(f"{type(e).__name__}: {e}")


if __name__ == "__main__":
    main()
