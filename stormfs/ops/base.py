"""What every kind of operation shares: the error boundary, the plumbing that runs
blocking calls, the way from a node to its place in SOURCE, and commits.

`boundary` is the one place where errors become errnos: `OSError` becomes its
errno, a file that fails authentication becomes EIO, anything unexpected is
logged with its traceback and answered EIO, and the daemon keeps serving.
Blocking work runs in threads (`_run`), or inline where it is cheaper
(`_meta`); a per-file `trio.Lock` (the open-file table's) orders reads, writes
and commits.

Data reaches SOURCE on flush (so close() returns commit errors), on fsync
(durably), on the last release if writes came after the last flush (mmap), and
at shutdown.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import stat
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import pyfuse3
import trio

from .. import format as fmt
from ..content import EnvelopeReader, Identity, Reader
from ..inodes import InodeTable, Node
from ..openfiles import Handles
from ..source import At, is_hidden
from ..stats import Stats
from ..store import Store
from ..working import WorkingCopy

log = logging.getLogger(__name__)

T = TypeVar("T")

# Reads and writes up to this size cost less than a thread hop (170-400 us here)
# when the page cache has the data, so they run inline like metadata calls.
INLINE_IO = 64 << 10


def boundary(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The one place where errors become errnos."""

    @functools.wraps(fn)
    async def wrapper(self: OpsBase, *args: Any) -> Any:
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


def hidden_name(name: bytes, *, creating: bool) -> None:
    """Names stormfs keeps for itself are neither seen nor made through the mount."""
    if is_hidden(name):
        raise pyfuse3.FUSEError(errno.EPERM if creating else errno.ENOENT)


class OpsBase(pyfuse3.Operations):
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
        self.handles = Handles()
        self._limiter = trio.CapacityLimiter(8)
        self._metadata_threads = metadata_threads
        self._root_uid = os.geteuid() == 0

    def close(self) -> None:
        """Let go of the backing directories (after the last request)."""
        self.table.close()

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
        if node.file.working is not None:
            e.st_size = node.file.working.size
            e.st_blocks = (node.file.working.size + 511) // 512
            e.st_mtime_ns = node.file.mtime_ns
            e.st_ctime_ns = max(node.file.mtime_ns, st.st_ctime_ns)
        if node.file.times is not None:
            e.st_atime_ns, e.st_mtime_ns = node.file.times
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
        if isinstance(target, int):  # unlinked but open: the descriptor of node.file.reader
            assert node.file.reader is not None
            return os.fstat(target), node.file.reader.size
        st, size, _ = self.store.stat(target)
        if node.file.reader is not None:
            held = os.fstat(node.file.reader.fd)
            if (held.st_dev, held.st_ino) != (st.st_dev, st.st_ino):
                # The name was given to another file behind the mount.  This node's handles
                # still read the file they opened (the next lookup of the name gets a node
                # of its own): its size is the one their reads must stop at.
                return held, node.file.reader.size
        elif stat.S_IFMT(st.st_mode) != stat.S_IFMT(node.mode):
            # Another kind of object now: ESTALE makes the kernel look the name up again
            # (a changed type would poison its cached inode with EIO).
            raise OSError(errno.ESTALE, "replaced by another kind of file")
        return st, size

    async def _entry(self, node: Node) -> pyfuse3.EntryAttributes:
        st, size = await self._meta(self._stat_node, node)
        return self._attrs(node, st, size)

    def _working(self, node: Node) -> WorkingCopy:
        if node.file.working is None:
            if node.file.reader is None:
                raise OSError(errno.EBADF, "file is not open")
            target = self._target(node)
            key = self.store.sealing_key(target) if isinstance(target, At) else self.store.key
            node.file.working = WorkingCopy(
                self.store, node.file.reader, node.file.reader.size, key
            )
            node.file.mtime_ns = time.time_ns()
        return node.file.working

    def _fresh_reader(self, node: Node, at: At) -> Reader:
        """Blocking: the node's reader, reopened if the name now holds another file."""
        reader = node.file.reader
        if reader is not None:
            now, held = self.store.lstat(at), os.fstat(reader.fd)
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
        working = node.file.working
        if working is None:
            return
        try:
            at = await self._meta(self._at, node)
        except OSError:
            return  # unlinked while open: nothing to commit to
        # The new version keeps the mtime the view showed while writes were
        # pending, so the kernel sees no change and keeps its page cache.
        times = node.file.times or (None, node.file.mtime_ns)

        committer = self.store.committer(at, durable=durable, times=times)
        # With group commit, a small streamed file's commit syncs nothing: finishing
        # its envelope costs less than the hop to a thread.
        inline = (
            not durable
            and working.streams()
            and working.size <= INLINE_IO
            and await self._meta(self.store.defers, at)
        )
        try:
            run = self._meta if inline else self._run
            reader = await run(working.commit, committer)
        except BaseException as e:
            node.file.cached = None
            self.stats.committed(e)
            raise
        self.stats.committed()
        old, node.file.reader = node.file.reader, reader
        node.file.working = None
        node.file.times = None
        if old is not None and old is not reader:  # a v2 file rewritten in place keeps it
            await self._meta(old.close)
        st = await self._meta(os.fstat, reader.fd)
        self.table.rekey(node, st, created=True)
        node.file.cached = Identity.of(st)

    async def _settle(self, at: At) -> None:
        """Publish a closed version still pending at `at` (group commit), before its
        name or its metadata changes; raises the error of a publish that fails."""
        if self.store.has_pending:
            await self._run(self.store.settle, at)

    @contextlib.asynccontextmanager
    async def _metadata_target(self, target: At | int) -> AsyncIterator[At | int]:
        """Where a metadata change of `target` goes: the version pending there, if a
        closed one waits for its batch (group commit), else `target` itself."""
        fd = None
        if isinstance(target, At) and self.store.has_pending:
            fd = await self._meta(self.store.reopen_pending, target)
        try:
            yield target if fd is None else fd
        finally:
            if fd is not None:
                os.close(fd)

    async def _close_reader(self, node: Node) -> None:
        reader, node.file.reader = node.file.reader, None
        if reader is not None:
            await self._meta(reader.close)

    def _metadata_changed(self, node: Node) -> None:
        """Blocking: our own chmod/chown/utime/xattr change moved ctime, not content."""
        reader = node.file.reader
        if isinstance(reader, EnvelopeReader) and reader.nonce and reader.key:
            nonce = reader.nonce
            reader.refresh()
            reader.verdicts.put(reader.ident, nonce, reader.key)
            reader.nonce = nonce

    async def drain(self) -> None:
        """Commit every pending write (at shutdown)."""
        for node in self.table:
            if node.file.working is None:
                continue
            async with node.file.lock:
                try:
                    await self._commit(node, durable=True)
                except Exception as e:
                    log.error("pending writes to inode %d lost at shutdown: %s", node.inode, e)

    def _target(self, node: Node) -> At | int:
        """Blocking: the node's place or, once its last name is gone, the file it holds open."""
        try:
            return self._at(node)
        except OSError:
            if node.file.reader is None:
                raise
            return node.file.reader.fd
