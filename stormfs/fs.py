"""The pyfuse3 operations: kernel requests translated into inode-map, open-file
table and store calls, one module per kind of request (`stormfs.ops`)."""

from __future__ import annotations

from .ops.attrs import AttrOps
from .ops.entries import EntryOps
from .ops.files import FileOps


class Operations(EntryOps, FileOps, AttrOps):
    supports_dot_lookup = False
    enable_writeback_cache = False
