"""Swapping a sealed copy in for its original, so that a concurrent commit is never lost.

A read lease (``F_SETLEASE``) on the original tells when another process
starts opening it for writing; ``renameat2(RENAME_EXCHANGE)`` swaps two names
in one directory, so that after the swap the original is still linked under
the temporary name and the swap can be checked, and undone if someone renamed
a new version over the name in the meantime.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import secrets

from .source import RENAME_EXCHANGE, renameat2

F_RDLCK = fcntl.F_RDLCK


class Retry(Exception):
    """The file changed or is in use: leave it as it is and try again later."""

    def __init__(self, status: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


def ino(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


def lstat_at(dir_fd: int, name: bytes) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def take_lease(fd: int) -> bool:
    """A read lease on `fd`; False where none can be had (NFS, FUSE, another user's file)."""
    try:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, F_RDLCK)
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EBUSY):
            raise Retry("busy", "open for writing by another process") from None
        if e.errno in (errno.EINVAL, errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP):
            return False
        if e.errno in (errno.EACCES, errno.EPERM):
            return False  # not the owner, and no CAP_LEASE
        raise
    return True


def lease_intact(fd: int) -> bool:
    """False once another process has started opening the file for writing."""
    return fcntl.fcntl(fd, fcntl.F_GETLEASE) == F_RDLCK


def exchange(dir_fd: int, a: bytes, b: bytes) -> None:
    """Atomically swap two names in one directory (renameat2 RENAME_EXCHANGE)."""
    renameat2(dir_fd, a, dir_fd, b, RENAME_EXCHANGE)


PROBE_PREFIX = b"exchange-probe-"


def cannot_exchange(dir_fd: int) -> OSError | None:
    """Why names cannot be exchanged on the filesystem of `dir_fd` (None: they can),
    found by exchanging two empty files made there for the purpose.  `dir_fd` is a
    directory of stormfs' own, held under a lock: any probe file in it is stale."""
    for stale in map(os.fsencode, os.listdir(dir_fd)):  # from a run killed while it probed
        if stale.startswith(PROBE_PREFIX):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(stale, dir_fd=dir_fd)
    tag = secrets.token_hex(4).encode()
    names = (PROBE_PREFIX + b"a-" + tag, PROBE_PREFIX + b"b-" + tag)
    try:
        for name in names:
            os.close(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600, dir_fd=dir_fd))
        exchange(dir_fd, *names)
    except OSError as e:
        if e.errno in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            return e
        raise
    finally:
        for name in names:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=dir_fd)
    return None


def put_back(dir_fd: int, hold: bytes, name: bytes, placed: tuple[int, int]) -> None:
    """Undo an exchange: `hold` goes back to `name`, where we had put `placed`.

    If another version was renamed over `name` meanwhile, it is newer than what
    `hold` has: it goes back to `name` instead, and `hold` ends with the
    superseded file (which that rename would have replaced anyway).
    """
    for _ in range(16):
        exchange(dir_fd, hold, name)
        now = lstat_at(dir_fd, hold)
        if now is None or ino(now) == placed:
            return
        placed = ino(os.stat(name, dir_fd=dir_fd, follow_symlinks=False))
    raise OSError(errno.EAGAIN, "name keeps being replaced", os.fsdecode(name))


def swap_in(dir_fd: int, hold: bytes, name: bytes, expect: tuple[int, int]) -> bool:
    """Exchange `hold` (our envelope) with `name` if `name` holds `expect`.

    True when it did: `hold` now links the original.  False when `name` held
    something else (checked again after the swap, which is then undone).
    """
    st = lstat_at(dir_fd, name)
    if st is None or ino(st) != expect:
        return False
    ours = ino(os.stat(hold, dir_fd=dir_fd, follow_symlinks=False))
    exchange(dir_fd, hold, name)
    got = lstat_at(dir_fd, hold)
    if got is not None and ino(got) == expect:
        return True
    put_back(dir_fd, hold, name, ours)
    return False
