"""The learner group's torch.distributed store: on one node nothing may listen on a routable
address (torch's TCPStore listens on every interface, whatever host it is given, and has no
authentication). Runs the learners' real `rendezvous` + `join` in two processes, without Ray."""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("torch.distributed")


def _listening_inodes(pids: list[int]) -> set[str]:
    inodes = set()
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    return inodes


def _routable_listeners(pids: list[int]) -> list[str]:
    """LISTEN sockets of `pids` bound to anything but loopback, from /proc/net/tcp{,6}."""
    mine, found = _listening_inodes(pids), []
    loopback = {"0100007F", "00000000000000000000000001000000"}  # 127.0.0.1, ::1
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "0A" and inode in mine and local.split(":")[0] not in loopback:
                found.append(f"{table}: {local}")
    return found


def _rank(rank: int, init_method: str, ready, done) -> None:
    import torch
    import torch.distributed as dist

    from qiusuo.train.distributed.learner import Learner

    me = SimpleNamespace(cfg=SimpleNamespace(device="cpu"), rank=rank, world=2)
    Learner.join(me, init_method)
    t = torch.tensor([rank + 1.0])
    dist.all_reduce(t)
    assert t.item() == 3.0
    ready.put(os.getpid())
    done.wait(60)
    dist.destroy_process_group()


def test_single_node_learners_listen_on_no_routable_address():
    from qiusuo.train.distributed.learner import Learner

    init_method = Learner.rendezvous(None, single_node=True)
    assert init_method.startswith("file://")
    store_dir = Path(init_method[len("file://"):]).parent
    assert (store_dir.stat().st_mode & 0o777) == 0o700
    ctx = multiprocessing.get_context("fork")
    ready, done = ctx.Queue(), ctx.Event()
    procs = [ctx.Process(target=_rank, args=(r, init_method, ready, done)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        pids = [ready.get(timeout=120) for _ in procs]
        assert _routable_listeners(pids) == []
    finally:
        done.set()
        for p in procs:
            p.join(timeout=60)
    assert [p.exitcode for p in procs] == [0, 0]
