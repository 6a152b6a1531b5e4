"""Fewer requests per file: the counters, -o writeback_cache, -o exclusive, and the
kernel's security.capability probe, all through real mounts."""

from __future__ import annotations

import errno
import json
import os
import subprocess
from pathlib import Path

import pytest

from stormfs.daemon import EXCLUSIVE_TIMEOUT, MountOptions
from stormfs.exitcodes import MOUNT_FAILED

from .helpers import MountFactory, scrubbed_env, stormfs_cmd


def status(mnt: Path) -> dict:
    return json.loads(os.getxattr(mnt, "user.stormfs.status"))


def writes(mnt: Path) -> int:
    """WRITE requests the daemon answered so far."""
    return status(mnt)["requests"].get("write", {}).get("count", 0)


def small_writes(path: Path, n: int = 64, size: int = 1000) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for _ in range(n):
            os.write(fd, b"w" * size)
    finally:
        os.close(fd)


def test_sole_options_parse():
    plain = MountOptions.parse([])
    assert (plain.writeback_cache, plain.exclusive, plain.sole) == (False, False, [])
    o = MountOptions.parse(["writeback_cache", "exclusive,entry_timeout=5"])
    assert o.sole == ["writeback_cache", "exclusive"]
    assert (o.entry_timeout, o.attr_timeout) == (5.0, EXCLUSIVE_TIMEOUT)
    assert "writeback_cache" in o.describe() and "exclusive" in o.describe()


def test_requests_are_counted_by_kind(mount_factory: MountFactory):
    m = mount_factory()
    small_writes(m.mnt / "f", size=4096)
    requests = status(m.mnt)["requests"]
    assert {"create", "write", "flush", "release"} <= set(requests)
    # one WRITE per page-aligned write(2) without the cache (an unaligned one may cost two)
    assert requests["write"]["count"] == 64
    assert all(r["seconds"] >= 0 for r in requests.values())
    text = subprocess.run(
        stormfs_cmd("status", str(m.mnt)), capture_output=True, text=True, timeout=60
    ).stdout
    assert "requests:" in text and "write 64" in text


def test_capability_probe_is_answered_none(mount_factory: MountFactory):
    """The kernel asks for security.capability before every write(2): no such attribute."""
    m = mount_factory()
    (m.mnt / "f").write_bytes(b"x")
    for name in ("security.capability", "security.selinux", "system.posix_acl_access"):
        with pytest.raises(OSError) as e:
            os.getxattr(m.mnt / "f", name)
        assert e.value.errno == errno.ENODATA, name
    before = status(m.mnt)["requests"]["getxattr"]["count"]
    small_writes(m.mnt / "f", n=10)
    # one probe per write(2) (and the status read itself): FUSE caches no answer
    assert status(m.mnt)["requests"]["getxattr"]["count"] - before >= 10


def test_writeback_cache_merges_writes_and_reaches_the_mount(mount_factory: MountFactory):
    m = mount_factory(args=("-o", "writeback_cache"))
    assert "writeback_cache" in status(m.mnt)["options"]
    before = writes(m.mnt)
    small_writes(m.mnt / "f")
    assert writes(m.mnt) - before < 8  # 64 write(2)s, merged in the page cache
    assert (m.mnt / "f").read_bytes() == b"w" * 64_000
    assert (m.mnt / "f").stat().st_size == 64_000
    m.stop()
    assert m.decrypt("f") == b"w" * 64_000


def test_exclusive_raises_the_timeouts_unless_given(mount_factory: MountFactory):
    m = mount_factory(args=("-o", "exclusive"))
    options = status(m.mnt)["options"]
    assert {"exclusive", "entry_timeout=300", "attr_timeout=300"} <= set(options)
    (m.mnt / "f").write_bytes(b"data")
    assert (m.mnt / "f").read_bytes() == b"data"
    given = mount_factory(args=("-o", "exclusive,attr_timeout=2"))
    options = status(given.mnt)["options"]
    assert {"exclusive", "entry_timeout=300", "attr_timeout=2"} <= set(options)


def test_exclusive_remembers_missing_names(mount_factory: MountFactory):
    m = mount_factory(args=("-o", "exclusive"))

    def lookups() -> int:
        return status(m.mnt)["requests"].get("lookup", {}).get("count", 0)

    before = lookups()
    for _ in range(5):
        assert not (m.mnt / "missing").exists()
    assert lookups() - before == 1  # asked once, then remembered
    (m.mnt / "missing").write_bytes(b"made here")  # names made through the mount show
    assert (m.mnt / "missing").read_bytes() == b"made here"
    # What breaking the promise looks like: a name made behind the mount stays unseen.
    assert not (m.mnt / "behind").exists()
    (m.source / "behind").write_bytes(b"x")
    assert not (m.mnt / "behind").exists()


def second_daemon(source: Path, mnt: Path, key: str, *opts: str) -> subprocess.CompletedProcess:
    mnt.mkdir()
    return subprocess.run(
        stormfs_cmd("mount", "--foreground", *opts, str(source), str(mnt)),
        env=scrubbed_env(key),
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ((), ("-o", "exclusive")),
        (("-o", "exclusive"), ()),
        (("-o", "writeback_cache"), ("-o", "writeback_cache")),
    ],
    ids=["exclusive-joins", "joins-exclusive", "writeback-joins-writeback"],
)
def test_sole_options_refuse_a_second_daemon(
    mount_factory: MountFactory, tmp_path: Path, key: str, first: tuple, second: tuple
):
    m = mount_factory(args=first)
    (m.mnt / "f").write_bytes(b"kept")
    done = second_daemon(m.source, tmp_path / "second", key, *second)
    assert done.returncode == MOUNT_FAILED, done.stderr
    assert "the only one" in done.stderr and ".stormfs/tmp/" in done.stderr
    assert not os.path.ismount(tmp_path / "second")
    assert (m.mnt / "f").read_bytes() == b"kept"  # the first one serves on
    # once the first has stopped, the option is free to use
    m.stop()
    again = mount_factory(m.source, args=second)
    assert (again.mnt / "f").read_bytes() == b"kept"
