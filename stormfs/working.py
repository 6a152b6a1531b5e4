"""Pending writes of one file, kept without ever holding the file in memory.

A working copy is the committed version (`base`) plus what was written since.
Two representations, chosen by the access pattern:

* **stream** — while every write lands at or just after the end of what was
  written so far, the data goes straight through a streaming AES-GCM sealer
  into a temporary envelope (the *prefix*); committing finishes that envelope
  and renames it into place.  A new file, or one rewritten from the start, is
  encrypted once, as it arrives.
* **blocks** — any other write freezes the prefix and goes to a scratch file
  of 4 KiB blocks, encrypted with AES-256-XTS under a per-mount key that never
  touches disk.  Committing streams base ⊕ prefix ⊕ blocks through a new
  sealer into a fresh temporary file.

Truncation only lowers the limits below which base and prefix bytes count, so
nothing is rewritten until commit.  Blocking code; runs off the trio thread.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from typing import TypeVar

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from . import format as fmt
from .content import Reader, read_full
from .source import pwrite_all
from .store import Store, TempFile

BLOCK = 4096
CHUNK = 1 << 20
# A write this far past the streamed end still streams (the gap is copied from
# base now rather than at commit); further away, it goes to scratch blocks.
CATCHUP_LIMIT = 64 << 20

T = TypeVar("T")


class Scratch:
    """Dirty 4 KiB blocks of one file in an unlinked file, AES-256-XTS encrypted.

    XTS is the disk-sector mode: a block can be rewritten in place under the same
    tweak (its index) without the keystream reuse CTR would suffer.
    """

    def __init__(self, fd: int, key: bytes) -> None:
        self.fd = fd
        self._aes = algorithms.AES(key)
        self._dirty = bytearray()

    def has(self, block: int) -> bool:
        return block < len(self._dirty) and self._dirty[block] == 1

    def _xts(self, block: int) -> Cipher:
        return Cipher(self._aes, modes.XTS(block.to_bytes(16, "little")))

    def write(self, first: int, data: bytes | bytearray) -> None:
        out = bytearray(len(data))
        view = memoryview(data)
        for i in range(0, len(data), BLOCK):
            enc = self._xts(first + i // BLOCK).encryptor()
            out[i : i + BLOCK] = enc.update(view[i : i + BLOCK])
        pwrite_all(self.fd, out, first * BLOCK)
        last = first + len(data) // BLOCK
        if len(self._dirty) < last:
            self._dirty.extend(bytes(last - len(self._dirty)))
        self._dirty[first:last] = b"\x01" * (last - first)

    def read(self, first: int, count: int) -> bytes:
        raw = os.pread(self.fd, count * BLOCK, first * BLOCK)
        if len(raw) != count * BLOCK:
            raise OSError(errno.EIO, "scratch file is short")
        out = bytearray(len(raw))
        view = memoryview(raw)
        for i in range(0, len(raw), BLOCK):
            dec = self._xts(first + i // BLOCK).decryptor()
            out[i : i + BLOCK] = dec.update(view[i : i + BLOCK])
        return bytes(out)

    def drop_from(self, block: int) -> None:
        if block < len(self._dirty):
            del self._dirty[block:]
            os.ftruncate(self.fd, block * BLOCK)

    def close(self) -> None:
        os.close(self.fd)


class PlainSealer:
    """The sealer of a mount without a key: files are written as they are."""

    nonce = None
    header = b""

    def update(self, data: bytes | memoryview) -> bytes:
        return bytes(data)

    def finalize(self) -> bytes:
        return b""


class Prefix:
    """A temporary file holding the first `length` bytes of the new version."""

    def __init__(self, temp: TempFile, sealer: fmt.Sealer | PlainSealer, key: bytes | None):
        self.temp = temp
        self.sealer: fmt.Sealer | PlainSealer | None = sealer
        self.nonce = sealer.nonce
        self.key = key
        self.offset = len(sealer.header)
        self.length = 0
        pwrite_all(temp.fd, sealer.header, 0)

    def append(self, data: bytes | memoryview) -> None:
        assert self.sealer is not None
        pwrite_all(self.temp.fd, self.sealer.update(data), self.offset + self.length)
        self.length += len(data)

    def read(self, offset: int, n: int) -> bytes:
        data = os.pread(self.temp.fd, n, self.offset + offset)
        if len(data) != n:
            raise OSError(errno.EIO, "temporary file is short")
        if self.key is None or self.nonce is None:
            return data
        return fmt.decrypt_range(self.key, self.nonce, offset, data)

    def finish(self) -> None:
        assert self.sealer is not None
        tag = self.sealer.finalize()
        self.sealer = None
        pwrite_all(self.temp.fd, tag, self.offset + self.length)
        os.ftruncate(self.temp.fd, self.offset + self.length + len(tag))


class WorkingCopy:
    def __init__(self, store: Store, base: Reader, size: int) -> None:
        self.store = store
        self.base = base  # owned by the caller
        self.size = size
        self._base_limit = min(size, base.size)  # base bytes count below this
        self._prefix: Prefix | None = None
        self._prefix_valid = 0  # prefix bytes count below this
        self._scratch: Scratch | None = None

    # ---- reading ------------------------------------------------------------

    def _under(self, off: int, n: int) -> bytes:
        """Exactly `n` bytes of what lies under the scratch blocks: prefix, then base."""
        plen = self._prefix.length if self._prefix else 0
        parts = []
        pos, end = off, off + n
        if pos < self._prefix_valid:
            take = min(end, self._prefix_valid) - pos
            assert self._prefix is not None
            parts.append(self._prefix.read(pos, take))
            pos += take
        if pos < end and pos < plen:
            take = min(end, plen) - pos
            parts.append(bytes(take))
            pos += take
        if pos < end and pos < self._base_limit:
            take = min(end, self._base_limit) - pos
            parts.append(read_full(self.base, pos, take))
            pos += take
        if pos < end:
            parts.append(bytes(end - pos))
        return b"".join(parts)

    def read(self, off: int, n: int) -> bytes:
        n = min(n, self.size - off)
        if n <= 0:
            return b""
        if self._scratch is None:
            return self._under(off, n)
        scratch = self._scratch
        parts = []
        first, last = off // BLOCK, (off + n - 1) // BLOCK
        b = first
        while b <= last:
            dirty = scratch.has(b)
            run = b + 1
            while run <= last and scratch.has(run) == dirty:
                run += 1
            lo, hi = max(off, b * BLOCK), min(off + n, run * BLOCK)
            if dirty:
                data = scratch.read(b, run - b)
                parts.append(data[lo - b * BLOCK : hi - b * BLOCK])
            else:
                parts.append(self._under(lo, hi - lo))
            b = run
        return b"".join(parts)

    # ---- writing ------------------------------------------------------------

    def _streaming(self) -> bool:
        return self._scratch is None and (self._prefix is None or self._prefix.sealer is not None)

    def write(self, off: int, data: bytes) -> None:
        end = off + len(data)
        if end > fmt.MAX_PLAINTEXT_SIZE:
            raise OSError(errno.EFBIG, "file too large for one AES-GCM envelope")
        if not data:
            return
        plen = self._prefix.length if self._prefix else 0
        if self._streaming() and plen <= off <= plen + CATCHUP_LIMIT:
            try:
                self._stream_to(off)
                assert self._prefix is not None
                self._prefix.append(data)
                self._prefix_valid = self._prefix.length
            except BaseException:
                self._freeze()
                raise
        else:
            self._freeze()
            self._write_blocks(off, data)
        self.size = max(self.size, end)

    def _stream_to(self, off: int) -> None:
        """Start the prefix if needed and fill it from what lies under, up to `off`."""
        if self._prefix is None:
            key = self.store.key
            sealer: fmt.Sealer | PlainSealer = (
                fmt.Sealer(key.material) if key is not None else PlainSealer()
            )
            temp = self.store.new_temp()
            try:
                self._prefix = Prefix(temp, sealer, key.material if key else None)
            except BaseException:
                temp.discard()
                raise
        prefix = self._prefix
        while prefix.length < off:
            n = min(CHUNK, off - prefix.length)
            prefix.append(self._under(prefix.length, n))
            self._prefix_valid = prefix.length

    def _freeze(self) -> None:
        """No more appends to the prefix: the file now diverges from a stream."""
        if self._prefix is not None:
            self._prefix.sealer = None

    def _block(self, b: int) -> bytes:
        assert self._scratch is not None
        if self._scratch.has(b):
            return self._scratch.read(b, 1)
        return self._under(b * BLOCK, BLOCK)

    def _write_blocks(self, off: int, data: bytes) -> None:
        if self._scratch is None:
            self._scratch = Scratch(self.store.new_scratch(), self.store.scratch_key)
        end = off + len(data)
        first, last = off // BLOCK, (end - 1) // BLOCK
        buf = bytearray((last - first + 1) * BLOCK)
        if off % BLOCK:
            buf[:BLOCK] = self._block(first)
        if end % BLOCK and (last != first or not off % BLOCK):
            buf[-BLOCK:] = self._block(last)
        start = off - first * BLOCK
        buf[start : start + len(data)] = data
        self._scratch.write(first, buf)

    def truncate(self, size: int) -> None:
        if size > fmt.MAX_PLAINTEXT_SIZE:
            raise OSError(errno.EFBIG, "file too large for one AES-GCM envelope")
        if size < self.size:
            if self._prefix is not None and size < self._prefix.length:
                self._freeze()
            self._prefix_valid = min(self._prefix_valid, size)
            self._base_limit = min(self._base_limit, size)
            if self._scratch is not None:
                b = size // BLOCK
                tail = size % BLOCK
                if tail and self._scratch.has(b):
                    block = bytearray(self._scratch.read(b, 1))
                    block[tail:] = bytes(BLOCK - tail)
                    self._scratch.write(b, block)
                self._scratch.drop_from(b + 1 if tail else b)
        self.size = size

    # ---- committing ---------------------------------------------------------

    def commit(self, publish: Callable[[TempFile, bytes | None], T]) -> T:
        """Write the complete new version to a temporary file and `publish` it.

        On success the working copy is spent (closed).  On failure it stays
        intact, so a later commit can try again.
        """
        prefix = self._prefix
        if prefix is not None and self._streaming():
            try:
                self._stream_to(self.size)
                prefix.finish()
            except BaseException:
                self._freeze()
                raise
            result = publish(prefix.temp, prefix.nonce)
            self._prefix = None
            self.close()
            return result
        key = self.store.key
        sealer: fmt.Sealer | PlainSealer = (
            fmt.Sealer(key.material) if key is not None else PlainSealer()
        )
        temp = self.store.new_temp()
        try:
            out = Prefix(temp, sealer, None)
            for off in range(0, self.size, CHUNK):
                out.append(self.read(off, min(CHUNK, self.size - off)))
            out.finish()
            result = publish(temp, sealer.nonce)
        except BaseException:
            temp.discard()
            raise
        self.close()
        return result

    def close(self) -> None:
        """Drop pending state (temporary and scratch files); the base stays open."""
        if self._prefix is not None:
            self._prefix.temp.discard()
            self._prefix = None
        if self._scratch is not None:
            self._scratch.close()
            self._scratch = None
