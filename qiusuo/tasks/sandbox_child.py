"""The sandbox's child side: run as `python -I sandbox_child.py`, config as JSON on stdin.

This file imports only the standard library and never imports qiusuo: it is executed by path in
a fresh interpreter. It is the one place where model-written code is executed, and it first
builds the walls, in this order:

1. (launcher, still with the caller's privileges) `unshare(CLONE_NEWNET | CLONE_NEWPID)`: an
   empty network namespace (not even loopback is up) and a PID namespace whose first process
   takes every other one down when it dies. Unprivileged callers try the same inside a new user
   namespace. If the kernel refuses, sockets are blocked in-process instead (weaker: ctypes can
   get around it) and the report says so.
2. fork; the child becomes PID 1 of the new namespace and then:
   pre-imports common stdlib modules (the interpreter may live under a directory the
   unprivileged uid cannot read, e.g. /root/.pyenv), sets RLIMIT_CORE/CPU/AS/FSIZE/NOFILE/NPROC,
   drops to an unprivileged uid/gid when running as root (RLIMIT_NPROC is not enforced for
   root), sets no-new-privs and a parent-death SIGKILL, and applies a Landlock ruleset when the
   kernel has one: file writes only beneath the work directory, no TCP bind/connect, no signals
   to processes outside the sandbox.
3. forks the worker that executes the program, then each test (PID 1 itself only waits), and
   prints `<nonce> <passed> <total>` as its last line. The nonce arrives on stdin, so
   `os._exit(0)` in the program cannot fake a pass. (Code that digs the nonce out of the
   interpreter's frames could; the sandbox bounds damage, it does not make reward hacking
   impossible for a determined adversary.)
"""

import ctypes
import importlib
import json
import os
import resource
import signal
import sys
import traceback

CLONE_NEWUSER, CLONE_NEWNET, CLONE_NEWPID = 0x10000000, 0x40000000, 0x20000000
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 1, 38
SYS_LANDLOCK_CREATE_RULESET, SYS_LANDLOCK_ADD_RULE, SYS_LANDLOCK_RESTRICT_SELF = 444, 445, 446
PRELOAD = (
    "array", "bisect", "cmath", "collections", "collections.abc", "copy", "dataclasses", "datetime",
    "decimal", "encodings.idna", "enum", "fractions", "functools", "hashlib", "heapq", "io", "itertools", "json", "math",
    "numbers", "operator", "random", "re", "socket", "statistics", "string", "struct", "textwrap",
    "time", "typing", "unicodedata",
)  # fmt: skip

_libc = ctypes.CDLL(None, use_errno=True)


def _unshare(flags: int) -> bool:
    return _libc.unshare(ctypes.c_int(flags)) == 0


def isolate_namespaces() -> dict:
    """Enter fresh network + PID namespaces if the kernel lets us; report what we got."""
    if os.geteuid() == 0 and _unshare(CLONE_NEWNET | CLONE_NEWPID):
        return {"network": "netns", "pid_namespace": True}
    uid, gid = os.getuid(), os.getgid()
    if os.geteuid() != 0 and _unshare(CLONE_NEWUSER | CLONE_NEWNET | CLONE_NEWPID):
        for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
        return {"network": "netns", "pid_namespace": True}
    if _unshare(CLONE_NEWNET):
        return {"network": "netns", "pid_namespace": False}
    return {"network": "socket-patch", "pid_namespace": False}


def apply_landlock(workdir: str) -> int:
    """Allow file writes only beneath `workdir`; deny TCP and outside signals.
    Returns the Landlock ABI version applied (0: none)."""

    def syscall(number: int, *args) -> int:
        # syscall(2) is variadic: pass ints as C longs, or ctypes would pass them as int32
        return _libc.syscall(*(ctypes.c_long(a) if isinstance(a, int) else a for a in (number, *args)))

    abi = syscall(SYS_LANDLOCK_CREATE_RULESET, None, 0, 1)  # flag 1: query the ABI version
    if abi < 1:
        return 0
    write_fs = sum(1 << b for b in (1, 4, 5, 6, 7, 8, 9, 10, 11, 12))  # write, remove, make-*
    write_fs |= (1 << 13 if abi >= 2 else 0) | (1 << 14 if abi >= 3 else 0)  # refer, truncate
    net = 0b11 if abi >= 4 else 0  # bind_tcp | connect_tcp, with no rule allowing any port
    scoped = 0b11 if abi >= 6 else 0  # abstract unix sockets | signals

    class RulesetAttr(ctypes.Structure):
        _fields_ = [("fs", ctypes.c_uint64), ("net", ctypes.c_uint64), ("scoped", ctypes.c_uint64)]

    class PathBeneath(ctypes.Structure):
        _pack_ = 1
        _fields_ = [("allowed", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]

    attr = RulesetAttr(write_fs, net, scoped)
    size = 8 if abi < 4 else 16 if abi < 6 else 24
    ruleset = syscall(SYS_LANDLOCK_CREATE_RULESET, ctypes.byref(attr), size, 0)
    if ruleset < 0:
        return 0
    dirfd = os.open(workdir, os.O_PATH | os.O_CLOEXEC)
    rule = PathBeneath(write_fs, dirfd)
    ok = syscall(SYS_LANDLOCK_ADD_RULE, ruleset, 1, ctypes.byref(rule), 0) == 0  # 1: path-beneath rule
    ok = ok and syscall(SYS_LANDLOCK_RESTRICT_SELF, ruleset, 0) == 0
    os.close(dirfd)
    os.close(ruleset)
    return abi if ok else 0


def block_sockets() -> None:
    """In-process fallback when no network namespace is available."""
    import socket

    def refuse(*args, **kwargs):
        raise PermissionError("network access is disabled in the sandbox")

    socket.socket = refuse  # type: ignore[assignment]
    socket.create_connection = refuse  # type: ignore[assignment]
    socket.socketpair = refuse  # type: ignore[assignment]


def confine(cfg: dict, report: dict) -> None:
    """Limits, privilege drop, Landlock: everything between fork and the untrusted code."""
    for name in PRELOAD + tuple(cfg.get("preload", ())):
        importlib.import_module(name)
    mb = 2**20
    limits = [(resource.RLIMIT_CORE, 0), (resource.RLIMIT_CPU, cfg["cpu_s"]),
              (resource.RLIMIT_AS, cfg["memory_mb"] * mb), (resource.RLIMIT_FSIZE, cfg["fsize_mb"] * mb),
              (resource.RLIMIT_NOFILE, cfg["nofile"]), (resource.RLIMIT_NPROC, cfg["nproc"])]
    for which, soft in limits:
        # hard CPU limit one second above soft: SIGXCPU first, SIGKILL if it is ignored
        resource.setrlimit(which, (soft, soft + 1 if which == resource.RLIMIT_CPU else soft))
    if os.geteuid() == 0:
        os.setgroups([])
        os.setgid(cfg["gid"])
        os.setuid(cfg["uid"])
    _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # after setuid: a uid change clears it
    report.update(uid=os.getuid(), landlock_abi=apply_landlock(cfg["workdir"]))
    if report["network"] != "netns":
        block_sockets()
    with open("isolation.json", "w") as f:
        json.dump(report, f)


def run_untrusted(cfg: dict) -> None:
    """Execute the program, then each test, counting tests that complete without an exception."""
    import builtins

    namespace = {"__name__": "__main__", "__builtins__": builtins}
    passed = 0
    try:
        exec(compile(cfg["program"], "solution.py", "exec"), namespace)
        for i, test in enumerate(cfg["tests"]):
            try:
                exec(compile(test, f"<test {i}>", "exec"), namespace)
                passed += 1
            except BaseException:  # noqa: BLE001 — SystemExit in a test is a failure, not an exit
                traceback.print_exc()
    except BaseException:  # noqa: BLE001 — any failure of the program fails every test
        traceback.print_exc()
        passed = 0
    sys.stdout.flush()
    os.write(1, f"\n{cfg['nonce']} {passed} {len(cfg['tests'])}\n".encode())


def _exit_code(status: int) -> int:
    return os.WEXITSTATUS(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)


def main() -> None:
    cfg = json.loads(sys.stdin.read())
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.chdir(cfg["workdir"])
    report = isolate_namespaces()
    init = os.fork()
    if init == 0:
        # PID 1 of the new namespace. It only waits: the kernel drops signals to a namespace's
        # init that it has no handler for, SIGXCPU from RLIMIT_CPU included, so the untrusted
        # code must run in a child of it. When init exits, the kernel kills the whole namespace.
        code = 1
        try:
            confine(cfg, report)
            worker = os.fork()
            if worker == 0:
                _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
                run_untrusted(cfg)
                os._exit(0)
            code = _exit_code(os.waitpid(worker, 0)[1])
        except BaseException:  # noqa: BLE001 — report why confinement failed, then exit
            traceback.print_exc()
        finally:
            os._exit(code)
    # The caller stops a run with SIGTERM: kill init, whose exit makes the kernel kill and reap
    # every process in the namespace, and return only after that, so that when this launcher
    # has exited nothing of the run is left.
    signal.signal(signal.SIGTERM, lambda *_: _kill_quietly(init))
    sys.exit(_exit_code(os.waitpid(init, 0)[1]))


def _kill_quietly(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # init has already exited


if __name__ == "__main__":
    main()
