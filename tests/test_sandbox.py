"""Sandbox spec: the `code` task runs completions against unit tests in a confined process;
hostile programs score 0 and leave the machine as it was. Limits are small so each case takes
about a second (a hostile case at most its `wall_s`)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import tempfile
from pathlib import Path

import pytest

import qiusuo.tasks as tasks
from qiusuo.tasks import sandbox
from qiusuo.tasks.code import count_passed, extract_code, parse_test, same
from qiusuo.tasks.sandbox import Call, SandboxError, SandboxLimits, decode_results, probe_isolation, run_calls

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
        assert report["capabilities_dropped"] is True
    if report["refused"] is None:  # a full run: every layer is there
        assert report["seccomp"] == "filter" and report["landlock_abi"] >= 1 and report["pid_namespace"]


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
               "            time.sleep(3)\n            os._exit(0)\n        n += 1\nexcept OSError:\n    pass\n"
               "def forked():\n    return n")
    result = run_calls(program, [Call("forked")], LIMITS)
    assert result.values is not None, result.stderr
    assert result.values[0][1] <= LIMITS.nproc


def test_nproc_already_exhausted_is_an_error_not_a_zero():
    """RLIMIT_NPROC counts every task of the uid (the caller's threads too, without a user
    namespace): when the worker cannot even be forked, say so instead of scoring 0."""
    with pytest.raises(SandboxError, match="RLIMIT_NPROC=1"):
        run_calls("def f():\n    return 1", [Call("f")], SandboxLimits(wall_s=5.0, nproc=1))


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


# --- reward hacking: the hostile-program corpus (each run for real, each must score 0) ---------
SECRET_ROWS = [{"question": "Add one.", "signature": "def inc(x):",
                "tests": ["assert inc(1) == 2", "assert inc(-1) == 0", "assert inc(41) == 42"]}]

HOSTILE = {
    "eq_always_true": "class Any:\n    def __eq__(self, other):\n        return True\n    __hash__ = None\n"
                      "def inc(x):\n    return Any()",
    "int_subclass_eq_true": "class I(int):\n    def __eq__(self, other):\n        return True\n"
                            "    __hash__ = int.__hash__\ndef inc(x):\n    return I(7)",
    "frame_walk_f_locals": (
        "import sys\nfound = []\nf = sys._getframe(0)\nwhile f is not None:\n"
        "    for k, v in list(f.f_locals.items()):\n        found.append((k, v))\n    f = f.f_back\n"
        "blob = repr(found)\nassert '42' not in blob.replace('41', '')  # no expected value anywhere\n"
        "def inc(x):\n    return 'stolen' if '42' in blob else None"),
    # against the old harness: find its config (nonce, tests) in a caller's frame, print the pass line
    "frame_walk_steal_nonce_print_result": (
        "import sys, os\nf = sys._getframe(0)\nwhile f is not None:\n    for v in list(f.f_locals.values()):\n"
        "        if isinstance(v, dict) and 'nonce' in v:\n"
        "            os.write(1, ('\\n%s 999 3\\n' % v['nonce']).encode())\n            os._exit(0)\n"
        "    f = f.f_back\nimport os\nos._exit(0)"),
    "frame_walk_replace_the_tests": (
        "import sys\nf = sys._getframe(0)\nwhile f is not None:\n    for v in list(f.f_locals.values()):\n"
        "        for key in ('tests', 'calls'):\n            if isinstance(v, dict) and isinstance(v.get(key), list):\n"
        "                v[key][:] = [v[key][0]] * len(v[key]) if key == 'calls' else ['pass'] * len(v[key])\n"
        "            if isinstance(v, list) and v and isinstance(v[0], tuple):\n                v[:] = [v[0]] * len(v)\n"
        "    f = f.f_back\ndef inc(x):\n    return 'wrong'"),
    "frame_walk_rewrite_calls": (
        "import sys\nf = sys._getframe(0)\nwhile f is not None:\n"
        "    for v in list(f.f_locals.values()):\n        if isinstance(v, list):\n            v.clear()\n"
        "    f = f.f_back\ndef inc(x):\n    return None"),
    "fake_result_line_then_os_exit": ("import os\nprint('deadbeef 999 3')\n"
                                      "os.write(1, b'{\"results\":[{\"value\":2},{\"value\":0},{\"value\":42}]}')\n"
                                      "os._exit(0)"),
    "exit_before_tests": "exit(0)\ndef inc(x):\n    return x + 1",
    "sys_exit_in_function": "import sys\ndef inc(x):\n    sys.exit(0)",
    "monkeypatch_builtins": ("import builtins, json\nbuiltins.type = lambda *a: int\nbuiltins.isinstance = "
                             "lambda *a: True\njson.dumps = lambda *a, **k: '{\"results\": []}'\n"
                             "builtins.len = lambda x: 3\nclass X:\n    pass\ndef inc(x):\n    return X()"),
    "write_result_fd_forged_count": (
        "import os\nfor fd in range(3, 64):\n    try:\n"
        "        os.write(fd, b'{\"results\":[{\"value\":999},{\"value\":999},{\"value\":999},{\"value\":999}]}')\n"
        "    except OSError:\n        pass\nos._exit(0)"),
    "write_result_fd_then_honest_looking": (
        "import os\nfor fd in range(3, 64):\n    try:\n        os.write(fd, b'{\"passed\": 999, \"total\": 3}')\n"
        "    except OSError:\n        pass\ndef inc(x):\n    return None"),
    "system_exit_inside_eq": ("class E:\n    def __eq__(self, other):\n        raise SystemExit(0)\n"
                              "def inc(x):\n    return E()"),
    "infinite_repr": ("class R:\n    def __repr__(self):\n        while True:\n            pass\n"
                      "    __str__ = __repr__\ndef inc(x):\n    return R()"),
    "million_digit_int": "def inc(x):\n    return 10 ** 1000000",
    "never_ending_generator": "import itertools\ndef inc(x):\n    return (i for i in itertools.count())",
    "list_subclass_eq": "class L(list):\n    def __eq__(self, o):\n        return True\ndef inc(x):\n    return L()",
    "bool_for_int": "def inc(x):\n    return True",  # assert inc(...) == 1 would pass with == ; exact types say no
    "os_exit_in_function": "import os\ndef inc(x):\n    os._exit(0)",
}


@pytest.fixture(scope="module")
def hostile_task(tmp_path_factory):
    path = tmp_path_factory.mktemp("hostile") / "code.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in SECRET_ROWS))
    t = tasks.get("code", path=str(path), limits=LIMITS, test_fraction=0.01, partial_credit=True)
    t.problem = t.generate(1, seed=0)[0]
    return t


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_program_scores_zero(hostile_task, name):
    s = hostile_task.score(hostile_task.problem, c(f"```python\n{HOSTILE[name]}\n```"))
    assert s.accuracy == 0.0, name
    assert 0.0 <= s.reward <= 1.0


def test_honest_programs_still_score_one(hostile_task):
    for program in ("def inc(x):\n    return x + 1", "inc = lambda x: x + 1",
                    "import math\ndef inc(x):\n    print('noise 999 3')\n    return int(math.floor(x)) + 1"):
        assert hostile_task.score(hostile_task.problem, c(program)).accuracy == 1.0, program


def test_subclasses_of_plain_types_count_as_their_contents(tmp_path):
    """Honest code returns Counter, defaultdict, OrderedDict, namedtuple: they are sent as the dict
    or tuple they hold, read through the base type's methods (their own methods never run)."""
    rows = [{"question": "q", "tests": ["assert count('aab') == {'a': 2, 'b': 1}", "assert pair(1) == (1, 2)",
                                        "assert big(3) == 3"]}]
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps(rows[0]) + "\n")
    t = tasks.get("code", path=str(path), limits=LIMITS, test_fraction=0.01)
    problem = (t._splits["train"] + t._splits["test"])[0]
    honest = ("from collections import Counter, namedtuple\nimport enum\nP = namedtuple('P', 'a b')\n"
              "class N(enum.IntEnum):\n    THREE = 3\n"
              "def count(s):\n    return Counter(s)\ndef pair(x):\n    return P(x, x + 1)\ndef big(x):\n    return N(x)")
    assert t.score(problem, c(honest)).accuracy == 1.0
    lying = ("class D(dict):\n    def items(self):\n        return [('a', 2), ('b', 1)]\n    def __iter__(self):\n"
             "        return iter(['a', 'b'])\ndef count(s):\n    return D()\ndef pair(x):\n    return (1, 2)\n"
             "def big(x):\n    return 3")
    assert t.score(problem, c(lying)).accuracy == 0.0  # its overridden items() never runs: it is empty


def test_one_for_bool_and_float_for_int_are_wrong(tmp_path):
    """Exact types: `True == 1` and `1.0 == 1` in Python, but not as answers."""
    rows = [{"question": "q", "tests": ["assert f() == 1"]},
            {"question": "q", "tests": ["assert f() == 1"], "compare": "numeric"}]
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    t = tasks.get("code", path=str(path), limits=LIMITS, test_fraction=0.01)
    exact, numeric = sorted(t._splits["train"] + t._splits["test"], key=lambda p: p.metadata["line"])
    scores = [t.score(exact, c(f"def f():\n    return {v}")).accuracy for v in ("1", "True", "1.0")]
    assert scores == [1.0, 0.0, 0.0]
    scores = [t.score(numeric, c(f"def f():\n    return {v}")).accuracy for v in ("1", "True", "1.0")]
    assert scores == [1.0, 0.0, 1.0]


def test_the_untrusted_interpreter_never_sees_expected_values(hostile_task):
    """Everything reachable from the program's frames and fds: no expected value, no test source."""
    # the needles are joined at run time: the program's source and constants are among gc's objects
    program = ("import sys, gc\nseen = ''\n"
               "f = sys._getframe(0)\nwhile f is not None:\n    seen += repr(f.f_locals)\n    f = f.f_back\n"
               "seen += repr(gc.get_objects())\n"
               "def inc(x):\n    return tuple(''.join(n) in seen for n in [['== ', '42'], ['inc', '(41)'], ['inc(-1) ', '== 0']])")
    result = run_calls(program, [c.call for c in hostile_task.problem.metadata["cases"]], LIMITS)
    assert [v for _, v in result.values] == [(False, False, False)] * 3


def sandbox_child_encoder():
    import runpy

    return runpy.run_path(str(sandbox.CHILD))["make_encoder"]()


def test_passed_is_clamped_and_forged_documents_rejected():
    cases = [parse_test("assert f() == 1")]
    forged = sandbox.SandboxResult(values=(("value", 1), ("value", 1)), timed_out=False, returncode=0)
    assert count_passed(cases, forged) == 0  # more results than tests: not a valid run
    assert decode_results(b'{"results":[{"value":1}],"passed":999}', 1) is None
    assert decode_results(b'{"results":[{"value":NaN}]}', 1) is None
    assert decode_results(b'{"results":[{"value":' + b"9" * 5000 + b"}]}", 1) is None
    assert decode_results(b'{"results":[{"value":{"set":[{"list":[]}]}}]}', 1) == (("error", "undecodable"),)
    assert decode_results(b"[" * 100000, 1) is None
    # 50k ints that all hash to 0 (multiples of 2**61 - 1): building a Python set of them took 204 s;
    # the decoder keeps canonical strings (randomised hashing) instead
    members = [k * (2**61 - 1) for k in range(50_000)]
    doc = b'{"results":[{"value":{"set":[' + ",".join(map(str, members)).encode() + b']}}]}'
    (kind, value), = decode_results(doc, 1)
    assert kind == "value" and len(value.members) == 50_000
    assert decode_results(b'{"results":[{"value":{"dict":[[1,2],[1,3]]}}]}', 1) == (("error", "undecodable"),)


def test_parse_test_forms_and_refusals():
    assert parse_test("assert f(1, [2]) == (3, 'a')").expected == (3, "a")
    assert parse_test("assert (3, 'a') == f(1, [2])").call.args == "(1, [2])"
    assert parse_test("assert f(7)").expected is True
    assert parse_test("assert not f(8)").expected is False
    assert parse_test("assert f(x=1) is None").call.kwargs == "{'x': 1}"
    assert parse_test("assert math.isclose(f(2), 1.41, rel_tol=1e-3)").tolerance == (1e-3, 0.0)
    for bad in ("print(1)", "assert f(g(1)) == 2", "assert f(1) == y", "assert f(1) < 2", "x = 1\nassert f()",
                "assert f(*a) == 1", "assert len(f(1)) == 2 or True"):
        with pytest.raises(ValueError, match="test"):
            parse_test(bad)


def test_same_is_exact():
    from qiusuo.tasks.sandbox import decode_value

    def sent(v):  # what the parent gets back when the worker returns v
        return decode_value(json.loads(sandbox_child_encoder()(v, [1 << 20])))

    for value in ({1: [True], (2, "a"): {3.5}}, {frozenset({1, 2}), (1, None)}, [b"x", 1 + 2j, float("inf")]):
        assert same(value, sent(value))
    assert not same({1: 2}, sent({True: 2})) and not same({1}, sent({1.0})) and not same({1}, sent(frozenset({1})))
    assert same(1, 1) and not same(1, True) and not same(1, 1.0) and not same([1], (1,))
    assert same({1: [True]}, {1: [True]}) and not same({1: [True]}, {True: [True]})
    assert same({1, 2}, {2, 1}) and not same({1}, {True}) and not same({1}, frozenset({1}))
    assert same(float("nan"), float("nan")) and same(1, 1.0, (1e-9, 1e-9)) and not same(True, 1, (1e-9, 1e-9))


def patch_child(monkeypatch, old: str, new: str) -> Path:
    """A copy of the sandbox child with `old` replaced by `new`, used by `sandbox` for this test."""
    source = sandbox.CHILD.read_text()
    assert old in source, old
    child = Path(tempfile.mkdtemp()) / "sandbox_child.py"
    child.write_text(source.replace(old, new))
    monkeypatch.setattr(sandbox, "CHILD", child)
    return child


def test_refuses_when_a_layer_is_missing_unless_allowed(monkeypatch):
    """Fail closed: simulate a kernel without namespaces by running the child with unshare(2)
    refused (seccomp in a wrapper would need the same privileges; an env switch would be a
    backdoor, so the test patches the child's isolate function in a copy of the file)."""
    weak_child = patch_child(monkeypatch, "def isolate_namespaces() -> dict:",
                             "def isolate_namespaces() -> dict:\n    return {'network': 'socket-patch', "
                             "'pid_namespace': False, 'mount_namespace': False, 'user_namespace': False}\n\n\n"
                             "def _unused() -> dict:")
    try:
        before = sandbox.stats().get("refused_weak_isolation", 0)
        result = run_calls("def f():\n    return 1", [Call("f")], LIMITS)
        assert result.values is None and "no network namespace" in result.refused
        assert sandbox.stats()["refused_weak_isolation"] == before + 1
        weak = run_calls("def f():\n    return 1", [Call("f")], LIMITS, allow_weak_isolation=True)
        assert weak.refused is None and weak.values == (("value", 1),)
    finally:
        weak_child.unlink()
        weak_child.parent.rmdir()



def test_a_grpo_step_logs_the_sandbox_refusals(monkeypatch, task, make_checkpoint, tmp_path, capsys):
    """Refusals reach GRPO's metrics.jsonl (count and reasons, per step) and its console line: a run
    whose sandbox refuses every program learns nothing from its code problems, and before this the
    count lived only in `sandbox.stats()` of whichever process scored (a Ray rollout worker's)."""
    from qiusuo.train.config import GRPOConfig
    from qiusuo.train.grpo import GRPO

    weak_child = patch_child(monkeypatch, "def isolate_namespaces() -> dict:",
                             "def isolate_namespaces() -> dict:\n    return {'network': 'socket-patch', "
                             "'pid_namespace': False, 'mount_namespace': False, 'user_namespace': False}\n\n\n"
                             "def _unused() -> dict:")
    try:
        cfg = GRPOConfig(model=str(make_checkpoint(num_hidden_layers=1)), out=str(tmp_path / "run"),
                         prompts_per_step=1, group_size=2, max_tokens=4, steps=1, threads=1, progress=True,
                         save_every=0)
        grpo = GRPO(cfg, task=task)
        generate = grpo.llm.generate

        def right_answers(*args, **kwargs):  # real engine outputs whose text is the right program
            outs = generate(*args, **kwargs)
            for r in outs:
                r.outputs = [dataclasses.replace(o, text=c("def inc(x):\n    return x + 1")) for o in r.outputs]
            return outs

        monkeypatch.setattr(grpo.llm, "generate", right_answers)
        grpo.run()
    finally:
        weak_child.unlink()
        weak_child.parent.rmdir()
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert row["sandbox_refusals"] == 2 and row["accuracy"] == 0.0
    assert row["sandbox_refused/no_network_namespace"] == 2 and row["sandbox_refused/no_pid_namespace"] == 2
    assert "sandbox refused 2 (no_network_namespace 2, no_pid_namespace 2)" in capsys.readouterr().out


SECCOMP_DENIED = [
    ("unshare", "err(ctypes.CDLL(None, use_errno=True).unshare(0x10000000))"),
    ("clone_newuser", "err(ctypes.CDLL(None, use_errno=True).syscall(56, 0x10000000 | 17, 0, 0, 0, 0))"),
    ("mount", "err(ctypes.CDLL(None, use_errno=True).mount(b'none', b'.', b'tmpfs', 0, None))"),
    ("ptrace", "err(ctypes.CDLL(None, use_errno=True).ptrace(16, 1, 0, 0))"),
    ("bpf", "err(ctypes.CDLL(None, use_errno=True).syscall(321, 0, 0, 0))"),
    ("keyctl", "err(ctypes.CDLL(None, use_errno=True).syscall(250, 0, 0, 0))"),
    ("perf_event_open", "err(ctypes.CDLL(None, use_errno=True).syscall(298, 0, 0, -1, -1, 0))"),
    ("unix_socket", "__import__('socket').socket(1)"),  # AF_UNIX: the caller's sockets by path (Ray's)
]


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="syscall numbers below are x86_64's")
@pytest.mark.parametrize("name,attempt", SECCOMP_DENIED)
def test_seccomp_denies(name, attempt):
    if probe_isolation(LIMITS).get("seccomp") != "filter":
        pytest.skip("no seccomp filter on this machine (the sandbox refuses to run there)")
    program = ("import ctypes, os\ndef err(rc):\n    if rc != 0:\n        raise OSError(ctypes.get_errno(), 'x')\n"
               f"def attempt():\n    try:\n        {attempt}\n    except OSError as e:\n        return e.errno\n"
               "    return 0")
    result = run_calls(program, [Call("attempt")], LIMITS)
    assert result.values[0][0] == "value" and result.values[0][1] in (1, 38), (name, result)  # EPERM / ENOSYS


def test_workdir_is_size_limited(task):
    if probe_isolation(LIMITS).get("workdir") != "tmpfs":
        pytest.skip("no mount namespace: the work directory is bounded by RLIMIT_FSIZE per file only")
    program = ("def fill():\n    n = 0\n    try:\n        for i in range(100):\n"
               "            with open(f'f{i}', 'wb') as f:\n                f.write(b'x' * (1 << 20))\n"
               "            n += 1\n    except OSError:\n        pass\n    return n")
    result = run_calls(program, [Call("fill")], LIMITS)
    assert result.values[0][1] <= LIMITS.workdir_mb  # 16 MiB tmpfs, 1 MiB files


def test_whole_run_memory_is_bounded_by_the_cgroup():
    if not sandbox.cgroup_parents()[0]:
        pytest.skip(f"no cgroup here: {sandbox.cgroup_parents()[1]}")
    # 8 processes of 200 MB each: every one is within RLIMIT_AS (256 MB), together they are not
    program = ("import os, time\ndef hog():\n    kids = []\n    for _ in range(8):\n        pid = os.fork()\n"
               "        if pid == 0:\n            try:\n                b = bytearray(200 << 20)\n"
               "                for i in range(0, len(b), 4096):\n                    b[i] = 1\n"
               "                os._exit(0)\n            except MemoryError:\n                os._exit(3)\n"
               "        kids.append(pid)\n    codes = [os.waitpid(k, 0)[1] for k in kids]\n"
               "    return sum(1 for c in codes if c == 0)")
    result = run_calls(program, [Call("hog")], SandboxLimits(wall_s=20.0, cpu_s=5, memory_mb=256, nproc=16))
    # the cgroup (memory.max = 256 MB for the run) OOM-kills some: not all 8 can hold 200 MB at once
    assert result.values is None or result.values[0][1] < 8, result
    assert result.memory_exceeded and not result.timed_out


def test_the_dataset_on_disk_is_unreadable_even_when_world_readable():
    """The expected answers are also in the JSONL file: a program that knows (or guesses) its
    path must not read them, even where file permissions would let any uid."""
    if not probe_isolation(LIMITS).get("landlock_abi"):
        pytest.skip("no Landlock here (the sandbox refuses to run without it)")
    public = Path(tempfile.mkdtemp(prefix="qiusuo-data-"))
    try:
        public.chmod(0o755)
        data = public / "code.jsonl"
        data.write_text(json.dumps(SECRET_ROWS[0]) + "\n")
        data.chmod(0o644)
        program = (f"import json, re\ntry:\n    rows = open({str(data)!r}).read()\nexcept OSError:\n    rows = ''\n"
                   "answers = dict(re.findall(r'inc\\((-?\\d+)\\) == (-?\\d+)', rows))\n"
                   "def inc(x):\n    return int(answers.get(str(x), 'nan'))")
        path = public / "tasks.jsonl"
        path.write_text(data.read_text())
        t = tasks.get("code", path=str(path), limits=LIMITS, test_fraction=0.01)
        problem = (t._splits["train"] + t._splits["test"])[0]
        assert t.score(problem, c(program)).accuracy == 0.0
        assert run_calls(f"def peek():\n    return open({str(data)!r}).read()", [Call("peek")], LIMITS).values \
            == (("error", "raised"),)
    finally:
        shutil.rmtree(public)


def test_a_wall_that_fails_to_go_up_is_a_refusal(monkeypatch):
    """Confinement raising (here: Landlock's setup) refuses the run with the reason, like a
    missing kernel feature, instead of running unconfined or failing silently."""
    broken = patch_child(monkeypatch, "def apply_landlock(workdir: str, readable: list[int]) -> int:",
                         "def apply_landlock(workdir: str, readable: list[int]) -> int:\n"
                         "    raise OSError(38, 'simulated')\n\n\ndef _unused(workdir, readable):")
    try:
        result = run_calls("def f():\n    return 1", [Call("f")], LIMITS, allow_weak_isolation=True)
        assert result.values is None and result.refused.startswith("confinement failed: OSError")
    finally:
        shutil.rmtree(broken.parent)
