"""Minimal pyfuse3 passthrough filesystem: the ceiling for a Python FUSE daemon.

Benchmark-only, no encryption. It follows stormfs's policies wherever they are
not about encryption, so that "stormfs / passthrough" measures what encryption
costs and nothing else: 1 s entry/attr timeouts; the page cache kept across
opens only while the backing file is unchanged; metadata syscalls, and reads and
writes up to 64 KiB, run inline (a thread hop costs more), larger transfers and
fsync in worker threads; extended attributes outside ``user.*`` answered
"none" without a syscall (the kernel asks for ``security.capability`` on every
write); 1 MiB readahead (set by the benchmark after mounting, as stormfs does
for its own mounts); every handler guarded so an unexpected error answers EIO
instead of ending ``pyfuse3.main()``. FUSE inode numbers come from our own
counter keyed by the backing (st_dev, st_ino).

Usage: python bench/passthrough.py SOURCE MOUNTPOINT   (stays in the foreground)
"""

from __future__ import annotations

import argparse
import errno
import functools
import logging
import os
import signal
import stat
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import pyfuse3
import trio

log = logging.getLogger("passthrough")

TIMEOUT = 1.0
INLINE_IO = 64 << 10  # as stormfs: smaller transfers cost less than a thread hop
USER_XATTRS = b"user."
STAT_FIELDS = (
    "st_mode",
    "st_nlink",
    "st_uid",
    "st_gid",
    "st_rdev",
    "st_size",
    "st_blksize",
    "st_blocks",
    "st_atime_ns",
    "st_mtime_ns",
    "st_ctime_ns",
)

T = TypeVar("T")
Key = tuple[int, int]


def guarded(fn: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """Turn OSError into its errno and anything unexpected into a logged EIO.

    pyfuse3 only catches FUSEError; any other exception would end main().
    """

    @functools.wraps(fn)
    async def wrapper(*args: Any) -> T:
        try:
            return await fn(*args)
        except pyfuse3.FUSEError:
            raise
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno or errno.EIO) from None
        except Exception:
            log.exception("%s failed", fn.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper


def _identity(st: os.stat_result) -> tuple[int, int, int]:
    return (st.st_mtime_ns, st.st_ctime_ns, st.st_size)


def _listdir(path: bytes) -> list[tuple[bytes, os.stat_result]]:
    with os.scandir(path) as it:
        return [(e.name, e.stat(follow_symlinks=False)) for e in it]


def _open(path: bytes, flags: int, mode: int = 0o644) -> tuple[int, os.stat_result]:
    fd = os.open(path, flags, mode)
    return fd, os.fstat(fd)


def _apply(fn: Callable[..., object], path: bytes, *args: Any) -> os.stat_result:
    fn(*args)
    return os.lstat(path)


def _remove(fn: Callable[[bytes], None], path: bytes) -> os.stat_result:
    st = os.lstat(path)
    fn(path)
    return st


def _rename(
    old: bytes, new: bytes, noreplace: bool
) -> tuple[os.stat_result, os.stat_result | None]:
    st_old = os.lstat(old)
    try:
        st_new: os.stat_result | None = os.lstat(new)
    except FileNotFoundError:
        st_new = None
    if noreplace and st_new is not None:
        raise FileExistsError(errno.EEXIST, "exists")
    os.rename(old, new)
    return st_old, st_new


def _setattr(
    target: bytes | int, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields
) -> os.stat_result:
    """Apply a setattr to a path (never following a symlink) or an open fd."""
    nofollow: dict[str, bool] = {} if isinstance(target, int) else {"follow_symlinks": False}
    if fields.update_size:
        os.truncate(target, attr.st_size)
    if fields.update_mode:
        os.chmod(target, stat.S_IMODE(attr.st_mode))
    if fields.update_uid or fields.update_gid:
        uid = attr.st_uid if fields.update_uid else -1
        gid = attr.st_gid if fields.update_gid else -1
        os.chown(target, uid, gid, **nofollow)
    if fields.update_atime or fields.update_mtime:
        cur = os.stat(target, **nofollow)
        atime = attr.st_atime_ns if fields.update_atime else cur.st_atime_ns
        mtime = attr.st_mtime_ns if fields.update_mtime else cur.st_mtime_ns
        os.utime(target, ns=(atime, mtime), **nofollow)
    return os.stat(target, **nofollow)


def _release(fd: int, written: bool) -> os.stat_result | None:
    try:
        return os.fstat(fd) if written else None
    finally:
        os.close(fd)


class Passthrough(pyfuse3.Operations):
    """Mirror SOURCE at the mount point."""

    def __init__(self, source: str) -> None:
        super().__init__()
        root = os.fsencode(os.path.abspath(source))
        st = os.lstat(root)
        self._root = root
        self._paths: dict[int, set[bytes]] = {pyfuse3.ROOT_INODE: {root}}
        self._keys: dict[int, Key] = {pyfuse3.ROOT_INODE: (st.st_dev, st.st_ino)}
        self._inodes: dict[Key, int] = {(st.st_dev, st.st_ino): pyfuse3.ROOT_INODE}
        self._lookups: dict[int, int] = {}
        self._next_inode = pyfuse3.ROOT_INODE + 1
        self._handles: dict[int, int] = {}  # backing fd (our fh) -> inode
        self._written: set[int] = set()
        # Backing identity at the time the kernel's page cache was last filled.
        self._cached: dict[int, tuple[int, int, int]] = {}
        self._dirs: dict[int, tuple[bytes, list[tuple[bytes, os.stat_result]]]] = {}
        self._next_dir = 1
        self._limiter = trio.CapacityLimiter(8)

    async def _io(self, fn: Callable[..., T], *args: Any) -> T:
        """A metadata syscall: inline, as stormfs runs them on a local SOURCE."""
        return fn(*args)

    async def _data(self, nbytes: int, fn: Callable[..., T], *args: Any) -> T:
        """A data transfer: small inline, large (and syncs: nbytes=-1) in a thread."""
        if 0 <= nbytes <= INLINE_IO:
            return fn(*args)
        return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter)

    # -- inode table -------------------------------------------------------

    def _path(self, inode: int) -> bytes:
        paths = self._paths.get(inode)
        if not paths:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return next(iter(paths))

    def _child(self, parent: int, name: bytes) -> bytes:
        return os.path.join(self._path(parent), name)

    def _remember(self, path: bytes, st: os.stat_result) -> int:
        key = (st.st_dev, st.st_ino)
        inode = self._inodes.get(key)
        if inode is None:
            inode = self._next_inode
            self._next_inode += 1
            self._inodes[key] = inode
            self._keys[inode] = key
            self._paths[inode] = set()
            self._lookups[inode] = 0
        self._paths[inode].add(path)
        return inode

    def _entry(self, inode: int, st: os.stat_result) -> pyfuse3.EntryAttributes:
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = inode
        entry.entry_timeout = TIMEOUT
        entry.attr_timeout = TIMEOUT
        for name in STAT_FIELDS:
            setattr(entry, name, getattr(st, name))
        return entry

    def _looked_up(self, path: bytes, st: os.stat_result) -> pyfuse3.EntryAttributes:
        inode = self._remember(path, st)
        self._lookups[inode] += 1
        return self._entry(inode, st)

    def _unlinked(self, path: bytes, st: os.stat_result) -> None:
        """Forget a name; a backing inode with no name left is unmapped, so a
        reused backing inode number gets a fresh FUSE inode."""
        key = (st.st_dev, st.st_ino)
        inode = self._inodes.get(key)
        if inode is None:
            return
        paths = self._paths[inode]
        paths.discard(path)
        if not paths and (stat.S_ISDIR(st.st_mode) or st.st_nlink <= 1):
            del self._inodes[key]
        if inode != pyfuse3.ROOT_INODE and not paths and self._lookups[inode] == 0:
            self._drop(inode)

    def _drop(self, inode: int) -> None:
        key = self._keys.pop(inode)
        if self._inodes.get(key) == inode:
            del self._inodes[key]
        del self._paths[inode], self._lookups[inode]
        self._cached.pop(inode, None)

    def _moved(self, old: bytes, new: bytes, st: os.stat_result) -> None:
        inode = self._inodes.get((st.st_dev, st.st_ino))
        if inode is not None:
            self._paths[inode].discard(old)
            self._paths[inode].add(new)
        if stat.S_ISDIR(st.st_mode):
            prefix = old + b"/"
            for paths in self._paths.values():
                stale = [p for p in paths if p.startswith(prefix)]
                for p in stale:
                    paths.discard(p)
                    paths.add(new + p[len(old) :])

    async def _stat(self, inode: int) -> os.stat_result:
        paths = self._paths.get(inode)
        if paths:
            return await self._io(os.lstat, next(iter(paths)))
        for fd, owner in self._handles.items():  # unlinked but still open
            if owner == inode:
                return await self._io(os.fstat, fd)
        raise pyfuse3.FUSEError(errno.ENOENT)

    # -- metadata ----------------------------------------------------------

    @guarded
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        path = self._child(parent_inode, name)
        return self._looked_up(path, await self._io(os.lstat, path))

    @guarded
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._entry(inode, await self._stat(inode))

    @guarded
    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        target = fh if fh is not None else self._path(inode)
        return self._entry(inode, await self._io(_setattr, target, attr, fields))

    @guarded
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        return await self._io(os.readlink, self._path(inode))

    @guarded
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        sv = await self._io(os.statvfs, self._root)
        out = pyfuse3.StatvfsData()
        for name in ("bsize", "frsize", "blocks", "bfree", "bavail", "files", "ffree", "favail"):
            setattr(out, f"f_{name}", getattr(sv, f"f_{name}"))
        out.f_namemax = sv.f_namemax
        return out

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for inode, count in inode_list:
            if inode not in self._lookups:
                continue
            self._lookups[inode] -= count
            if self._lookups[inode] <= 0:
                self._drop(inode)

    # -- directories -------------------------------------------------------

    @guarded
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        path = self._path(inode)
        fh = self._next_dir
        self._next_dir += 1
        self._dirs[fh] = (path, await self._io(_listdir, path))
        return fh

    @guarded
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        path, entries = self._dirs[fh]
        for i in range(start_id, len(entries)):
            name, st = entries[i]
            inode = self._remember(os.path.join(path, name), st)
            if not pyfuse3.readdir_reply(token, name, self._entry(inode, st), i + 1):
                if self._lookups[inode] == 0:
                    self._drop(inode)
                break
            self._lookups[inode] += 1

    @guarded
    async def releasedir(self, fh: int) -> None:
        del self._dirs[fh]

    @guarded
    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        path = self._child(parent_inode, name)
        return self._looked_up(path, await self._io(_apply, os.mkdir, path, path, mode))

    @guarded
    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        path = self._child(parent_inode, name)
        return self._looked_up(path, await self._io(_apply, os.mknod, path, path, mode, rdev))

    @guarded
    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        path = self._child(parent_inode, name)
        return self._looked_up(path, await self._io(_apply, os.symlink, path, target, path))

    @guarded
    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        src, path = self._path(inode), self._child(new_parent_inode, new_name)
        link = functools.partial(os.link, follow_symlinks=False)
        return self._looked_up(path, await self._io(_apply, link, path, src, path))

    @guarded
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        path = self._child(parent_inode, name)
        self._unlinked(path, await self._io(_remove, os.unlink, path))

    @guarded
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        path = self._child(parent_inode, name)
        self._unlinked(path, await self._io(_remove, os.rmdir, path))

    @guarded
    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        if flags & pyfuse3.RENAME_EXCHANGE:
            raise pyfuse3.FUSEError(errno.EINVAL)
        old = self._child(parent_inode_old, name_old)
        new = self._child(parent_inode_new, name_new)
        noreplace = bool(flags & pyfuse3.RENAME_NOREPLACE)
        st_old, st_new = await self._io(_rename, old, new, noreplace)
        if st_new is not None and (st_new.st_dev, st_new.st_ino) == (st_old.st_dev, st_old.st_ino):
            return  # two names of one inode: rename(2) changes nothing
        if st_new is not None:
            self._unlinked(new, st_new)
        self._moved(old, new, st_old)

    # -- files -------------------------------------------------------------

    @guarded
    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        path = self._child(parent_inode, name)
        fd, st = await self._io(_open, path, flags | os.O_CREAT, mode)
        entry = self._looked_up(path, st)
        self._handles[fd] = entry.st_ino
        self._written.add(fd)
        return pyfuse3.FileInfo(fh=fd), entry

    @guarded
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        fd, st = await self._io(_open, self._path(inode), flags & ~os.O_CREAT)
        keep = self._cached.get(inode) == _identity(st)
        self._cached[inode] = _identity(st)
        self._handles[fd] = inode
        return pyfuse3.FileInfo(fh=fd, keep_cache=keep)

    @guarded
    async def read(self, fh: int, off: int, size: int) -> bytes:
        return await self._data(size, os.pread, fh, size, off)

    @guarded
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        self._written.add(fh)
        return await self._data(len(buf), os.pwrite, fh, buf, off)

    @guarded
    async def flush(self, fh: int) -> None:
        """Writes go straight to the backing file; nothing is buffered here."""

    @guarded
    async def fsync(self, fh: int, datasync: bool) -> None:
        await self._data(-1, os.fdatasync if datasync else os.fsync, fh)

    @guarded
    async def release(self, fh: int) -> None:
        inode = self._handles.pop(fh)
        written = fh in self._written
        self._written.discard(fh)
        st = await self._io(_release, fh, written)
        # Our own writes went through the page cache, so it still matches.
        if st is not None and inode in self._lookups:
            self._cached[inode] = _identity(st)

    # -- extended attributes -----------------------------------------------

    @guarded
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        if not name.startswith(USER_XATTRS):
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        getx = functools.partial(os.getxattr, follow_symlinks=False)
        return await self._io(getx, self._path(inode), name)

    @guarded
    async def setxattr(
        self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext
    ) -> None:
        setx = functools.partial(os.setxattr, follow_symlinks=False)
        await self._io(setx, self._path(inode), name, value)

    @guarded
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        listx = functools.partial(os.listxattr, follow_symlinks=False)
        return [os.fsencode(n) for n in await self._io(listx, self._path(inode))]

    @guarded
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        removex = functools.partial(os.removexattr, follow_symlinks=False)
        await self._io(removex, self._path(inode), name)


async def _serve() -> None:
    async def stop_on_signal() -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _ in signals:
                pyfuse3.terminate()
                return

    async with trio.open_nursery() as nursery:
        nursery.start_soon(stop_on_signal)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source")
    parser.add_argument("mountpoint")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="passthrough: %(levelname)s %(message)s")
    os.umask(0)  # the kernel already applied the caller's umask to every mode we get
    options = set(pyfuse3.default_options) | {"fsname=bench-passthrough", "subtype=passthrough"}
    pyfuse3.init(Passthrough(args.source), args.mountpoint, options)
    try:
        trio.run(_serve)
    finally:
        pyfuse3.close(unmount=True)


if __name__ == "__main__":
    main()
