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
nothing is rewritten until commit.

New versions are v1 envelopes, or v2 files on a mount that writes v2.  A v2
file already under the sealing key is not rewritten whole: its writes go to
scratch blocks, and the commit reseals only the chunks they touch (plus the
last chunk, when the size changed), which the store writes in place under a
redo record.  Blocking code; runs off the trio thread.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from typing import Protocol

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from . import format as fmt
from . import format_v2 as v2
from .content import Reader, V2Reader, read_full
from .keys import Key
from .source import pwrite_all
from .store import AnySealer, PlainSealer, Store, TempFile

BLOCK = 4096
CHUNK = 1 << 20
# A write this far past the streamed end still streams (the gap is copied from
# base now rather than at commit); further away, it goes to scratch blocks.
CATCHUP_LIMIT = 64 << 20


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

    def dirty_blocks(self) -> Iterator[int]:
        i = self._dirty.find(1)
        while i >= 0:
            yield i
            i = self._dirty.find(1, i + 1)

    def drop_from(self, block: int) -> None:
        if block < len(self._dirty):
            del self._dirty[block:]
            os.ftruncate(self.fd, block * BLOCK)

    def close(self) -> None:
        os.close(self.fd)


class Prefix:
    """A temporary file holding the first `length` bytes of the new version, sealed
    as they came; `streaming` until the file diverges from a stream."""

    def __init__(self, temp: TempFile, sealer: AnySealer, key: Key | None) -> None:
        self.temp = temp
        self.sealer = sealer
        self.streaming = True
        self._key = key
        self._disk = len(sealer.header)  # bytes written to the temporary file
        self.length = 0
        pwrite_all(temp.fd, sealer.header, 0)

    def append(self, data: bytes | memoryview) -> None:
        out = self.sealer.update(data)
        pwrite_all(self.temp.fd, out, self._disk)
        self._disk += len(out)
        self.length += len(data)

    def read(self, offset: int, n: int) -> bytes:
        sealer = self.sealer
        if isinstance(sealer, v2.Sealer):
            return self._read_v2(sealer, offset, n)
        data = os.pread(self.temp.fd, n, len(sealer.header) + offset)
        if len(data) != n:
            raise OSError(errno.EIO, "temporary file is short")
        if isinstance(sealer, PlainSealer):
            return data
        assert self._key is not None
        return fmt.decrypt_range(self._key.material, sealer.nonce, offset, data)

    def _read_v2(self, sealer: v2.Sealer, offset: int, n: int) -> bytes:
        """Sealed chunks from the file (authenticated as they are opened), the rest
        from the sealer's pending chunk."""
        cipher = sealer.cipher
        size = cipher.chunk_size
        boundary = sealer.sealed_chunks * size
        parts = []
        if offset < boundary:
            chunks = v2.chunks_covering(offset, min(offset + n, boundary) - offset, size)
            slot = v2.slot_size(size)
            start = v2.chunk_offset(chunks.start, size)
            raw = memoryview(os.pread(self.temp.fd, len(chunks) * slot, start))
            if len(raw) != len(chunks) * slot:
                raise OSError(errno.EIO, "temporary file is short")
            plain = b"".join(
                cipher.open_chunk(i, raw[k * slot : (k + 1) * slot], False)
                for k, i in enumerate(chunks)
            )
            skip = offset - chunks.start * size
            parts.append(plain[skip : skip + min(n, boundary - offset)])
        if offset + n > boundary:
            lo = max(offset, boundary) - boundary
            parts.append(bytes(sealer.pending[lo : offset + n - boundary]))
        return b"".join(parts)

    def finish(self) -> None:
        self.streaming = False
        tail = self.sealer.finalize()
        pwrite_all(self.temp.fd, tail, self._disk)
        os.ftruncate(self.temp.fd, self._disk + len(tail))


class Committer(Protocol):
    """Where a commit goes: the store's side, bound to one file (`Store.committer`)."""

    def publish(self, temp: TempFile, sealer: AnySealer, key: Key | None) -> Reader: ...

    def rewrite(
        self, reader: V2Reader, chunks: Iterator[tuple[int, bytes]], size: int
    ) -> Reader: ...


class WorkingCopy:
    """`key` seals the new version (None: it is written as plaintext)."""

    def __init__(self, store: Store, base: Reader, size: int, key: Key | None) -> None:
        self.store = store
        self.key = key
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
        if self._prefix is None:
            # A file reseals in place rather than streams, unless it is rewritten from empty.
            return self._scratch is None and (self._base_limit == 0 or not self._in_place())
        return self._scratch is None and self._prefix.streaming

    def streams(self) -> bool:
        """Whether a commit now only finishes the envelope streamed so far (and fills
        in what lies under it up to `size`), rather than rewriting the file."""
        return self._prefix is not None and self._streaming()

    def _in_place(self) -> bool:
        """Whether the base is a v2 file this copy's new version may keep, chunks and all."""
        base = self.base
        return (
            self.store.write_v2
            and isinstance(base, V2Reader)
            and self.key is not None
            and base.key == self.key.material
        )

    def _new_sealer(self) -> AnySealer:
        if self.key is None:
            return PlainSealer()
        if self.store.write_v2:
            return v2.Sealer(self.key.material)
        return fmt.Sealer(self.key.material)

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
            temp = self.store.new_temp()
            try:
                self._prefix = Prefix(temp, self._new_sealer(), self.key)
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
            self._prefix.streaming = False

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

    def commit(self, to: Committer) -> Reader:
        """Make the new version the file's content and return its reader.

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
            result = to.publish(prefix.temp, prefix.sealer, self.key)
            self._prefix = None
        elif prefix is None and self._in_place() and (chunks := self._changed_chunks()):
            assert isinstance(self.base, V2Reader)
            result = to.rewrite(self.base, chunks, self.size)
        else:
            result = self._rewrite_whole(to)
        self.close()
        return result

    def _rewrite_whole(self, to: Committer) -> Reader:
        sealer = self._new_sealer()
        temp = self.store.new_temp()
        try:
            out = Prefix(temp, sealer, self.key)
            for off in range(0, self.size, CHUNK):
                out.append(self.read(off, min(CHUNK, self.size - off)))
            out.finish()
            return to.publish(temp, sealer, self.key)
        except BaseException:
            temp.discard()
            raise

    def _changed_chunks(self) -> Iterator[tuple[int, bytes]] | None:
        """The chunks of the base that the new version changes, resealed, in order;
        None where rewriting the whole file costs less (most of it changed, and it
        has one name, so a rename can publish it)."""
        assert isinstance(self.base, V2Reader)
        base = self.base
        cipher = base.file_cipher()
        size = cipher.chunk_size
        last = v2.chunk_count(self.size, size) - 1
        dirty: set[int] = set()
        if self._scratch is not None:
            dirty.update(b * BLOCK // size for b in self._scratch.dirty_blocks())
        if self.size != base.size or self._base_limit < base.size:
            start = min(self._base_limit, base.size)
            dirty.update(v2.chunks_covering(start, self.size - start, size))
            dirty.add(last)
            dirty.add(v2.chunk_count(base.size, size) - 1)  # the old last, if it stays
        changed = sorted(i for i in dirty if i <= last)
        if len(changed) > (last + 1) // 2 and os.fstat(base.fd).st_nlink == 1:
            return None

        def sealed() -> Iterator[tuple[int, bytes]]:
            for i in changed:
                plain = self.read(i * size, v2.chunk_span(self.size, i, size))
                yield i, cipher.seal_chunk(i, plain, i == last)

        return sealed()

    def close(self) -> None:
        """Drop pending state (temporary and scratch files); the base stays open."""
        if self._prefix is not None:
            self._prefix.temp.discard()
            self._prefix = None
        if self._scratch is not None:
            self._scratch.close()
            self._scratch = None
