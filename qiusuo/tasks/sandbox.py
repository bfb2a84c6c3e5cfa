"""Run untrusted Python in a confined child process and bring back its functions' return values.

    run_calls(program, [Call("inc", "(1,)")], limits)   # -> SandboxResult(values=[("value", 2)])

The sandbox never decides a reward: it returns, per call, the decoded value or an error kind, and
the `code` task compares those with expected values that never leave this process (code.py).
The full design and threat model is in sandbox_child.py's docstring; in short:

- A private directory `qiusuo-sandbox-*/` (0711, ours) holds the work directory `work/` (the only
  place the program may write; a size-limited tmpfs inside the run's mount namespace when the
  kernel allows), and two files the program has no path to: `report.jsonl` (what each layer of
  confinement gave; the worker never holds its fd) and `result.json` (the worker's fd 4).
- `python -I sandbox_child.py` starts in a new session with both fds, reads its config (program,
  function names, literal arguments, limits) from stdin and builds the walls: namespaces, cgroup,
  rlimits, capability drop, uid drop, Landlock, seccomp.
- Fail closed: when the kernel refuses a namespace, Landlock or seccomp, the child refuses to run
  the program. The run scores 0, the reason is logged (once per distinct reason) and counted in
  `stats()["refused_weak_isolation"]`, unless `allow_weak_isolation=True` (CLI:
  `--allow-weak-sandbox`) accepts the weaker confinement.
- Limits per run: a cgroup (v2 `memory.max`/`pids.max`, or the v1 memory and pids controllers on
  hybrid hosts) bounds the whole run, all processes together; where no cgroup can be made this
  is said once and the per-process rlimits remain the only bound.
- On timeout the launcher gets SIGTERM, kills the namespace's init and returns once the kernel
  has reaped everything in it; whatever happened, the process group is then SIGKILLed and the
  cgroup's remaining tasks killed before it is removed.
- The result file is read with a size cap and decoded strictly (`decode_results`): plain JSON
  types plus tagged containers; anything else makes that value an error, never an exception.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

CHILD = Path(__file__).with_name("sandbox_child.py")
NOBODY = 65534
EXIT_REFUSED, EXIT_NPROC = 97, 98  # sandbox_child's init exit codes
RESULT_READ_LIMIT = 4 << 20  # the worker's encoder stops at 1 MiB of values; framing is on top
MAX_DEPTH = 64

logger = logging.getLogger(__name__)
_stats: collections.Counter = collections.Counter()
_stats_lock = threading.Lock()
_logged: set[str] = set()


class SandboxError(RuntimeError):
    """The sandbox could not run the program for a reason that is not the program's fault (a
    misconfigured host); raised rather than scored 0 so that training does not learn from it."""


@dataclass(frozen=True)
class SandboxLimits:
    """Per-run limits. `nproc` counts all processes of the sandbox uid, so it bounds fork bombs;
    `memory_mb` bounds each process (RLIMIT_AS) and, where a cgroup can be made, the whole run;
    `workdir_mb` is the size of the work directory's tmpfs."""

    wall_s: float = 5.0
    cpu_s: int = 2
    memory_mb: int = 512
    fsize_mb: int = 4
    workdir_mb: int = 16
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
        if self.nproc < 1 or self.nofile < 16 or self.fsize_mb < 1 or self.workdir_mb < 1:
            raise ValueError("need nproc >= 1, nofile >= 16, fsize_mb >= 1 and workdir_mb >= 1")
        if self.uid == 0 or self.gid == 0:
            raise ValueError("the sandbox uid/gid must not be root (0): RLIMIT_NPROC does not bind root")


@dataclass(frozen=True)
class Call:
    """One function call of a test: the function's name and its arguments as Python literal
    source (`"(1, [2, 3])"`, `"{'k': 1}"`), evaluated with ast.literal_eval in the child."""

    fn: str
    args: str = "()"
    kwargs: str = "{}"


@dataclass(frozen=True)
class SandboxResult:
    """`values[i]` is ("value", v) or ("error", kind) for call i; None when the run produced no
    valid result document (crash, early exit, timeout, refusal, forged bytes)."""

    values: tuple | None
    timed_out: bool
    returncode: int | None
    stdout: str = ""
    stderr: str = ""
    isolation: dict = field(default_factory=dict)
    refused: str | None = None
    memory_exceeded: bool = False  # the run's cgroup OOM-killed a process (not a timeout)


def stats() -> dict[str, int]:
    """Counters since start: runs, completed, refused_weak_isolation (and `refused:<reason>` per
    missing layer, see `refusal_reasons`), timed_out, memory_exceeded, no_result, cgroup_unavailable."""
    with _stats_lock:
        return dict(_stats)


def refusal_reasons(refused: str) -> list[str]:
    """The metric keys of a refusal message: one snake_case key per missing layer
    ("no network namespace; no Landlock" -> ["no_network_namespace", "no_landlock"]), the
    detail after a colon dropped ("confinement failed: OSError: ..." -> ["confinement_failed"])."""
    keys = []
    for part in refused.split("; "):
        words = re.sub(r"[^a-z0-9]+", "_", part.split(":", 1)[0].strip().lower()).strip("_")
        keys.append(words or "unknown")
    return keys


def _count(name: str) -> None:
    with _stats_lock:
        _stats[name] += 1


def _log_once(key: str, level: int, message: str) -> None:
    with _stats_lock:
        first = key not in _logged
        _logged.add(key)
    logger.log(level if first else logging.DEBUG, message)


# --- cgroups ---------------------------------------------------------------------------------------
def _own_cgroups() -> dict[str, str]:
    """controller (or "" for v2) -> our cgroup path, from /proc/self/cgroup."""
    own = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        for c in controllers.split(",") if controllers else [""]:
            own[c] = path
    return own


@lru_cache(maxsize=1)
def cgroup_parents() -> tuple[dict[str, Path], str]:
    """Where to make per-run cgroups: ({"memory": dir, "pids": dir} or {"v2": dir}, description).
    Empty dict when this process may not make them (the description says why)."""
    try:
        mounts = [line.split() for line in Path("/proc/self/mounts").read_text().splitlines()]
        own = _own_cgroups()
    except OSError as e:
        return {}, f"cannot read /proc ({e})"
    for _, point, kind, options, *_ in mounts:
        if kind == "cgroup2" and "" in own:
            base = Path(point) / own[""].lstrip("/")
            try:
                enabled = (base / "cgroup.subtree_control").read_text().split()
                if not {"memory", "pids"} <= set(enabled):
                    (base / "cgroup.subtree_control").write_text("+memory +pids")
                probe = base / f"qiusuo-probe-{os.getpid()}"
                probe.mkdir()
                probe.rmdir()
                return {"v2": base}, f"cgroup v2 at {base}"
            except OSError:
                pass  # controllers bound to v1, or not delegated to us: try v1 below
    found = {}
    for _, point, kind, options, *_ in mounts:
        for controller in ("memory", "pids"):
            if kind == "cgroup" and controller in options.split(",") and controller in own:
                base = Path(point) / own[controller].lstrip("/")
                try:
                    probe = base / f"qiusuo-probe-{os.getpid()}"
                    probe.mkdir()
                    probe.rmdir()
                    found[controller] = base
                except OSError:
                    pass
    if found:
        return found, "cgroup v1 " + ", ".join(f"{c} at {p}" for c, p in found.items())
    return {}, "no cgroup controller this process may use (needs delegated v2 memory+pids, or v1)"


def _make_cgroups(name: str, limits: SandboxLimits) -> list[Path]:
    parents, why = cgroup_parents()
    if not parents:
        _count("cgroup_unavailable")
        _log_once("cgroups", logging.WARNING, f"sandbox: {why}; runs are bounded by per-process rlimits only")
        return []
    memory, pids = str(limits.memory_mb * 2**20), str(limits.nproc + 2)  # + launcher and init
    made: list[Path] = []
    try:
        for controller, parent in parents.items():
            d = parent / name
            d.mkdir()
            made.append(d)
            files = {"v2": [("memory.max", memory), ("memory.swap.max", "0"), ("pids.max", pids)],
                     "memory": [("memory.limit_in_bytes", memory), ("memory.memsw.limit_in_bytes", memory)],
                     "pids": [("pids.max", pids)]}[controller]
            for filename, value in files:
                try:
                    (d / filename).write_text(value)
                except OSError:
                    if filename not in ("memory.swap.max", "memory.memsw.limit_in_bytes"):  # no swap accounting
                        raise
    except OSError as e:
        _remove_cgroups(made)
        _count("cgroup_unavailable")
        _log_once("cgroups-failed", logging.WARNING, f"sandbox: could not make a cgroup ({e}); this run and any "
                  "other that fails the same way is bounded by per-process rlimits only")
        return []
    return made


def _oom_killed(dirs: list[Path]) -> bool:
    """Did the run's memory cgroup kill a process? (v2 memory.events, v1 memory.oom_control)"""
    for d in dirs:
        for filename in ("memory.events", "memory.oom_control"):
            try:
                counters = dict(line.split() for line in (d / filename).read_text().splitlines() if " " in line)
            except (OSError, ValueError):
                continue
            if int(counters.get("oom_kill", "0")) > 0:
                return True
    return False


def _remove_cgroups(dirs: list[Path]) -> None:
    for d in dirs:
        for _ in range(50):
            try:
                for pid in (d / "cgroup.procs").read_text().split():
                    try:
                        os.kill(int(pid), signal.SIGKILL)
                    except ProcessLookupError:
                        pass  # exited meanwhile
                d.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.02)  # EBUSY: killed tasks are still exiting
        else:
            logger.warning("sandbox: could not remove cgroup %s", d)


# --- results ----------------------------------------------------------------------------------------
def _reject_constant(name: str):
    raise ValueError(f"bare {name} is not part of the result format")


@dataclass(frozen=True)
class DecodedSet:
    """A set or frozenset the worker returned, as the `canonical` strings of its members. Never a
    Python set of the decoded values: ints hash predictably, and 50,000 ints that all hash to 0
    took 204 s to put in one set; str hashing is randomised per process."""

    kind: str  # "set" or "frozenset"
    members: frozenset


@dataclass(frozen=True)
class DecodedDict:
    """A dict the worker returned: (canonical(key), value) pairs, for the same reason."""

    items: tuple


def canonical(v) -> str:
    """A type-tagged, self-delimiting string of a plain or decoded value: equal strings mean
    equal values of equal types (True is not 1, 1.0 is not 1, a tuple is not a list)."""
    t = type(v)
    if t is DecodedSet:
        return v.kind + "{" + ",".join(sorted(v.members)) + "}"
    if t is DecodedDict:
        return "dict{" + ",".join(sorted(k + ":" + canonical(x) for k, x in v.items)) + "}"
    if t in (set, frozenset):
        return t.__name__ + "{" + ",".join(sorted(canonical(x) for x in v)) + "}"
    if t is dict:
        return "dict{" + ",".join(sorted(canonical(k) + ":" + canonical(x) for k, x in v.items())) + "}"
    if t in (list, tuple):
        return t.__name__ + "[" + ",".join(canonical(x) for x in v) + "]"
    if t is float and v != v:
        return "float:nan"
    if t in (type(None), bool, int, float, str, bytes, complex):
        return t.__name__ + ":" + repr(v)
    raise ValueError(f"not a plain value: {t.__name__}")


def _hashable(x) -> bool:
    t = type(x)
    if t in (list, DecodedDict):
        return False
    if t is DecodedSet:
        return x.kind == "frozenset"
    return all(_hashable(y) for y in x) if t is tuple else True


def decode_value(v, depth: int = 0):
    """A value of the result format -> plain Python, sets and dicts as DecodedSet / DecodedDict
    (raises ValueError on anything else)."""
    if depth > MAX_DEPTH:
        raise ValueError("too deep")
    t = type(v)
    if v is None or t in (bool, int, float, str):
        return v
    if t is not dict or len(v) != 1:
        raise ValueError("not a value of the result format")
    (tag, body), = v.items()
    if tag in ("list", "tuple", "set", "frozenset") and type(body) is list:
        items = [decode_value(x, depth + 1) for x in body]
        if tag in ("set", "frozenset"):
            if not all(_hashable(x) for x in items):
                raise ValueError("unhashable member in a set")  # what Python itself would refuse
            return DecodedSet(tag, frozenset(canonical(x) for x in items))
        return list(items) if tag == "list" else tuple(items)
    if tag == "dict" and type(body) is list:
        pairs = []
        for pair in body:
            if type(pair) is not list or len(pair) != 2:
                raise ValueError("dict items are [key, value] pairs")
            key = decode_value(pair[0], depth + 1)
            if not _hashable(key):
                raise ValueError("unhashable dict key")
            pairs.append((canonical(key), decode_value(pair[1], depth + 1)))
        if len({k for k, _ in pairs}) != len(pairs):
            raise ValueError("duplicate dict key")
        return DecodedDict(tuple(pairs))
    if tag == "bytes" and type(body) is str:
        return bytes.fromhex(body)
    if tag == "float" and body in ("nan", "inf", "-inf"):
        return float(body)
    if tag == "complex" and type(body) is list and len(body) == 2 and all(type(x) is float for x in body):
        return complex(body[0], body[1])
    raise ValueError(f"unknown tag {tag!r}")


def decode_results(raw: bytes, n_calls: int) -> tuple | None:
    """The worker's result document -> per call ("value", v) or ("error", kind); None if the
    document is not exactly one result per call."""
    if len(raw) > RESULT_READ_LIMIT:
        return None
    try:
        doc = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except (ValueError, RecursionError):  # includes >4300-digit integers and invalid UTF-8
        return None
    if type(doc) is not dict or set(doc) != {"results"}:
        return None
    if doc["results"] is None:
        return tuple(("error", "program raised") for _ in range(n_calls))
    if type(doc["results"]) is not list or len(doc["results"]) != n_calls:
        return None
    out = []
    for item in doc["results"]:
        if type(item) is dict and set(item) == {"value"}:
            try:
                out.append(("value", decode_value(item["value"])))
            except (ValueError, TypeError, RecursionError):  # TypeError: unhashable set member or key
                out.append(("error", "undecodable"))
        elif type(item) is dict and set(item) == {"error"} and type(item["error"]) is str:
            out.append(("error", item["error"][:40]))
        else:
            out.append(("error", "malformed"))
    return tuple(out)


# --- running --------------------------------------------------------------------------------------
def _tail(path: Path, limit: int = 4000) -> str:
    try:
        with path.open("rb") as f:
            f.seek(max(0, path.stat().st_size - limit))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def _read_capped(path: Path, limit: int) -> bytes | None:
    try:
        with path.open("rb") as f:
            data = f.read(limit + 1)
    except OSError:
        return None
    return data if len(data) <= limit else None


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # already gone with everything in it


def _read_report(path: Path) -> dict:
    report = {}
    for line in (_read_capped(path, 1 << 16) or b"").decode("utf-8", "replace").splitlines():
        try:
            item = json.loads(line)
        except ValueError:
            continue  # a line cut by a crash
        if type(item) is dict:
            report.update(item)
    return report


def _tasks_of_uid(uid: int) -> int:
    n = 0
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if entry.stat().st_uid == uid:
                    n += len(os.listdir(entry / "task"))
            except OSError:
                continue  # exited while we looked
    return n


def run_calls(program: str, calls: list[Call], limits: SandboxLimits = SandboxLimits(),
              allow_weak_isolation: bool = False) -> SandboxResult:
    """Run `program`, then each call, in the sandbox; see the module docstring."""
    _count("runs")
    base = Path(tempfile.mkdtemp(prefix="qiusuo-sandbox-"))
    cgroups: list[Path] = []
    root = os.geteuid() == 0
    try:
        workdir = base / "work"
        workdir.mkdir()
        base.chmod(0o711)  # the sandbox uid may pass through to work/, not list or open the rest
        if root:
            os.chown(workdir, limits.uid, limits.gid)  # the code may write here, and only here
        report_path, result_path = base / "report.jsonl", base / "result.json"
        stdout_path, stderr_path = base / "stdout.txt", base / "stderr.txt"
        report_fd = os.open(report_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        result_fd = os.open(result_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        cgroups = _make_cgroups(f"qiusuo-sandbox-{secrets.token_hex(6)}", limits)
        cfg = {"workdir": str(workdir), "program": program,
               "calls": [{"fn": c.fn, "args": c.args, "kwargs": c.kwargs} for c in calls],
               "report_fd": report_fd, "result_fd": result_fd, "allow_weak": allow_weak_isolation,
               "cgroup_procs": [str(d / "cgroup.procs") for d in cgroups],
               "cpu_s": limits.cpu_s, "memory_mb": limits.memory_mb, "fsize_mb": limits.fsize_mb,
               "workdir_mb": limits.workdir_mb, "nproc": limits.nproc, "nofile": limits.nofile,
               "uid": limits.uid, "gid": limits.gid, "preload": list(limits.preload)}
        timed_out = False
        try:
            with stdout_path.open("wb") as out, stderr_path.open("wb") as err:
                proc = subprocess.Popen(
                    [sys.executable, "-I", str(CHILD)], stdin=subprocess.PIPE, stdout=out, stderr=err,
                    cwd=base, start_new_session=True, close_fds=True, pass_fds=(report_fd, result_fd),
                    env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
                )
        finally:
            os.close(report_fd)
            os.close(result_fd)
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
        report = _read_report(report_path)
        stdout, stderr = _tail(stdout_path), _tail(stderr_path)
        if report.get("nproc_exhausted"):
            uid = limits.uid if root else os.getuid()
            raise SandboxError(
                f"the sandbox could not fork its worker: RLIMIT_NPROC={limits.nproc} and uid {uid} already "
                f"runs {_tasks_of_uid(uid)} processes/threads (without a user namespace the caller's own "
                "threads count). Raise SandboxLimits.nproc above that, run fewer threads, or run as root "
                "so the sandbox switches to its own uid")
        if report.get("refused"):
            _count("refused_weak_isolation")
            for reason in refusal_reasons(report["refused"]):
                _count("refused:" + reason)
            _log_once("refused:" + report["refused"], logging.ERROR,
                      f"sandbox refused to run code: {report['refused']}. Every code reward is 0 until the "
                      "kernel allows these layers; pass allow_weak_isolation=True (--allow-weak-sandbox) to "
                      "accept weaker confinement")
            return SandboxResult(values=None, timed_out=False, returncode=proc.returncode, stdout=stdout,
                                 stderr=stderr, isolation=report, refused=report["refused"])
        oom = _oom_killed(cgroups)
        if proc.returncode in (128 + signal.SIGXCPU, 128 + signal.SIGKILL, -signal.SIGKILL) and not oom:
            timed_out = True  # CPU limit: soft SIGXCPU, then hard SIGKILL
        values = None if timed_out else decode_results(_read_capped(result_path, RESULT_READ_LIMIT) or b"",
                                                       len(calls))
        _count("timed_out" if timed_out else "memory_exceeded" if oom else "no_result" if values is None
               else "completed")
        return SandboxResult(values=values, timed_out=timed_out, returncode=proc.returncode, stdout=stdout,
                             stderr=stderr, isolation=report, memory_exceeded=oom)
    finally:
        _remove_cgroups(cgroups)
        shutil.rmtree(base, ignore_errors=True)


def run_many(jobs: list[tuple[str, list[Call]]], limits: SandboxLimits = SandboxLimits(),
             max_workers: int = 2, allow_weak_isolation: bool = False) -> list[SandboxResult]:
    """`run_calls` for each (program, calls), `max_workers` sandboxes at a time."""
    with ThreadPoolExecutor(max_workers=max_workers) as pool:
        return list(pool.map(lambda job: run_calls(job[0], job[1], limits, allow_weak_isolation), jobs))


def probe_isolation(limits: SandboxLimits = SandboxLimits(), allow_weak_isolation: bool = True) -> dict:
    """What confinement this machine gives: network ("netns" or "socket-patch"), PID and mount
    namespaces, work directory ("tmpfs" or why not), uid, capabilities dropped, Landlock ABI
    (0 = none), seccomp ("filter" or why not), and the cgroups used ("cgroup")."""
    result = run_calls("pass", [], limits, allow_weak_isolation)
    return {**result.isolation, "cgroup": cgroup_parents()[1], "refused": result.refused}
