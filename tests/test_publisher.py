"""The group-commit publisher on its own, over real files: batches, superseded
versions, settling, failures that are kept and retried."""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

import pytest

from stormfs.publisher import Pending, Publisher

from .helpers import wait_for


class Renames:
    """The publisher's rename, recorded; failing while `fail` is set."""

    def __init__(self) -> None:
        self.done: list[tuple[bytes, float]] = []
        self.fail: OSError | None = None

    def __call__(self, p: Pending) -> None:
        if self.fail is not None:
            raise self.fail
        os.rename(p.temp_name, p.name, src_dir_fd=p.temp_dir_fd, dst_dir_fd=p.dir_fd)
        self.done.append((p.name, time.monotonic()))


@pytest.fixture
def dirs(tmp_path: Path):
    (tmp_path / "tmp").mkdir()
    (tmp_path / "d").mkdir()
    fds = [os.open(tmp_path / n, os.O_PATH | os.O_DIRECTORY) for n in ("tmp", "d")]
    yield tmp_path, fds[0], fds[1]
    for fd in fds:
        os.close(fd)


@pytest.fixture
def publisher():
    """`start(delay)` -> (a publisher, its recorded renames); all closed at teardown."""
    started: list[Publisher] = []

    def start(delay: float) -> tuple[Publisher, Renames]:
        renames = Renames()
        started.append(Publisher(renames, delay=delay))
        return started[-1], renames

    yield start
    for pub in started:
        pub.close()


def pending(tmp_fd: int, dir_fd: int, name: bytes, data: bytes, serial: int) -> Pending:
    temp = b"t-%d" % serial
    fd = os.open(temp, os.O_RDWR | os.O_CREAT, 0o600, dir_fd=tmp_fd)
    os.write(fd, data)
    st = os.fstat(dir_fd)
    return Pending((st.st_dev, st.st_ino, name), os.dup(dir_fd), name, tmp_fd, temp, fd)


def test_closes_within_the_delay_are_published_together(dirs, publisher):
    root, tmp_fd, dir_fd = dirs
    pub, renames = publisher(0.3)
    start = time.monotonic()
    for i in range(50):
        pub.add(pending(tmp_fd, dir_fd, b"f%d" % i, b"v%d" % i, i))
    assert len(pub) == 50 and not renames.done
    wait_for(lambda: len(renames.done) == 50)
    times = [t for _, t in renames.done]
    assert min(times) - start >= 0.3 and max(times) - min(times) < 0.2  # one batch
    assert len(pub) == 0
    assert all((root / "d" / f"f{i}").read_bytes() == b"v%d" % i for i in range(50))
    assert os.listdir(root / "tmp") == []


def test_a_newer_version_supersedes_a_queued_one_and_settle_publishes_at_once(dirs, publisher):
    root, tmp_fd, dir_fd = dirs
    pub, renames = publisher(30)
    first = pending(tmp_fd, dir_fd, b"f", b"first", 1)
    pub.add(first)
    pub.add(pending(tmp_fd, dir_fd, b"f", b"second", 2))
    assert os.listdir(root / "tmp") == ["t-2"]  # the first is gone, never published
    pub.settle(first.place)
    assert (root / "d" / "f").read_bytes() == b"second"
    assert [n for n, _ in renames.done] == [b"f"] and len(pub) == 0


def test_a_failed_publish_is_kept_served_and_retried_by_settle(dirs, publisher):
    root, tmp_fd, dir_fd = dirs
    pub, renames = publisher(0.01)
    renames.fail = OSError(errno.ENOSPC, "No space left on device")
    p = pending(tmp_fd, dir_fd, b"f", b"kept", 1)
    pub.add(p)
    wait_for(lambda: pub.failed(p.place) is not None)
    served = pub.reopen(p.place, os.O_RDONLY)
    assert served is not None
    assert os.pread(served, 10, 0) == b"kept"  # still served meanwhile
    os.close(served)
    with pytest.raises(OSError) as e:
        pub.settle(p.place)
    assert e.value.errno == errno.ENOSPC
    renames.fail = None
    pub.settle(p.place)
    assert (root / "d" / "f").read_bytes() == b"kept" and len(pub) == 0


def test_forget_takes_a_version_out_unpublished(dirs, publisher):
    root, tmp_fd, dir_fd = dirs
    pub, renames = publisher(30)
    p = pending(tmp_fd, dir_fd, b"f", b"never", 1)
    pub.add(p)
    assert pub.forget(p.place) is p and len(pub) == 0
    pub.settle(p.place)  # nothing left to publish
    assert not (root / "d" / "f").exists() and renames.done == []
