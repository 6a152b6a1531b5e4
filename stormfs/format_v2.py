"""The v2 envelope: chunked AES-256-GCM with per-file subkeys, as pure functions.

    header (60) | chunk 0 | chunk 1 | ... | chunk N-1

    header = 0x02 "stormfs" | chunk size (u32 be) | file id (16) | HMAC-SHA256 (32)
    chunk  = nonce (12) | AES-256-GCM ciphertext (1..chunk size) | tag (16)

Keys per file: ``HKDF-SHA256(key, salt=file id, info=INFO)`` gives 64 bytes,
the chunk key then the header MAC key.  A chunk's associated data is
``file id | index (u64 be) | last (1 byte)``.  Every chunk but the last holds
exactly `chunk_size` plaintext bytes; the last holds 1..chunk_size, or 0 when
the whole file is empty, so an empty file is its header and one empty chunk.

Everything is designed for rewriting one chunk in place: each chunk has its
own random nonce, the header never changes once written, and the plaintext
size follows from the on-disk size and the chunk size.  docs/FORMAT.md is the
specification, with test vectors.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Iterable, Iterator

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import hmac as crypto_hmac
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

# DecryptionFailed is the one error of this module, shared with v1.
from .format import KEY_SIZE, NONCE_SIZE, TAG_SIZE, DecryptionFailed, read_exact

VERSION = 0x02
SIGNATURE = b"\x02stormfs"  # the version byte and a fixed tag: what makes a file v2
CHUNK_SIZE_FIELD = struct.Struct(">I")
PREFIX_SIZE = len(SIGNATURE) + CHUNK_SIZE_FIELD.size  # 12: what classification reads
FILE_ID_SIZE = 16
MAC_SIZE = 32
MAC_OFFSET = PREFIX_SIZE + FILE_ID_SIZE  # 28
HEADER_SIZE = MAC_OFFSET + MAC_SIZE  # 60
CHUNK_OVERHEAD = NONCE_SIZE + TAG_SIZE  # 28
EMPTY_FILE_SIZE = HEADER_SIZE + CHUNK_OVERHEAD  # 88

CHUNK_SIZE = 16 << 10  # what new files use (measured: docs/FORMAT.md)
MIN_CHUNK_SIZE = 4 << 10
MAX_CHUNK_SIZE = 64 << 10
# Random 96-bit nonces are safe for 2**32 seals under one key: one file id
# never holds more chunks than that.
MAX_CHUNKS = 2**32

INFO = b"stormfs v2 file keys"
_INDEX = struct.Struct(">Q")


def valid_chunk_size(chunk_size: int) -> bool:
    """A power of two from 4 KiB to 64 KiB."""
    return MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE and chunk_size & (chunk_size - 1) == 0


def is_v2(prefix: bytes) -> bool:
    """Whether a file whose first bytes are `prefix` is a v2 file (authentic or not)."""
    return prefix[: len(SIGNATURE)] == SIGNATURE


def chunk_size_of(prefix: bytes) -> int | None:
    """The chunk size a v2 file's first `PREFIX_SIZE` bytes name; None if no valid one
    (unauthenticated: `open_header` checks it)."""
    if len(prefix) < PREFIX_SIZE or not is_v2(prefix):
        return None
    (size,) = CHUNK_SIZE_FIELD.unpack_from(prefix, len(SIGNATURE))
    return size if valid_chunk_size(size) else None


# ---- sizes and positions --------------------------------------------------------------


def slot_size(chunk_size: int) -> int:
    """On-disk bytes of a full chunk."""
    return chunk_size + CHUNK_OVERHEAD


def chunk_count(plain_size: int, chunk_size: int) -> int:
    """Chunks of a file of `plain_size` bytes: at least one (an empty file has one)."""
    return max(1, -(-plain_size // chunk_size))


def ondisk_size(plain_size: int, chunk_size: int) -> int:
    """The on-disk size of a v2 file of `plain_size` bytes."""
    count = chunk_count(plain_size, chunk_size)
    if plain_size < 0 or count > MAX_CHUNKS:
        raise OverflowError("no v2 file has that size")
    return HEADER_SIZE + plain_size + count * CHUNK_OVERHEAD


def plaintext_size(disk_size: int, chunk_size: int | None) -> int:
    """The plaintext size of a v2 file of `disk_size` bytes on disk.

    Total, never negative: for a size no v2 file has (cut or extended inside a
    chunk; see `size_is_valid`) it is what the complete chunks and the partial
    one would hold; for a header that names no valid chunk size (None), the
    size less the overhead of an empty file.  Such files fail every read.
    """
    if chunk_size is None:
        return max(0, disk_size - EMPTY_FILE_SIZE)
    full, rest = divmod(max(0, disk_size - HEADER_SIZE), slot_size(chunk_size))
    return full * chunk_size + max(0, rest - CHUNK_OVERHEAD)


def size_is_valid(disk_size: int, chunk_size: int) -> bool:
    """Whether some plaintext size gives exactly `disk_size` bytes on disk."""
    if disk_size < EMPTY_FILE_SIZE:
        return False
    return ondisk_size(plaintext_size(disk_size, chunk_size), chunk_size) == disk_size


def chunk_offset(index: int, chunk_size: int) -> int:
    """Where chunk `index` starts on disk."""
    return HEADER_SIZE + index * slot_size(chunk_size)


def chunk_span(plain_size: int, index: int, chunk_size: int) -> int:
    """Plaintext bytes chunk `index` holds in a file of `plain_size` bytes."""
    return max(0, min(chunk_size, plain_size - index * chunk_size))


def chunks_covering(offset: int, n: int, chunk_size: int) -> range:
    """Indices of the chunks holding plaintext bytes ``[offset, offset + n)``."""
    if n <= 0:
        return range(offset // chunk_size, offset // chunk_size)
    return range(offset // chunk_size, (offset + n - 1) // chunk_size + 1)


# ---- keys, header, chunks ---------------------------------------------------------------


def new_file_id() -> bytes:
    return os.urandom(FILE_ID_SIZE)


def new_nonce() -> bytes:
    return os.urandom(NONCE_SIZE)


def derive_keys(key: bytes, file_id: bytes) -> tuple[bytes, bytes]:
    """(chunk key, header MAC key) of one file."""
    if len(key) != KEY_SIZE or len(file_id) != FILE_ID_SIZE:
        raise ValueError("a v2 file needs a 32-byte key and a 16-byte file id")
    okm = HKDF(algorithm=hashes.SHA256(), length=64, salt=file_id, info=INFO).derive(key)
    return okm[:32], okm[32:]


def associated_data(file_id: bytes, index: int, last: bool) -> bytes:
    return file_id + _INDEX.pack(index) + (b"\x01" if last else b"\x00")


def _hmac(mac_key: bytes, data: bytes) -> crypto_hmac.HMAC:
    h = crypto_hmac.HMAC(mac_key, hashes.SHA256())
    h.update(data)
    return h


class FileCipher:
    """One v2 file's keys: seals and opens its header and its chunks."""

    def __init__(self, key: bytes, file_id: bytes, chunk_size: int = CHUNK_SIZE) -> None:
        if not valid_chunk_size(chunk_size):
            raise ValueError(f"chunk size {chunk_size} is not a power of two in 4..64 KiB")
        self.file_id = file_id
        self.chunk_size = chunk_size
        chunk_key, self._mac_key = derive_keys(key, file_id)
        self._aead = AESGCM(chunk_key)

    @classmethod
    def new(cls, key: bytes, chunk_size: int = CHUNK_SIZE) -> FileCipher:
        """The keys of a new file, under a fresh random file id."""
        return cls(key, new_file_id(), chunk_size)

    def _header_body(self) -> bytes:
        return SIGNATURE + CHUNK_SIZE_FIELD.pack(self.chunk_size) + self.file_id

    def header(self) -> bytes:
        body = self._header_body()
        return body + _hmac(self._mac_key, body).finalize()

    def seal_chunk(
        self,
        index: int,
        plaintext: bytes | bytearray | memoryview,
        last: bool,
        nonce: bytes | None = None,
    ) -> bytes:
        """Chunk `index` on disk; a fresh random nonce unless one is given.

        Every chunk but the last must be full; the last holds 1..chunk_size bytes
        (0 only as chunk 0 of an empty file).
        """
        out = bytearray(len(plaintext) + CHUNK_OVERHEAD)
        self.seal_chunk_into(index, plaintext, last, memoryview(out), nonce)
        return bytes(out)

    def seal_chunk_into(
        self,
        index: int,
        plaintext: bytes | bytearray | memoryview,
        last: bool,
        out: memoryview,
        nonce: bytes | None = None,
    ) -> None:
        """`seal_chunk`, written into `out` (exactly the sealed chunk's size)."""
        n = len(plaintext)
        if not 0 <= index < MAX_CHUNKS:
            raise OverflowError("chunk index out of range")
        if n > self.chunk_size or (not last and n != self.chunk_size) or (n == 0 and index):
            raise ValueError(f"{n} bytes cannot be chunk {index} (last={last})")
        nonce = new_nonce() if nonce is None else nonce
        out[:NONCE_SIZE] = nonce
        self._aead.encrypt_into(
            nonce, plaintext, associated_data(self.file_id, index, last), out[NONCE_SIZE:]
        )

    def open_chunk(self, index: int, sealed: bytes | memoryview, last: bool) -> bytes:
        """The plaintext of chunk `index` as read from disk; DecryptionFailed unless
        it authenticates as that chunk of this file, last or not as said."""
        out = bytearray(max(0, len(sealed) - CHUNK_OVERHEAD))
        self.open_chunk_into(index, sealed, last, memoryview(out))
        return bytes(out)

    def open_chunk_into(
        self, index: int, sealed: bytes | memoryview, last: bool, out: memoryview
    ) -> None:
        """`open_chunk`, with the plaintext written into `out` (exactly its size)."""
        n = len(sealed) - CHUNK_OVERHEAD
        if n < 0 or n > self.chunk_size or (not last and n != self.chunk_size):
            raise DecryptionFailed(f"chunk {index} has the wrong size")
        if n == 0 and index:
            raise DecryptionFailed(f"chunk {index} is empty")
        view = memoryview(sealed)
        try:
            self._aead.decrypt_into(
                bytes(view[:NONCE_SIZE]),
                view[NONCE_SIZE:],
                associated_data(self.file_id, index, last),
                out,
            )
        except InvalidTag:
            raise DecryptionFailed(f"chunk {index} does not authenticate") from None

    def verify_header(self, header: bytes) -> None:
        """DecryptionFailed unless `header` is this file's header, authentic under the key."""
        body = self._header_body()
        if len(header) < HEADER_SIZE or header[:MAC_OFFSET] != body:
            raise DecryptionFailed("not this file's header")
        try:
            _hmac(self._mac_key, body).verify(header[MAC_OFFSET:HEADER_SIZE])
        except InvalidSignature:
            raise DecryptionFailed("the header does not authenticate") from None


def open_header(key: bytes, header: bytes) -> FileCipher:
    """The keys of the file whose first `HEADER_SIZE` bytes are `header`.

    Raises DecryptionFailed for anything but an authentic v2 header under `key`.
    """
    chunk_size = chunk_size_of(header)
    if len(header) < HEADER_SIZE or chunk_size is None:
        raise DecryptionFailed("not a v2 header")
    cipher = FileCipher(key, header[PREFIX_SIZE:MAC_OFFSET], chunk_size)
    cipher.verify_header(header)
    return cipher


# ---- whole files ------------------------------------------------------------------------


def seal(
    key: bytes,
    plaintext: bytes,
    *,
    chunk_size: int = CHUNK_SIZE,
    file_id: bytes | None = None,
    nonces: Iterable[bytes] | None = None,
) -> bytes:
    """A whole v2 file in memory (fresh random file id and nonces unless given)."""
    cipher = FileCipher(key, new_file_id() if file_id is None else file_id, chunk_size)
    given = iter(nonces) if nonces is not None else None
    return cipher.header() + b"".join(
        cipher.seal_chunk(i, piece, last, None if given is None else next(given))
        for i, piece, last in _pieces(plaintext, chunk_size)
    )


class Sealer:
    """Streaming v2 writer, the shape of `format.Sealer`: `header`, then `update` with
    the plaintext as it comes (returns the chunks it completes), then `finalize` (the
    last chunk).  Gives the bytes `seal` gives for the same file id and nonces.

    A full chunk is held back until more plaintext follows, since only then is it
    known not to be the last; so at most one chunk of plaintext is held.
    """

    def __init__(self, key: bytes, chunk_size: int = CHUNK_SIZE) -> None:
        self.cipher = FileCipher.new(key, chunk_size)
        self.header = self.cipher.header()
        self.sealed_chunks = 0  # chunks returned so far, none of them the last
        self.pending = bytearray()  # plaintext after them: 0..chunk_size bytes
        self._out = bytearray()  # reused: a fresh large buffer per call costs page faults

    def update(self, data: bytes | memoryview) -> memoryview:
        """The chunks `data` completes, as a view valid until the next call."""
        size = self.cipher.chunk_size
        view = memoryview(data)
        # Seal every chunk now known not to be the last: all but the final 1..size bytes.
        count = max(0, len(self.pending) + len(view) - 1) // size
        if self.sealed_chunks + count >= MAX_CHUNKS:
            raise OverflowError("file too large for a v2 file")
        slot = slot_size(size)
        if len(self._out) < count * slot:
            self._out = bytearray(count * slot)
        dest = memoryview(self._out)
        used = 0  # bytes of `view` consumed
        for k in range(count):
            if k == 0 and self.pending:
                used = size - len(self.pending)
                plain: bytes | bytearray | memoryview = self.pending + view[:used]
            else:
                plain = view[used : used + size]
                used += size
            self.cipher.seal_chunk_into(
                self.sealed_chunks, plain, False, dest[k * slot : (k + 1) * slot]
            )
            self.sealed_chunks += 1
        if count:
            self.pending = bytearray(view[used:])
        else:
            self.pending += view
        return dest[: count * slot]

    def finalize(self) -> bytes:
        last = self.cipher.seal_chunk(self.sealed_chunks, self.pending, True)
        self.pending.clear()
        return last


def _pieces(plaintext: bytes, chunk_size: int) -> Iterator[tuple[int, bytes, bool]]:
    count = chunk_count(len(plaintext), chunk_size)
    for i in range(count):
        yield i, plaintext[i * chunk_size : (i + 1) * chunk_size], i == count - 1


def open_file(key: bytes, data: bytes) -> bytes:
    """The plaintext of a whole in-memory v2 file; DecryptionFailed unless all of it
    authenticates."""
    pieces: list[bytes] = []
    verify_stream(key, _bytes_reader(data), len(data), pieces.append)
    return b"".join(pieces)


def verify_stream(
    key: bytes,
    read: Callable[[int], bytes],
    size: int,
    out: Callable[[bytes], object] | None = None,
) -> FileCipher:
    """Authenticate a v2 file of `size` bytes read sequentially through `read(n)`, one
    chunk at a time (bounded memory), handing each chunk's plaintext to `out`.

    Returns the file's keys; raises DecryptionFailed for anything else (a bad
    header or chunk, a size no v2 file has, a stream that ends early).
    """
    cipher = open_header(key, read_exact(read, HEADER_SIZE, "v2 file"))
    if not size_is_valid(size, cipher.chunk_size):
        raise DecryptionFailed("no v2 file has this size")
    plain = plaintext_size(size, cipher.chunk_size)
    count = chunk_count(plain, cipher.chunk_size)
    for i in range(count):
        span = chunk_span(plain, i, cipher.chunk_size)
        piece = cipher.open_chunk(
            i, read_exact(read, span + CHUNK_OVERHEAD, "v2 file"), i == count - 1
        )
        if out is not None:
            out(piece)
    return cipher


def _bytes_reader(data: bytes) -> Callable[[int], bytes]:
    pos = 0

    def read(n: int) -> bytes:
        nonlocal pos
        piece = data[pos : pos + n]
        pos += len(piece)
        return piece

    return read
