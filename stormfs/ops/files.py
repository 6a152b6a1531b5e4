"""Operations on open files: create, open, read, write, flush, fsync, release."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
import time

import pyfuse3

from ..content import EnvelopeReader, Identity, PlainReader, V2Reader
from ..openfiles import Handle
from ..source import At, sync_dir
from .base import OpsBase, boundary, hidden_name

log = logging.getLogger(__name__)


class FileOps(OpsBase):
    # Keep the kernel's page cache at every open, unchecked (-o exclusive: nothing
    # else changes SOURCE); otherwise only while the backing file is unchanged.
    keep_cache = False

    @boundary
    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        hidden_name(name, creating=True)

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
        async with node.file.lock:
            node.file.reader = PlainReader(fd, 0)
            # Dirty from birth: even a file closed without a write becomes an envelope.
            self._working(node)
            node.file.opens += 1
            node.file.cached = None
        fh = self.handles.add(Handle(node, writable=True))
        return pyfuse3.FileInfo(fh=fh), self._attrs(node, st, 0)

    @boundary
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        node = self.table.get(inode)
        writable = (flags & os.O_ACCMODE) != os.O_RDONLY
        async with node.file.lock:
            if node.file.working is None:
                try:
                    at = await self._meta(self._at, node)
                    node.file.reader = await self._meta(self._fresh_reader, node, at)
                except FileNotFoundError:
                    # The name the kernel opened by now leads to another file (replaced
                    # behind the mount, and looked up meanwhile) or to none: ESTALE makes
                    # the kernel look it up again and open what is there, or say ENOENT.
                    raise OSError(errno.ESTALE, "no longer under that name") from None
                node.handed_out = None
                st = await self._meta(os.fstat, node.file.reader.fd)
                # The name may hold another file than the node last knew (replaced behind
                # the mount): key the node by the file it serves now, so that the stale
                # inode number, once reused by the backing file system, cannot bind to it.
                self.table.rekey(node, st)
                ident = Identity.of(st)
                keep = self.keep_cache or ident == node.file.cached
                node.file.cached = ident
                if not keep:
                    # The kernel may still hold the size of another version (within
                    # attr_timeout): reads would stop there.  Make it ask again.
                    with contextlib.suppress(OSError):
                        pyfuse3.invalidate_inode(node.inode, attr_only=True)
                reader = node.file.reader
                if isinstance(reader, EnvelopeReader | V2Reader) and not flags & os.O_TRUNC:
                    # A damaged file fails at open, even one whose plaintext is empty
                    # (v1: the whole file, once per version; v2: its header, and the empty
                    # chunk of an empty file).
                    cost = reader.size if isinstance(reader, EnvelopeReader) else 0
                    await self._io(cost, reader.verify)
            else:
                keep = True
            if flags & os.O_TRUNC and writable:
                await self._run(self._working(node).truncate, 0)
                node.file.mtime_ns = time.time_ns()
                node.file.times = None
            node.file.opens += 1
        fh = self.handles.add(Handle(node, writable))
        return pyfuse3.FileInfo(fh=fh, keep_cache=keep)

    @boundary
    async def read(self, fh: int, off: int, size: int) -> bytes:
        node = self.handles.file(fh).node
        async with node.file.lock:
            source = node.file.working or node.file.reader
            if source is None:
                raise OSError(errno.EBADF, "file is not open")
            data = await self._io(size, source.read, off, size)
        self.stats.bytes_read += len(data)
        return data

    @boundary
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        node = self.handles.file(fh).node
        async with node.file.lock:
            try:
                await self._io(len(buf), self._working(node).write, off, buf)
            except BaseException:
                node.file.cached = None
                raise
            node.file.mtime_ns = time.time_ns()
            node.file.times = None
        self.stats.bytes_written += len(buf)
        return len(buf)

    @boundary
    async def flush(self, fh: int) -> None:
        h = self.handles.file(fh)
        if h.writable:
            async with h.node.file.lock:
                if h.node.file.working is not None:
                    await self._commit(h.node, durable=False)
                elif self.store.has_pending:
                    # A version of an earlier close that could not be published: try
                    # again, and return its error to this close.
                    at = await self._meta(self._target, h.node)
                    if isinstance(at, At) and self.store.failed(at):
                        await self._settle(at)

    @boundary
    async def fsync(self, fh: int, datasync: bool) -> None:
        node = self.handles.file(fh).node
        async with node.file.lock:
            if node.file.working is not None:
                await self._commit(node, durable=True)
            elif isinstance(target := await self._meta(self._target, node), At):
                await self._settle(target)
                await self._run(sync_dir, At(target.dir_fd, b"."))

    @boundary
    async def release(self, fh: int) -> None:
        h = self.handles.file(fh)
        self.handles.pop(fh)
        node = h.node
        async with node.file.lock:
            node.file.opens -= 1
            if node.file.opens == 0:
                if node.file.working is not None:
                    try:
                        await self._commit(node, durable=False)
                    except Exception as e:
                        log.error("pending writes to inode %d lost: %s", node.inode, e)
                    working, node.file.working = node.file.working, None
                    if working is not None:
                        await self._meta(working.close)
                await self._close_reader(node)
        self.table.settle(node)
