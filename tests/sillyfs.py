"""A passthrough FUSE filesystem with the semantics of libfuse's high-level API, for use
as SOURCE: a file unlinked (or renamed over) while it is open is renamed
``.fuse_hidden<ino><n>`` in its directory instead, and removed at its last close, as
libfuse does without ``hard_remove`` (NFS does the same with ``.nfs*`` names).  So a
directory holding such a file cannot be removed until the file is closed.

``--no-xattr`` makes every extended attribute call answer ENOTSUP, like a filesystem
without xattr support.

Usage: python -m tests.sillyfs SOURCE MOUNTPOINT [--no-xattr]   (stays in the foreground)
"""

from __future__ import annotations

import argparse
import errno
import importlib.util
import logging
import os
import sys
from pathlib import Path

import pyfuse3
import trio

_spec = importlib.util.spec_from_file_location(
    "bench_passthrough", Path(__file__).resolve().parent.parent / "bench" / "passthrough.py"
)
assert _spec is not None and _spec.loader is not None
passthrough = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = passthrough
_spec.loader.exec_module(passthrough)

HIDDEN_PREFIX = b".fuse_hidden"


class SillyRename(passthrough.Passthrough):  # type: ignore[misc,name-defined]
    def __init__(self, source: str, *, xattrs: bool) -> None:
        super().__init__(source)
        self._xattrs = xattrs
        self._hidden: dict[int, bytes] = {}  # inode -> its hidden path
        self._hide_seq = 0

    def _open_inode(self, path: bytes) -> tuple[int, os.stat_result] | None:
        """The FUSE inode of `path` if some handle has it open."""
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return None
        inode = self._inodes.get((st.st_dev, st.st_ino))
        if inode is None or inode not in self._handles.values():
            return None
        return inode, st

    def _hide(self, path: bytes) -> bool:
        """Rename an open file to a hidden name beside it (libfuse's hide_node)."""
        found = self._open_inode(path)
        if found is None:
            return False
        inode, st = found
        self._hide_seq += 1
        name = b"%s%08x%08x" % (HIDDEN_PREFIX, inode, self._hide_seq)
        hidden = os.path.join(os.path.dirname(path), name)
        os.rename(path, hidden)
        self._moved(path, hidden, st)
        self._hidden[inode] = hidden
        return True

    @passthrough.guarded
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        if not self._hide(self._child(parent_inode, name)):
            await super().unlink(parent_inode, name, ctx)

    @passthrough.guarded
    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        if not flags & pyfuse3.RENAME_EXCHANGE:
            self._hide(self._child(parent_inode_new, name_new))
        await super().rename(parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx)

    @passthrough.guarded
    async def release(self, fh: int) -> None:
        inode = self._handles.get(fh)
        await super().release(fh)
        if inode in self._hidden and inode not in self._handles.values():
            hidden = self._hidden.pop(inode)
            try:
                st = os.lstat(hidden)
                os.unlink(hidden)
            except FileNotFoundError:
                return
            self._unlinked(hidden, st)

    async def _no_xattrs(self) -> None:
        if not self._xattrs:
            raise pyfuse3.FUSEError(errno.ENOTSUP)

    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        await self._no_xattrs()
        return await super().getxattr(inode, name, ctx)

    async def setxattr(
        self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext
    ) -> None:
        await self._no_xattrs()
        await super().setxattr(inode, name, value, ctx)

    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        await self._no_xattrs()
        return await super().listxattr(inode, ctx)

    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self._no_xattrs()
        await super().removexattr(inode, name, ctx)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source")
    parser.add_argument("mountpoint")
    parser.add_argument("--no-xattr", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="sillyfs: %(levelname)s %(message)s")
    os.umask(0)
    ops = SillyRename(args.source, xattrs=not args.no_xattr)
    options = set(pyfuse3.default_options) | {"fsname=sillyfs", "subtype=sillyfs"}
    pyfuse3.init(ops, args.mountpoint, options)
    try:
        trio.run(passthrough._serve)
    finally:
        pyfuse3.close(unmount=True)


if __name__ == "__main__":
    main()
