"""Classification and scanning: the one classifier of a backing file and the one walker of SOURCE.

Used by the mount (`store`), `audit`, `encrypt` and the key checks.  A file's
format is told by its first bytes (`layout_from`, and over files `layout_of`,
`header_layout`, `kind_of`, `header_kind`): legacy plaintext, a v1 envelope or
a v2 chunked file (docs/FORMAT.md, "Classification"); `classify_path` also
says whether an envelope authenticates and which key of the keyring opens it
(`opening_key`, the one loop over the keys).  A file under ``SOURCE/ACCOUNT/``
may be under a key of the keyring or under that key's user key of ACCOUNT
(Storm Cloud's ``server-user`` mode): both are candidates, the key named by
the key id recorded on the file first, and of its two forms the one the
method recorded on the file names (else, the user key on a per-user SOURCE).

Blocking code.  Nothing here writes: files are opened read-only with
O_NOATIME where the kernel allows it, so even access times stay as they were.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import os
import stat
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import NamedTuple, TypeVar

from . import format as fmt
from . import format_v2 as v2
from .content import LRU, Identity, Opened, pread_stream
from .keys import MASTER_METHOD, USER_METHOD, Key, Keyring
from .source import is_hidden, open_readonly, recorded_key_id, recorded_method

# A file that changes while it is being verified is read again this many times.
VERIFY_ATTEMPTS = 3

T = TypeVar("T")
R = TypeVar("R")


class Status(enum.Enum):
    ENCRYPTED = "encrypted"
    NEEDS_ENCRYPTION = "needs_encryption"
    DECRYPTION_FAILED = "decryption_failed"
    UNREADABLE = "unreadable"


@dataclass(frozen=True)
class Entry:
    """A regular file found by `walk` (`st` is its lstat), or a place that could not be read."""

    rel: bytes
    st: os.stat_result | None = None
    error: OSError | None = None


@dataclass(frozen=True)
class Verdict:
    """A file's class, why, (authenticated envelopes) the key that opens it, (legacy
    files and envelopes) its encryption method: ``none``, ``server`` or
    ``server-user``, and (from `classify_path`, envelopes) the format its header
    names."""

    status: Status
    detail: str
    key: Key | None = None
    method: str | None = None
    version: int | None = None


def display(rel: bytes) -> str:
    """A relative path for output and JSON (undecodable bytes as surrogate escapes)."""
    return os.fsdecode(rel).encode("utf-8", "backslashreplace").decode("utf-8")


def describe(e: OSError) -> str:
    if e.errno == errno.ENOENT:
        return "file not found (removed during the scan)"
    return e.strerror or str(e)


def walk(
    root: bytes,
    *,
    on_hidden: Callable[[bytes, os.DirEntry], None] | None = None,
    breadth_first: bool = False,
    max_entries: int | None = None,
) -> Iterator[Entry]:
    """Every regular file under `root`, as `Entry` (relative paths), depth first
    unless `breadth_first`, each directory's names in order.

    Names stormfs keeps for itself (``.stormfs*``) are skipped at every level;
    `on_hidden` sees them.  Symlinks are not followed; a directory reached
    twice (bind mounts) is walked once; one that cannot be listed becomes an
    `Entry` with its error.  With `max_entries`, the walk stops after looking
    at that many directory entries.
    """
    seen: set[tuple[int, int]] = set()
    pending = deque([b""])
    take = pending.popleft if breadth_first else pending.pop
    looked = 0
    while pending:
        rel = take()
        path = os.path.join(root, rel) if rel else root
        try:
            st = os.stat(path, follow_symlinks=False)
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            with os.scandir(path) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            if rel:
                yield Entry(rel, error=e)
                continue
            raise
        subdirs = []
        for entry in entries:
            looked += 1
            if max_entries is not None and looked > max_entries:
                return
            child = os.path.join(rel, entry.name) if rel else entry.name
            if is_hidden(entry.name):
                if on_hidden is not None:
                    on_hidden(child, entry)
                continue
            try:
                est = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue  # gone between listing and stat: it is not there any more
            except OSError as e:
                yield Entry(child, error=e)
                continue
            if stat.S_ISDIR(est.st_mode):
                subdirs.append(child)
            elif stat.S_ISREG(est.st_mode):
                yield Entry(child, st=est)
        pending.extend(subdirs if breadth_first else reversed(subdirs))


class Layout(NamedTuple):
    """A file's format as its first bytes tell it (nothing authenticated yet)."""

    version: int  # 0: legacy plaintext; 1 or 2: that envelope
    chunk_size: int | None = None  # v2: the chunk size its header names, if a valid one

    @property
    def kind(self) -> fmt.Kind:
        return fmt.Kind.PLAINTEXT if self.version == 0 else fmt.Kind.ENCRYPTED

    @property
    def name(self) -> str:
        return f"v{self.version}" if self.version else "legacy"

    def plaintext_size(self, disk_size: int) -> int:
        if self.version == 2:
            return v2.plaintext_size(disk_size, self.chunk_size)
        return fmt.plaintext_size(disk_size, self.kind)


LEGACY = Layout(0)
V1 = Layout(1)
# What classification reads of a file: enough for v1's version byte and v2's
# signature and chunk size.  Shorter files are legacy, as Storm Cloud's rule has it.
PREFIX_SIZE = v2.PREFIX_SIZE
SHORTEST_ENVELOPE = fmt.OVERHEAD


def layout_from(disk_size: int, prefix: bytes) -> Layout:
    """The format of a file of `disk_size` bytes whose first bytes are `prefix`
    (at least `PREFIX_SIZE` of them where the file has that many).

    v2 is told by its 8-byte signature, so a legacy file that merely starts
    with 0x02 stays legacy; otherwise Storm Cloud's mixed-mode rule.
    """
    if disk_size < SHORTEST_ENVELOPE:
        return LEGACY
    if v2.is_v2(prefix):
        return Layout(2, v2.chunk_size_of(prefix))
    return V1 if fmt.classify(disk_size, prefix[:1]) is fmt.Kind.ENCRYPTED else LEGACY


def header_layout(fd: int, st: os.stat_result) -> Layout:
    """The format of the open regular file `fd` (`st` its fstat), by its first bytes."""
    if st.st_size < SHORTEST_ENVELOPE:
        return LEGACY
    return layout_from(st.st_size, os.pread(fd, PREFIX_SIZE, 0))


def header_kind(fd: int, st: os.stat_result) -> fmt.Kind:
    """Whether the open regular file `fd` is legacy plaintext or an envelope (v1 or v2)."""
    return header_layout(fd, st).kind


def layout_of(
    path: bytes, st: os.stat_result, cache: LRU | None = None, *, dir_fd: int | None = None
) -> tuple[os.stat_result, Layout | None]:
    """The format of the regular file at `path` (relative to `dir_fd` if given) whose
    lstat is `st`, and the stat that describes it (None: no longer a regular file).

    A file too short for an envelope is legacy without being opened.  Another
    is looked up in `cache` (identity -> layout), else opened and described by
    the fstat of the descriptor read, so a file replaced since the lstat is
    never described by the other one's class.  OSError from the open propagates.
    """
    if st.st_size < SHORTEST_ENVELOPE:
        return st, LEGACY
    layout = cache.get(Identity.of(st)) if cache is not None else None
    if layout is not None:
        return st, layout
    fd = open_readonly(path, dir_fd=dir_fd)
    try:
        opened = os.fstat(fd)
        if not stat.S_ISREG(opened.st_mode):
            return opened, None
        layout = header_layout(fd, opened)
    finally:
        os.close(fd)
    if cache is not None:
        cache.put(Identity.of(opened), layout)
    return opened, layout


def kind_of(
    path: bytes, st: os.stat_result, cache: LRU | None = None
) -> tuple[os.stat_result, fmt.Kind | None]:
    """`layout_of`, told as legacy plaintext or envelope."""
    st, layout = layout_of(path, st, cache)
    return st, None if layout is None else layout.kind


def opening_key(
    keyring: Keyring,
    key_id: str | None,
    opens: Callable[[bytes], object],
    *,
    account: bytes | None = None,
    user_first: bool = False,
) -> Key | None:
    """The key of `keyring` that opens something, the one named `key_id` tried first;
    for a file of `account`, each key's user key too (first if `user_first`).

    `opens(material)` raises DecryptionFailed for a key that does not open it.
    """
    for key in keyring.candidates(key_id, account, user_first=user_first):
        with contextlib.suppress(fmt.DecryptionFailed):
            opens(key.material)
            return key
    return None


def user_first(fd: int, account: bytes | None, per_user: bool) -> bool:
    """Whether the user key is the likely one for the file open at `fd`, of `account`:
    as the method recorded on it says, else when SOURCE is a per-user one."""
    if account is None:
        return False
    method = recorded_method(fd)
    return per_user if method not in (MASTER_METHOD, USER_METHOD) else method == USER_METHOD


def authenticate(
    fd: int,
    size: int,
    keyring: Keyring,
    key_id: str | None,
    *,
    account: bytes | None = None,
    per_user: bool = False,
) -> Opened | None:
    """The nonce, and the key of `keyring` that opens the envelope of `size` bytes open
    at `fd` (the key named `key_id` tried first; for a file of `account`, user keys
    too, the likely form first, `per_user` saying what is likely where the file does
    not); None when no key opens it."""
    nonces: list[bytes] = []

    def opens(material: bytes) -> None:
        nonces.append(fmt.verify_stream(material, pread_stream(fd), size))

    first = user_first(fd, account, per_user)
    key = opening_key(keyring, key_id, opens, account=account, user_first=first)
    return None if key is None else Opened(nonces[-1], key)


def classify_path(
    path: bytes,
    keyring: Keyring | None,
    *,
    quick: bool,
    account: bytes | None = None,
    per_user: bool = False,
) -> Verdict:
    """Put one file in exactly one class.

    Envelopes are authenticated in full (streaming, bounded memory) unless
    `quick`, which trusts the header (and the method recorded on the file).
    A file of `account` may also be under a user key (`authenticate`).  A file
    that changes while it is read is read again; one that keeps changing, cannot
    be opened or read, or has vanished is `unreadable`.
    """
    last = ""
    for _ in range(VERIFY_ATTEMPTS):
        try:
            fd = open_readonly(path)
        except OSError as e:
            return Verdict(Status.UNREADABLE, describe(e))
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                return Verdict(Status.UNREADABLE, "no longer a regular file")
            layout = header_layout(fd, st)
            if layout is LEGACY:
                legacy = f"legacy plaintext ({st.st_size} bytes)"
                return Verdict(Status.NEEDS_ENCRYPTION, legacy, method="none")
            if quick:
                method = USER_METHOD if user_first(fd, account, False) else MASTER_METHOD
                header = f"{layout.name} header (not verified)"
                return Verdict(Status.ENCRYPTED, header, None, method, layout.version)
            if keyring is None:
                return Verdict(Status.DECRYPTION_FAILED, "encrypted, and no key is configured")
            verdict = _authenticate(fd, st, keyring, layout, account, per_user)
            if Identity.of(os.fstat(fd)) == Identity.of(st):
                return verdict
            last = "kept changing during the scan"
        except OSError as e:
            return Verdict(Status.UNREADABLE, describe(e))
        finally:
            os.close(fd)
    return Verdict(Status.UNREADABLE, last)


def _authenticate(
    fd: int,
    st: os.stat_result,
    keyring: Keyring,
    layout: Layout,
    account: bytes | None,
    per_user: bool,
) -> Verdict:
    """Every byte of the envelope checked; a v2 file's header alone turns a wrong key away."""
    if layout.version == 2:

        def opens(material: bytes) -> None:
            v2.verify_stream(material, pread_stream(fd), st.st_size)

        first = user_first(fd, account, per_user)
        key = opening_key(keyring, recorded_key_id(fd), opens, account=account, user_first=first)
    else:
        opened = authenticate(
            fd, st.st_size, keyring, recorded_key_id(fd), account=account, per_user=per_user
        )
        key = opened.key if opened is not None else None
    if key is not None:
        prefix = "v2 file " if layout.version == 2 else ""
        under = f"key id {key.key_id}"
        if key.account is not None:
            under = f"the user key of {display(key.account)} from {under}"
        detail = f"{prefix}authenticated under {under}"
        return Verdict(Status.ENCRYPTED, detail, key, key.method, layout.version)
    if layout.version == 2:
        why = "v2 file does not authenticate under the key (wrong key, damaged, cut or extended)"
    else:
        why = (
            "envelope does not authenticate under the key "
            "(wrong key, damaged or truncated, or plaintext starting with 0x01)"
        )
    return Verdict(
        Status.DECRYPTION_FAILED, f"DECRYPTION_FAILED: {why}", None, version=layout.version
    )


def bounded_map(
    fn: Callable[[T], R], items: Iterable[T], *, workers: int, window: int = 256
) -> Iterator[tuple[T, R]]:
    """`(item, fn(item))` in order, from `workers` threads, at most `window` in flight.

    Unlike `Executor.map`, it does not consume `items` ahead of the window, so a
    walk over millions of files stays in bounded memory.
    """
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: deque[tuple[T, Future[R]]] = deque()
        for item in items:
            pending.append((item, pool.submit(fn, item)))
            if len(pending) >= window:
                head, fut = pending.popleft()
                yield head, fut.result()
        while pending:
            head, fut = pending.popleft()
            yield head, fut.result()
