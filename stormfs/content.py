"""Plaintext readers over one committed backing file (blocking; run off the trio thread).

A reader serves plaintext byte ranges: a legacy file as-is; a v1 envelope only
after its tag has been verified once, then any range by AES-CTR; a v2 file
chunk by chunk, each read verifying only the chunks it covers.  A v1 envelope
does not say which key sealed it: the reader's `Authenticate` finds the key of
the keyring that opens it.  v1 verdicts (the nonce and that key) are
remembered per backing-file identity, so reopening an unchanged file reads none
of it again, whichever key opens it.
"""

from __future__ import annotations

import errno
import logging
import os
from collections import OrderedDict
from collections.abc import Callable
from typing import NamedTuple, Protocol

from . import format as fmt
from . import format_v2 as v2
from .keys import Key
from .source import file_lock

log = logging.getLogger(__name__)


class Identity(NamedTuple):
    """What makes a backing file "the same file, unchanged" (st_ctime_ns cannot be set)."""

    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> Identity:
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class LRU(OrderedDict):
    """A small bounded mapping; the oldest entries fall out first."""

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = capacity

    def put(self, key, value) -> None:
        self[key] = value
        self.move_to_end(key)
        if len(self) > self.capacity:
            self.popitem(last=False)


class Reader(Protocol):
    fd: int  # the backing file, open for reading
    size: int  # plaintext size

    def read(self, offset: int, n: int) -> bytes:
        """Up to `n` bytes at `offset`; short only at end of file."""
        ...

    def close(self) -> None: ...


class PlainReader:
    """A legacy plaintext file, served as-is."""

    def __init__(self, fd: int, size: int) -> None:
        self.fd = fd
        self.size = size

    def read(self, offset: int, n: int) -> bytes:
        return os.pread(self.fd, n, offset)

    def close(self) -> None:
        os.close(self.fd)


class Opened(NamedTuple):
    """An envelope whose tag verified: its nonce, and the key that opened it."""

    nonce: bytes
    key: Key


FAILED = "failed"  # a remembered verdict: the envelope does not authenticate under any key

# (descriptor, envelope size) -> the nonce and key that open it, or None.
Authenticate = Callable[[int, int], Opened | None]


class Verdicts:
    """Backing-file identity -> the `Opened` of an envelope whose tag verified, or FAILED."""

    def __init__(self, capacity: int = 65536) -> None:
        self._cache: LRU = LRU(capacity)

    def get(self, ident: Identity) -> Opened | str | None:
        """The remembered verdict, FAILED, or None when this file was never verified."""
        return self._cache.get(ident)

    def put(self, ident: Identity, nonce: bytes, key: Key) -> None:
        """Remember that the file `ident` authenticates, with `nonce`, under `key`."""
        self._cache.put(ident, Opened(nonce, key))

    def fail(self, ident: Identity) -> None:
        self._cache.put(ident, FAILED)


class EnvelopeReader:
    """A v1 envelope: verified (streaming, bounded memory) before the first byte is served.

    `opened` is given for an envelope this process just sealed; otherwise
    `authenticate` finds the key that opens it.  `key` is that key once known
    (it stays when `refresh` finds the content unchanged).
    """

    def __init__(
        self,
        fd: int,
        authenticate: Authenticate,
        verdicts: Verdicts,
        name: str,
        *,
        opened: Opened | None = None,
        st: os.stat_result | None = None,
    ) -> None:
        self.fd = fd
        self.authenticate = authenticate
        self.verdicts = verdicts
        self.name = name
        st = st or os.fstat(fd)
        self.ident = Identity.of(st)
        self.size = fmt.plaintext_size(st.st_size, fmt.Kind.ENCRYPTED)
        self.nonce: bytes | None = None
        self.key: Key | None = None
        if opened is not None:
            self.nonce, self.key = opened
            verdicts.put(self.ident, *opened)

    def refresh(self) -> None:
        """Take the file as it is now, unverified (after a change of its metadata, say)."""
        st = os.fstat(self.fd)
        ident = Identity.of(st)
        if ident != self.ident:
            self.ident = ident
            self.size = fmt.plaintext_size(st.st_size, fmt.Kind.ENCRYPTED)
            self.nonce = None

    def verify(self) -> tuple[bytes, Key]:
        """The nonce and key of the envelope, verified once; DecryptionFailed if no key opens it."""
        if self.nonce is not None and self.key is not None:
            return self.nonce, self.key
        known = self.verdicts.get(self.ident)
        if known == FAILED:
            raise fmt.DecryptionFailed(self.name)
        if isinstance(known, Opened) and self._header_nonce() != known.nonce:
            # The same identity, another envelope: a file replaced within one timestamp
            # tick by one of the same size that got the freed inode number.
            known = None
        if not isinstance(known, Opened):
            for _ in range(3):
                known = self._verify_once()
                now = Identity.of(os.fstat(self.fd))
                if now == self.ident:
                    break
                # Changed while it was read: verify again.  (A rename over the file, as
                # another daemon's commit does, moves its ctime but not its bytes.)
                self.ident = now
                self.size = fmt.plaintext_size(now.size, fmt.Kind.ENCRYPTED)
            else:
                raise OSError(errno.EIO, "backing file keeps changing while it is verified")
            self.verdicts.put(self.ident, *known)
        self.nonce, self.key = known
        return known

    def _header_nonce(self) -> bytes:
        return os.pread(self.fd, fmt.HEADER_SIZE, 0)[1:]

    def _verify_once(self) -> Opened:
        opened = self.authenticate(self.fd, self.ident.size)
        if opened is None:
            self.verdicts.fail(self.ident)
            log.error("DECRYPTION_FAILED: %s", self.name)
            raise fmt.DecryptionFailed(self.name)
        return opened

    def read(self, offset: int, n: int) -> bytes:
        # Bytes read from a file that changed after it was verified are not
        # authenticated: when the identity moved, verify again and reread.
        for _ in range(3):
            nonce, key = self.verify()
            want = max(0, min(n, self.size - offset))
            if want == 0:
                return b""
            ct = os.pread(self.fd, want, fmt.HEADER_SIZE + offset)
            if len(ct) == want and Identity.of(os.fstat(self.fd)) == self.ident:
                return fmt.decrypt_range(key.material, nonce, offset, ct)
            self.refresh()
        raise OSError(errno.EIO, "backing file keeps changing while read")

    def close(self) -> None:
        os.close(self.fd)


class Reported:
    """Backing-file versions (identities) already named in a DECRYPTION_FAILED line."""

    def __init__(self, capacity: int = 65536) -> None:
        self._seen: LRU = LRU(capacity)

    def first(self, ident: Identity) -> bool:
        """True the first time `ident` is reported, False after."""
        if ident in self._seen:
            return False
        self._seen.put(ident, True)
        return True


class V2Reader:
    """A v2 file: a read verifies and decrypts only the chunks it covers.

    The header is verified at the first read of each version of the file; a
    chunk that does not authenticate fails the reads that cover it (other
    chunks stay readable), and the file is named in the log once per version.
    """

    def __init__(
        self,
        fd: int,
        key: bytes,
        reported: Reported,
        name: str,
        chunk_size: int | None,
        *,
        st: os.stat_result | None = None,
        cipher: v2.FileCipher | None = None,
    ) -> None:
        self.fd = fd
        self.key = key
        self.reported = reported
        self.name = name
        self.chunk_size = chunk_size  # as the header says; trusted once it verified
        self._cipher: v2.FileCipher | None = None
        self._take(st or os.fstat(fd))
        self._cipher = cipher  # given by the writer of the file, which needs no check
        self._plain = bytearray()

    def _take(self, st: os.stat_result) -> None:
        self.ident = Identity.of(st)
        self.size = v2.plaintext_size(st.st_size, self.chunk_size)
        self._cipher = None

    def _changed(self) -> bool:
        """Whether the backing file moved on since `ident`; if so, take it as it is now."""
        st = os.fstat(self.fd)
        if Identity.of(st) == self.ident:
            return False
        self._take(st)
        return True

    def file_cipher(self) -> v2.FileCipher:
        """The file's keys, from its header (verified at the first call per version)."""
        if self._cipher is None:
            cipher = v2.open_header(self.key, os.pread(self.fd, v2.HEADER_SIZE, 0))
            if not v2.size_is_valid(self.ident.size, cipher.chunk_size):
                raise fmt.DecryptionFailed("no v2 file has this size")
            self.chunk_size = cipher.chunk_size
            self.size = v2.plaintext_size(self.ident.size, cipher.chunk_size)
            self._cipher = cipher
        return self._cipher

    def _read_chunks(self, offset: int, n: int) -> bytes:
        cipher = self.file_cipher()
        size = cipher.chunk_size
        last = v2.chunk_count(self.size, size) - 1
        chunks = v2.chunks_covering(offset, n, size)
        start = v2.chunk_offset(chunks.start, size)
        end = min(self.ident.size, v2.chunk_offset(chunks.stop, size))
        raw = memoryview(os.pread(self.fd, end - start, start))
        if len(raw) != end - start:
            raise fmt.DecryptionFailed("shorter than its size")
        slot = v2.slot_size(size)
        want = len(raw) - len(chunks) * v2.CHUNK_OVERHEAD
        if len(self._plain) < want:  # reused: a fresh large buffer per read costs page faults
            self._plain = bytearray(want)
        plain = memoryview(self._plain)
        for k, i in enumerate(chunks):
            sealed = raw[k * slot : (k + 1) * slot]
            at = k * size
            cipher.open_chunk_into(
                i, sealed, i == last, plain[at : at + len(sealed) - v2.CHUNK_OVERHEAD]
            )
        skip = offset - chunks.start * size
        return bytes(plain[skip : skip + n])

    def _header_and_empty_chunk(self) -> bytes:
        cipher = self.file_cipher()
        if self.size:
            return b""
        empty = os.pread(self.fd, self.ident.size - v2.HEADER_SIZE, v2.HEADER_SIZE)
        return cipher.open_chunk(0, empty, True)

    def _checked(self, read: Callable[[], bytes]) -> bytes:
        """`read()`, of the file as it stands.

        A read that fails, or that the file changed under, may have met chunks a
        writer elsewhere was rewriting in place.  Writers hold the file's lock
        while they apply, so the read is done again under a shared lock: what
        fails then is damage.
        """
        try:
            data = read()
            if not self._changed():
                return data
        except fmt.DecryptionFailed:
            pass
        with file_lock(self.fd, exclusive=False):
            self._changed()
            try:
                return read()
            except fmt.DecryptionFailed:
                if self.reported.first(self.ident):
                    log.error("DECRYPTION_FAILED: %s", self.name)
                raise fmt.DecryptionFailed(self.name) from None

    def rewritten(self) -> None:
        """The file was changed in place by this process: take its new size, keep its keys
        (its header never changes)."""
        cipher = self._cipher
        self._take(os.fstat(self.fd))
        if cipher is not None:
            self._cipher = cipher
            self.size = v2.plaintext_size(self.ident.size, cipher.chunk_size)

    def verify(self) -> None:
        """At open: the header, and an empty file's one chunk, which no read looks at
        (any other chunk is checked by the reads that cover it)."""
        self._checked(self._header_and_empty_chunk)

    def read(self, offset: int, n: int) -> bytes:
        def chunks() -> bytes:
            want = max(0, min(n, self.size - offset))
            return self._read_chunks(offset, want) if want else b""

        return self._checked(chunks)

    def close(self) -> None:
        os.close(self.fd)


def pread_stream(fd: int) -> Callable[[int], bytes]:
    """`read(n)` over a file from its start, by pread (the descriptor's offset is left alone)."""
    pos = 0

    def read(n: int) -> bytes:
        nonlocal pos
        data = os.pread(fd, n, pos)
        pos += len(data)
        return data

    return read


def read_full(reader: Reader, offset: int, n: int) -> bytes:
    """Exactly `n` bytes: the reader's content, zero-filled past its end."""
    data = reader.read(offset, n) if offset < reader.size else b""
    while len(data) < n and offset + len(data) < reader.size:
        more = reader.read(offset + len(data), n - len(data))
        if not more:
            break
        data += more
    return data + bytes(n - len(data)) if len(data) < n else data
