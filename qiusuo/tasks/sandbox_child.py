"""The sandbox's child side: run as `python -I sandbox_child.py`, config as JSON on stdin.

This file never imports qiusuo: it is executed by path in a fresh interpreter, and it is the one
place where model-written code is executed. Threat model: from the program's first line on, the
worker interpreter is the adversary's. It can rebind builtins, patch `json`, walk frames, write
to any fd it holds, exit at will. So nothing that decides the reward lives there:

- The worker receives the program and, per test, only a function name and literal arguments
  (parsed by the parent from `assert f(args) == expected`). The expected values, the test source
  and any secret never enter this interpreter; there is nothing to steal or to overwrite.
- The worker returns values only: after the program ran, it calls each function and encodes the
  return value with a fixed encoder whose references are captured before the program runs. It
  reads values through the base types' own C methods (`int.__repr__(v)`, `dict.items(v)`,
  `tuple.__iter__(v)`), so a subclass's `__eq__`, `__repr__`, `__iter__` or `__hash__` never runs
  and only its real contents are sent (an int subclass "equal to everything" is sent as the int
  it holds, a Counter as its dict); other types are refused; size, depth and digit limits. It writes one JSON document to the result fd (a file the parent opened; the
  program has no path to it).
- The parent treats those bytes as hostile data: size-capped, decoded with a strict json.loads
  into plain types, compared with the expected values by exact type (see code.py), and `passed`
  is clamped to 0..total. A program that subverts the encoder or writes the result fd itself can
  only report values it chose, which is no better than returning them; printing to stdout,
  exiting early or crashing yields no valid document and 0.

The walls, in this order:

1. (launcher, the caller's privileges) join the run's cgroups (memory, pids) when the parent made
   them; `unshare(CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID)` (inside a new user namespace when
   unprivileged): an empty network namespace, a PID namespace whose init takes every process
   down when it dies, and a private mount namespace in which the work directory becomes a
   size-limited tmpfs. Missing namespaces are a refusal unless `allow_weak` is set.
2. fork; the child becomes PID 1 of the namespace and: pre-imports common stdlib modules (the
   interpreter may live where the unprivileged uid cannot read), sets RLIMIT_CORE/CPU/AS/FSIZE/
   NOFILE/NPROC, drops every capability (bounding and ambient sets, then setuid to an
   unprivileged uid when root, then capset to zero), sets no-new-privs and parent-death SIGKILL,
   applies Landlock (writes only beneath the work directory; reads only there and in the Python
   installation and system library directories, so the dataset holding the expected answers is
   unreadable; no TCP, no signals or abstract sockets outside) and a seccomp filter (libseccomp
   via pyseccomp) that denies namespace, mount, bpf, keyring, ptrace, perf, module and io_uring
   syscalls and unix-domain sockets. A layer the kernel refuses, or a step that fails, is a
   refusal unless `allow_weak` is set. Each outcome is written to the report fd, which the
   worker never holds.
3. forks the worker (PID 1 only waits: the kernel drops signals to a namespace's init that it has
   no handler for, SIGXCPU included); a fork refused by RLIMIT_NPROC is reported as such, since
   it means the sandbox uid already runs too many tasks, not that the program failed.
"""

import ctypes
import errno
import importlib
import json
import os
import resource
import signal
import struct
import sys
import traceback

CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWNET, CLONE_NEWPID = 0x20000, 0x10000000, 0x40000000, 0x20000000
CLONE_NEWCGROUP, CLONE_NEWUTS, CLONE_NEWIPC, CLONE_NEWTIME = 0x02000000, 0x04000000, 0x08000000, 0x80
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS, PR_CAPBSET_DROP, PR_CAP_AMBIENT = 1, 38, 24, 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
MS_NOSUID, MS_NODEV, MS_REC, MS_PRIVATE = 2, 4, 0x4000, 0x40000
SYS_LANDLOCK_CREATE_RULESET, SYS_LANDLOCK_ADD_RULE, SYS_LANDLOCK_RESTRICT_SELF = 444, 445, 446
SYS_CAPSET = 126
EXIT_REFUSED, EXIT_NPROC = 97, 98  # init's exit codes for "refused to run" and "could not fork"
PRELOAD = (
    "array", "bisect", "cmath", "collections", "collections.abc", "copy", "dataclasses", "datetime",
    "decimal", "encodings.idna", "enum", "fractions", "functools", "hashlib", "heapq", "io", "itertools", "json", "math",
    "numbers", "operator", "random", "re", "socket", "statistics", "string", "struct", "textwrap",
    "time", "typing", "unicodedata",
)  # fmt: skip
# Syscalls nobody's unit-tested function needs and every container escape or kernel exploit
# likes; denied with EPERM (clone3 with ENOSYS, so libc falls back to clone, whose namespace
# flags are filtered).
DENIED_SYSCALLS = (
    "unshare", "setns", "mount", "umount2", "pivot_root", "chroot", "move_mount", "open_tree", "fsopen",
    "fsconfig", "fsmount", "fspick", "mount_setattr", "bpf", "keyctl", "add_key", "request_key", "ptrace",
    "process_vm_readv", "process_vm_writev", "perf_event_open", "kexec_load", "kexec_file_load",
    "init_module", "finit_module", "delete_module", "reboot", "swapon", "swapoff", "userfaultfd",
    "io_uring_setup", "io_uring_enter", "io_uring_register", "open_by_handle_at", "name_to_handle_at",
    "quotactl", "acct", "settimeofday", "clock_settime", "clock_adjtime", "adjtimex", "syslog",
    "personality", "lookup_dcookie", "vhangup", "fanotify_init", "pidfd_getfd", "kcmp",
)  # fmt: skip
NAMESPACE_FLAGS = (CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWNET, CLONE_NEWPID, CLONE_NEWCGROUP, CLONE_NEWUTS,
                   CLONE_NEWIPC, CLONE_NEWTIME)
RESULT_LIMIT = 1 << 20  # bytes of encoded return values the worker may send in all
MAX_DEPTH = 64

_libc = ctypes.CDLL(None, use_errno=True)


def _unshare(flags: int) -> bool:
    return _libc.unshare(ctypes.c_int(flags)) == 0


def _syscall(number: int, *args) -> int:
    # syscall(2) is variadic: pass ints as C longs, or ctypes would pass them as int32
    return _libc.syscall(*(ctypes.c_long(a) if isinstance(a, int) else a for a in (number, *args)))


def isolate_namespaces() -> dict:
    """Enter fresh mount + network + PID namespaces if the kernel lets us; report what we got."""
    flags = CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID
    if os.geteuid() == 0 and _unshare(flags):
        return {"network": "netns", "pid_namespace": True, "mount_namespace": True, "user_namespace": False}
    uid, gid = os.getuid(), os.getgid()
    if os.geteuid() != 0 and _unshare(CLONE_NEWUSER | flags):
        for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
        return {"network": "netns", "pid_namespace": True, "mount_namespace": True, "user_namespace": True}
    if _unshare(CLONE_NEWNET):
        return {"network": "netns", "pid_namespace": False, "mount_namespace": False, "user_namespace": False}
    return {"network": "socket-patch", "pid_namespace": False, "mount_namespace": False, "user_namespace": False}


def mount_workdir(workdir: str, size_mb: int, uid: int, gid: int) -> str:
    """Make `workdir` a private tmpfs of `size_mb` (and 4096 inodes): the run's disk quota.
    Returns "tmpfs", or the reason it stayed on disk."""
    mount = _libc.mount
    mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
    # first stop mounts propagating back to the host's namespace
    if mount(None, b"/", None, MS_REC | MS_PRIVATE, None) != 0:
        return f"disk (make-private failed: {os.strerror(ctypes.get_errno())})"
    options = f"size={size_mb}m,nr_inodes=4096,mode=0700,uid={uid},gid={gid}".encode()
    if mount(b"tmpfs", workdir.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, options) != 0:
        return f"disk (tmpfs mount failed: {os.strerror(ctypes.get_errno())})"
    return "tmpfs"


def read_roots() -> list[str]:
    """Directories the program may read: the interpreter's installation and the system's
    libraries, nothing else. The dataset with the expected answers, the caller's home, /proc (the
    caller's environ when it runs as the same uid) and /sys stay unreadable."""
    import sysconfig

    roots = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix, "/usr", "/lib", "/lib64", "/etc",
             "/dev", "/bin", "/sbin"}
    roots |= {v for k, v in sysconfig.get_paths().items() if k in ("stdlib", "platstdlib", "purelib", "platlib")}
    roots |= {os.path.dirname(os.path.realpath(sys.executable))}
    return sorted(r for r in roots if r and os.path.isdir(r))


def open_paths(paths: list[str]) -> list[int]:
    """O_PATH fds of `paths`, opened while still privileged (the interpreter may live where the
    sandbox uid cannot even look, e.g. /root/.pyenv; DAC then denies it anyway)."""
    return [os.open(p, os.O_PATH | os.O_CLOEXEC) for p in paths]


def apply_landlock(workdir: str, readable: list[int]) -> int:
    """Writes only beneath `workdir`; reads and execution only beneath it and `readable`; no TCP;
    no signals or abstract unix sockets outside the sandbox. `readable` holds O_PATH fds (closed
    here). Returns the ABI applied (0: none)."""
    abi = _syscall(SYS_LANDLOCK_CREATE_RULESET, None, 0, 1)  # flag 1: query the ABI version
    if abi < 1:
        for fd in readable:
            os.close(fd)
        return 0
    read_fs = (1 << 0) | (1 << 2) | (1 << 3)  # execute, read_file, read_dir
    write_fs = sum(1 << b for b in (1, 4, 5, 6, 7, 8, 9, 10, 11, 12))  # write, remove, make-*
    write_fs |= (1 << 13 if abi >= 2 else 0) | (1 << 14 if abi >= 3 else 0)  # refer, truncate
    net = 0b11 if abi >= 4 else 0  # bind_tcp | connect_tcp, with no rule allowing any port
    scoped = 0b11 if abi >= 6 else 0  # abstract unix sockets | signals

    class RulesetAttr(ctypes.Structure):
        _fields_ = [("fs", ctypes.c_uint64), ("net", ctypes.c_uint64), ("scoped", ctypes.c_uint64)]

    class PathBeneath(ctypes.Structure):
        _pack_ = 1
        _fields_ = [("allowed", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]

    attr = RulesetAttr(read_fs | write_fs, net, scoped)
    size = 8 if abi < 4 else 16 if abi < 6 else 24
    ruleset = _syscall(SYS_LANDLOCK_CREATE_RULESET, ctypes.byref(attr), size, 0)
    if ruleset < 0:
        for fd in readable:
            os.close(fd)
        return 0
    ok = True
    for fd, allowed in [(os.open(workdir, os.O_PATH | os.O_CLOEXEC), read_fs | write_fs)] + \
            [(fd, read_fs) for fd in readable]:
        rule = PathBeneath(allowed, fd)
        ok = ok and _syscall(SYS_LANDLOCK_ADD_RULE, ruleset, 1, ctypes.byref(rule), 0) == 0  # 1: path-beneath
        os.close(fd)
    ok = ok and _syscall(SYS_LANDLOCK_RESTRICT_SELF, ruleset, 0) == 0
    os.close(ruleset)
    return abi if ok else 0


def drop_bounding_capabilities() -> None:
    """Empty the bounding and ambient sets (needs CAP_SETPCAP, so before the uid drop): no
    later exec can regain a capability."""
    with open("/proc/sys/kernel/cap_last_cap") as f:
        last = int(f.read())
    for cap in range(last + 1):
        _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0)
    _libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)


def clear_capabilities() -> bool:
    """capset(2) everything to zero (a no-op after setuid away from root, the whole job inside a
    user namespace), then check /proc: True when no capability of any set is left."""
    header = ctypes.create_string_buffer(struct.pack("Ii", 0x20080522, 0), 8)  # _LINUX_CAPABILITY_VERSION_3
    data = ctypes.create_string_buffer(24)  # two zeroed {effective, permitted, inheritable} words
    _syscall(SYS_CAPSET, header, data)
    with open("/proc/self/status") as f:
        caps = dict(line.split(":", 1) for line in f if line.startswith("Cap"))
    return all(int(caps.get(k, "1"), 16) == 0 for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"))


def install_seccomp() -> str:
    """Deny the syscalls in DENIED_SYSCALLS and namespace-creating clones. Returns "filter", or
    why there is none."""
    import socket as socket_module

    try:
        import pyseccomp as seccomp
    except ImportError:
        return "unavailable (pip install pyseccomp; needs libseccomp2)"
    try:
        filt = seccomp.SyscallFilter(seccomp.ALLOW)
        for name in DENIED_SYSCALLS:
            try:
                filt.add_rule(seccomp.ERRNO(errno.EPERM), name)
            except (OSError, ValueError, RuntimeError):
                pass  # not a syscall on this architecture
        for flag in NAMESPACE_FLAGS:  # rules of one syscall are OR-ed: any namespace flag denies
            filt.add_rule(seccomp.ERRNO(errno.EPERM), "clone", seccomp.Arg(0, seccomp.MASKED_EQ, flag, flag))
        filt.add_rule(seccomp.ERRNO(errno.ENOSYS), "clone3")  # flags live in memory, unfilterable
        # unix sockets by path are not covered by the network namespace or Landlock: without
        # this, a program running as the caller's uid could talk to its sockets (Ray's raylet...)
        filt.add_rule(seccomp.ERRNO(errno.EPERM), "socket", seccomp.Arg(0, seccomp.EQ, socket_module.AF_UNIX))
        filt.load()
    except (OSError, RuntimeError) as e:
        return f"failed ({e})"
    return "filter"


def block_sockets() -> None:
    """In-process fallback when no network namespace is available (allow_weak only)."""
    import socket

    def refuse(*args, **kwargs):
        raise PermissionError("network access is disabled in the sandbox")

    socket.socket = refuse  # type: ignore[assignment]
    socket.create_connection = refuse  # type: ignore[assignment]
    socket.socketpair = refuse  # type: ignore[assignment]


def confine(cfg: dict, report: dict) -> None:
    """Limits, capability and privilege drop, Landlock, seccomp: everything between fork and the
    untrusted code. Fills `report` with what each layer gave."""
    for name in PRELOAD + tuple(cfg.get("preload", ())):
        importlib.import_module(name)
    try:
        import pyseccomp  # noqa: F401 — imported while the interpreter's files are still readable
    except ImportError:
        pass
    readable = open_paths(read_roots())  # before the uid drop, like the imports
    mb = 2**20
    limits = [(resource.RLIMIT_CORE, 0), (resource.RLIMIT_CPU, cfg["cpu_s"]),
              (resource.RLIMIT_AS, cfg["memory_mb"] * mb), (resource.RLIMIT_FSIZE, cfg["fsize_mb"] * mb),
              (resource.RLIMIT_NOFILE, cfg["nofile"]), (resource.RLIMIT_NPROC, cfg["nproc"])]
    for which, soft in limits:
        # hard CPU limit one second above soft: SIGXCPU first, SIGKILL if it is ignored
        resource.setrlimit(which, (soft, soft + 1 if which == resource.RLIMIT_CPU else soft))
    drop_bounding_capabilities()
    if os.geteuid() == 0:
        os.setgroups([])
        os.setgid(cfg["gid"])
        os.setuid(cfg["uid"])
    report["capabilities_dropped"] = clear_capabilities()
    _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # after setuid: a uid change clears it
    report.update(uid=os.getuid(), landlock_abi=apply_landlock(cfg["workdir"], readable))
    if report["network"] != "netns":
        block_sockets()
    report["seccomp"] = install_seccomp()


def weaknesses(report: dict) -> list[str]:
    """The layers this run lacks, in words (empty: fully confined)."""
    missing = []
    if report.get("network") != "netns":
        missing.append("no network namespace")
    if report.get("pid_namespace") is False:
        missing.append("no PID namespace")
    if report.get("landlock_abi") == 0:
        missing.append("no Landlock")
    if "seccomp" in report and report["seccomp"] != "filter":
        missing.append(f"no seccomp filter: {report['seccomp']}")
    if report.get("capabilities_dropped") is False:
        missing.append("capabilities still held")
    return missing


# --- the worker: values out, nothing in ---------------------------------------------------------
def make_encoder():
    """A JSON encoder bound, now, to the builtins it uses: later rebinding of names by the
    program does not reach it. Values are read through the base types' own C methods
    (`int.__repr__`, `dict.items`, `tuple.__iter__`...), never through the value's class, so a
    subclass counts as its base (a Counter is its dict, a namedtuple its tuple) while its own
    `__eq__`, `__repr__`, `__iter__` or `__hash__` never run. Other types are refused (raise)."""
    _isinstance, _len, _list, _enumerate = isinstance, len, list, enumerate
    _int_repr, _float_repr, _str_str, _bytes_hex = int.__repr__, float.__repr__, str.__str__, bytes.hex
    _real, _imag = complex.real.__get__, complex.imag.__get__
    _dict_items, _list_copy = dict.items, list.copy
    _tuple_iter, _set_iter, _frozenset_iter = tuple.__iter__, set.__iter__, frozenset.__iter__
    _isnan, _isinf = __import__("math").isnan, __import__("math").isinf
    _quote = json.encoder.encode_basestring_ascii

    class Refused(Exception):
        pass

    def number(x: float) -> str:
        return '{"float":"%s"}' % _float_repr(x) if (_isnan(x) or _isinf(x)) else _float_repr(x)

    def encode(value, out: list, depth: int, budget: list) -> None:
        if depth > MAX_DEPTH:
            raise Refused("too deep")
        kind = None
        if value is None:
            piece = "null"
        elif _isinstance(value, bool):  # bool cannot be subclassed: True or False
            piece = "true" if value is True else "false"
        elif _isinstance(value, int):
            piece = _int_repr(value)  # ValueError past sys.get_int_max_str_digits() (4300)
        elif _isinstance(value, float):
            piece = number(value)
        elif _isinstance(value, str):
            piece = _quote(_str_str(value))
        elif _isinstance(value, bytes):
            piece = '{"bytes":"%s"}' % _bytes_hex(value)
        elif _isinstance(value, complex):
            piece = '{"complex":[%s,%s]}' % (_float_repr(_real(value)), _float_repr(_imag(value)))
        elif _isinstance(value, dict):
            kind, items = "dict", _list(_dict_items(value))
        elif _isinstance(value, list):
            kind, items = "list", _list_copy(value)
        elif _isinstance(value, tuple):
            kind, items = "tuple", _list(_tuple_iter(value))
        elif _isinstance(value, set):
            kind, items = "set", _list(_set_iter(value))
        elif _isinstance(value, frozenset):
            kind, items = "frozenset", _list(_frozenset_iter(value))
        else:
            raise Refused("unsupported type")
        if kind is None:
            budget[0] -= _len(piece)
            if budget[0] < 0:
                raise Refused("too large")
            out.append(piece)
            return
        budget[0] -= _len(items)
        if budget[0] < 0:
            raise Refused("too large")
        out.append('{"%s":[' % kind)
        for i, item in _enumerate(items):
            if i:
                out.append(",")
            if kind == "dict":
                out.append("[")
                encode(item[0], out, depth + 1, budget)
                out.append(",")
                encode(item[1], out, depth + 1, budget)
                out.append("]")
            else:
                encode(item, out, depth + 1, budget)
        out.append("]}")

    def encode_value(value, budget: list) -> str:
        out: list = []
        encode(value, out, 0, budget)
        return "".join(out)

    return encode_value


def run_untrusted(cfg: dict, result_fd: int) -> None:
    """Execute the program, call each function, write `{"results": [...]}` to `result_fd`:
    per call `{"value": <encoded>}` or `{"error": "raised" | "unencodable"}`."""
    import ast
    import builtins

    encode_value, write, _BaseException = make_encoder(), os.write, BaseException
    # decode the arguments before the program exists: trusted literals, fresh objects per call
    calls = [(c["fn"], ast.literal_eval(c["args"]), ast.literal_eval(c["kwargs"])) for c in cfg["calls"]]
    program = cfg["program"]  # cfg holds no expected value, test source or secret: nothing to steal
    namespace = {"__name__": "__main__", "__builtins__": builtins}
    try:
        exec(compile(program, "solution.py", "exec"), namespace)
    except _BaseException:  # noqa: BLE001 — any failure of the program fails every test
        traceback.print_exc()
        write(result_fd, b'{"results":null}')
        return
    pieces, budget = [], [RESULT_LIMIT]
    for fn, args, kwargs in calls:
        try:
            value = namespace[fn](*args, **kwargs)
        except _BaseException:  # noqa: BLE001 — SystemExit in a call is a failed test, not an exit
            pieces.append('{"error":"raised"}')
            continue
        try:
            pieces.append('{"value":%s}' % encode_value(value, budget))
        except _BaseException:  # noqa: BLE001 — refused types, 10^6-digit ints, hostile containers
            pieces.append('{"error":"unencodable"}')
    write(result_fd, ('{"results":[%s]}' % ",".join(pieces)).encode())


def _exit_code(status: int) -> int:
    return os.WEXITSTATUS(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)


def main() -> None:
    cfg = json.loads(sys.stdin.read())
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    report_fd, result_fd = cfg["report_fd"], cfg["result_fd"]

    def send(**items) -> None:  # one JSON line per step: a crash later still leaves the earlier ones
        os.write(report_fd, (json.dumps(items) + "\n").encode())

    for procs in cfg["cgroup_procs"]:
        with open(procs, "w") as f:  # this launcher, and so everything it forks, joins the run's cgroup
            f.write(str(os.getpid()))
    report = isolate_namespaces()
    if report["mount_namespace"]:
        owner = (cfg["uid"], cfg["gid"]) if os.geteuid() == 0 else (os.getuid(), os.getgid())
        report["workdir"] = mount_workdir(cfg["workdir"], cfg["workdir_mb"], *owner)
    else:
        report["workdir"] = "disk (no mount namespace)"
    os.chdir(cfg["workdir"])  # after the mount: the cwd must be the tmpfs, not the directory under it
    send(**report)
    if weaknesses(report) and not cfg["allow_weak"]:
        send(refused="; ".join(weaknesses(report)))
        sys.exit(EXIT_REFUSED)
    init = os.fork()
    if init == 0:
        # PID 1 of the new namespace. It only waits: the kernel drops signals to a namespace's
        # init that it has no handler for, SIGXCPU from RLIMIT_CPU included, so the untrusted
        # code must run in a child of it. When init exits, the kernel kills the whole namespace.
        code = 1
        try:
            try:
                confine(cfg, report)
            except Exception as e:  # noqa: BLE001 — any failed wall is a refusal, reported with its reason
                traceback.print_exc()
                send(refused=f"confinement failed: {type(e).__name__}: {e}")
                os._exit(EXIT_REFUSED)
            send(**{k: report[k] for k in ("uid", "landlock_abi", "seccomp", "capabilities_dropped")})
            if weaknesses(report) and not cfg["allow_weak"]:
                send(refused="; ".join(weaknesses(report)))
                os._exit(EXIT_REFUSED)
            try:
                worker = os.fork()
            except BlockingIOError:
                send(nproc_exhausted=True)
                os._exit(EXIT_NPROC)
            if worker == 0:
                os.close(report_fd)
                _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
                run_untrusted(cfg, result_fd)
                os._exit(0)
            os.close(result_fd)
            os.close(report_fd)
            code = _exit_code(os.waitpid(worker, 0)[1])
        except BaseException:  # noqa: BLE001 — report why confinement failed, then exit
            traceback.print_exc()
        finally:
            os._exit(code)
    os.close(result_fd)
    os.close(report_fd)
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
