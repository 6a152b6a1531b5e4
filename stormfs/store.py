"""The mount's store: classify backing files, open readers, and commit new versions atomically.

Everything here is blocking and runs off the trio thread.

Private state lives in ``SOURCE/.stormfs/`` (mode 0700).  Each running daemon
owns an *instance directory* ``.stormfs/tmp/<host>.<pid>.<random>/`` holding its
temporary envelopes, unlinked scratch files and redo records (`redo`: those of
v2 chunk rewrites), with a lock and a lease that tell other daemons it is alive
(`instances`).  At start, the directories of daemons proven gone are taken
over: their redo records are replayed and the directory removed.  So a crash
leaves nothing visible and nothing torn, and several daemons (on one host or
over shared storage) can use one SOURCE.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import secrets
import socket
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass

from . import format as fmt
from . import format_v2 as v2
from . import redo
from .content import (
    LRU,
    EnvelopeReader,
    Identity,
    Opened,
    PlainReader,
    Reader,
    Reported,
    V2Reader,
    Verdicts,
)
from .instances import (
    GONE,
    LOCK,
    STARTING,
    STARTING_GRACE,
    Renewal,
    is_silly,
    owner_gone,
    remove_leftover,
)
from .keys import MASTER_METHOD, USER_METHOD, Key, Keyring, account_of
from .publisher import Pending, Place, Publisher
from .scan import V1, Layout, authenticate, header_layout, layout_of, opening_key, user_first
from .source import (
    KEY_ID_XATTR,
    LOCAL_TMP_PREFIX,
    METHOD_XATTR,
    At,
    copy_metadata,
    copy_metadata_fd,
    file_lock,
    lock,
    open_dir,
    open_lock,
    recorded_key_id,
    recorded_method,
    set_xattr,
    state_dir,
    write_atomically,
)

log = logging.getLogger(__name__)


@dataclass
class TempFile:
    """A temporary file being written; `dir_fd` is the directory it lives in."""

    dir_fd: int
    name: bytes
    fd: int

    def take_fd(self) -> int:
        """Hand the descriptor over (the file now lives under another name)."""
        fd, self.fd = self.fd, -1
        return fd

    def discard(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.name, dir_fd=self.dir_fd)


class PlainSealer:
    """The sealer of a mount without a key: files are written as they are."""

    header = b""

    def update(self, data: bytes | memoryview) -> bytes:
        return bytes(data)

    def finalize(self) -> bytes:
        return b""


AnySealer = fmt.Sealer | v2.Sealer | PlainSealer


class NoKeyReader:
    """An envelope met while running without a key: it cannot be served."""

    def __init__(self, fd: int, size: int, name: str) -> None:
        self.fd = fd
        self.size = size
        self.name = name

    def read(self, offset: int, n: int) -> bytes:
        log.error("DECRYPTION_FAILED: %s (encrypted, and no key is configured)", self.name)
        raise fmt.DecryptionFailed(self.name)

    def close(self) -> None:
        os.close(self.fd)


class Store:
    """SOURCE as the mount sees it.  `key` is the keyring's current key (which seals
    every new version); the other keys of `keyring` only open what they sealed.
    `write_v2`: new versions are v2 files (else v1 envelopes).  `publish_delay`:
    seconds within which a version committed without `durable` is published
    (`publisher`); None publishes it before the commit returns.

    With `per_user_keys`, a file under ``SOURCE/ACCOUNT/`` is sealed with the current
    key's user key of ACCOUNT (`keys.user_key`).  Whatever the option, a file under
    an account opens under a key of the keyring or under its user key."""

    def __init__(
        self,
        root: str | bytes,
        keyring: Keyring | None,
        *,
        write_v2: bool = False,
        publish_delay: float | None = None,
        per_user_keys: bool = False,
    ) -> None:
        self.root = os.fsencode(os.path.realpath(os.fsdecode(root)))
        self.write_v2 = write_v2
        self.per_user_keys = per_user_keys
        self.keyring = keyring
        self.key = keyring.current if keyring is not None else None
        self.verdicts = Verdicts()
        self.reported = Reported()
        self._layouts: LRU = LRU(262144)
        self.scratch_key = os.urandom(64)  # AES-256-XTS for scratch; never on disk
        self.state = state_dir(self.root)
        self._tmp_parent = state_dir(self.root, b"tmp")
        name = f"{socket.gethostname()}.{os.getpid()}.{secrets.token_hex(4)}".encode()
        self.instance = os.path.join(self._tmp_parent, name)
        # Locked and leased before it takes its name, so another daemon's recovery
        # never sees this instance directory without its owner's marks.
        staging = self.instance + STARTING
        os.mkdir(staging, 0o700)
        self._lock_fd = open_lock(os.path.join(staging, LOCK))
        lock(self._lock_fd, wait=False)
        self.instance_fd = open_dir(staging)
        self._lease = Renewal(self.instance_fd)
        os.rename(staging, self.instance)
        self._lease.start()
        self._state_dev = os.fstat(self.instance_fd).st_dev
        self._slots = redo.Slots(self.instance_fd)
        self._publisher = (
            Publisher(self._rename_pending, delay=publish_delay)
            if publish_delay is not None
            else None
        )
        self._seq = 0
        self._reported: set[bytes] = set()
        self.recover()

    # ---- lifecycle --------------------------------------------------------

    def recover(self) -> int:
        """Finish what gone daemons left: replay their redo records, remove their files.

        Never raises for a leftover it cannot remove: that is logged once and left
        for a later start."""
        cleaned = 0
        now = time.time()
        for entry in os.scandir(self._tmp_parent):
            name = os.fsencode(entry.name)
            if entry.path == self.instance or name.endswith(GONE):
                continue
            try:
                if entry.is_dir(follow_symlinks=False) and self._take_over(entry, name, now):
                    cleaned += 1
            except OSError as e:
                self._report(name, f"cannot recover it: {e.strerror}")
        self._sweep()
        if cleaned:
            log.info("cleaned up after %d stopped daemon(s)", cleaned)
        return cleaned

    def _take_over(self, entry: os.DirEntry[bytes], name: bytes, now: float) -> bool:
        """Replay the redo records of a gone daemon's directory and retire it."""
        try:
            lock_fd = open_lock(os.path.join(entry.path, LOCK), create=False)
        except FileNotFoundError:
            lock_fd = -1
            if name.endswith(STARTING) and _age(entry) < STARTING_GRACE:
                return False  # a daemon between its mkdir and its lock
        try:
            if lock_fd >= 0:
                try:
                    lock(lock_fd, wait=False)
                except BlockingIOError:
                    return False  # a live daemon holds it
                if not owner_gone(entry.path, now):
                    return False  # free, but its owner is not proven gone
            for rec in sorted(os.listdir(entry.path)):
                if is_silly(rec):
                    continue
                if rec.startswith(b"redo-"):
                    self._replay(entry.path, rec)
                elif rec.startswith(redo.PREFIX):
                    self._replay_chunks(entry.path, rec)
            try:
                os.rename(entry.path, entry.path + GONE)
            except FileNotFoundError:
                return False  # another daemon took it over first
        finally:
            if lock_fd >= 0:
                os.close(lock_fd)
        return True

    def _sweep(self) -> None:
        """Remove retired directories; what cannot be removed yet is logged once."""
        for entry in os.scandir(self._tmp_parent):
            name = os.fsencode(entry.name)
            if name.endswith(GONE):
                left = remove_leftover(entry.path)
                if left:
                    held = [n for n in left if is_silly(n)]
                    why = (
                        f"{len(held)} file(s) still open in some process ({os.fsdecode(held[0])})"
                        if held
                        else f"{os.fsdecode(left[0])} cannot be removed"
                    )
                    self._report(name, f"{why}; removed at a later start")

    def _report(self, name: bytes, why: str) -> None:
        if name not in self._reported:
            self._reported.add(name)
            log.warning("left .stormfs/tmp/%s: %s", os.fsdecode(name), why)

    def close(self) -> None:
        if self._publisher is not None:
            for p in self._publisher.flush():
                log.error("closed version of %s not published: %s", self.rel(p.name), p.error)
            self._publisher.close()
        self._slots.close()
        self._lease.stop()
        retired = self.instance + GONE
        try:
            os.rename(self.instance, retired)
        except OSError as e:
            log.debug("instance directory not retired: %s", e.strerror)
            retired = self.instance
        os.close(self.instance_fd)
        os.close(self._lock_fd)
        if remove_leftover(retired):
            log.debug("instance directory left for a later start to remove")

    # ---- paths and classification -----------------------------------------

    def real_path(self, at: At) -> bytes:
        """Where a place is now, as a path (for log lines and redo records only)."""
        parent = os.readlink(b"/proc/self/fd/%d" % at.dir_fd)
        return parent if at.name == b"." else os.path.join(parent, at.name)

    def rel(self, at: At | bytes) -> str:
        """A place (or path) relative to SOURCE, for log lines."""
        try:
            path = at if isinstance(at, bytes) else self.real_path(at)
        except OSError:
            return os.fsdecode(at.name if isinstance(at, At) else at)
        return os.fsdecode(os.path.relpath(path, self.root))

    # ---- versions closed but not yet published (group commit) -------------

    def _place(self, at: At) -> Place | None:
        """Where a version may be pending: a name in a directory (only while any is)."""
        if not self._publisher or at.name == b".":
            return None
        return _place_of(at)

    def reopen_pending(self, at: At, flags: int = os.O_RDONLY) -> int | None:
        """A descriptor of the version pending at `at`, None if none is.

        A change of mode, owner or times made through it needs no publish first:
        the temporary file is the inode the rename will name."""
        place = self._place(at)
        if self._publisher is None or place is None:
            return None
        return self._publisher.reopen(place, flags)

    def lstat(self, at: At) -> os.stat_result:
        """The file at `at` as the mount serves it: its pending version, if it has one."""
        place = self._place(at)
        pending = self._publisher.stat(place) if self._publisher and place else None
        return pending if pending is not None else at.lstat()

    def settle(self, at: At) -> None:
        """Publish the version pending at `at` now (before its name is changed or
        synced); raises the error of a publish that fails."""
        place = self._place(at)
        if self._publisher and place is not None:
            self._publisher.settle(place)

    def defers(self, at: At) -> bool:
        """Whether a commit of `at` that is not durable leaves its sync to the publisher
        (`_defer`: one name, on the state directory's filesystem) without waiting for
        it (no earlier version of the file is being published)."""
        return (
            self._publisher is not None
            and self._deferrable(at.lstat())
            and self._publisher.find(_place_of(at)) is None
        )

    def _deferrable(self, old: os.stat_result) -> bool:
        return old.st_nlink == 1 and old.st_dev == self._state_dev

    @property
    def has_pending(self) -> bool:
        return bool(self._publisher)

    def publishing(self) -> int:
        """Closed versions waiting for their batch."""
        return len(self._publisher) if self._publisher is not None else 0

    def settle_dir(self, dir_fd: int) -> None:
        """`settle` every version pending in the directory `dir_fd` (before it is synced)."""
        if self._publisher:
            st = os.fstat(dir_fd)
            self._publisher.settle_dir(st.st_dev, st.st_ino)

    def failed(self, at: At) -> bool:
        """Whether a version pending at `at` could not be published."""
        place = self._place(at)
        return bool(self._publisher and place and self._publisher.failed(place))

    def _rename_pending(self, p: Pending) -> None:
        os.rename(p.temp_name, p.name, src_dir_fd=p.temp_dir_fd, dst_dir_fd=p.dir_fd)

    def _defer(self, temp: TempFile, at: At, old: os.stat_result) -> int | None:
        """Queue `temp` to be published at `at` by the next batch, and return its
        descriptor; None where it must be published now (a durable commit, several
        names, another filesystem)."""
        if self._publisher is None or not self._deferrable(old):
            return None
        place = _place_of(at)
        dir_fd = At(at.dir_fd, b".").open(os.O_PATH | os.O_DIRECTORY)
        try:
            mine = os.dup(temp.fd)
        except BaseException:
            os.close(dir_fd)
            raise
        assert self._publisher is not None
        self._publisher.add(Pending(place, dir_fd, at.name, temp.dir_fd, temp.name, mine))
        return temp.take_fd()

    def _drop_pending(self, at: At) -> None:
        """A version pending at `at` that a newer one, published now, supersedes."""
        place = self._place(at)
        p = self._publisher.forget(place) if self._publisher and place else None
        if p is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p.temp_name, dir_fd=p.temp_dir_fd)

    def stat(self, at: At) -> tuple[os.stat_result, int, Layout | None]:
        """lstat, plus the plaintext size and the format of a regular file
        (`scan.layout_of`, cached by identity; None where the file cannot be opened)."""
        fd = self.reopen_pending(at, os.O_RDONLY)
        if fd is not None:
            try:
                st = os.fstat(fd)
                layout = self._layouts.get(Identity.of(st)) or header_layout(fd, st)
            finally:
                os.close(fd)
            return st, layout.plaintext_size(st.st_size), layout
        st = at.lstat()
        if not stat.S_ISREG(st.st_mode):
            return st, st.st_size, None
        try:
            st, layout = layout_of(at.name, st, self._layouts, dir_fd=at.dir_fd)
        except PermissionError:
            return st, st.st_size, None
        if layout is None:
            return st, st.st_size, None
        return st, layout.plaintext_size(st.st_size), layout

    def account(self, at: At) -> bytes | None:
        """The account of the place `at`: the first component of its path under SOURCE,
        None for a name directly in SOURCE.

        Told from the path the kernel gives the directory descriptor now, so it
        follows renames of the directories above, made through the mount or not."""
        return self._account(self.real_path(at))

    def _account_of_fd(self, fd: int) -> bytes | None:
        """The account of the file open at `fd`, by the path the kernel gives it now."""
        try:
            return self._account(os.readlink(b"/proc/self/fd/%d" % fd))
        except OSError:
            return None

    def _account(self, path: bytes) -> bytes | None:
        inside = self.root.rstrip(b"/") + b"/"
        return account_of(path[len(inside) :]) if path.startswith(inside) else None

    def _verified(self, at: At) -> Opened | None:
        try:
            opened = self.verdicts.get(Identity.of(self.lstat(at)))
        except OSError:
            return None
        return opened if isinstance(opened, Opened) else None

    def key_id_of(self, at: At) -> str | None:
        """The id of the key that opened the file, once a read has verified it (for a
        user key, the id of the key it is derived from); before, the id recorded on it
        (None if none is)."""
        opened = self._verified(at)
        return opened.key.key_id if opened is not None else recorded_key_id(at.proc)

    def method_of(self, at: At) -> str:
        """``server-user`` for an envelope under a user key, ``server`` for one under a key
        of the keyring: as the key that opened it says once a read has verified it;
        before, as recorded on the file (``server`` if nothing is)."""
        opened = self._verified(at)
        if opened is not None:
            return opened.key.method
        return USER_METHOD if recorded_method(at.proc) == USER_METHOD else MASTER_METHOD

    def _authenticate(self, fd: int, size: int) -> Opened | None:
        assert self.keyring is not None
        account, per_user = self._account_of_fd(fd), self.per_user_keys
        return authenticate(
            fd, size, self.keyring, recorded_key_id(fd), account=account, per_user=per_user
        )

    def _v2_key(self, fd: int) -> bytes:
        """The key of the keyring (or user key) whose MAC the v2 header carries (the current
        one if none does: the reads then fail as damage)."""
        assert self.keyring is not None and self.key is not None
        header = os.pread(fd, v2.HEADER_SIZE, 0)
        account = self._account_of_fd(fd)
        key = opening_key(
            self.keyring,
            recorded_key_id(fd),
            lambda m: v2.open_header(m, header),
            account=account,
            user_first=user_first(fd, account, self.per_user_keys),
        )
        return (key or self.key).material

    def open_reader(self, at: At) -> Reader:
        # O_NONBLOCK: a FIFO put in the file's place must not block the open forever.
        try:
            fd = self.reopen_pending(at, os.O_RDONLY)
            if fd is None:
                fd = at.open(os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise _replaced(at.name) from None
            raise
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise _replaced(at.name)
            layout = header_layout(fd, st)
            self._layouts.put(Identity.of(st), layout)
            if layout.kind is fmt.Kind.PLAINTEXT:
                return PlainReader(fd, st.st_size)
            if self.key is None:
                return NoKeyReader(fd, layout.plaintext_size(st.st_size), self.rel(at))
            if layout.version == 2:
                return V2Reader(
                    fd, self._v2_key(fd), self.reported, self.rel(at), layout.chunk_size, st=st
                )
            return EnvelopeReader(fd, self._authenticate, self.verdicts, self.rel(at), st=st)
        except BaseException:
            os.close(fd)
            raise

    # ---- writing ----------------------------------------------------------

    def sealing_key(self, at: At) -> Key | None:
        """The key that seals new versions of the file at `at` (None: plaintext): the
        current key, or with per-user keys, for a file under ``SOURCE/ACCOUNT/``, the
        current key's user key of ACCOUNT (`account`: where the file's directory is
        now, so a rename of a directory above it, through the mount or not, counts)."""
        if self.keyring is None or not self.per_user_keys:
            return self.key
        return self.keyring.sealing(self.account(at))

    def committer(
        self, at: At, *, durable: bool, times: tuple[int | None, int] | None = None
    ) -> Committer:
        """Where a commit of the file at `at` goes (`working.WorkingCopy.commit`)."""
        return Committer(self, at, durable, times)

    def new_temp(self) -> TempFile:
        self._seq += 1
        name = b"t-%d-%s" % (self._seq, secrets.token_hex(6).encode())
        fd = os.open(
            name, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600, dir_fd=self.instance_fd
        )
        return TempFile(self.instance_fd, name, fd)

    def new_scratch(self) -> int:
        """An anonymous file for scratch data: gone with its descriptor, even on a crash."""
        try:
            return os.open(self.instance, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                raise
        temp = self.new_temp()
        os.unlink(temp.name, dir_fd=temp.dir_fd)
        return temp.fd

    def publish(
        self,
        temp: TempFile,
        at: At,
        sealer: AnySealer,
        key: Key | None,
        *,
        durable: bool,
        times: tuple[int | None, int] | None = None,
    ) -> Reader:
        """Make `temp` (complete, not yet synced; sealed by `sealer` under `key`) the
        content of the file `at`, atomically.

        Metadata (mode, owner, extended attributes) is carried over from the
        current file.  A file with several hard links is rewritten in place under
        a redo record, so that every name sees the new content.  `durable` also
        syncs the directory, so the new version survives power loss.  `times`
        gives (atime, mtime) in ns, atime None for the current file's.
        Returns a reader of the new version; `temp` is consumed on success.
        """
        old = at.lstat()
        if not stat.S_ISREG(old.st_mode):
            raise OSError(errno.EISDIR if stat.S_ISDIR(old.st_mode) else errno.EINVAL, at.name)
        ns = (
            None if times is None else (old.st_atime_ns if times[0] is None else times[0], times[1])
        )
        copy_metadata(at.proc, old, temp.fd)
        if key is not None:
            set_xattr(temp.fd, KEY_ID_XATTR, key.key_id.encode())
            set_xattr(temp.fd, METHOD_XATTR, key.method.encode())
        if ns is not None:
            os.utime(temp.fd, ns=ns)
        if not durable:
            fd = self._defer(temp, at, old)
            if fd is not None:
                return self._reader_for(fd, at, sealer, key)
        self._drop_pending(at)  # superseded by this version
        os.fsync(temp.fd)
        dir_fd = At(at.dir_fd, b".").open(os.O_RDONLY | os.O_DIRECTORY)  # O_PATH cannot fsync
        try:
            if old.st_nlink > 1:
                reader = self._rewrite_in_place(temp, at, old, sealer, key, ns)
                temp.discard()
            else:
                self._rename_into(temp, dir_fd, at.name, old.st_dev)
                reader = self._reader_for(temp.take_fd(), at, sealer, key)
            if durable:
                try:
                    os.fsync(dir_fd)
                except BaseException:
                    reader.close()
                    raise
        finally:
            os.close(dir_fd)
        return reader

    def _reader_for(self, fd: int, at: At, sealer: AnySealer, key: Key | None) -> Reader:
        """The reader of a version this mount has just written (nothing to verify)."""
        st = os.fstat(fd)
        if isinstance(sealer, PlainSealer) or key is None:
            return PlainReader(fd, st.st_size)
        if isinstance(sealer, v2.Sealer):
            size = sealer.cipher.chunk_size
            self._layouts.put(Identity.of(st), Layout(2, size))
            return V2Reader(
                fd, key.material, self.reported, self.rel(at), size, st=st, cipher=sealer.cipher
            )
        self._layouts.put(Identity.of(st), V1)
        opened = Opened(sealer.nonce, key)
        return EnvelopeReader(
            fd, self._authenticate, self.verdicts, self.rel(at), opened=opened, st=st
        )

    def _rename_into(self, temp: TempFile, dir_fd: int, name: bytes, dev: int) -> None:
        if dev == self._state_dev:
            os.rename(temp.name, name, src_dir_fd=temp.dir_fd, dst_dir_fd=dir_fd)
            return
        # The target directory is on another filesystem: stage a copy beside it.
        local = LOCAL_TMP_PREFIX + secrets.token_hex(8).encode()
        fd = os.open(local, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
        try:
            _copy_fd(temp.fd, fd)
            copy_metadata_fd(temp.fd, fd)
            os.fsync(fd)
            os.rename(local, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except BaseException:
            os.close(fd)
            os.unlink(local, dir_fd=dir_fd)
            raise
        temp.discard()
        temp.fd = fd

    def _rewrite_in_place(
        self,
        temp: TempFile,
        at: At,
        old: os.stat_result,
        sealer: AnySealer,
        key: Key | None,
        times: tuple[int, int] | None,
    ) -> Reader:
        record = {
            "target": os.fsdecode(self.real_path(at)),
            "temp": temp.name.decode(),
            "dev": old.st_dev,
            "ino": old.st_ino,
        }
        rec_name = b"redo-" + temp.name
        write_atomically(self.instance_fd, rec_name, json.dumps(record).encode())
        fd = at.open(os.O_RDWR | os.O_NOFOLLOW)
        try:
            _overwrite(temp.fd, fd)
            if times is not None:
                os.utime(fd, ns=times)
            if key is not None:
                set_xattr(fd, KEY_ID_XATTR, key.key_id.encode())
                set_xattr(fd, METHOD_XATTR, key.method.encode())
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        os.unlink(rec_name, dir_fd=self.instance_fd)
        return self._reader_for(fd, at, sealer, key)

    def rewrite_chunks(
        self,
        reader: V2Reader,
        chunks: Iterator[tuple[int, bytes]],
        size: int,
        *,
        times: tuple[int | None, int] | None,
    ) -> V2Reader:
        """Write `chunks` ((index, sealed chunk) each) of the v2 file that `reader`
        reads, in place, atomically under a chunk record, so that it holds `size`
        plaintext bytes.  Every writer of the file holds its lock while it applies,
        so a reader that finds a torn chunk can wait and read again (`content`)."""
        chunk_size = reader.file_cipher().chunk_size
        # The very file the reader reads (the name may have moved on).
        fd = os.open(b"/proc/self/fd/%d" % reader.fd, os.O_RDWR | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            old_size = st.st_size

            def extents() -> Iterator[tuple[int, bytes, bytes | None]]:
                for index, sealed in chunks:
                    offset = v2.chunk_offset(index, chunk_size)
                    old = os.pread(fd, fmt.NONCE_SIZE, offset) if offset < old_size else b""
                    yield offset, sealed, old if len(old) == fmt.NONCE_SIZE else None

            target = os.readlink(b"/proc/self/fd/%d" % fd)
            with self._slots.take() as slot:
                record = slot.write(target, st, v2.ondisk_size(size, chunk_size), extents())
                with file_lock(fd, exclusive=True):
                    redo.apply(record, slot.fd, fd)
                    if times is not None:
                        atime = st.st_atime_ns if times[0] is None else times[0]
                        os.utime(fd, ns=(atime, times[1]))
                    # The file's name and metadata are as they were: its data (and
                    # size) is all a durable commit needs, and all a record waits for.
                    os.fdatasync(fd)
                slot.clear()
        finally:
            os.close(fd)
        reader.rewritten()
        self._layouts.put(reader.ident, Layout(2, chunk_size))
        return reader

    def _replay_chunks(self, instance: bytes, name: bytes) -> None:
        """Finish an interrupted in-place rewrite of v2 chunks, if it is one."""
        slot_fd = os.open(os.path.join(instance, name), os.O_RDONLY | os.O_CLOEXEC)
        try:
            record = redo.load(slot_fd)
            if record is None:
                return
            try:
                fd = os.open(record.target, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
            except OSError as e:
                log.warning(
                    "chunk record for %s not replayed: %s", self.rel(record.target), e.strerror
                )
                return
            try:
                st = os.fstat(fd)
                if (st.st_dev, st.st_ino) != (record.dev, record.ino):
                    return
                with file_lock(fd, exclusive=True):
                    todo = redo.pending(record, slot_fd, fd)
                    if todo:
                        redo.apply(record, slot_fd, fd)
                        os.fsync(fd)
                        log.info("finished an interrupted rewrite of %s", self.rel(record.target))
                if todo is None:
                    log.warning(
                        "chunk record for %s not replayed: the file was written since",
                        self.rel(record.target),
                    )
            finally:
                os.close(fd)
        finally:
            os.close(slot_fd)

    def _replay(self, instance: bytes, rec_name: bytes) -> None:
        """Finish an interrupted in-place rewrite (the temp is complete and synced)."""
        try:
            with open(os.path.join(instance, rec_name), "rb") as f:
                rec = json.load(f)
        except ValueError:
            # Torn while it was written: the copy starts only once the record is
            # synced, so the target was never touched.
            log.info("dropped an incomplete redo record %s", os.fsdecode(rec_name))
            return
        target = os.fsencode(rec["target"])
        try:
            src = os.open(os.path.join(instance, rec["temp"].encode()), os.O_RDONLY)
        except FileNotFoundError:
            return
        try:
            fd = os.open(target, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as e:
            log.warning("redo record for %s not replayed: %s", self.rel(target), e.strerror)
            os.close(src)
            return
        try:
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) == (rec["dev"], rec["ino"]):
                _overwrite(src, fd)
                os.fsync(fd)
                log.info("finished an interrupted rewrite of %s", self.rel(target))
        finally:
            os.close(fd)
            os.close(src)


class Committer:
    """A commit's way into SOURCE, for one file: a new version by `publish`, or
    some chunks of a v2 file rewritten in place by `rewrite`."""

    def __init__(
        self, store: Store, at: At, durable: bool, times: tuple[int | None, int] | None
    ) -> None:
        self._store = store
        self._at = at
        self._durable = durable
        self._times = times

    def publish(self, temp: TempFile, sealer: AnySealer, key: Key | None) -> Reader:
        return self._store.publish(
            temp, self._at, sealer, key, durable=self._durable, times=self._times
        )

    def rewrite(self, reader: V2Reader, chunks: Iterator[tuple[int, bytes]], size: int) -> Reader:
        # The file must have its name before it changes in place: a chunk record
        # names the file by its path.
        self._store.settle(self._at)
        return self._store.rewrite_chunks(reader, chunks, size, times=self._times)


def _place_of(at: At) -> Place:
    st = os.fstat(at.dir_fd)
    return (st.st_dev, st.st_ino, at.name)


def _replaced(name: bytes) -> OSError:
    """The regular file the kernel knows was replaced by another kind of object behind
    the mount.  ESTALE makes the kernel look the name up again and retry."""
    return OSError(errno.ESTALE, "no longer a regular file", os.fsdecode(name))


def _age(entry: os.DirEntry) -> float:
    try:
        return time.time() - entry.stat(follow_symlinks=False).st_mtime
    except FileNotFoundError:
        return 0.0


def _copy_fd(src: int, dst: int) -> int:
    size = os.fstat(src).st_size
    done = 0
    while done < size:
        n = os.copy_file_range(src, dst, size - done, done, done)
        if n == 0:
            break
        done += n
    return done


def _overwrite(src: int, dst: int) -> None:
    size = _copy_fd(src, dst)
    os.ftruncate(dst, size)
