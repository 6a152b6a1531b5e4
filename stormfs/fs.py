"""The pyfuse3 operations: translate kernel requests into table, store and working-copy calls.

Every handler goes through `_boundary`: `OSError` becomes its errno, a file that
fails authentication becomes EIO, anything unexpected is logged with its
traceback and answered EIO — the daemon keeps serving.  Blocking work runs in
threads (`_run`); a per-node `trio.Lock` orders reads, writes and commits.

Data reaches SOURCE on flush (so close() returns commit errors), on fsync
(durably), on the last release if writes came after the last flush (mmap), and
at shutdown.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import logging
import os
import stat
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import pyfuse3
import trio

from . import format as fmt
from .content import EnvelopeReader, Identity, PlainReader, Reader
from .inodes import InodeTable, Node
from .source import KEY_ID_XATTR, VIRTUAL_XATTR_PREFIX, At, is_hidden, renameat2, sync_dir
from .stats import STATUS_XATTR, Stats
from .store import Store
from .working import WorkingCopy

log = logging.getLogger(__name__)

T = TypeVar("T")

# Reads and writes up to this size cost less than a thread hop (170-400 us here)
# when the page cache has the data, so they run inline like metadata calls.
INLINE_IO = 64 << 10

# The view carries user.* extended attributes only (others are neither shown
# nor set: ACLs and security labels would not be enforced through the mount).
USER_XATTRS = "user."

XATTR_METHOD = "user.stormfs.encryption_method"
XATTR_SIZE = "user.stormfs.encrypted_size"
XATTR_FORMAT = "user.stormfs.format"


def _boundary(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The one place where errors become errnos."""

    @functools.wraps(fn)
    async def wrapper(self: Operations, *args: Any) -> Any:
        try:
            return await fn(self, *args)
        except pyfuse3.FUSEError:
            raise
        except fmt.DecryptionFailed:
            raise pyfuse3.FUSEError(errno.EIO) from None
        except OSError as e:
            if e.errno is None:
                log.exception("%s failed", fn.__name__)
                raise pyfuse3.FUSEError(errno.EIO) from None
            raise pyfuse3.FUSEError(e.errno) from None
        except Exception:
            log.exception("unexpected error in %s", fn.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper


@dataclass(eq=False)
class Handle:
    node: Node
    writable: bool


@dataclass(eq=False)
class DirHandle:
    node: Node
    names: list[bytes] | None = None


def _user_namespace_only(key: str) -> None:
    if not key.startswith(USER_XATTRS):
        raise pyfuse3.FUSEError(errno.EOPNOTSUPP)


def _hidden_name(name: bytes, *, creating: bool) -> None:
    if is_hidden(name):
        raise pyfuse3.FUSEError(errno.EPERM if creating else errno.ENOENT)


class Operations(pyfuse3.Operations):
    supports_dot_lookup = False
    enable_writeback_cache = False

    def __init__(
        self,
        store: Store,
        *,
        entry_timeout: float = 1.0,
        attr_timeout: float = 1.0,
        metadata_threads: bool = False,
        stats: Stats | None = None,
    ) -> None:
        super().__init__()
        self.store = store
        self.stats = stats or Stats()
        self.table = InodeTable(os.open(store.root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC))
        self.entry_timeout = entry_timeout
        self.attr_timeout = attr_timeout
        self._handles: dict[int, Handle | DirHandle] = {}
        self._next_fh = 1
        self._limiter = trio.CapacityLimiter(8)
        self._metadata_threads = metadata_threads
        self._root_uid = os.geteuid() == 0

    def close(self) -> None:
        """Let go of the backing directories (after the last request)."""
        self.table.close()

    # ---- plumbing -----------------------------------------------------------

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        """Blocking work that moves data (reads, writes, verification, fsync, commits)."""
        return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter)

    async def _meta(self, fn: Callable[..., T], *args: Any) -> T:
        """A metadata syscall or two: inline, unless the mount offloads those too.

        On a local filesystem they are served from the kernel's caches in
        microseconds, while a thread hop costs hundreds; a SOURCE on a network
        filesystem, where any syscall can stall, mounts with -o metadata_threads.
        """
        if self._metadata_threads:
            return await self._run(fn, *args)
        return fn(*args)

    async def _io(self, nbytes: int, fn: Callable[..., T], *args: Any) -> T:
        """Data transfer: a small one like a metadata call, a large one in a thread."""
        if nbytes <= INLINE_IO:
            return await self._meta(fn, *args)
        return await self._run(fn, *args)

    def _new_fh(self, handle: Handle | DirHandle) -> int:
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = handle
        return fh

    def _handle(self, fh: int) -> Handle:
        h = self._handles.get(fh)
        if not isinstance(h, Handle):
            raise pyfuse3.FUSEError(errno.EBADF)
        return h

    def _attrs(self, node: Node, st: os.stat_result, size: int) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = node.inode
        e.generation = 0
        e.entry_timeout = self.entry_timeout
        e.attr_timeout = self.attr_timeout
        e.st_mode = st.st_mode
        e.st_nlink = st.st_nlink
        e.st_uid = st.st_uid
        e.st_gid = st.st_gid
        e.st_rdev = st.st_rdev
        e.st_size = size
        e.st_blksize = 4096
        e.st_blocks = st.st_blocks
        e.st_atime_ns = st.st_atime_ns
        e.st_mtime_ns = st.st_mtime_ns
        e.st_ctime_ns = st.st_ctime_ns
        if node.working is not None:
            e.st_size = node.working.size
            e.st_blocks = (node.working.size + 511) // 512
            e.st_mtime_ns = node.mtime_ns
            e.st_ctime_ns = max(node.mtime_ns, st.st_ctime_ns)
        if node.times is not None:
            e.st_atime_ns, e.st_mtime_ns = node.times
        return e

    def _dir_fd(self, node: Node) -> int:
        """Blocking: the descriptor of a directory node's backing directory, opened
        through its parent's on first use."""
        if node.fd is not None:
            return node.fd
        parent, name = self.table.name_of(node)
        fd = At(self._dir_fd(parent), name).open(os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW)
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != node.key:
            os.close(fd)
            raise OSError(errno.ESTALE, "directory replaced behind the mount")
        self.table.hold(node, fd)
        if node.fd is None:
            raise OSError(errno.ESTALE, "forgotten meanwhile")
        return node.fd

    def _at(self, node: Node) -> At:
        """Blocking: where the node's object is: a directory by its own descriptor, any
        other object by its name in its parent (ENOENT once no name is left)."""
        if node.is_dir:
            return At(self._dir_fd(node), b".")
        parent, name = self.table.name_of(node)
        return At(self._dir_fd(parent), name)

    def _child(self, parent_inode: int, name: bytes) -> At:
        return At(self._dir_fd(self.table.get(parent_inode)), name)

    def _stat_node(self, node: Node) -> tuple[os.stat_result, int]:
        """Blocking: the node's backing stat and plaintext size (by name, or by open file)."""
        target = self._target(node)
        if isinstance(target, int):  # unlinked but open: the descriptor of node.reader
            assert node.reader is not None
            return os.fstat(target), node.reader.size
        st, size, _ = self.store.stat(target)
        if node.reader is not None:
            held = os.fstat(node.reader.fd)
            if (held.st_dev, held.st_ino) != (st.st_dev, st.st_ino):
                # The name was given to another file behind the mount.  This node's handles
                # still read the file they opened (the next lookup of the name gets a node
                # of its own): its size is the one their reads must stop at.
                return held, node.reader.size
        elif stat.S_IFMT(st.st_mode) != stat.S_IFMT(node.mode):
            # Another kind of object now: ESTALE makes the kernel look the name up again
            # (a changed type would poison its cached inode with EIO).
            raise OSError(errno.ESTALE, "replaced by another kind of file")
        return st, size

    async def _entry(self, node: Node) -> pyfuse3.EntryAttributes:
        st, size = await self._meta(self._stat_node, node)
        return self._attrs(node, st, size)

    def _working(self, node: Node) -> WorkingCopy:
        if node.working is None:
            if node.reader is None:
                raise OSError(errno.EBADF, "file is not open")
            node.working = WorkingCopy(self.store, node.reader, node.reader.size)
            node.mtime_ns = time.time_ns()
        return node.working

    def _fresh_reader(self, node: Node, at: At) -> Reader:
        """Blocking: the node's reader, reopened if the name now holds another file."""
        reader = node.reader
        if reader is not None:
            now, held = at.lstat(), os.fstat(reader.fd)
            key = (held.st_dev, held.st_ino)
            if (now.st_dev, now.st_ino) == key or node.handed_out == key:
                # The same file; or the lookup this open follows found this very
                # file (the name moved on since, an instant ago): open that version.
                return reader
            # Replaced behind the mount while handles read the old file through this
            # node (and its page cache).  Switching would mix the versions under them:
            # ESTALE makes the kernel look the name up and open the new file as a
            # node of its own.
            raise OSError(errno.ESTALE, "replaced behind the mount while open")
        return self.store.open_reader(at)

    async def _commit(self, node: Node, *, durable: bool) -> None:
        """Make the node's pending writes the committed version (node lock held)."""
        working = node.working
        if working is None:
            return
        try:
            at = await self._meta(self._at, node)
        except OSError:
            return  # unlinked while open: nothing to commit to
        # The new version keeps the mtime the view showed while writes were
        # pending, so the kernel sees no change and keeps its page cache.
        times = node.times or (None, node.mtime_ns)

        def publish(temp, nonce):
            return self.store.publish(temp, at, nonce, durable=durable, times=times)

        try:
            reader = await self._run(working.commit, publish)
        except BaseException as e:
            node.cached = None
            self.stats.committed(e)
            raise
        self.stats.committed()
        old, node.reader = node.reader, reader
        node.working = None
        node.times = None
        if old is not None:
            await self._meta(old.close)
        st = await self._meta(os.fstat, reader.fd)
        self.table.rekey(node, st, created=True)
        node.cached = Identity.of(st)

    async def _close_reader(self, node: Node) -> None:
        reader, node.reader = node.reader, None
        if reader is not None:
            await self._meta(reader.close)

    def _metadata_changed(self, node: Node) -> None:
        """Blocking: our own chmod/chown/utime/xattr change moved ctime, not content."""
        reader = node.reader
        if isinstance(reader, EnvelopeReader) and reader.nonce is not None:
            nonce = reader.nonce
            reader.refresh()
            reader.verdicts.put(reader.ident, nonce)
            reader.nonce = nonce

    async def drain(self) -> None:
        """Commit every pending write (at shutdown)."""
        for node in self.table:
            if node.working is None:
                continue
            async with node.lock:
                try:
                    await self._commit(node, durable=True)
                except Exception as e:
                    log.error("pending writes to inode %d lost at shutdown: %s", node.inode, e)

    # ---- lookups and attributes ---------------------------------------------

    @_boundary
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        _hidden_name(name, creating=False)
        at = await self._meta(self._child, parent_inode, name)
        st, size, _ = await self._meta(self.store.stat, at)
        node = self.table.bind(parent_inode, name, st)
        node.lookups += 1
        node.handed_out = (st.st_dev, st.st_ino)
        return self._attrs(node, st, size)

    @_boundary
    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for inode, n in inode_list:
            try:
                node = self.table.get(inode)
            except OSError:
                continue
            self.table.forget(node, n)

    @_boundary
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return await self._entry(self.table.get(inode))

    @_boundary
    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        node = self.table.get(inode)
        async with node.lock:
            target = self._target(node)
            if fields.update_size:
                if node.reader is None:
                    assert isinstance(target, At)  # a node without a name is open
                    node.reader = await self._meta(self._fresh_reader, node, target)
                    opened_here = True
                else:
                    opened_here = False
                await self._run(self._working(node).truncate, attr.st_size)
                node.mtime_ns = time.time_ns()
                node.times = None
                if fh is None or opened_here:
                    await self._commit(node, durable=False)
                if opened_here and node.opens == 0:
                    await self._close_reader(node)
            await self._meta(self._set_metadata, node, target, attr, fields)
        return await self._entry(node)

    def _target(self, node: Node) -> At | int:
        """Blocking: the node's place or, once its last name is gone, the file it holds open."""
        try:
            return self._at(node)
        except OSError:
            if node.reader is None:
                raise
            return node.reader.fd

    def _set_metadata(
        self, node: Node, target: At | int, attr: pyfuse3.EntryAttributes, fields: Any
    ) -> None:
        # A descriptor, or a name in a directory whose last component is never followed.
        where: dict[str, Any] = (
            {"dir_fd": target.dir_fd, "follow_symlinks": False} if isinstance(target, At) else {}
        )
        obj = target.name if isinstance(target, At) else target
        changed = False
        if fields.update_mode and not stat.S_ISLNK(node.mode):
            os.chmod(obj, stat.S_IMODE(attr.st_mode), dir_fd=where.get("dir_fd"))
            changed = True
        if fields.update_uid or fields.update_gid:
            uid = attr.st_uid if fields.update_uid else -1
            os.chown(obj, uid, attr.st_gid if fields.update_gid else -1, **where)
            changed = True
        if fields.update_atime or fields.update_mtime:
            st = os.stat(obj, **where)
            times = (
                attr.st_atime_ns if fields.update_atime else st.st_atime_ns,
                attr.st_mtime_ns if fields.update_mtime else st.st_mtime_ns,
            )
            os.utime(obj, ns=times, **where)
            if node.working is not None:
                node.times = times
            changed = True
        if changed:
            self._metadata_changed(node)

    @_boundary
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        at = await self._meta(self._at, self.table.get(inode))
        return await self._meta(functools.partial(os.readlink, at.name, dir_fd=at.dir_fd))

    @_boundary
    async def access(self, inode: int, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        return True

    @_boundary
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        sv = await self._meta(os.statvfs, self.store.root)
        out = pyfuse3.StatvfsData()
        for name in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail"):
            setattr(out, name, getattr(sv, name))
        for name in ("f_files", "f_ffree", "f_favail", "f_namemax"):
            setattr(out, name, getattr(sv, name))
        return out

    # ---- creating and removing names ----------------------------------------

    async def _made(
        self,
        parent_inode: int,
        name: bytes,
        make: Callable[[At], None],
        *,
        created: bool = True,
    ) -> pyfuse3.EntryAttributes:
        """Run `make(at)` for a new name, then look it up (`created`: a new object,
        not another name of an existing one)."""
        _hidden_name(name, creating=True)

        def work() -> tuple[os.stat_result, int, Any]:
            at = self._child(parent_inode, name)
            make(at)
            return self.store.stat(at)

        st, size, _ = await self._meta(work)
        node = self.table.bind(parent_inode, name, st, created=created)
        node.lookups += 1
        return self._attrs(node, st, size)

    def _chown_new(self, at: At, ctx: pyfuse3.RequestContext) -> None:
        if self._root_uid:
            os.chown(at.name, ctx.uid, ctx.gid, dir_fd=at.dir_fd, follow_symlinks=False)

    @_boundary
    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        def make(at: At) -> None:
            os.mkdir(at.name, stat.S_IMODE(mode), dir_fd=at.dir_fd)
            self._chown_new(at, ctx)

        return await self._made(parent_inode, name, make)

    @_boundary
    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        def make(at: At) -> None:
            os.symlink(target, at.name, dir_fd=at.dir_fd)
            self._chown_new(at, ctx)

        return await self._made(parent_inode, name, make)

    @_boundary
    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        def make(at: At) -> None:
            os.mknod(at.name, mode, rdev, dir_fd=at.dir_fd)
            self._chown_new(at, ctx)

        return await self._made(parent_inode, name, make)

    @_boundary
    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        node = self.table.get(inode)
        async with node.lock:
            src = await self._meta(self._at, node)

            def make(at: At) -> None:
                os.link(
                    src.name,
                    at.name,
                    src_dir_fd=src.dir_fd,
                    dst_dir_fd=at.dir_fd,
                    follow_symlinks=False,
                )

            return await self._made(new_parent_inode, new_name, make, created=False)

    async def _remove(self, parent_inode: int, name: bytes, remove: Callable[..., None]) -> None:
        _hidden_name(name, creating=False)
        at = await self._meta(self._child, parent_inode, name)
        victim = self.table.child(parent_inode, name)
        if victim is None:
            await self._meta(functools.partial(remove, at.name, dir_fd=at.dir_fd))
            return
        async with victim.lock:
            await self._meta(functools.partial(remove, at.name, dir_fd=at.dir_fd))
            self.table.unlink(parent_inode, name)
        self.table.settle(victim)

    @_boundary
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self._remove(parent_inode, name, os.unlink)

    @_boundary
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self._remove(parent_inode, name, os.rmdir)

    @_boundary
    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        _hidden_name(name_old, creating=False)
        _hidden_name(name_new, creating=True)
        if flags & ~(pyfuse3.RENAME_NOREPLACE | pyfuse3.RENAME_EXCHANGE):
            raise pyfuse3.FUSEError(errno.EINVAL)
        old = await self._meta(self._child, parent_inode_old, name_old)
        new = await self._meta(self._child, parent_inode_new, name_new)
        nodes = {
            n.inode: n
            for n in (
                self.table.child(parent_inode_old, name_old),
                self.table.child(parent_inode_new, name_new),
            )
            if n is not None
        }
        locked = [nodes[i] for i in sorted(nodes)]
        async with contextlib.AsyncExitStack() as stack:
            for node in locked:
                await stack.enter_async_context(node.lock)
            if flags:
                await self._meta(renameat2, old.dir_fd, old.name, new.dir_fd, new.name, flags)
            else:
                rename = functools.partial(
                    os.rename, old.name, new.name, src_dir_fd=old.dir_fd, dst_dir_fd=new.dir_fd
                )
                await self._meta(rename)
            if flags & pyfuse3.RENAME_EXCHANGE:
                self.table.exchange((parent_inode_old, name_old), (parent_inode_new, name_new))
            else:
                self.table.move((parent_inode_old, name_old), (parent_inode_new, name_new))
        for node in locked:
            self.table.settle(node)

    # ---- files ----------------------------------------------------------------

    @_boundary
    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        _hidden_name(name, creating=True)

        def make() -> tuple[int, os.stat_result]:
            at = self._child(parent_inode, name)
            fd = at.open(os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, stat.S_IMODE(mode))
            try:
                if self._root_uid:
                    os.fchown(fd, ctx.uid, ctx.gid)
                return fd, os.fstat(fd)
            except BaseException:
                os.close(fd)
                raise

        try:
            fd, st = await self._meta(make)
        except FileExistsError:
            if flags & os.O_EXCL:
                raise
            entry = await self.lookup(parent_inode, name, ctx)
            info = await self.open(entry.st_ino, flags, ctx)
            return info, entry
        node = self.table.bind(parent_inode, name, st, created=True)
        node.lookups += 1
        async with node.lock:
            node.reader = PlainReader(fd, 0)
            # Dirty from birth: even a file closed without a write becomes an envelope.
            self._working(node)
            node.opens += 1
            node.cached = None
        fh = self._new_fh(Handle(node, writable=True))
        return pyfuse3.FileInfo(fh=fh), self._attrs(node, st, 0)

    @_boundary
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        node = self.table.get(inode)
        writable = (flags & os.O_ACCMODE) != os.O_RDONLY
        async with node.lock:
            if node.working is None:
                at = await self._meta(self._at, node)
                node.reader = await self._meta(self._fresh_reader, node, at)
                node.handed_out = None
                st = await self._meta(os.fstat, node.reader.fd)
                # The name may hold another file than the node last knew (replaced behind
                # the mount): key the node by the file it serves now, so that the stale
                # inode number, once reused by the backing file system, cannot bind to it.
                self.table.rekey(node, st)
                ident = Identity.of(st)
                keep = ident == node.cached
                node.cached = ident
                if not keep:
                    # The kernel may still hold the size of another version (within
                    # attr_timeout): reads would stop there.  Make it ask again.
                    with contextlib.suppress(OSError):
                        pyfuse3.invalidate_inode(node.inode, attr_only=True)
                if isinstance(node.reader, EnvelopeReader) and not flags & os.O_TRUNC:
                    # A damaged file fails at open, even one whose plaintext is empty.
                    await self._io(node.reader.size, node.reader.verify)
            else:
                keep = True
            if flags & os.O_TRUNC and writable:
                await self._run(self._working(node).truncate, 0)
                node.mtime_ns = time.time_ns()
                node.times = None
            node.opens += 1
        fh = self._new_fh(Handle(node, writable))
        return pyfuse3.FileInfo(fh=fh, keep_cache=keep)

    @_boundary
    async def read(self, fh: int, off: int, size: int) -> bytes:
        node = self._handle(fh).node
        async with node.lock:
            source = node.working or node.reader
            if source is None:
                raise OSError(errno.EBADF, "file is not open")
            data = await self._io(size, source.read, off, size)
        self.stats.bytes_read += len(data)
        return data

    @_boundary
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        node = self._handle(fh).node
        async with node.lock:
            try:
                await self._io(len(buf), self._working(node).write, off, buf)
            except BaseException:
                node.cached = None
                raise
            node.mtime_ns = time.time_ns()
            node.times = None
        self.stats.bytes_written += len(buf)
        return len(buf)

    @_boundary
    async def flush(self, fh: int) -> None:
        h = self._handle(fh)
        if h.writable:
            async with h.node.lock:
                await self._commit(h.node, durable=False)

    @_boundary
    async def fsync(self, fh: int, datasync: bool) -> None:
        node = self._handle(fh).node
        async with node.lock:
            if node.working is not None:
                await self._commit(node, durable=True)
            elif isinstance(target := await self._meta(self._target, node), At):
                await self._run(sync_dir, At(target.dir_fd, b"."))

    @_boundary
    async def release(self, fh: int) -> None:
        h = self._handle(fh)
        del self._handles[fh]
        node = h.node
        async with node.lock:
            node.opens -= 1
            if node.opens == 0:
                if node.working is not None:
                    try:
                        await self._commit(node, durable=False)
                    except Exception as e:
                        log.error("pending writes to inode %d lost: %s", node.inode, e)
                    working, node.working = node.working, None
                    if working is not None:
                        await self._meta(working.close)
                await self._close_reader(node)
        self.table.settle(node)

    # ---- directories ----------------------------------------------------------

    @_boundary
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        node = self.table.get(inode)
        node.opens += 1
        return self._new_fh(DirHandle(node))

    def _list(self, at: At) -> list[bytes]:
        fd = at.open(os.O_RDONLY | os.O_DIRECTORY)
        try:
            names = (os.fsencode(n) for n in os.listdir(fd))  # str: listed by descriptor
            return [n for n in names if not is_hidden(n)]
        finally:
            os.close(fd)

    def _stat_many(self, dir_fd: int, names: list[bytes]) -> list[tuple[bytes, Any] | None]:
        out: list[tuple[bytes, Any] | None] = []
        for name in names:
            try:
                out.append((name, self.store.stat(At(dir_fd, name))))
            except FileNotFoundError:
                out.append(None)  # removed since the listing
        return out

    @_boundary
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        dh = self._handles.get(fh)
        if not isinstance(dh, DirHandle):
            raise pyfuse3.FUSEError(errno.EBADF)
        at = await self._meta(self._at, dh.node)
        if start_id == 0 or dh.names is None:
            dh.names = await self._meta(self._list, at)
        names = dh.names
        batch = 256
        for first in range(start_id, len(names), batch):
            stats = await self._meta(self._stat_many, at.dir_fd, names[first : first + batch])
            for i, item in enumerate(stats, start=first):
                if item is None:
                    continue
                name, (st, size, _) = item
                node = self.table.bind(dh.node.inode, name, st)
                if not pyfuse3.readdir_reply(token, name, self._attrs(node, st, size), i + 1):
                    self.table.settle(node)
                    return
                node.lookups += 1

    @_boundary
    async def releasedir(self, fh: int) -> None:
        dh = self._handles.pop(fh, None)
        if isinstance(dh, DirHandle):
            dh.node.opens -= 1
            self.table.settle(dh.node)

    @_boundary
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        dh = self._handles.get(fh)
        if not isinstance(dh, DirHandle):
            raise pyfuse3.FUSEError(errno.EBADF)
        await self._run(sync_dir, await self._meta(self._at, dh.node))

    # ---- extended attributes --------------------------------------------------

    def _virtual_xattrs(self, node: Node) -> dict[str, bytes]:
        """Blocking: the read-only user.stormfs.* attributes of a regular file."""
        if not stat.S_ISREG(node.mode):
            return {}
        at = self._at(node)
        st, _, layout = self.store.stat(at)
        if layout is None or layout.kind is not fmt.Kind.ENCRYPTED:
            return {XATTR_METHOD: b"none"}
        key_id = self.store.key_id_of(at) or (self.store.key.key_id if self.store.key else "")
        return {
            XATTR_METHOD: b"server",
            XATTR_SIZE: str(st.st_size).encode(),
            KEY_ID_XATTR: key_id.encode(),
            XATTR_FORMAT: layout.name.encode(),
        }

    def status(self) -> dict[str, Any]:
        """Blocking: `stormfs status` and the metrics file (`stats.Stats.report`)."""
        # One copy first: with -o metadata_threads this runs beside the request loop.
        nodes = {h.node for h in list(self._handles.values()) if isinstance(h, Handle)}
        pending = {}
        for node in nodes:
            if node.working is not None:
                try:
                    name = self.store.rel(self._at(node))
                except OSError:
                    name = f"(unlinked, inode {node.inode})"
                pending[name] = node.working.size
        return self.stats.report(len(nodes), pending)

    @_boundary
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        key = os.fsdecode(name)
        if not key.startswith(USER_XATTRS):
            # Answered without a syscall: the kernel asks for security.capability
            # on every write and ls for ACLs on every file.
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        if key == STATUS_XATTR and inode == pyfuse3.ROOT_INODE:
            # Read-only and unlisted: `cp -a` of the root does not carry it.
            return json.dumps(await self._meta(self.status)).encode()
        node = self.table.get(inode)
        if key.startswith(VIRTUAL_XATTR_PREFIX):
            value = (await self._meta(self._virtual_xattrs, node)).get(key)
            if value is None:
                raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
            return value
        path = (await self._meta(self._at, node)).proc
        try:
            return await self._meta(
                functools.partial(os.getxattr, path, key, follow_symlinks=False)
            )
        except OSError as e:
            if e.errno == errno.ENODATA:
                raise pyfuse3.FUSEError(pyfuse3.ENOATTR) from None
            raise

    @_boundary
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        node = self.table.get(inode)
        path = (await self._meta(self._at, node)).proc

        def names() -> list[bytes]:
            try:
                backing = os.listxattr(path, follow_symlinks=False)
            except OSError as e:
                if e.errno != errno.ENOTSUP:
                    raise
                backing = []  # SOURCE has no xattrs; ours are answered all the same
            own = [
                n
                for n in backing
                if n.startswith(USER_XATTRS) and not n.startswith(VIRTUAL_XATTR_PREFIX)
            ]
            return [os.fsencode(n) for n in (*own, *self._virtual_xattrs(node))]

        return await self._meta(names)

    @_boundary
    async def setxattr(
        self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext
    ) -> None:
        key = os.fsdecode(name)
        _user_namespace_only(key)
        if key.startswith(VIRTUAL_XATTR_PREFIX):
            return  # read-only and computed: accepted and ignored, so `cp -a` onto a mount works
        node = self.table.get(inode)
        path = (await self._meta(self._at, node)).proc

        def work() -> None:
            os.setxattr(path, key, value, follow_symlinks=False)
            self._metadata_changed(node)

        async with node.lock:
            await self._meta(work)

    @_boundary
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        key = os.fsdecode(name)
        _user_namespace_only(key)
        if key.startswith(VIRTUAL_XATTR_PREFIX):
            return
        node = self.table.get(inode)
        path = (await self._meta(self._at, node)).proc

        def work() -> None:
            try:
                os.removexattr(path, key, follow_symlinks=False)
            except OSError as e:
                if e.errno == errno.ENODATA:
                    raise pyfuse3.FUSEError(pyfuse3.ENOATTR) from None
                raise
            self._metadata_changed(node)

        async with node.lock:
            await self._meta(work)
