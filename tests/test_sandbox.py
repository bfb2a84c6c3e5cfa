"""Sandbox spec: the `code` task runs completions against unit tests in a confined process;
hostile programs score 0 and leave the machine as it was. Limits are small so each case takes
about a second (a hostile case at most its `wall_s`)."""

from __future__ import annotations

import json
import os
import socket
import tempfile
from pathlib import Path

import pytest

import qiusuo.tasks as tasks
from qiusuo.tasks.code import extract_code
from qiusuo.tasks.sandbox import SandboxLimits, probe_isolation, run_tests

LIMITS = SandboxLimits(wall_s=2.0, cpu_s=1, memory_mb=256, nproc=16)
IS_ROOT = os.geteuid() == 0


def c(answer: str) -> str:
    return f"<think></think><answer>{answer}</answer>"


def processes_of(uid: int) -> list[int]:
    """PIDs of live (non-zombie) processes owned by `uid`."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
        except OSError:
            continue  # exited while we looked
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        if int(fields["Uid"].split()[0]) == uid and not fields["State"].strip().startswith("Z"):
            pids.append(int(entry.name))
    return pids


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    rows = [{"question": "Add one.", "signature": "def inc(x):", "solution": "def inc(x):\n    return x + 1",
             "tests": ["assert inc(1) == 2", "assert inc(-1) == 0", "assert inc(41) == 42"]}]
    path = tmp_path_factory.mktemp("code") / "code.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    t = tasks.get("code", path=str(path), limits=LIMITS, test_fraction=0.01)
    t.problem = t.generate(1, seed=0)[0]
    return t


@pytest.fixture(autouse=True)
def machine_left_as_it_was():
    yield
    if IS_ROOT:  # every process the sandbox started has died with it
        assert processes_of(LIMITS.uid) == []


def test_isolation_report():
    report = probe_isolation(LIMITS)
    # which network isolation this kernel gives: a fresh namespace, or the in-process socket block
    assert report["network"] in ("netns", "socket-patch"), report
    print(f"sandbox isolation on this machine: {report}")
    if IS_ROOT:
        assert report["uid"] == LIMITS.uid != 0  # RLIMIT_NPROC only binds a non-root uid


def test_right_wrong_and_malformed_solutions(task):
    p = task.problem
    assert "def inc(x):" in p.prompt
    assert task.score(p, c("def inc(x):\n    return x + 1")).reward == 1.0
    assert task.score(p, c("```python\ndef inc(x):\n    return x + 1\n```")).reward == 1.0
    assert task.score(p, task.solution(p, None, "direct")).reward == 1.0
    assert task.score(p, c("def inc(x):\n    return 2")).reward == 0.1  # passes one test of three
    assert task.score(p, c("def inc(x) return")).reward == 0.1  # syntax error
    assert task.score(p, "def inc(x):\n    return x + 1").reward == 0.0  # no format
    scores = tasks.score_batch(task, [p] * 3, [c("def inc(x):\n    return x + 1"), c("pass"), "x"])
    assert [s.reward for s in scores] == [1.0, 0.1, 0.0]


def test_partial_credit(task, tmp_path):
    partial = tasks.get("code", path=task._splits["train"][0].metadata["source"], limits=LIMITS,
                        partial_credit=True, test_fraction=0.01)
    s = partial.score(task.problem, c("def inc(x):\n    return 2"))
    assert s.accuracy == pytest.approx(1 / 3)


def test_extract_code():
    assert extract_code("```python\nx = 1\n```") == "x = 1"
    assert extract_code("Here:\n```\nx = 1\n```\nand more") == "x = 1"
    assert extract_code("x = 1") == "x = 1"


# --- hostile programs: each scores 0 ---------------------------------------------------------
def test_infinite_loop(task):
    s = task.score(task.problem, c("while True:\n    pass"))
    assert s.reward == 0.1 and s.accuracy == 0.0 and s.timed_out


def test_sleeping_forever_hits_the_wall_clock(task):
    s = task.score(task.problem, c("import time\ntime.sleep(1000)"))
    assert s.accuracy == 0.0 and s.timed_out


def test_fork_bomb(task):
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
    s = task.score(task.problem, c(bomb))
    assert s.accuracy == 0.0 and s.timed_out
    # the autouse fixture checks that no process of the sandbox uid survived


def test_escaping_the_process_group_does_not_survive(task):
    program = ("import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(60)\n"
               "def inc(x):\n    return x + 1")
    assert task.score(task.problem, c(program)).accuracy == 1.0  # the tests pass; the orphan is killed


def test_nproc_limit_binds():
    program = ("import os, time\nn = 0\ntry:\n    for _ in range(200):\n        if os.fork() == 0:\n"
               "            time.sleep(3)\n            os._exit(0)\n        n += 1\nexcept OSError:\n    pass")
    result = run_tests(program, [f"assert n < 200 and n <= {LIMITS.nproc}"], LIMITS)
    assert result.ok, result.stderr


def test_huge_allocation(task):
    for program in ("x = bytearray(10**11)", "x = [0] * 10**10", "x = ' ' * 2**40"):
        s = task.score(task.problem, c(program))
        assert s.accuracy == 0.0, program


def test_write_outside_the_sandbox_dir(task, tmp_path):
    target = tmp_path / "escaped.txt"
    s = task.score(task.problem, c(f"open({str(target)!r}, 'w').write('x')\ndef inc(x):\n    return x + 1"))
    assert s.accuracy == 0.0 and not target.exists()
    # even a world-writable directory (file permissions alone would allow it) stays untouched
    # when the kernel has Landlock
    if probe_isolation(LIMITS).get("landlock_abi", 0) or IS_ROOT:
        open_dir = Path(tempfile.mkdtemp(prefix="qiusuo-test-"))
        try:
            open_dir.chmod(0o777)
            target = open_dir / "escaped.txt"
            program = f"open({str(target)!r}, 'w').write('x')\ndef inc(x):\n    return x + 1"
            if probe_isolation(LIMITS).get("landlock_abi", 0):
                assert task.score(task.problem, c(program)).accuracy == 0.0
                assert not target.exists()
        finally:
            for f in open_dir.iterdir():
                f.unlink()
            open_dir.rmdir()


def test_writing_inside_the_sandbox_dir_is_allowed(task):
    program = "open('scratch.txt', 'w').write('ok')\ndef inc(x):\n    return x + 1"
    assert task.score(task.problem, c(program)).accuracy == 1.0


def test_socket(task):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        server.settimeout(0.2)
        port = server.getsockname()[1]
        program = (f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
                   "s.sendall(b'leak')\ndef inc(x):\n    return x + 1")
        assert task.score(task.problem, c(program)).accuracy == 0.0
        with pytest.raises(socket.timeout):
            server.accept()  # nobody ever connected


@pytest.mark.parametrize("program", ["import os\nos._exit(0)", "import sys\nsys.exit(0)",
                                     "def inc(x):\n    raise SystemExit(0)"])
def test_faking_success_by_exiting(task, program):
    assert task.score(task.problem, c(program)).accuracy == 0.0


def test_limits_validation():
    with pytest.raises(ValueError, match="root"):
        SandboxLimits(uid=0)
    with pytest.raises(ValueError, match="memory_mb"):
        SandboxLimits(memory_mb=1)


def test_socket_patch_fallback_blocks_sockets():
    """The in-process fallback used when the kernel refuses a network namespace (not the path
    this machine takes: see test_isolation_report)."""
    import subprocess
    import sys

    from qiusuo.tasks.sandbox import CHILD

    code = (f"import runpy, socket\nrunpy.run_path({str(CHILD)!r})['block_sockets']()\n"
            "try:\n    socket.create_connection(('127.0.0.1', 9))\nexcept PermissionError:\n    print('blocked')")
    out = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True, timeout=30)
    assert out.stdout.strip() == "blocked", out.stderr
