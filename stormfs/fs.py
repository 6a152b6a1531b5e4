"""The pyfuse3 operations: kernel requests translated into inode-map, open-file
table and store calls, one module per kind of request (`stormfs.ops`).

Every request handler is counted here, by kind, with the time spent in it
(`stats.Stats.request`): `stormfs status` reports them."""

from __future__ import annotations

import errno
import functools
import time
from collections.abc import Callable
from typing import Any

import pyfuse3

from .ops.attrs import AttrOps
from .ops.entries import EntryOps
from .ops.files import FileOps

# The kernel requests stormfs answers, by the name of their pyfuse3 handler.
REQUESTS = (
    "lookup",
    "forget",
    "getattr",
    "setattr",
    "readlink",
    "mknod",
    "mkdir",
    "unlink",
    "rmdir",
    "symlink",
    "rename",
    "link",
    "open",
    "create",
    "read",
    "write",
    "flush",
    "release",
    "fsync",
    "opendir",
    "readdir",
    "releasedir",
    "fsyncdir",
    "statfs",
    "access",
    "getxattr",
    "listxattr",
    "setxattr",
    "removexattr",
)


def _counted(kind: str, handler: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(handler)
    async def counted(self: Operations, *args: Any) -> Any:
        start = time.perf_counter_ns()
        try:
            return await handler(self, *args)
        finally:
            self.stats.request(kind, time.perf_counter_ns() - start)

    return counted


class Operations(EntryOps, FileOps, AttrOps):
    supports_dot_lookup = False
    enable_writeback_cache = False
    # How long the kernel may remember that a name does not exist (-o exclusive: only
    # this daemon makes names); 0: it asks again every time.
    negative_timeout = 0.0

    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        try:
            return await super().lookup(parent_inode, name, ctx)
        except pyfuse3.FUSEError as e:
            if e.errno != errno.ENOENT or not self.negative_timeout:
                raise
        missing = pyfuse3.EntryAttributes()
        missing.st_ino = 0
        missing.entry_timeout = self.negative_timeout
        return missing


for _kind in REQUESTS:
    setattr(Operations, _kind, _counted(_kind, getattr(Operations, _kind)))
