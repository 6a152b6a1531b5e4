"""Fault injection (DESIGN §3): kill -9 at random moments, a full disk, backing files
that go bad behind the mount, tampered envelopes.

The kill tests print their seed; rerun a failure with STORMFS_CRASH_SEED=<seed>.
`make stress` runs the kill loop many more times (STORMFS_STRESS_CRASH_ROUNDS).
"""

from __future__ import annotations

import errno
import json
import os
import stat
import subprocess
import threading
import time
from pathlib import Path

import pytest

from stormfs import format as fmt
from stormfs import keys
from stormfs.instances import LEASE_EXPIRY, Lease

from .crashes import crash_loop
from .helpers import Mount, MountFactory, audit, storm_cloud_envelope, wait_for

pytestmark = pytest.mark.faults

CRASH_ROUNDS = int(os.environ.get("STORMFS_CRASH_ROUNDS", "50"))


@pytest.mark.timeout(600)
def test_kill_9_during_writes_leaves_every_file_whole(mount_factory: MountFactory, tmp_path):
    figures = crash_loop(mount_factory, tmp_path, CRASH_ROUNDS)
    assert figures["kills"] == CRASH_ROUNDS
    # Some kills did land inside commits: temporaries were left for recovery to clean.
    assert figures["temps"] > 0


@pytest.mark.stress
@pytest.mark.timeout(3600)
def test_kill_9_many_times(mount_factory: MountFactory, tmp_path):
    rounds = int(os.environ.get("STORMFS_STRESS_CRASH_ROUNDS", "500"))
    figures = crash_loop(mount_factory, tmp_path, rounds)
    assert figures["temps"] > 0 and figures["redo"] > 0


def _dead_instance(source: Path, name: str = "deadhost.1.0000dead") -> Path:
    """The instance directory of a daemon on another server whose lease expired."""
    inst = source / ".stormfs" / "tmp" / name
    inst.mkdir(parents=True)
    (inst / "lock").write_bytes(b"")
    renewed = time.time() - LEASE_EXPIRY - 1
    (inst / "lease").write_bytes(Lease("deadhost", 1, 1, "elsewhere", "pid:[1]", renewed).encode())
    return inst


def test_recovery_replays_a_complete_redo_record(mount_factory: MountFactory, tmp_path, key):
    """A daemon died in the middle of rewriting a hard-linked file in place: the next
    mount finishes the copy from the synced temporary, then removes the leftovers."""
    source = tmp_path / "src"
    source.mkdir()
    (source / "a").write_bytes(storm_cloud_envelope(key, b"old content " * 1000))
    (source / "good").write_bytes(storm_cloud_envelope(key, b"lets the key check pass"))
    os.link(source / "a", source / "b")
    new = storm_cloud_envelope(key, b"new")
    inst = _dead_instance(source)
    (inst / "t-1-abc").write_bytes(new)
    half = new[:10] + (source / "a").read_bytes()[10:]  # the overwrite was under way
    (source / "a").write_bytes(half)
    st = (source / "a").stat()
    record = {"target": str(source / "a"), "temp": "t-1-abc", "dev": st.st_dev, "ino": st.st_ino}
    (inst / "redo-t-1-abc").write_text(json.dumps(record))
    m = mount_factory(source)
    assert (m.mnt / "a").read_bytes() == b"new"
    assert (m.mnt / "b").read_bytes() == b"new"
    assert m.instance_dirs() == [n for n in m.instance_dirs() if f".{m.pid}." in n]
    assert "finished an interrupted rewrite of a" in m.logtext()


@pytest.mark.parametrize("record", [b"", b'{"target": "/x", "te'])
def test_recovery_survives_a_torn_redo_record(
    mount_factory: MountFactory, tmp_path, key, record: bytes
):
    """Killed while writing the redo record itself: the in-place copy had not started,
    so the file is untouched; the mount must come up and drop the record."""
    source = tmp_path / "src"
    source.mkdir()
    old = storm_cloud_envelope(key, b"intact")
    (source / "a").write_bytes(old)
    os.link(source / "a", source / "b")
    inst = _dead_instance(source)
    (inst / "t-1-abc").write_bytes(storm_cloud_envelope(key, b"never published"))
    (inst / "redo-t-1-abc").write_bytes(record)
    m = mount_factory(source)
    assert (m.mnt / "a").read_bytes() == b"intact"
    assert (m.mnt / "b").read_bytes() == b"intact"
    assert len(m.instance_dirs()) == 1


def test_recovery_leaves_a_live_daemons_instance_alone(mount_factory: MountFactory, tmp_path):
    """Two daemons on one SOURCE: the second start must not clean the first one's files."""
    source = tmp_path / "src"
    a = mount_factory(source)
    fd = os.open(a.mnt / "open", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, b"x" * 100_000, 0)
        os.pwrite(fd, b"y" * 10, 50_000)  # scratch blocks and a temporary in a's instance
        b = mount_factory(source)
        assert len(b.instance_dirs()) == 2
        os.pwrite(fd, b"z", 0)
    finally:
        os.close(fd)
    expected = b"z" + b"x" * 49_999 + b"y" * 10 + b"x" * 49_990
    assert (a.mnt / "open").read_bytes() == expected
    wait_for(lambda: (b.mnt / "open").stat().st_size == len(expected))
    assert (b.mnt / "open").read_bytes() == expected


# ---- full disk ---------------------------------------------------------------


def _free(path: Path) -> int:
    sv = os.statvfs(path)
    return sv.f_bavail * sv.f_frsize


def _fill(path: Path, leave: int) -> None:
    """Fill the filesystem under `path` until about `leave` bytes are free."""
    with open(path / "filler", "ab") as f:
        f.write(bytes(max(0, _free(path) - leave)))


def _expect_enospc(action) -> None:
    with pytest.raises(OSError) as e:
        action()
    assert e.value.errno == errno.ENOSPC, e.value


def test_full_disk_gives_enospc_and_keeps_previous_versions(tmpfs, mount_factory):
    source = tmpfs("16m")
    m = mount_factory(source)
    keep = os.urandom(3 << 20)
    small = b"small file, previous version"
    (m.mnt / "keep").write_bytes(keep)
    (m.mnt / "small").write_bytes(small)
    _fill(source, 256 << 10)

    def intact() -> None:
        assert (m.mnt / "keep").read_bytes() == keep
        assert (m.mnt / "small").read_bytes() == small
        assert m.decrypt("keep") == keep
        assert m.decrypt("small") == small
        (inst,) = (source / ".stormfs" / "tmp").iterdir()
        wait_for(
            lambda: sorted(os.listdir(inst)) == ["lease", "lock"]
        )  # the failed commit's temporary is gone

    # write(): a new file streams into a temporary that cannot grow
    def write_big() -> None:
        with open(m.mnt / "big", "wb") as f:
            f.write(os.urandom(4 << 20))

    _expect_enospc(write_big)
    os.unlink(m.mnt / "big")
    intact()

    # write(): a write within the first 64 MiB streams, copying what lies before it now
    def patch_far() -> None:
        fd = os.open(m.mnt / "keep", os.O_WRONLY)
        try:
            os.pwrite(fd, b"changed", 2 << 20)
        finally:
            os.close(fd)

    _expect_enospc(patch_far)
    intact()

    # close(): a write behind the streamed end goes to scratch blocks and fits; the
    # commit (a whole new envelope) does not
    def patch_then_close() -> None:
        fd = os.open(m.mnt / "keep", os.O_WRONLY)
        try:
            os.pwrite(fd, b"c", 0)
            os.pwrite(fd, b"changed", 0)
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)

    _expect_enospc(patch_then_close)
    intact()

    # fsync(): same, reported by fsync; the handle stays usable
    fd = os.open(m.mnt / "keep", os.O_RDWR)
    try:
        os.pwrite(fd, b"c", 0)
        os.pwrite(fd, b"changed", 0)
        _expect_enospc(lambda: os.fsync(fd))
        assert os.pread(fd, 7, 0) == b"changed"  # still pending, not lost yet
    finally:
        _expect_enospc(lambda: os.close(fd))
    intact()

    # an O_TRUNC rewrite of a small file that would fit is refused no more than needed
    (m.mnt / "small").write_bytes(b"rewritten")
    small = b"rewritten"
    intact()

    # space comes back: everything works again
    os.unlink(source / "filler")
    (m.mnt / "big").write_bytes(b"B" * (4 << 20))
    fd = os.open(m.mnt / "keep", os.O_RDWR)
    try:
        os.pwrite(fd, b"c", 0)
        os.pwrite(fd, b"changed", 0)
        os.fsync(fd)
    finally:
        os.close(fd)
    keep = b"changed" + keep[7:]
    intact()
    assert (m.mnt / "big").read_bytes() == b"B" * (4 << 20)
    assert m.proc.poll() is None


# ---- backing errors ----------------------------------------------------------


def _errno_of(action, timeout: float = 15.0) -> int:
    """The errno `action` fails with (0: no error).  Run in a thread: a request the daemon
    never answers fails the test instead of hanging the suite."""
    out: list[int] = []

    def run() -> None:
        try:
            action()
            out.append(0)
        except OSError as e:
            out.append(e.errno)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    assert out, f"no answer within {timeout}s: the daemon hangs"
    return out[0]


def _still_serves(m: Mount) -> None:
    (m.mnt / "canary").write_bytes(b"alive")
    assert (m.mnt / "canary").read_bytes() == b"alive"
    assert m.proc.poll() is None


def test_backing_file_replaced_behind_the_mount(mount_factory: MountFactory):
    """Backing files removed, or replaced by a directory, a FIFO or a symlink, while the
    kernel still caches them as regular files: each open gets the truth (a clear errno,
    or the new object), never a hang, and the daemon keeps serving."""
    m = mount_factory(args=("-o", "attr_timeout=0,entry_timeout=30"))
    for name in ("gone", "dir", "fifo", "link", "open", "retyped"):
        (m.mnt / name).write_bytes(b"content of " + name.encode())
        os.stat(m.mnt / name)  # the kernel now caches the entry
    held = os.open(m.mnt / "open", os.O_RDONLY)
    try:
        for name in ("gone", "dir", "fifo", "link", "open"):
            os.unlink(m.source / name)
        os.mkdir(m.source / "dir")
        os.mkfifo(m.source / "fifo")
        os.symlink("nowhere", m.source / "link")
        os.mkfifo(m.source / "open")

        assert _errno_of(lambda: (m.mnt / "gone").read_bytes()) == errno.ENOENT
        assert _errno_of(lambda: (m.mnt / "gone").write_bytes(b"x")) == errno.ENOENT
        assert _errno_of(lambda: (m.mnt / "dir").read_bytes()) == errno.EISDIR
        assert _errno_of(lambda: (m.mnt / "dir").write_bytes(b"x")) == errno.EISDIR
        assert _errno_of(lambda: (m.mnt / "link").read_bytes()) == errno.ENOENT

        def open_fifo() -> None:
            fd = os.open(m.mnt / "fifo", os.O_RDONLY | os.O_NONBLOCK)
            try:
                assert stat.S_ISFIFO(os.fstat(fd).st_mode)
            finally:
                os.close(fd)

        assert _errno_of(open_fifo) == 0
        assert stat.S_ISDIR(os.stat(m.mnt / "dir").st_mode)
        # stat of a name whose cached inode changed type: the new type, not EIO
        os.unlink(m.source / "retyped")
        os.mkdir(m.source / "retyped")
        assert stat.S_ISDIR(os.stat(m.mnt / "retyped").st_mode)
        _still_serves(m)
        # a handle opened before the change keeps reading the version it opened
        assert os.pread(held, 100, 0) == b"content of open"
    finally:
        os.close(held)
    _still_serves(m)


def _chattr(flag: str, *paths: Path) -> None:
    subprocess.run(["chattr", flag, *map(str, paths)], check=True, timeout=30)


def test_immutable_backing_file_and_directory(mount_factory: MountFactory):
    """Backing objects made immutable (chattr +i: refused even to root): commits fail
    with EPERM through close(), the committed version stays readable, nothing is left
    behind, and once the flag is gone writes work again."""
    m = mount_factory()
    (m.mnt / "d").mkdir()
    (m.mnt / "f").write_bytes(b"before")
    _chattr("+i", m.source / "f", m.source / "d")
    try:
        assert _errno_of(lambda: (m.mnt / "f").write_bytes(b"after")) == errno.EPERM
        assert (m.mnt / "f").read_bytes() == b"before"
        assert _errno_of(lambda: (m.mnt / "d" / "new").write_bytes(b"x")) == errno.EPERM
        (inst,) = m.instance_dirs()
        wait_for(
            lambda: sorted(os.listdir(m.source / ".stormfs" / "tmp" / inst)) == ["lease", "lock"]
        )
        _still_serves(m)
    finally:
        _chattr("-i", m.source / "f", m.source / "d")
    (m.mnt / "f").write_bytes(b"after")
    (m.mnt / "d" / "new").write_bytes(b"x")
    assert m.decrypt("f") == b"after"
    assert m.decrypt("d/new") == b"x"


def test_backing_inode_number_reused_behind_the_mount(mount_factory: MountFactory):
    """A file removed behind the mount while the kernel still knows it; the next file
    created there gets its inode number.  The new file reads as itself, the old name is
    gone.  (Retries until the backing file system does reuse the number.)"""
    m = mount_factory(args=("-o", "attr_timeout=0,entry_timeout=30"))
    for attempt in range(50):
        old, new = m.source / f"old{attempt}", m.source / f"new{attempt}"
        old.write_bytes(b"old")
        os.stat(m.mnt / old.name)  # the kernel keeps the node (no handle open)
        ino = old.stat().st_ino
        old.unlink()
        new.write_bytes(b"new file")
        if new.stat().st_ino != ino:
            continue
        assert (m.mnt / new.name).read_bytes() == b"new file"
        assert _errno_of(lambda o=old: (m.mnt / o.name).read_bytes()) == errno.ENOENT
        _still_serves(m)
        return
    pytest.skip("the backing file system never reused an inode number")


# ---- tampering -------------------------------------------------------------
# Bit flips, truncation, a header-only file, an envelope under another key and a
# plaintext that starts with 0x01: tests/test_view.py::
# test_decryption_failed_answers_eio_and_never_touches_file.  Tampering while a file is
# open: tests/test_view.py::test_tamper_while_open_is_detected.  What follows is what
# the v1 format cannot see.


def test_v1_cannot_detect_copy_rollback_or_swap(mount_factory: MountFactory):
    """An envelope copied over another name, a whole-file rollback to an older envelope,
    and two names swapped all read back as valid content: v1 authenticates each file's
    bytes alone (no associated data), not its name or its age."""
    m = mount_factory()
    (m.mnt / "salary.txt").write_bytes(b"alice: 100")
    (m.mnt / "notes.txt").write_bytes(b"harmless notes")
    (m.mnt / "balance").write_bytes(b"balance: 10")
    old_envelope = (m.source / "balance").read_bytes()
    (m.mnt / "balance").write_bytes(b"balance: 5000")
    (m.mnt / "a").write_bytes(b"content of a")
    (m.mnt / "b").write_bytes(b"content of b")
    m.stop()
    (m.source / "notes.txt").write_bytes((m.source / "salary.txt").read_bytes())
    (m.source / "balance").write_bytes(old_envelope)
    os.rename(m.source / "a", m.source / "tmp")
    os.rename(m.source / "b", m.source / "a")
    os.rename(m.source / "tmp", m.source / "b")
    m = mount_factory(m.source)
    assert (m.mnt / "notes.txt").read_bytes() == b"alice: 100"
    assert (m.mnt / "balance").read_bytes() == b"balance: 10"
    assert (m.mnt / "a").read_bytes() == b"content of b"
    assert (m.mnt / "b").read_bytes() == b"content of a"
    assert "DECRYPTION_FAILED" not in m.logtext()


def test_mixed_mode_serves_plaintext_placed_in_source(mounted: Mount):
    """Anyone who can write SOURCE can plant a plaintext file: mixed mode serves it,
    marked `encryption_method=none`; `stormfs audit` lists it as needing encryption."""
    (mounted.source / "planted.txt").write_bytes(b"not from us")
    assert (mounted.mnt / "planted.txt").read_bytes() == b"not from us"
    assert os.getxattr(mounted.mnt / "planted.txt", "user.stormfs.encryption_method") == b"none"
    assert mounted.key is not None
    code, report = audit(mounted.source, mounted.key)
    assert code == 5
    assert [(f["path"], f["status"]) for f in report["files"]] == [
        ("planted.txt", "needs_encryption")
    ]


@pytest.mark.parametrize("where", ["nonce", "body", "tag", "truncate", "extend"])
def test_tampered_envelope_is_named_in_log_once_per_version(mount_factory, tmp_path, key, where):
    """Each kind of damage: EIO on every read, one DECRYPTION_FAILED line naming the file
    (the verdict is remembered, not recomputed per read), `stormfs audit` lists it, and
    the file itself is never modified."""
    source = tmp_path / "src"
    (source / "dir").mkdir(parents=True)
    env = bytearray(storm_cloud_envelope(key, os.urandom(200_000)))
    if where == "nonce":
        env[5] ^= 0x80
    elif where == "body":
        env[fmt.HEADER_SIZE + 123_456] ^= 1
    elif where == "tag":
        env[-1] ^= 1
    elif where == "truncate":
        del env[-1000:]
    else:
        env += b"\0"
    (source / "dir" / "doc.bin").write_bytes(env)
    (source / "good").write_bytes(storm_cloud_envelope(key, b"lets the key check pass"))
    m = mount_factory(source)
    for _ in range(3):
        assert _errno_of(lambda: (m.mnt / "dir" / "doc.bin").read_bytes()) == errno.EIO
    assert _errno_of(lambda: os.open(m.mnt / "dir" / "doc.bin", os.O_RDONLY)) == errno.EIO
    _still_serves(m)
    m.stop()
    assert m.logtext().count("DECRYPTION_FAILED: dir/doc.bin") == 1
    code, report = audit(source, key)
    assert code == 6 and report["issues"] == 1 and report["encrypted"] == 2  # good, canary
    assert [(f["path"], f["status"]) for f in report["files"]] == [
        ("dir/doc.bin", "decryption_failed")
    ]
    assert (source / "dir" / "doc.bin").read_bytes() == env
    assert key not in m.logtext()
    assert keys.parse_key(key) not in m.log.read_bytes()
