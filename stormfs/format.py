"""The v1 envelope: Storm Cloud's on-disk format, as pure functions.

    0x01 | nonce (12) | AES-256-GCM ciphertext | tag (16)

Whole file, no associated data: ``ciphertext || tag`` is exactly what
``AESGCM(key).encrypt(nonce, plaintext, None)`` returns.  Nothing here touches
the OS; callers hand in bytes or a binary stream.

GCM is AES-CTR underneath: 16-byte block ``i`` of the plaintext is XORed with
``AES(key, nonce || uint32_be(2 + i))``.  So once a file's tag has been
verified, any byte range of it can be decrypted on its own (`decrypt_range`).
"""

from __future__ import annotations

import enum
import os
from collections.abc import Callable
from typing import BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

VERSION = 0x01
VERSION_BYTE = bytes([VERSION])
KEY_SIZE = 32
NONCE_SIZE = 12
TAG_SIZE = 16
HEADER_SIZE = 1 + NONCE_SIZE
OVERHEAD = HEADER_SIZE + TAG_SIZE  # 29
AES_BLOCK = 16
# GCM's 32-bit block counter starts at 2 for the payload: at most 2**32 - 2 blocks.
MAX_PLAINTEXT_SIZE = (2**32 - 2) * AES_BLOCK
STREAM_CHUNK = 1 << 20


class DecryptionFailed(Exception):
    """The envelope does not authenticate under the key (DECRYPTION_FAILED)."""


class Kind(enum.Enum):
    PLAINTEXT = "none"  # legacy file, served as-is
    ENCRYPTED = "server"  # v1 envelope (authentic or not: that needs the key)


def classify(disk_size: int, first_byte: bytes) -> Kind:
    """Storm Cloud's mixed-mode rule: short files and non-0x01 files are plaintext."""
    if disk_size < OVERHEAD or first_byte[:1] != VERSION_BYTE:
        return Kind.PLAINTEXT
    return Kind.ENCRYPTED


def plaintext_size(disk_size: int, kind: Kind) -> int:
    return disk_size - OVERHEAD if kind is Kind.ENCRYPTED else disk_size


def disk_size(plain_size: int) -> int:
    return plain_size + OVERHEAD


def new_nonce() -> bytes:
    return os.urandom(NONCE_SIZE)


def header(nonce: bytes) -> bytes:
    return VERSION_BYTE + nonce


def seal(key: bytes, plaintext: bytes, nonce: bytes | None = None) -> bytes:
    """Encrypt a whole file in memory.  A fresh random nonce unless one is given."""
    nonce = new_nonce() if nonce is None else nonce
    return header(nonce) + AESGCM(key).encrypt(nonce, plaintext, None)


def open_envelope(key: bytes, envelope: bytes) -> bytes:
    """Decrypt a whole in-memory envelope; raise DecryptionFailed unless authentic."""
    if classify(len(envelope), envelope[:1]) is not Kind.ENCRYPTED:
        raise DecryptionFailed("not a v1 envelope")
    try:
        return AESGCM(key).decrypt(envelope[1:HEADER_SIZE], envelope[HEADER_SIZE:], None)
    except InvalidTag:
        raise DecryptionFailed("authentication failed") from None


class Sealer:
    """Streaming encryption: `header`, then `update` per chunk, then `finalize` -> tag.

    Produces the same bytes as `seal` without holding the plaintext.
    """

    def __init__(self, key: bytes, nonce: bytes | None = None) -> None:
        self.nonce = new_nonce() if nonce is None else nonce
        self.header = header(self.nonce)
        self._enc = Cipher(algorithms.AES(key), modes.GCM(self.nonce)).encryptor()
        self.plaintext_len = 0

    def update(self, data: bytes | memoryview) -> bytes:
        self.plaintext_len += len(data)
        if self.plaintext_len > MAX_PLAINTEXT_SIZE:
            raise OverflowError("file too large for one AES-GCM envelope")
        return self._enc.update(data)

    def finalize(self) -> bytes:
        self._enc.finalize()
        return self._enc.tag


def verify_stream(key: bytes, read: Callable[[int], bytes], size: int) -> bytes:
    """Authenticate an envelope of `size` bytes read sequentially through `read(n)`.

    Decrypts in chunks and discards the output, so memory stays bounded.
    Returns the nonce on success; raises DecryptionFailed otherwise (including
    a stream that ends early or does not look like an envelope).
    """
    head = read_exact(read, HEADER_SIZE)
    if size < OVERHEAD or classify(size, head) is not Kind.ENCRYPTED:
        raise DecryptionFailed("not a v1 envelope")
    nonce = head[1:]
    dec = Cipher(algorithms.AES(key), modes.GCM(nonce)).decryptor()
    remaining = size - OVERHEAD
    while remaining:
        chunk = read_exact(read, min(STREAM_CHUNK, remaining))
        dec.update(chunk)
        remaining -= len(chunk)
    tag = read_exact(read, TAG_SIZE)
    try:
        dec.finalize_with_tag(tag)
    except InvalidTag:
        raise DecryptionFailed("authentication failed") from None
    return nonce


def verify_file(key: bytes, stream: BinaryIO, size: int) -> bytes:
    """`verify_stream` over a binary file object positioned at the envelope's start."""
    return verify_stream(key, stream.read, size)


def open_stream(key: bytes, stream: BinaryIO, out: BinaryIO, size: int) -> None:
    """Verify, then write the plaintext to `out` — never a byte before the tag checks.

    Two passes over `stream` (which must be seekable): authenticate, then
    decrypt with CTR.  Memory stays bounded for any size.
    """
    start = stream.tell()
    nonce = verify_file(key, stream, size)
    stream.seek(start + HEADER_SIZE)
    remaining = size - OVERHEAD
    offset = 0
    while remaining:
        chunk = read_exact(stream.read, min(STREAM_CHUNK, remaining))
        out.write(decrypt_range(key, nonce, offset, chunk))
        offset += len(chunk)
        remaining -= len(chunk)


def ctr_counter(nonce: bytes, block_index: int) -> bytes:
    """GCM's counter block for plaintext block `block_index` (payload starts at 2)."""
    return nonce + ((2 + block_index) & 0xFFFFFFFF).to_bytes(4, "big")


def decrypt_range(key: bytes, nonce: bytes, offset: int, ciphertext: bytes | memoryview) -> bytes:
    """Decrypt ciphertext that starts at plaintext `offset` of a verified envelope.

    Only call this on an envelope whose tag has been verified: CTR alone gives
    no integrity.
    """
    skip = offset % AES_BLOCK
    ctr = Cipher(algorithms.AES(key), modes.CTR(ctr_counter(nonce, offset // AES_BLOCK)))
    dec = ctr.decryptor()
    if skip:
        dec.update(bytes(skip))
    return dec.update(ciphertext) + dec.finalize()


def read_exact(read: Callable[[int], bytes], n: int, what: str = "envelope") -> bytes:
    """Exactly `n` bytes from a stream; a short one is a truncated (damaged) file."""
    data = read(n)
    if len(data) == n:
        return data
    parts = [data]
    got = len(data)
    while got < n:
        more = read(n - got)
        if not more:
            raise DecryptionFailed(f"truncated {what}")
        parts.append(more)
        got += len(more)
    return b"".join(parts)
