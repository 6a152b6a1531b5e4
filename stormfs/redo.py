"""Chunk records: what makes rewriting some chunks of a v2 file in place atomic.

Overwriting a chunk on disk is not atomic: a crash can leave half of it.  So
a commit first writes the new chunks into a record in the daemon's instance
directory and syncs it, then applies them to the file, syncs the file, and
clears the record.  A daemon that dies meanwhile leaves the record behind;
whoever takes its instance directory over replays it (`replay`).

    record = "stormfsR" | body length (u64 be) | SHA-256 of the body | body
    body   = chunk data ... | trailer (JSON) | trailer length (u32 be)

The trailer names the file (path, dev, ino), its new on-disk size, and per
extent its offset in the file, its length and the nonce the chunk there had
before (null past the old end).  A record that is torn, or was cleared (its
first bytes zeroed), has no valid digest and is ignored: the file was not
touched yet.  A record file keeps its size from commit to commit, so syncing
a record flushes its data and no metadata.

Clearing a record is not synced, so after a power cut a record that was
already applied may be found again.  Replay tells from the nonces on disk: an
extent that already holds the new bytes was applied; one that holds the old
nonce (or the new one, half written) was not; any other nonce means a later
writer (another daemon) changed the chunk since, and the record is dropped
rather than roll that change back.  A shrinking record truncates before it
writes, so "every extent applied" also means "the size applied".

Each record file (a *slot*) is reused commit after commit, so a commit
creates no directory entry and needs no directory sync; one slot per commit
in flight.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from .format import NONCE_SIZE
from .source import pwrite_all

PREFIX = b"chunks-"  # slot names in the instance directory
MAGIC = b"stormfsR"
_HEADER = struct.Struct(">8sQ32s")
_LENGTH = struct.Struct(">I")


@dataclass(frozen=True)
class Extent:
    offset: int  # in the file
    length: int
    old_nonce: bytes | None


@dataclass(frozen=True)
class Record:
    target: bytes
    dev: int
    ino: int
    size: int  # the file's new on-disk size
    extents: list[tuple[Extent, int]]  # each with its data's offset in the record


class Slot:
    """One record file, reused for commit after commit."""

    def __init__(self, dir_fd: int, name: bytes) -> None:
        self.name = name
        self.fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)

    def write(
        self,
        target: bytes,
        st: os.stat_result,
        size: int,
        chunks: Iterable[tuple[int, bytes, bytes | None]],
    ) -> Record:
        """Write and sync the record of `chunks` ((offset, data, old nonce) each) for the
        file `st`, to have the on-disk size `size`."""
        digest = hashlib.sha256()
        pos = 0
        extents = []
        for offset, data, old_nonce in chunks:
            pwrite_all(self.fd, data, _HEADER.size + pos)
            digest.update(data)
            extents.append((Extent(offset, len(data), old_nonce), pos))
            pos += len(data)
        trailer = json.dumps(
            {
                "target": os.fsdecode(target),
                "dev": st.st_dev,
                "ino": st.st_ino,
                "size": size,
                "extents": [
                    [e.offset, e.length, None if e.old_nonce is None else e.old_nonce.hex()]
                    for e, _ in extents
                ],
            }
        ).encode()
        tail = trailer + _LENGTH.pack(len(trailer))
        digest.update(tail)
        pwrite_all(self.fd, tail, _HEADER.size + pos)
        pwrite_all(self.fd, _HEADER.pack(MAGIC, pos + len(tail), digest.digest()), 0)
        os.fdatasync(self.fd)
        return Record(target, st.st_dev, st.st_ino, size, extents)

    def clear(self) -> None:
        pwrite_all(self.fd, bytes(_HEADER.size), 0)

    def close(self) -> None:
        os.close(self.fd)


class Slots:
    """The instance directory's record files: one taken per commit in flight."""

    def __init__(self, dir_fd: int) -> None:
        self._dir_fd = dir_fd
        self._free: list[Slot] = []
        self._count = 0
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def take(self) -> Iterator[Slot]:
        with self._lock:
            if self._free:
                slot = self._free.pop()
            else:
                self._count += 1
                slot = Slot(self._dir_fd, PREFIX + b"%d" % self._count)
                os.fsync(self._dir_fd)  # once per slot: its name survives a power cut
        try:
            yield slot
        finally:
            with self._lock:
                self._free.append(slot)

    def close(self) -> None:
        with self._lock:
            for slot in self._free:
                slot.close()
            self._free.clear()


def apply(record: Record, slot_fd: int, fd: int) -> None:
    """Write the record's chunks into the file `fd` (not synced)."""
    if record.size < os.fstat(fd).st_size:
        os.ftruncate(fd, record.size)
    for extent, pos in record.extents:
        data = os.pread(slot_fd, extent.length, _HEADER.size + pos)
        if len(data) != extent.length:
            raise OSError(5, "chunk record is short")
        pwrite_all(fd, data, extent.offset)
    if os.fstat(fd).st_size != record.size:
        os.ftruncate(fd, record.size)


def load(fd: int) -> Record | None:
    """The record in `fd`; None if it is empty, torn or cleared."""
    magic, length, digest = _HEADER.unpack(os.pread(fd, _HEADER.size, 0).ljust(_HEADER.size, b"\0"))
    if magic != MAGIC:
        return None
    body = os.pread(fd, length, _HEADER.size)
    if len(body) != length or length < _LENGTH.size or hashlib.sha256(body).digest() != digest:
        return None
    (n,) = _LENGTH.unpack_from(body, len(body) - _LENGTH.size)
    try:
        t = json.loads(body[len(body) - _LENGTH.size - n : len(body) - _LENGTH.size])
        pos = 0
        extents = []
        for offset, length, old in t["extents"]:
            nonce = None if old is None else bytes.fromhex(old)
            extents.append((Extent(offset, length, nonce), pos))
            pos += length
        return Record(os.fsencode(t["target"]), t["dev"], t["ino"], t["size"], extents)
    except (ValueError, KeyError, TypeError):
        return None


def pending(record: Record, slot_fd: int, fd: int) -> bool | None:
    """Whether the record still has to be applied to `fd`: False if it was, None if
    a later writer changed one of its chunks since (so it must not be)."""
    todo = False
    for extent, pos in record.extents:
        on_disk = os.pread(fd, extent.length, extent.offset)
        new = os.pread(slot_fd, extent.length, _HEADER.size + pos)
        if on_disk == new:
            continue
        nonce = on_disk[:NONCE_SIZE]
        if len(nonce) < NONCE_SIZE or nonce in (extent.old_nonce, new[:NONCE_SIZE]):
            todo = True
        elif extent.old_nonce is None and not nonce.strip(b"\0"):
            todo = True  # past the old end: a hole, never written
        else:
            return None
    return todo
