"""Operations on names and directories: lookup and forget, making and removing
names, renames, listing and syncing directories.

On a mount with per-user keys, a rename that would move a file to another
account's key (across accounts, between SOURCE's top level and an account, or
of a top-level directory, which is an account) is refused with EXDEV: `mv`
then copies and removes, and the copy is sealed under the key of where it
lands.  Re-sealing inside rename would make it neither atomic nor cheap.  A
hard link across accounts is refused alike: one file cannot be under two keys."""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import stat
from collections.abc import Callable, Sequence
from typing import Any

import pyfuse3

from ..openfiles import DirHandle
from ..source import At, is_hidden, renameat2, sync_dir
from .base import OpsBase, boundary, hidden_name


class EntryOps(OpsBase):
    @boundary
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        hidden_name(name, creating=False)
        at = await self._meta(self._child, parent_inode, name)
        st, size, _ = await self._meta(self.store.stat, at)
        node = self.table.bind(parent_inode, name, st)
        node.lookups += 1
        node.handed_out = (st.st_dev, st.st_ino)
        return self._attrs(node, st, size)

    @boundary
    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for inode, n in inode_list:
            try:
                node = self.table.get(inode)
            except OSError:
                continue
            self.table.forget(node, n)

    @boundary
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        at = await self._meta(self._at, self.table.get(inode))
        return await self._meta(functools.partial(os.readlink, at.name, dir_fd=at.dir_fd))

    @boundary
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        sv = await self._meta(os.statvfs, self.store.root)
        out = pyfuse3.StatvfsData()
        for name in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail"):
            setattr(out, name, getattr(sv, name))
        for name in ("f_files", "f_ffree", "f_favail", "f_namemax"):
            setattr(out, name, getattr(sv, name))
        return out

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
        hidden_name(name, creating=True)

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

    @boundary
    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        def make(at: At) -> None:
            os.mkdir(at.name, stat.S_IMODE(mode), dir_fd=at.dir_fd)
            self._chown_new(at, ctx)

        return await self._made(parent_inode, name, make)

    @boundary
    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        def make(at: At) -> None:
            os.symlink(target, at.name, dir_fd=at.dir_fd)
            self._chown_new(at, ctx)

        return await self._made(parent_inode, name, make)

    @boundary
    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        def make(at: At) -> None:
            os.mknod(at.name, mode, rdev, dir_fd=at.dir_fd)
            self._chown_new(at, ctx)

        return await self._made(parent_inode, name, make)

    @boundary
    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        node = self.table.get(inode)
        async with node.file.lock:
            src = await self._meta(self._at, node)
            await self._settle(src)

            def make(at: At) -> None:
                if self.store.per_user_keys and self._changes_account(src, at, 0):
                    raise OSError(errno.EXDEV, "a hard link cannot join two accounts")
                os.link(
                    src.name,
                    at.name,
                    src_dir_fd=src.dir_fd,
                    dst_dir_fd=at.dir_fd,
                    follow_symlinks=False,
                )

            return await self._made(new_parent_inode, new_name, make, created=False)

    async def _remove(self, parent_inode: int, name: bytes, remove: Callable[..., None]) -> None:
        hidden_name(name, creating=False)
        at = await self._meta(self._child, parent_inode, name)
        victim = self.table.child(parent_inode, name)
        await self._settle(at)
        if victim is None:
            await self._meta(functools.partial(remove, at.name, dir_fd=at.dir_fd))
            return
        async with victim.file.lock:
            await self._meta(functools.partial(remove, at.name, dir_fd=at.dir_fd))
            self.table.unlink(parent_inode, name)
        self.table.settle(victim)

    @boundary
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self._remove(parent_inode, name, os.unlink)

    @boundary
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self._remove(parent_inode, name, os.rmdir)

    @boundary
    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        hidden_name(name_old, creating=False)
        hidden_name(name_new, creating=True)
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
                await stack.enter_async_context(node.file.lock)
            if self.store.per_user_keys and await self._meta(
                self._changes_account, old, new, flags
            ):
                raise pyfuse3.FUSEError(errno.EXDEV)
            await self._settle(old)
            await self._settle(new)
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

    def _changes_account(self, old: At, new: At, flags: int) -> bool:
        """Blocking: whether the rename would put sealed content (a regular file, or a
        directory and all it holds) under another account: across accounts, between
        SOURCE's top level and an account, or a top-level directory (an account) itself."""
        moves = [(old, new), (new, old)] if flags & pyfuse3.RENAME_EXCHANGE else [(old, new)]
        for src, dst in moves:
            mode = src.lstat().st_mode
            if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                continue  # a symlink, a device, a FIFO: nothing is sealed
            account = self.store.account(src)
            if account != self.store.account(dst) or (account is None and stat.S_ISDIR(mode)):
                return True
        return False

    @boundary
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        node = self.table.get(inode)
        node.file.opens += 1
        return self.handles.add(DirHandle(node))

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

    @boundary
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        dh = self.handles.directory(fh)
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

    @boundary
    async def releasedir(self, fh: int) -> None:
        dh = self.handles.pop(fh)
        if isinstance(dh, DirHandle):
            dh.node.file.opens -= 1
            self.table.settle(dh.node)

    @boundary
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        dh = self.handles.directory(fh)
        at = await self._meta(self._at, dh.node)
        if self.store.has_pending:
            await self._run(self.store.settle_dir, at.dir_fd)
        await self._run(sync_dir, at)
