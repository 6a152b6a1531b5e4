"""Recovery over a SOURCE that is not a local disk (DESIGN §7): a FUSE SOURCE that
silly-renames files unlinked while open (tests/sillyfs.py, as libfuse's high-level
filesystems and NFS do), and locks that are free while their owners live (as after a
GlusterFS volume restart).  A start must always come back, and never touch the state
of a live daemon.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from stormfs.instances import LEASE_EXPIRY, Lease

from .crashes import crash_loop
from .helpers import Mount, MountFactory

pytestmark = pytest.mark.faults

SILLY_ROUNDS = int(os.environ.get("STORMFS_SILLY_ROUNDS", "10"))


def tmp_dir(source: Path) -> Path:
    return source / ".stormfs" / "tmp"


def instance_of(m: Mount) -> Path:
    (name,) = [n for n in m.instance_dirs() if f".{m.pid}." in n]
    return tmp_dir(m.source) / name


@pytest.mark.timeout(600)
def test_kill_9_and_restart_over_a_silly_renaming_source(
    silly_source: Callable[..., Path], mount_factory: MountFactory, tmp_path: Path
):
    """Each kill leaves the lock, temporaries and unlinked scratch files of a dead
    daemon; every restart takes them over and mounts, by itself."""
    figures = crash_loop(mount_factory, tmp_path, SILLY_ROUNDS, source=silly_source())
    assert figures["kills"] == SILLY_ROUNDS


@pytest.mark.stress
@pytest.mark.timeout(3600)
def test_kill_9_and_restart_over_a_silly_renaming_source_50_times(
    silly_source: Callable[..., Path], mount_factory: MountFactory, tmp_path: Path
):
    figures = crash_loop(mount_factory, tmp_path, 50, source=silly_source())
    assert figures["kills"] == 50


def test_leftover_held_open_is_logged_once_and_removed_later(
    silly_source: Callable[..., Path], mount_factory: MountFactory
):
    """A dead daemon's file that some process still holds open: the start mounts all
    the same, names the leftover in one log line, and a later start removes it."""
    source = silly_source()
    m = mount_factory(source)
    m.kill()
    (dead,) = m.instance_dirs()
    held = os.open(tmp_dir(source) / dead / "held", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.unlink(tmp_dir(source) / dead / "held")  # now .fuse_hidden* in the dead directory
        m2 = mount_factory(source)
        assert m2.instance_dirs() == [instance_of(m2).name]
        assert (m2.mnt / "x").write_bytes(b"serving") == 7
        assert m2.logtext().count(f"left .stormfs/tmp/{dead}.gone") == 1
        assert ".fuse_hidden" in m2.logtext()
        m2.stop()
    finally:
        os.close(held)
    time.sleep(0.5)  # the silly-renamed file goes at its last close
    m3 = mount_factory(source)
    assert sorted(os.listdir(tmp_dir(source))) == [instance_of(m3).name]
    assert (m3.mnt / "x").read_bytes() == b"serving"


def test_free_locks_of_live_daemons_are_not_proof_of_death(
    silly_source: Callable[..., Path], mount_factory: MountFactory
):
    """Two daemons with unpublished writes (temporaries, scratch blocks) lose their
    locks while they run, as on a GlusterFS volume restart: a third daemon's start
    must leave their state alone, and neither loses a byte."""
    source = silly_source()
    a, b = mount_factory(source), mount_factory(source)
    expected: dict[int, bytes] = {}
    fds: dict[int, int] = {}
    for m in (a, b):
        fds[m.pid] = os.open(m.mnt / f"open-{m.pid}", os.O_RDWR | os.O_CREAT, 0o644)
        os.pwrite(fds[m.pid], b"x" * 300_000, 0)
        os.pwrite(fds[m.pid], b"y" * 10, 50_000)  # scratch blocks and a temporary
        expected[m.pid] = b"x" * 50_000 + b"y" * 10 + b"x" * 249_990
    try:
        for m in (a, b):
            inst = instance_of(m)
            before = sorted(os.listdir(inst))
            # A fresh file in the lock's place: unlocked, while its owner believes it holds it.
            (inst / "lock.new").write_bytes(b"")
            os.rename(inst / "lock.new", inst / "lock")
            assert len(before) > 2, before  # lease, lock and some temporaries
        c = mount_factory(source)
        assert "cleaned up" not in c.logtext()
        assert len(c.instance_dirs()) == 3
        for m in (a, b):
            os.pwrite(fds[m.pid], b"z", 0)
            expected[m.pid] = b"z" + expected[m.pid][1:]
    finally:
        for fd in fds.values():
            os.close(fd)
    for m in (a, b):
        assert (m.mnt / f"open-{m.pid}").read_bytes() == expected[m.pid]
        assert c.decrypt(f"open-{m.pid}") == expected[m.pid]


def _lease(inst: Path, **fields: object) -> None:
    lease = Lease("elsewhere", 4242, 1, "another-boot", "pid:[1]", time.time())
    inst.mkdir(parents=True)
    (inst / "lock").write_bytes(b"")
    (inst / "t-1-leftover").write_bytes(b"unpublished")
    (inst / "lease").write_bytes(Lease(**{**lease.__dict__, **fields}).encode())


def test_another_servers_state_waits_for_its_lease_to_expire(
    mount_factory: MountFactory, tmp_path: Path
):
    """A free lock from another server: taken over only once its lease has not been
    renewed for LEASE_EXPIRY seconds."""
    source = tmp_path / "src"
    fresh, expired = tmp_dir(source) / "elsewhere.1.fresh", tmp_dir(source) / "elsewhere.2.old"
    _lease(fresh)
    _lease(expired, renewed=time.time() - LEASE_EXPIRY - 5)
    m = mount_factory(source)
    assert sorted(m.instance_dirs()) == sorted([fresh.name, instance_of(m).name])
    assert (fresh / "t-1-leftover").read_bytes() == b"unpublished"


def test_same_machine_state_goes_once_its_process_is_gone(
    mount_factory: MountFactory, tmp_path: Path
):
    """On this machine the PID tells: a live process (with the start time recorded)
    keeps its state even with a stale lease; a gone one, or a reused PID, does not."""
    source = tmp_path / "src"
    me = Lease.mine()
    live, dead, reused = (tmp_dir(source) / f"here.{n}" for n in ("live", "dead", "reused"))
    same = {"boot_id": me.boot_id, "pid_ns": me.pid_ns, "renewed": 0.0}
    _lease(live, pid=me.pid, start=me.start, **same)
    _lease(dead, pid=2**22 + 1, start=1, **same)
    _lease(reused, pid=me.pid, start=me.start - 1, **same)
    m = mount_factory(source)
    assert sorted(m.instance_dirs()) == sorted([live.name, instance_of(m).name])
