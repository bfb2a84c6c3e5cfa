"""Run untrusted Python against tests in a confined child process (the `code` task's grader).

`run_tests(program, tests)` writes nothing but a private temporary directory, starts
`python -I sandbox_child.py` in a new session (its own process group) with that directory as
cwd, passes the program, the tests and a random nonce on stdin, and waits at most `wall_s`.
On timeout it sends SIGTERM, on which the launcher kills the namespace's init and returns once
the kernel has reaped every process in it; then, whatever happened, it SIGKILLs the whole
process group. The child confines itself before it
runs the code (see sandbox_child.py): network and PID namespaces, resource limits
(RLIMIT_CPU, AS, FSIZE, NOFILE, NPROC), an unprivileged uid when we are root (the kernel does
not enforce RLIMIT_NPROC for root), and a Landlock ruleset that keeps writes inside the
temporary directory. Because the code runs as PID 1 of its own PID namespace with a
parent-death SIGKILL, a process that escapes the process group with `setsid` still dies with
the sandbox. Output is written to files inside the directory, so RLIMIT_FSIZE also caps it.

A test passes only if the child prints the nonce line after running it; the caller never
executes model text itself.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

CHILD = Path(__file__).with_name("sandbox_child.py")
NOBODY = 65534


@dataclass(frozen=True)
class SandboxLimits:
    """Per-run limits. `nproc` counts all processes of the sandbox uid, so it bounds fork bombs."""

    wall_s: float = 5.0
    cpu_s: int = 2
    memory_mb: int = 512
    fsize_mb: int = 4
    nproc: int = 32
    nofile: int = 64
    uid: int = NOBODY  # used only when running as root
    gid: int = NOBODY
    preload: tuple[str, ...] = ()  # extra modules to import before the uid drop (see sandbox_child)

    def __post_init__(self):
        if self.wall_s <= 0 or self.cpu_s < 1:
            raise ValueError(f"need wall_s > 0 and cpu_s >= 1, got {self.wall_s}, {self.cpu_s}")
        if self.memory_mb < 64:
            raise ValueError(f"memory_mb must be >= 64 (the interpreter needs it), got {self.memory_mb}")
        if self.nproc < 1 or self.nofile < 16 or self.fsize_mb < 1:
            raise ValueError("need nproc >= 1, nofile >= 16 and fsize_mb >= 1")
        if self.uid == 0 or self.gid == 0:
            raise ValueError("the sandbox uid/gid must not be root (0): RLIMIT_NPROC does not bind root")


@dataclass(frozen=True)
class SandboxResult:
    passed: int
    total: int
    timed_out: bool
    returncode: int | None
    stdout: str = ""
    stderr: str = ""
    isolation: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.total > 0 and self.passed == self.total


def _tail(path: Path, limit: int = 4000) -> str:
    try:
        with path.open("rb") as f:
            f.seek(max(0, path.stat().st_size - limit))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # already gone with everything in it


def run_tests(program: str, tests: list[str], limits: SandboxLimits = SandboxLimits()) -> SandboxResult:
    """Run `program`, then each test snippet (e.g. an `assert`), in the sandbox."""
    nonce = secrets.token_hex(16)
    workdir = Path(tempfile.mkdtemp(prefix="qiusuo-sandbox-"))
    try:
        stdout_path, stderr_path = workdir / "stdout.txt", workdir / "stderr.txt"
        if os.geteuid() == 0:
            os.chown(workdir, limits.uid, limits.gid)  # the code may write here, and only here
        cfg = {"workdir": str(workdir), "program": program, "tests": list(tests), "nonce": nonce,
               "cpu_s": limits.cpu_s, "memory_mb": limits.memory_mb, "fsize_mb": limits.fsize_mb,
               "nproc": limits.nproc, "nofile": limits.nofile, "uid": limits.uid, "gid": limits.gid,
               "preload": list(limits.preload)}
        timed_out = False
        with stdout_path.open("wb") as out, stderr_path.open("wb") as err:
            proc = subprocess.Popen(
                [sys.executable, "-I", str(CHILD)], stdin=subprocess.PIPE, stdout=out, stderr=err,
                cwd=workdir, start_new_session=True, close_fds=True,
                env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
            )
            try:
                proc.stdin.write(json.dumps(cfg).encode())
                proc.stdin.close()
                proc.wait(timeout=limits.wall_s)
            except subprocess.TimeoutExpired:
                timed_out = True
                proc.terminate()  # the launcher kills the namespace and waits for it to empty
                try:
                    proc.wait(timeout=10.0)
                except subprocess.TimeoutExpired:
                    pass  # fall through to the process-group kill
            except BrokenPipeError:
                pass  # the child died before reading its config; the return code says why
            finally:
                _kill_group(proc.pid)
                proc.wait()
        stdout, stderr = _tail(stdout_path), _tail(stderr_path)
        passed, total = 0, len(tests)
        last = stdout.rstrip("\n").rsplit("\n", 1)[-1].split()
        if len(last) == 3 and last[0] == nonce:
            passed = int(last[1])
        try:
            isolation = json.loads((workdir / "isolation.json").read_text())
        except (OSError, ValueError):
            isolation = {}
        if proc.returncode == 128 + signal.SIGXCPU or proc.returncode == 128 + signal.SIGKILL:
            timed_out = True  # CPU limit: soft SIGXCPU, then hard SIGKILL
        return SandboxResult(passed=passed if not timed_out else 0, total=total, timed_out=timed_out,
                             returncode=proc.returncode, stdout=stdout, stderr=stderr, isolation=isolation)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def run_many(jobs: list[tuple[str, list[str]]], limits: SandboxLimits = SandboxLimits(),
             max_workers: int = 2) -> list[SandboxResult]:
    """`run_tests` for each (program, tests), `max_workers` sandboxes at a time."""
    with ThreadPoolExecutor(max_workers=max_workers) as pool:
        return list(pool.map(lambda job: run_tests(job[0], job[1], limits), jobs))


def probe_isolation(limits: SandboxLimits = SandboxLimits()) -> dict:
    """What confinement this machine gives: network ("netns" or "socket-patch"), PID namespace,
    uid, Landlock ABI (0 = none)."""
    return run_tests("pass", ["pass"], limits).isolation
