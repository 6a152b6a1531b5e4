"""SOURCE access: the primitives every part of stormfs touches the storage directory with.

The names stormfs keeps for itself, places reached by directory descriptor,
opening without touching atime, the private state directory, locks, atomic
writes, syncs, name exchange, extended attributes and metadata copies.
Blocking code.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import itertools
import logging
import os
import secrets
import stat
import struct
from collections.abc import Callable, Iterator
from typing import NamedTuple

log = logging.getLogger(__name__)

STATE_DIR = b".stormfs"
HIDDEN_PREFIX = b".stormfs"
# Temporary files placed next to their target; hidden by HIDDEN_PREFIX too.
LOCAL_TMP_PREFIX = b".stormfs-tmp-"
VIRTUAL_XATTR_PREFIX = "user.stormfs."
KEY_ID_XATTR = VIRTUAL_XATTR_PREFIX + "key_id"
RENAME_EXCHANGE = 2
# A temporary file of `write_atomically` is its target's name plus this and a random tag.
PART_INFIX = b".part-"

libc = ctypes.CDLL(None, use_errno=True)
AT_FDCWD = -100


class At(NamedTuple):
    """A name in a directory held by descriptor (``O_PATH`` is enough); ``b"."`` is the
    directory itself.  The mount reaches SOURCE this way: no path is longer than one
    name, whatever the depth, and a directory renamed meanwhile is still the same one."""

    dir_fd: int
    name: bytes

    @property
    def proc(self) -> bytes:
        """The same place as a short path, for calls that take no directory descriptor
        (extended attributes): the kernel follows the descriptor, not a path."""
        return b"/proc/self/fd/%d/%s" % (self.dir_fd, self.name)

    def lstat(self) -> os.stat_result:
        return os.stat(self.name, dir_fd=self.dir_fd, follow_symlinks=False)

    def open(self, flags: int, mode: int = 0o777) -> int:
        return os.open(self.name, flags | os.O_CLOEXEC, mode, dir_fd=self.dir_fd)


def check_libc(result: int, prefix: str = "") -> None:
    """Raise the OSError of a failed libc call (`result` non-zero), its text after `prefix`."""
    if result != 0:
        e = ctypes.get_errno()
        raise OSError(e, prefix + os.strerror(e))


def is_hidden(name: bytes) -> bool:
    """Names stormfs keeps for itself: invisible in the view, refused when created."""
    return name.startswith(HIDDEN_PREFIX)


def open_readonly(path: bytes | str, *, dir_fd: int | None = None) -> int:
    """Open without following a symlink, blocking on a FIFO, or touching atime."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        return os.open(path, flags | os.O_NOATIME, dir_fd=dir_fd)
    except PermissionError:
        return os.open(path, flags, dir_fd=dir_fd)  # O_NOATIME needs ownership or CAP_FOWNER


def open_dir(path: bytes | str, *, nofollow: bool = False) -> int:
    """A directory's descriptor, for the *at() calls and fsync."""
    return os.open(
        path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | (os.O_NOFOLLOW if nofollow else 0)
    )


def sync_dir(path: bytes | str | At) -> None:
    """fsync a directory: the names created, renamed or removed in it become durable."""
    fd = path.open(os.O_RDONLY | os.O_DIRECTORY) if isinstance(path, At) else open_dir(path)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def syncfs(fd: int) -> None:
    """Flush the whole filesystem `fd` is on."""
    check_libc(libc.syncfs(fd))


def renameat2(old_dir_fd: int, old: bytes, new_dir_fd: int, new: bytes, flags: int) -> None:
    if libc.renameat2(old_dir_fd, old, new_dir_fd, new, ctypes.c_uint(flags)) != 0:
        e = ctypes.get_errno()
        if flags & RENAME_EXCHANGE and e in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise OSError(e, "this filesystem cannot exchange names (renameat2 RENAME_EXCHANGE)")
        raise OSError(e, os.strerror(e), os.fsdecode(new))


def state_dir(root: bytes, *sub: bytes) -> bytes:
    """``SOURCE/.stormfs[/sub...]``: each level that is missing is created mode 0700
    (whatever the umask) and made durable in its parent; existing ones are left alone."""
    levels = list(itertools.accumulate(sub, os.path.join, initial=os.path.join(root, STATE_DIR)))
    for path in levels:
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            continue
        os.chmod(path, 0o700)
        sync_dir(os.path.dirname(path))
    return levels[-1]


def lock(fd: int, *, wait: bool) -> None:
    """An exclusive ``flock`` on `fd`, held until it is closed.  Without `wait`,
    BlockingIOError when another process holds it."""
    fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))


_FLOCK = struct.Struct("hhxxxxqqixxxx")  # struct flock on Linux x86-64 and arm64


@contextlib.contextmanager
def file_lock(fd: int, *, exclusive: bool) -> Iterator[None]:
    """An open-file-description lock on the whole of `fd` (between processes, and
    daemons on shared storage), released on leaving; where the filesystem has no
    such locks, none is taken."""
    kind = fcntl.F_WRLCK if exclusive else fcntl.F_RDLCK
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLKW, _FLOCK.pack(kind, os.SEEK_SET, 0, 0, 0))
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
            raise
        yield
        return
    try:
        yield
    finally:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _FLOCK.pack(fcntl.F_UNLCK, os.SEEK_SET, 0, 0, 0))


def open_lock(name: bytes, *, dir_fd: int | None = None, create: bool = True) -> int:
    """A lock file's descriptor (for `lock`)."""
    flags = os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT if create else 0)
    return os.open(name, flags, 0o600, dir_fd=dir_fd)


def write_atomically(
    dir_fd: int, name: bytes | str, data: bytes, *, mode: int = 0o600, durable: bool = True
) -> None:
    """Make `name` in `dir_fd` hold `data`, whole or not at all: a temporary file
    beside it (``name.part-*``), renamed over it.

    `durable` syncs the file before the rename and the directory after;
    without it the caller makes both durable later (one syncfs for many).
    """
    target = os.fsencode(name)
    tmp = target + PART_INFIX + secrets.token_hex(4).encode()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode, dir_fd=dir_fd)
    try:
        try:
            os.fchmod(fd, mode)
            pwrite_all(fd, data, 0)
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, target, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dir_fd)
        raise
    if durable:
        os.fsync(dir_fd)


def pwrite_all(fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


def recorded_key_id(file: int | bytes) -> str | None:
    """The key id recorded on a file (a descriptor, or a path whose symlink is not followed)."""
    try:
        if isinstance(file, int):
            raw = os.getxattr(file, KEY_ID_XATTR)
        else:
            raw = os.getxattr(file, KEY_ID_XATTR, follow_symlinks=False)
    except OSError:
        return None
    return raw.decode("utf-8", "replace")


def set_xattr(fd: int, name: str, value: bytes) -> None:
    """Set an extended attribute where the filesystem (and our privileges) allow it."""
    try:
        os.setxattr(fd, name, value)
    except OSError as e:
        if e.errno not in (errno.ENOTSUP, errno.EPERM):
            raise


def _copy_xattrs(
    read: Callable[[str], bytes], names: list[str], fd: int, *, ours: bool = False
) -> None:
    """Copy extended attributes; stormfs' own (`ours`) only between two of its files."""
    for name in names:
        if name.startswith(VIRTUAL_XATTR_PREFIX) and not ours:
            continue
        try:
            os.setxattr(fd, name, read(name))
        except OSError as e:
            if e.errno not in (errno.ENOTSUP, errno.EPERM, errno.ENODATA, errno.EACCES):
                raise
            log.debug("extended attribute %s not carried over: %s", name, e.strerror)


def copy_metadata(path: bytes, old: os.stat_result, fd: int) -> None:
    """Mode, owner and extended attributes of the current version onto the new one."""
    if os.geteuid() == 0:
        os.fchown(fd, old.st_uid, old.st_gid)
    os.fchmod(fd, stat.S_IMODE(old.st_mode))
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as e:
        if e.errno != errno.ENOTSUP:
            raise
        return
    _copy_xattrs(lambda n: os.getxattr(path, n, follow_symlinks=False), names, fd)


def copy_metadata_fd(src: int, dst: int) -> None:
    """Everything `copy_metadata` carries, plus stormfs' own attributes and the times,
    from one of stormfs' files to its copy."""
    st = os.fstat(src)
    if os.geteuid() == 0:
        os.fchown(dst, st.st_uid, st.st_gid)
    os.fchmod(dst, stat.S_IMODE(st.st_mode))
    try:
        names = os.listxattr(src)
    except OSError:
        return
    _copy_xattrs(lambda n: os.getxattr(src, n), names, dst, ours=True)
    os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))
