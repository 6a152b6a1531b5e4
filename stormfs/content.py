"""Plaintext readers over one committed backing file (blocking; run off the trio thread).

A reader serves plaintext byte ranges: a legacy file as-is; a v1 envelope only
after its tag has been verified once, then any range by AES-CTR.  A v1
envelope does not say which key sealed it: the reader's `Authenticate`
finds the key of the keyring that opens it.  Verdicts (the nonce and that
key) are remembered per backing-file identity, so reopening an unchanged file
reads none of it again, whichever key opens it.
"""

from __future__ import annotations

import errno
import logging
import os
from collections import OrderedDict
from collections.abc import Callable
from typing import NamedTuple, Protocol

from . import format as fmt
from .keys import Key

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
    """Backing-file identity -> the `Opened` of an envelope whose tag verified, or FAILED.

    `only_key` is the key of a keyring that has one: a verdict recorded without
    its key can only be under that one.
    """

    def __init__(self, capacity: int = 65536, *, only_key: Key | None = None) -> None:
        self._cache: LRU = LRU(capacity)
        self._only_key = only_key

    def get(self, ident: Identity) -> Opened | str | None:
        """The remembered verdict, FAILED, or None when this file was never verified."""
        return self._cache.get(ident)

    def put(self, ident: Identity, nonce: bytes, key: Key | None = None) -> None:
        """Remember that the file `ident` authenticates, with `nonce`, under `key`.

        Without `key` (and with several keys), nothing is remembered: which key
        opens the file is found again at its next open.
        """
        key = key or self._only_key
        if key is not None:
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
