"""Group commit (`-o publish_delay`): a close no longer waits for the disk; its new
version is served at once and published under its name within the delay, in a
batch with others.
What needs the name itself (fsync, rename, link, xattrs) publishes first, a change of
mode, owner or times goes to the waiting version and is published with it,
and a publish that fails reaches the file's next fsync and close."""

from __future__ import annotations

import errno
import os
import random
import subprocess
import threading
import time
from pathlib import Path

import pytest

from .helpers import Mount, MountFactory

SLOW = ("-o", "publish_delay=3")  # a window wide enough to look into


def stored(m: Mount, name: str) -> bytes:
    """The plaintext under `name` in SOURCE right now (empty for an empty file)."""
    blob = (m.source / name).read_bytes()
    return blob and m.decrypt(name, settle=False)


def test_a_closed_file_is_served_at_once_and_published_within_the_delay(
    mount_factory: MountFactory, tmp_path: Path
):
    source = tmp_path / "src"
    m = mount_factory(source, args=SLOW)
    other = mount_factory(source)
    (m.mnt / "f").write_bytes(b"first")
    m.settle()
    (m.mnt / "f").write_bytes(b"second version")
    closed = time.monotonic()
    assert (m.mnt / "f").read_bytes() == b"second version"
    assert (m.mnt / "f").stat().st_size == len(b"second version")
    assert stored(m, "f") == b"first"  # the previous version until the batch
    while stored(m, "f") != b"second version":
        assert time.monotonic() - closed < 3 + 2, "not published within the delay"
        time.sleep(0.05)
    assert time.monotonic() - closed >= 2.5
    # A second daemon over the same SOURCE sees it once published.
    deadline = time.monotonic() + 5
    while (other.mnt / "f").read_bytes() != b"second version":
        assert time.monotonic() < deadline
        time.sleep(0.1)


def test_fsync_rename_link_and_metadata_changes_publish_first(mount_factory: MountFactory):
    m = mount_factory(args=SLOW)
    (m.mnt / "synced").write_bytes(b"x")
    fd = os.open(m.mnt / "synced", os.O_RDONLY)
    os.fsync(fd)  # fsync of a file closed earlier: published when it returns
    os.close(fd)
    assert stored(m, "synced") == b"x"

    (m.mnt / "doc.tmp").write_bytes(b"saved atomically")
    os.rename(m.mnt / "doc.tmp", m.mnt / "doc")  # write, close, rename: an atomic save
    assert stored(m, "doc") == b"saved atomically"

    (m.mnt / "linked").write_bytes(b"two names")
    os.link(m.mnt / "linked", m.mnt / "linked2")
    assert stored(m, "linked2") == b"two names" == stored(m, "linked")

    (m.mnt / "meta").write_bytes(b"metadata")
    os.setxattr(m.mnt / "meta", "user.tag", b"kept")
    assert stored(m, "meta") == b"metadata"
    assert os.getxattr(m.source / "meta", "user.tag") == b"kept"

    (m.mnt / "gone").write_bytes(b"removed before its batch")
    os.unlink(m.mnt / "gone")
    assert not (m.source / "gone").exists()
    time.sleep(3.5)
    assert not (m.source / "gone").exists()  # no batch brings it back
    assert sorted(os.listdir(m.mnt)) == ["doc", "linked", "linked2", "meta", "synced"]


def test_mode_owner_and_times_go_with_the_waiting_version(mount_factory: MountFactory):
    """`tar -x` sets them on every file it has just closed: no publish of its own."""
    m = mount_factory(args=SLOW)
    (m.mnt / "old").write_bytes(b"before")
    m.settle()
    old = (m.source / "old").stat()
    (m.mnt / "old").write_bytes(b"after")
    (m.mnt / "new").write_bytes(b"new file")
    times = (1_000_000_000, 2_000_000_000)
    want = (0o640, 1234, 5678, times[1])
    for name in ("old", "new"):
        os.chmod(m.mnt / name, 0o640)
        os.chown(m.mnt / name, 1234, 5678)
        os.utime(m.mnt / name, ns=times)
        st = (m.mnt / name).stat()
        assert (st.st_mode & 0o777, st.st_uid, st.st_gid, st.st_mtime_ns) == want
    # Nothing published yet: the names in SOURCE hold what they held before.
    assert stored(m, "old") == b"before"
    assert (m.source / "old").stat().st_mode == old.st_mode
    assert stored(m, "new") == b""  # created empty, its content waits for the batch
    m.settle()
    assert (stored(m, "old"), stored(m, "new")) == (b"after", b"new file")
    for name in ("old", "new"):
        st = (m.source / name).stat()
        assert (st.st_mode & 0o777, st.st_uid, st.st_gid, st.st_mtime_ns) == want
        assert (m.mnt / name).read_bytes() == stored(m, name)


def test_a_directory_fsync_publishes_what_was_closed_in_it(mount_factory: MountFactory):
    m = mount_factory(args=SLOW)
    (m.mnt / "d").mkdir()
    for i in range(20):
        (m.mnt / "d" / f"f{i}").write_bytes(b"%d" % i)
    fd = os.open(m.mnt / "d", os.O_RDONLY | os.O_DIRECTORY)
    os.fsync(fd)
    os.close(fd)
    assert all(stored(m, f"d/f{i}") == b"%d" % i for i in range(20))


def test_a_failed_publish_reaches_the_next_fsync_and_close_and_loses_nothing(
    ext4_image: Path, mount_factory: MountFactory
):
    source = ext4_image / "src"
    source.mkdir()
    (source / "d").mkdir()
    m = mount_factory(source, args=("-o", "publish_delay=1"))
    (m.mnt / "d" / "f").write_bytes(b"old")
    m.settle()
    (m.mnt / "d" / "f").write_bytes(b"new content")
    subprocess.run(["chattr", "+i", str(source / "d")], check=True)
    try:
        deadline = time.monotonic() + 10
        while "publishing f failed" not in m.logtext():
            assert time.monotonic() < deadline, "the failed publish was not logged"
            time.sleep(0.1)
        assert (m.mnt / "d" / "f").read_bytes() == b"new content"  # still served
        fd = os.open(m.mnt / "d" / "f", os.O_WRONLY)
        try:
            with pytest.raises(OSError) as failed:
                os.fsync(fd)
            assert failed.value.errno == errno.EPERM
        finally:
            with pytest.raises(OSError) as closing:
                os.close(fd)  # the close reports it too (the descriptor is gone anyway)
            assert closing.value.errno == errno.EPERM
    finally:
        subprocess.run(["chattr", "-i", str(source / "d")], check=True)
    fd = os.open(m.mnt / "d" / "f", os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    assert stored(m, "d/f") == b"new content"


@pytest.mark.faults
@pytest.mark.timeout(300)
def test_kill_9_while_hundreds_of_files_are_closed(mount_factory: MountFactory, tmp_path: Path):
    """Every file is its previous version (empty, as created) or its new one; every
    file whose fsync returned is there whole."""
    source = tmp_path / "src"
    m = mount_factory(source, args=("-o", "publish_delay=0.05"))
    rng = random.Random()
    contents = {f"f{i}": rng.randbytes(rng.choice([1, 100, 5000, 70_000])) for i in range(400)}
    synced: set[str] = set()
    stop = threading.Event()

    def write() -> None:
        for name, data in contents.items():
            if stop.is_set():
                return
            try:
                fd = os.open(m.mnt / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                try:
                    os.write(fd, data)
                    if int(name[1:]) % 10 == 0:
                        os.fsync(fd)
                        synced.add(name)
                finally:
                    os.close(fd)
            except OSError:
                return  # the daemon is gone

    t = threading.Thread(target=write)
    t.start()
    time.sleep(rng.uniform(0.5, 2.0))
    m.kill()
    stop.set()
    t.join(30)
    m.stop()
    m = mount_factory(source)
    present = set(os.listdir(m.mnt))
    assert synced <= present
    for name in present:
        data = (m.mnt / name).read_bytes()
        assert data in (b"", contents[name]), name
        if name in synced:
            assert data == contents[name], name
    print(f"{len(present)} files, {len(synced)} synced")
