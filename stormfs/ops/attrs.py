"""Attributes and extended attributes: getattr, setattr, and the xattr view.

The view carries user.* extended attributes only (others are neither shown nor
set: ACLs and security labels would not be enforced through the mount), plus
the read-only ``user.stormfs.*`` attributes stormfs computes."""

from __future__ import annotations

import errno
import functools
import json
import os
import stat
import time
from typing import Any

import pyfuse3

from .. import format as fmt
from ..inodes import Node
from ..source import KEY_ID_XATTR, VIRTUAL_XATTR_PREFIX, At
from ..stats import STATUS_XATTR
from .base import OpsBase, boundary

USER_XATTRS = "user."

XATTR_METHOD = "user.stormfs.encryption_method"
XATTR_SIZE = "user.stormfs.encrypted_size"
XATTR_FORMAT = "user.stormfs.format"


def _user_namespace_only(key: str) -> None:
    if not key.startswith(USER_XATTRS):
        raise pyfuse3.FUSEError(errno.EOPNOTSUPP)


class AttrOps(OpsBase):
    @boundary
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return await self._entry(self.table.get(inode))

    @boundary
    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        node = self.table.get(inode)
        async with node.file.lock:
            target = self._target(node)
            if fields.update_size:
                if node.file.reader is None:
                    assert isinstance(target, At)  # a node without a name is open
                    node.file.reader = await self._meta(self._fresh_reader, node, target)
                    opened_here = True
                else:
                    opened_here = False
                await self._run(self._working(node).truncate, attr.st_size)
                node.file.mtime_ns = time.time_ns()
                node.file.times = None
                if fh is None or opened_here:
                    await self._commit(node, durable=False)
                if opened_here and node.file.opens == 0:
                    await self._close_reader(node)
            async with self._metadata_target(target) as where:
                await self._meta(self._set_metadata, node, where, attr, fields)
        return await self._entry(node)

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
            if node.file.working is not None:
                node.file.times = times
            changed = True
        if changed:
            self._metadata_changed(node)

    @boundary
    async def access(self, inode: int, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        return True

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
            XATTR_METHOD: self.store.method_of(at).encode(),
            XATTR_SIZE: str(st.st_size).encode(),
            KEY_ID_XATTR: key_id.encode(),
            XATTR_FORMAT: layout.name.encode(),
        }

    def status(self) -> dict[str, Any]:
        """Blocking: `stormfs status` and the metrics file (`stats.Stats.report`)."""
        nodes = {h.node for h in self.handles.open_files()}
        pending = {}
        for node in nodes:
            if node.file.working is not None:
                try:
                    name = self.store.rel(self._at(node))
                except OSError:
                    name = f"(unlinked, inode {node.inode})"
                pending[name] = node.file.working.size
        return self.stats.report(len(nodes), pending, self.store.publishing())

    @boundary
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

    @boundary
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

    @boundary
    async def setxattr(
        self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext
    ) -> None:
        key = os.fsdecode(name)
        _user_namespace_only(key)
        if key.startswith(VIRTUAL_XATTR_PREFIX):
            return  # read-only and computed: accepted and ignored, so `cp -a` onto a mount works
        node = self.table.get(inode)
        at = await self._meta(self._at, node)

        def work() -> None:
            os.setxattr(at.proc, key, value, follow_symlinks=False)
            self._metadata_changed(node)

        async with node.file.lock:
            await self._settle(at)
            await self._meta(work)

    @boundary
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        key = os.fsdecode(name)
        _user_namespace_only(key)
        if key.startswith(VIRTUAL_XATTR_PREFIX):
            return
        node = self.table.get(inode)
        at = await self._meta(self._at, node)

        def work() -> None:
            try:
                os.removexattr(at.proc, key, follow_symlinks=False)
            except OSError as e:
                if e.errno == errno.ENODATA:
                    raise pyfuse3.FUSEError(pyfuse3.ENOATTR) from None
                raise
            self._metadata_changed(node)

        async with node.file.lock:
            await self._settle(at)
            await self._meta(work)
