"""Writing v2 through a mount (`-o format=v2`): what lands on disk, what a write
costs on disk, crashes, and two daemons sharing a v2 SOURCE."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from stormfs import format_v2 as v2
from stormfs.daemon import V2_WARNING

from .crashes import crash_loop
from .helpers import Mount, MountFactory, changed_chunks

V2 = ("-o", "format=v2")
C = v2.CHUNK_SIZE


def stored(m: Mount, name: str) -> bytes:
    return (m.source / name).read_bytes()


def opened(m: Mount, name: str) -> bytes:
    """The plaintext of a v2 file in SOURCE, authenticated whole."""
    return v2.open_file(m.raw_key, stored(m, name))


def test_a_format_v2_mount_writes_v2_files_and_says_once_who_cannot_read_them(
    mount_factory: MountFactory,
):
    m = mount_factory(args=V2)
    data = os.urandom(3 * C + 11)
    (m.mnt / "f").write_bytes(data)
    (m.mnt / "empty").write_bytes(b"")
    assert v2.is_v2(stored(m, "f")) and opened(m, "f") == data
    assert stored(m, "empty")[:8] == v2.SIGNATURE and opened(m, "empty") == b""
    assert len(stored(m, "f")) == v2.ondisk_size(len(data), C)
    assert os.getxattr(m.mnt / "f", "user.stormfs.format") == b"v2"
    assert os.getxattr(m.source / "f", "user.stormfs.key_id") == os.getxattr(
        m.mnt / "f", "user.stormfs.key_id"
    )
    assert (m.mnt / "f").stat().st_size == len(data)
    assert m.logtext().count(V2_WARNING) == 1


def test_legacy_and_v1_files_become_v2_when_written_and_v1_mounts_turn_v2_back(
    mount_factory: MountFactory, tmp_path: Path
):
    source = tmp_path / "src"
    m = mount_factory(source, args=V2)
    (m.source / "legacy").write_bytes(b"plain from before")
    m.stop()
    m = mount_factory(source)  # v1
    (m.mnt / "v1").write_bytes(b"a v1 envelope")
    assert stored(m, "v1")[:1] == b"\x01"
    m.stop()
    m = mount_factory(source, args=V2)
    for name in ("legacy", "v1"):
        with open(m.mnt / name, "ab") as f:
            f.write(b"!")
        assert v2.is_v2(stored(m, name))
    assert opened(m, "legacy") == b"plain from before!" and opened(m, "v1") == b"a v1 envelope!"
    m.stop()
    m = mount_factory(source)  # a v1 mount never writes v2
    with open(m.mnt / "v1", "r+b") as f:
        f.write(b"A")
    assert stored(m, "v1")[:1] == b"\x01"
    assert m.decrypt("v1") == b"A v1 envelope!"
    assert (m.mnt / "legacy").read_bytes() == b"plain from before!"  # v2, still read


def test_a_small_write_and_fsync_in_a_large_v2_file_rewrites_only_its_chunks(
    mount_factory: MountFactory,
):
    m = mount_factory(args=V2)
    size = 8 << 20
    data = bytearray(os.urandom(size))
    (m.mnt / "big").write_bytes(data)
    ino = (m.source / "big").stat().st_ino
    steps = [
        (3 * C + 100, 4096),  # inside one chunk
        (10 * C - 2000, 4096),  # across two chunks
        (size, 4096),  # appended: the old last chunk and a new one
    ]
    for off, n in steps:
        before = stored(m, "big")
        piece = os.urandom(n)
        fd = os.open(m.mnt / "big", os.O_WRONLY)
        try:
            os.pwrite(fd, piece, off)
            os.fsync(fd)
            after = stored(m, "big")  # what fsync made durable, before close
        finally:
            os.close(fd)
        touched = {(off + i) // C for i in (0, n - 1)}
        if off + n > len(data):  # an append also reseals the old last chunk
            touched.add((len(data) - 1) // C)
        data[off : off + n] = piece
        assert set(changed_chunks(before, after)) == touched
        assert (m.source / "big").stat().st_ino == ino
    assert opened(m, "big") == bytes(data)
    assert (m.mnt / "big").read_bytes() == bytes(data)


def test_truncate_and_extend_a_v2_file_through_the_mount(mount_factory: MountFactory):
    m = mount_factory(args=V2)
    data = os.urandom(5 * C + 3)
    (m.mnt / "f").write_bytes(data)
    for size in (4 * C, 4 * C - 1, 1, 0, 2 * C + 5, 9 * C):
        os.truncate(m.mnt / "f", size)
        data = data[:size] + bytes(max(0, size - len(data)))
        assert opened(m, "f") == data, size
        assert (m.mnt / "f").stat().st_size == size
    with open(m.mnt / "f", "r+b") as f:  # a hole, written past the end
        f.seek(20 * C + 7)
        f.write(b"tail")
    data = data + bytes(20 * C + 7 - len(data)) + b"tail"
    assert opened(m, "f") == data == (m.mnt / "f").read_bytes()


@pytest.mark.faults
@pytest.mark.timeout(600)
def test_kill_9_while_writing_v2_leaves_committed_versions(
    mount_factory: MountFactory, tmp_path: Path
):
    rounds = int(os.environ.get("STORMFS_V2_CRASH_ROUNDS", "8"))
    figures = crash_loop(mount_factory, tmp_path, rounds, args=V2)
    assert figures["kills"] == rounds
    for name in os.listdir(tmp_path / "src"):
        path = tmp_path / "src" / name
        if path.is_file() and path.stat().st_size:
            assert v2.is_v2(path.read_bytes()[:8]), name


@pytest.mark.timeout(300)
def test_two_daemons_share_a_v2_source_while_one_rewrites_chunks_in_place(
    mount_factory: MountFactory, tmp_path: Path
):
    """A reads every chunk while B rewrites chunks in place: A never sees a torn
    chunk (no EIO, no DECRYPTION_FAILED), and every page it reads is one of B's
    versions of it."""
    source = tmp_path / "src"
    writer = mount_factory(source, args=V2)
    reader = mount_factory(source, args=V2)
    chunks = 64
    (writer.mnt / "shared").write_bytes(bytes([0]) * (chunks * C))
    stop = threading.Event()
    errors: list[BaseException] = []

    def rewrite() -> None:
        try:
            fd = os.open(writer.mnt / "shared", os.O_WRONLY)
            try:
                version = 0
                while not stop.is_set():
                    version = version % 255 + 1
                    i = version * 7 % chunks
                    os.pwrite(fd, bytes([version]) * C, i * C)
                    os.fsync(fd)
            finally:
                os.close(fd)
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=rewrite)
    t.start()
    reads = 0
    try:
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline and not errors:
            with open(reader.mnt / "shared", "rb") as f:
                # Drop the mount's cached pages of the file, so that A reads SOURCE.
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
                data = f.read()
            # Each read request sees each chunk whole, at one version; one read(2) may
            # span requests served at different moments (as with any file written in
            # place while it is read), so a page is the unit that must be whole.
            for i in range(0, len(data), 4096):
                page = data[i : i + 4096]
                assert page == bytes([page[0]]) * 4096, f"page at {i} mixes versions"
            reads += 1
    finally:
        stop.set()
        t.join(30)
    assert not errors, errors
    assert reads >= 3
    assert "DECRYPTION_FAILED" not in reader.logtext()
