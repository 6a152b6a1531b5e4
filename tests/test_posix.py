"""POSIX behaviour of the mount, driven with ordinary syscalls (DESIGN §2)."""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import random
import stat
import threading

import pytest

from .helpers import MOUNT_VARIANTS, Mount, wait_for

pytestmark = MOUNT_VARIANTS


def test_write_at_offsets_append_and_sparse(mounted: Mount):
    f = mounted.mnt / "f"
    model = bytearray(os.urandom(50_000))
    f.write_bytes(model)
    fd = os.open(f, os.O_RDWR)
    try:
        for off, n in ((0, 10), (4090, 20), (49_999, 5), (70_000, 3000), (12_345, 40_000)):
            data = os.urandom(n)
            os.pwrite(fd, data, off)
            if len(model) < off:
                model.extend(bytes(off - len(model)))
            model[off : off + n] = data
            assert os.pread(fd, len(model) + 10, 0) == model
    finally:
        os.close(fd)
    assert f.read_bytes() == model
    assert mounted.decrypt("f") == model
    with open(f, "ab") as a:
        a.write(b"appended")
    assert f.read_bytes() == model + b"appended"


def test_truncate_ftruncate_otrunc(mounted: Mount):
    f = mounted.mnt / "f"
    data = os.urandom(100_000)
    f.write_bytes(data)
    os.truncate(f, 5000)
    assert f.read_bytes() == data[:5000]
    assert mounted.decrypt("f") == data[:5000]
    os.truncate(f, 8000)
    assert f.read_bytes() == data[:5000] + bytes(3000)
    with open(f, "r+b") as h:
        h.truncate(10)
        h.seek(20)
        h.write(b"tail")
        h.flush()
        assert os.fstat(h.fileno()).st_size == 24
    assert f.read_bytes() == data[:10] + bytes(10) + b"tail"
    fd = os.open(f, os.O_WRONLY | os.O_TRUNC)
    assert f.stat().st_size == 0
    os.close(fd)
    assert f.read_bytes() == b""
    mounted.settle()
    assert (mounted.source / "f").stat().st_size == 29


def test_legacy_file_becomes_encrypted_when_modified(mounted: Mount):
    (mounted.source / "old.txt").write_bytes(b"legacy plaintext content")
    with open(mounted.mnt / "old.txt", "r+b") as f:
        f.seek(7)
        f.write(b"PLAINTEXT")
    assert (mounted.mnt / "old.txt").read_bytes() == b"legacy PLAINTEXT content"
    assert mounted.decrypt("old.txt") == b"legacy PLAINTEXT content"


def test_rename_over_existing_and_noreplace(mounted: Mount):
    a, b = mounted.mnt / "a", mounted.mnt / "b"
    a.write_bytes(b"A" * 100)
    b.write_bytes(b"B" * 50)
    os.rename(a, b)
    assert not a.exists()
    assert b.read_bytes() == b"A" * 100
    a.write_bytes(b"new a")
    libc = ctypes.CDLL(None, use_errno=True)
    rc = libc.renameat2(-100, os.fsencode(a), -100, os.fsencode(b), 1)  # RENAME_NOREPLACE
    assert rc == -1 and ctypes.get_errno() == errno.EEXIST
    assert b.read_bytes() == b"A" * 100
    rc = libc.renameat2(-100, os.fsencode(a), -100, os.fsencode(b), 2)  # RENAME_EXCHANGE
    assert rc == 0
    assert a.read_bytes() == b"A" * 100 and b.read_bytes() == b"new a"
    (mounted.mnt / "d1").mkdir()
    (mounted.mnt / "d1" / "inner").write_bytes(b"inner")
    os.rename(mounted.mnt / "d1", mounted.mnt / "d2")
    assert (mounted.mnt / "d2" / "inner").read_bytes() == b"inner"
    with open(mounted.mnt / "d2" / "inner", "ab") as h:
        h.write(b"+more")
    assert mounted.decrypt("d2/inner") == b"inner+more"


def test_unlink_open_file(mounted: Mount):
    f = mounted.mnt / "f"
    f.write_bytes(b"still here")
    fd = os.open(f, os.O_RDWR)
    try:
        os.unlink(f)
        assert not f.exists()
        assert os.pread(fd, 100, 0) == b"still here"
        os.pwrite(fd, b"STILL", 0)
        assert os.pread(fd, 100, 0) == b"STILL here"
        assert os.fstat(fd).st_size == 10
    finally:
        os.close(fd)
    assert os.listdir(mounted.mnt) == []
    assert sorted(os.listdir(mounted.source)) == [".stormfs"]


def test_mkdir_rmdir(mounted: Mount):
    d = mounted.mnt / "a" / "b" / "c"
    d.mkdir(parents=True)
    assert (mounted.source / "a" / "b" / "c").is_dir()
    (d / "f").write_bytes(b"x")
    with pytest.raises(OSError) as e:
        (mounted.mnt / "a" / "b" / "c").rmdir()
    assert e.value.errno == errno.ENOTEMPTY
    (d / "f").unlink()
    d.rmdir()
    assert not (mounted.source / "a" / "b" / "c").exists()


def test_symlinks(mounted: Mount):
    (mounted.mnt / "target").write_bytes(b"pointed at")
    os.symlink("target", mounted.mnt / "link")
    assert os.readlink(mounted.mnt / "link") == "target"
    assert os.readlink(mounted.source / "link") == "target"
    assert (mounted.mnt / "link").read_bytes() == b"pointed at"
    assert stat.S_ISLNK(os.lstat(mounted.mnt / "link").st_mode)
    os.symlink("/nonexistent/dangling", mounted.mnt / "dangling")
    assert os.readlink(mounted.mnt / "dangling") == "/nonexistent/dangling"


def test_hard_links_share_new_content(mounted: Mount):
    a, b = mounted.mnt / "a", mounted.mnt / "sub" / "b"
    b.parent.mkdir()
    a.write_bytes(b"version one")
    os.link(a, b)
    assert a.stat().st_ino == b.stat().st_ino
    assert a.stat().st_nlink == 2
    with open(b, "r+b") as f:
        f.write(b"VERSION")
    assert a.read_bytes() == b"VERSION one"
    a.write_bytes(b"rewritten through the other name, longer")
    assert b.read_bytes() == b"rewritten through the other name, longer"
    src_a, src_b = (mounted.source / "a").stat(), (mounted.source / "sub" / "b").stat()
    assert src_a.st_ino == src_b.st_ino and src_a.st_nlink == 2
    assert mounted.decrypt("sub/b") == b"rewritten through the other name, longer"


def test_chmod_chown_utimens(mounted: Mount):
    f = mounted.mnt / "f"
    f.write_bytes(b"data")
    os.chmod(f, 0o640)
    os.chown(f, 1234, 5678)
    os.utime(f, ns=(1_000_000_000, 2_000_000_000))
    mounted.settle()
    for st in (f.stat(), (mounted.source / "f").stat()):
        assert stat.S_IMODE(st.st_mode) == 0o640
        assert (st.st_uid, st.st_gid) == (1234, 5678)
        assert st.st_mtime_ns == 2_000_000_000
    f.write_bytes(b"rewritten")  # metadata survives a commit
    mounted.settle()
    st = (mounted.source / "f").stat()
    assert stat.S_IMODE(st.st_mode) == 0o640 and (st.st_uid, st.st_gid) == (1234, 5678)


def test_futimens_before_close_survives_commit(mounted: Mount):
    """What `cp -a` does: write, set times on the open file, close."""
    f = mounted.mnt / "f"
    with open(f, "wb") as h:
        h.write(b"copied content")
        h.flush()
        os.utime(h.fileno(), ns=(3_000_000_000, 4_000_000_000))
    assert f.stat().st_mtime_ns == 4_000_000_000
    assert (mounted.source / "f").stat().st_mtime_ns == 4_000_000_000


def test_fsync_commits_durably(mounted: Mount):
    fd = os.open(mounted.mnt / "f", os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        os.write(fd, b"synced")
        os.fsync(fd)
        assert mounted.decrypt("f") == b"synced"
        os.write(fd, b" and more")
        os.fdatasync(fd)
        assert mounted.decrypt("f") == b"synced and more"
    finally:
        os.close(fd)


def test_mmap_read_and_write(mounted: Mount):
    f = mounted.mnt / "f"
    f.write_bytes(bytes(range(256)) * 64)
    with open(f, "r+b") as h:
        m = mmap.mmap(h.fileno(), 0)
        assert m[1000:1004] == bytes([232, 233, 234, 235])
        m[0:5] = b"HELLO"
        m.flush()
        m.close()
    expected = b"HELLO" + (bytes(range(256)) * 64)[5:]
    assert f.read_bytes() == expected
    wait_for(lambda: mounted.decrypt("f") == expected)


def test_handles_see_each_others_writes(mounted: Mount):
    f = mounted.mnt / "f"
    f.write_bytes(b"0123456789")
    fd1 = os.open(f, os.O_RDWR)
    fd2 = os.open(f, os.O_RDWR)
    fd3 = os.open(f, os.O_RDONLY)
    try:
        os.pwrite(fd1, b"AB", 0)
        assert os.pread(fd2, 10, 0) == b"AB23456789"
        os.pwrite(fd2, b"YZ", 8)
        assert os.pread(fd1, 10, 0) == b"AB234567YZ"
        assert os.pread(fd3, 10, 0) == b"AB234567YZ"
        os.close(fd1)
        fd1 = -1
        assert mounted.decrypt("f") == b"AB234567YZ"
        os.pwrite(fd2, b"!", 5)
        assert os.pread(fd3, 10, 0) == b"AB234!67YZ"
    finally:
        for fd in (fd1, fd2, fd3):
            if fd >= 0:
                os.close(fd)
    assert mounted.decrypt("f") == b"AB234!67YZ"


def test_inode_numbers_stable_across_rewrites(mounted: Mount):
    f = mounted.mnt / "f"
    f.write_bytes(b"one")
    ino = f.stat().st_ino
    mounted.settle()
    backing = (mounted.source / "f").stat().st_ino
    for i in range(5):
        f.write_bytes(b"rewrite %d" % i)
        assert f.stat().st_ino == ino
    mounted.settle()
    assert (mounted.source / "f").stat().st_ino != backing  # atomic replace underneath
    os.rename(f, mounted.mnt / "g")
    assert (mounted.mnt / "g").stat().st_ino == ino


def test_readdir_while_entries_change(mounted: Mount):
    d = mounted.mnt / "d"
    d.mkdir()
    names = {f"f{i:04d}" for i in range(600)}
    for n in names:
        (d / n).write_bytes(b"")
    stop = threading.Event()

    def churn() -> None:
        i = 0
        while not stop.is_set():
            p = d / f"tmp{i % 10}"
            p.write_bytes(b"x")
            p.unlink()
            i += 1

    t = threading.Thread(target=churn)
    t.start()
    try:
        for _ in range(5):
            seen = {n for n in os.listdir(d) if not n.startswith("tmp")}
            assert seen == names
    finally:
        stop.set()
        t.join()
    assert set(os.listdir(d)) == names


def test_many_small_files_and_reads(mounted: Mount):
    for i in range(200):
        (mounted.mnt / f"file{i}").write_bytes(b"%d" % i * (i + 1))
    for i in range(200):
        assert (mounted.mnt / f"file{i}").read_bytes() == b"%d" % i * (i + 1)


def test_large_file_random_writes(mounted: Mount):
    f = mounted.mnt / "big"
    size = 20 << 20
    model = bytearray(os.urandom(size))
    f.write_bytes(model)
    rng = random.Random(7)
    fd = os.open(f, os.O_RDWR)
    try:
        for _ in range(300):
            off = rng.randrange(0, size + 100_000)
            data = os.urandom(rng.choice([1, 512, 4096, 10_000]))
            os.pwrite(fd, data, off)
            if len(model) < off:
                model.extend(bytes(off - len(model)))
            model[off : off + len(data)] = data
        assert os.pread(fd, len(model), 0) == model
    finally:
        os.close(fd)
    assert mounted.decrypt("big") == model


def test_mknod_fifo(mounted: Mount):
    os.mkfifo(mounted.mnt / "fifo")
    assert stat.S_ISFIFO(os.lstat(mounted.mnt / "fifo").st_mode)
    assert stat.S_ISFIFO(os.lstat(mounted.source / "fifo").st_mode)


def test_modes_follow_the_callers_umask(mounted: Mount):
    """The caller's umask is applied once, by the kernel: not again by the daemon's own."""
    old = os.umask(0)
    try:
        fd = os.open(mounted.mnt / "f", os.O_CREAT | os.O_WRONLY, 0o666)
        os.close(fd)
        os.mkdir(mounted.mnt / "d", 0o777)
        os.mkfifo(mounted.mnt / "p", 0o666)
        os.umask(0o027)
        os.close(os.open(mounted.mnt / "g", os.O_CREAT | os.O_WRONLY, 0o666))
    finally:
        os.umask(old)
    modes = {n: stat.S_IMODE(os.lstat(mounted.mnt / n).st_mode) for n in ("f", "d", "p", "g")}
    assert modes == {"f": 0o666, "d": 0o777, "p": 0o666, "g": 0o640}
    assert stat.S_IMODE((mounted.source / "f").stat().st_mode) == 0o666


def test_unlinked_open_file_keeps_working(mounted: Mount):
    """What tempfile.TemporaryFile does without O_TMPFILE: create, unlink, then use the
    descriptor: write, ftruncate, fchmod, futimens, fsync."""
    fd = os.open(mounted.mnt / "t", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.unlink(mounted.mnt / "t")
        os.write(fd, b"0123456789" * 10)
        os.fsync(fd)
        os.ftruncate(fd, 20)
        assert os.pread(fd, 100, 0) == b"01234567890123456789"
        os.ftruncate(fd, 30)
        assert os.fstat(fd).st_size == 30
        os.fchmod(fd, 0o640)
        os.utime(fd, ns=(1_000_000_000, 2_000_000_000))
        st = os.fstat(fd)
        assert stat.S_IMODE(st.st_mode) == 0o640 and st.st_mtime_ns == 2_000_000_000
        os.fsync(fd)
    finally:
        os.close(fd)
    assert os.listdir(mounted.mnt) == []
