"""Deep trees: the mount reaches SOURCE by directory descriptors, never by long paths.

A path on the mount of up to PATH_MAX - 1 bytes works whatever the length of
SOURCE's own path, although SOURCE's path plus the mount's would be far past
PATH_MAX.  The test itself reaches both sides by descriptors too.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from .helpers import Mount, MountFactory, reference_decrypt

NAME = 250  # bytes of each directory name; NAME_MAX is 255
LEVELS = 15  # 15 x 251 = 3765 bytes below the mount point


def _descend(top: str | Path, names: list[str], *, create: bool) -> list[int]:
    """Directory descriptors from `top` down through `names` (made on the way if asked)."""
    fds = [os.open(top, os.O_RDONLY | os.O_DIRECTORY)]
    for name in names:
        if create:
            os.mkdir(name, 0o755, dir_fd=fds[-1])
        fds.append(os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fds[-1]))
    return fds


def _close(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


def _read_at(dir_fd: int, name: str) -> bytes:
    fd = os.open(name, os.O_RDONLY, dir_fd=dir_fd)
    try:
        return os.read(fd, 1 << 20)
    finally:
        os.close(fd)


def test_paths_past_path_max_on_the_backing_side(mount_factory: MountFactory, tmp_path: Path):
    source = tmp_path / "/".join(["s" * 200] * 15)  # SOURCE itself: over 3000 bytes
    source.mkdir(parents=True)
    m: Mount = mount_factory(source=source)
    names = [chr(ord("a") + i) * NAME for i in range(LEVELS)]
    assert len(str(source)) + sum(len(n) + 1 for n in names) > 4096
    fds = _descend(m.mnt, names, create=True)
    deep = fds[-1]
    try:
        fd = os.open("f", os.O_CREAT | os.O_RDWR, 0o644, dir_fd=deep)
        os.write(fd, b"deep content")
        os.ftruncate(fd, 4)
        os.close(fd)
        assert _read_at(deep, "f") == b"deep"
        os.chmod("f", 0o600, dir_fd=deep)
        os.chown("f", 1000, 1000, dir_fd=deep, follow_symlinks=False)
        os.utime("f", ns=(10**18, 10**18), dir_fd=deep, follow_symlinks=False)
        st = os.stat("f", dir_fd=deep)
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_mtime_ns) == (0o600, 1000, 10**18)
        os.setxattr(f"/proc/self/fd/{deep}/f", "user.note", b"kept")
        assert os.getxattr(f"/proc/self/fd/{deep}/f", "user.note") == b"kept"
        os.link("f", "hard", src_dir_fd=deep, dst_dir_fd=deep)
        os.rename("hard", "moved", src_dir_fd=deep, dst_dir_fd=deep)
        os.symlink("f", "sym", dir_fd=deep)
        assert os.readlink("sym", dir_fd=deep) == "f"
        os.mkfifo("fifo", dir_fd=deep)
        os.mknod("node", stat.S_IFREG | 0o644, dir_fd=deep)
        os.mkdir("sub", dir_fd=deep)
        assert sorted(os.listdir(deep)) == ["f", "fifo", "moved", "node", "sub", "sym"]
        for name in ("moved", "sym", "fifo", "node"):
            os.unlink(name, dir_fd=deep)
        os.rmdir("sub", dir_fd=deep)
        assert os.listdir(deep) == ["f"]
        try:
            os.mkdir("x" * 256, dir_fd=deep)
        except OSError as e:
            assert e.errno == errno.ENAMETOOLONG  # the name itself, as on any file system
    finally:
        _close(fds)
    # On the backing side: an envelope of the committed content, reached by descriptors.
    backing = _descend(source, names, create=False)
    try:
        blob = _read_at(backing[-1], "f")
    finally:
        _close(backing)
    assert reference_decrypt(m.raw_key, blob) == b"deep"


def test_renaming_a_directory_keeps_handles_below_it(mounted: Mount):
    (mounted.mnt / "a" / "b").mkdir(parents=True)
    path = mounted.mnt / "a" / "b" / "f"
    path.write_bytes(b"0123456789")
    fd = os.open(path, os.O_RDWR)
    dir_fd = os.open(mounted.mnt / "a" / "b", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.rename(mounted.mnt / "a", mounted.mnt / "z")
        os.pwrite(fd, b"AB", 0)
        os.fsync(fd)
        assert os.pread(fd, 100, 0) == b"AB23456789"
        assert os.listdir(dir_fd) == ["f"]
        (Path(f"/proc/self/fd/{dir_fd}") / "g").write_bytes(b"new")
    finally:
        os.close(fd)
        os.close(dir_fd)
    assert mounted.decrypt("z/b/f") == b"AB23456789"
    assert mounted.decrypt("z/b/g") == b"new"
    assert not (mounted.source / "a").exists()
