"""The SOURCE side: classify backing files, open readers, and commit new versions atomically.

Everything here is blocking and runs off the trio thread.

Private state lives in ``SOURCE/.stormfs/`` (mode 0700).  Each running daemon
owns an *instance directory* ``.stormfs/tmp/<host>.<pid>.<random>/`` holding its
temporary envelopes, unlinked scratch files and redo records, with an exclusive
``flock`` on ``lock`` for as long as it lives.  At start, instance directories
whose lock is free belong to dead daemons: their redo records are replayed and
the directory removed.  So a crash leaves nothing visible and nothing torn, and
several daemons (on one host or over shared storage) can use one SOURCE.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import secrets
import shutil
import socket
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass

from . import format as fmt
from .content import LRU, EnvelopeReader, Identity, PlainReader, Reader, Verdicts
from .keys import Key

log = logging.getLogger(__name__)

STATE_DIR = b".stormfs"
HIDDEN_PREFIX = b".stormfs"
# Temporary files placed next to their target (only when the target directory is
# on another filesystem than the state directory); hidden by HIDDEN_PREFIX too.
LOCAL_TMP_PREFIX = b".stormfs-tmp-"
KEY_ID_XATTR = "user.stormfs.key_id"
# An instance directory's name while its daemon is starting, and how long a
# daemon may take from creating it to locking it.
STARTING = b".starting"
STARTING_GRACE = 60.0
VIRTUAL_XATTR_PREFIX = "user.stormfs."


def open_readonly(path: bytes | str, *, dir_fd: int | None = None) -> int:
    """Open without following a symlink, blocking on a FIFO, or touching atime."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        return os.open(path, flags | os.O_NOATIME, dir_fd=dir_fd)
    except PermissionError:
        return os.open(path, flags, dir_fd=dir_fd)  # O_NOATIME needs ownership or CAP_FOWNER


def sync_dir(path: bytes | str) -> None:
    """fsync a directory: the names created, renamed or removed in it become durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def is_hidden(name: bytes) -> bool:
    """Names stormfs keeps for itself: invisible in the view, refused when created."""
    return name.startswith(HIDDEN_PREFIX)


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


class NoKeyReader:
    """An envelope met while running without a key: it cannot be served."""

    def __init__(self, fd: int, st: os.stat_result, name: str) -> None:
        self.fd = fd
        self.size = fmt.plaintext_size(st.st_size, fmt.Kind.ENCRYPTED)
        self.name = name

    def read(self, offset: int, n: int) -> bytes:
        log.error("DECRYPTION_FAILED: %s (encrypted, and no key is configured)", self.name)
        raise fmt.DecryptionFailed(self.name)

    def close(self) -> None:
        os.close(self.fd)


class Store:
    def __init__(self, root: str | bytes, key: Key | None) -> None:
        self.root = os.fsencode(os.path.realpath(os.fsdecode(root)))
        self.key = key
        self.verdicts = Verdicts()
        self._kinds: LRU = LRU(262144)
        self.scratch_key = os.urandom(64)  # AES-256-XTS for scratch; never on disk
        self.state = os.path.join(self.root, STATE_DIR)
        os.makedirs(self.state, mode=0o700, exist_ok=True)
        self._tmp_parent = os.path.join(self.state, b"tmp")
        os.makedirs(self._tmp_parent, mode=0o700, exist_ok=True)
        name = f"{socket.gethostname()}.{os.getpid()}.{secrets.token_hex(4)}".encode()
        self.instance = os.path.join(self._tmp_parent, name)
        # Locked before it takes its name, so another daemon's recovery never
        # sees this instance directory unlocked.
        staging = self.instance + STARTING
        os.mkdir(staging, 0o700)
        self._lock_fd = os.open(
            os.path.join(staging, b"lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600
        )
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.rename(staging, self.instance)
        self.instance_fd = os.open(self.instance, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._state_dev = os.fstat(self.instance_fd).st_dev
        self._seq = 0
        self.recover()

    # ---- lifecycle --------------------------------------------------------

    def recover(self) -> int:
        """Finish what dead daemons left: replay redo records, remove their files."""
        cleaned = 0
        for entry in os.scandir(self._tmp_parent):
            if entry.path == self.instance or not entry.is_dir(follow_symlinks=False):
                continue
            try:
                lock_fd = os.open(os.path.join(entry.path, b"lock"), os.O_RDWR | os.O_CLOEXEC)
            except FileNotFoundError:
                lock_fd = -1
                if entry.name.endswith(STARTING) and _age(entry) < STARTING_GRACE:
                    continue  # a daemon between its mkdir and its lock
            try:
                if lock_fd >= 0:
                    try:
                        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except BlockingIOError:
                        continue  # a live daemon owns it
                for rec in sorted(os.listdir(entry.path)):
                    if rec.startswith(b"redo-"):
                        self._replay(entry.path, rec)
                shutil.rmtree(entry.path)
                cleaned += 1
            finally:
                if lock_fd >= 0:
                    os.close(lock_fd)
        if cleaned:
            log.info("cleaned up after %d stopped daemon(s)", cleaned)
        return cleaned

    def close(self) -> None:
        shutil.rmtree(self.instance, ignore_errors=True)
        os.close(self.instance_fd)
        os.close(self._lock_fd)

    # ---- paths and classification -----------------------------------------

    def rel(self, path: bytes) -> str:
        """A path relative to SOURCE, for log lines."""
        return os.fsdecode(os.path.relpath(path, self.root))

    def stat(self, path: bytes) -> tuple[os.stat_result, int, fmt.Kind | None]:
        """lstat, plus the plaintext size and the mixed-mode class of a regular file.

        Classes are cached by identity.  A file classified from its first byte is
        described by the fstat of the descriptor read, so a file replaced between
        the lstat and the open is never described by the other one's class.
        """
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode) or st.st_size < fmt.OVERHEAD:
            return st, st.st_size, fmt.Kind.PLAINTEXT if stat.S_ISREG(st.st_mode) else None
        kind = self._kinds.get(Identity.of(st))
        if kind is None:
            try:
                fd = open_readonly(path)
            except PermissionError:
                return st, st.st_size, None
            try:
                opened = os.fstat(fd)
                if not stat.S_ISREG(opened.st_mode):
                    return opened, opened.st_size, None
                st = opened
                kind = fmt.classify(st.st_size, os.pread(fd, 1, 0))
            finally:
                os.close(fd)
            self._kinds.put(Identity.of(st), kind)
        return st, fmt.plaintext_size(st.st_size, kind), kind

    def key_id_of(self, path: bytes) -> str | None:
        try:
            return os.getxattr(path, KEY_ID_XATTR, follow_symlinks=False).decode()
        except OSError:
            return None

    def open_reader(self, path: bytes) -> Reader:
        # O_NONBLOCK: a FIFO put in the file's place must not block the open forever.
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise _replaced(path) from None
            raise
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise _replaced(path)
            kind = fmt.classify(st.st_size, os.pread(fd, 1, 0))
            self._kinds.put(Identity.of(st), kind)
            if kind is fmt.Kind.PLAINTEXT:
                return PlainReader(fd, st.st_size)
            if self.key is None:
                return NoKeyReader(fd, st, self.rel(path))
            return EnvelopeReader(fd, self.key.material, self.verdicts, self.rel(path), st=st)
        except BaseException:
            os.close(fd)
            raise

    # ---- writing ----------------------------------------------------------

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
        path: bytes,
        nonce: bytes | None,
        *,
        durable: bool,
        times: tuple[int | None, int] | None = None,
    ) -> Reader:
        """Make `temp` (complete, not yet synced) the content of `path`, atomically.

        Metadata (mode, owner, extended attributes) is carried over from the
        current file.  A file with several hard links is rewritten in place under
        a redo record, so that every name sees the new content.  `durable` also
        syncs the directory, so the new version survives power loss.  `times`
        gives (atime, mtime) in ns, atime None for the current file's.
        Returns a reader of the new version; `temp` is consumed on success.
        """
        old = os.lstat(path)
        if not stat.S_ISREG(old.st_mode):
            raise OSError(errno.EISDIR if stat.S_ISDIR(old.st_mode) else errno.EINVAL, path)
        ns = (
            None if times is None else (old.st_atime_ns if times[0] is None else times[0], times[1])
        )
        copy_metadata(path, old, temp.fd)
        if self.key is not None and nonce is not None:
            _set_xattr(temp.fd, KEY_ID_XATTR, self.key.key_id.encode())
        if ns is not None:
            os.utime(temp.fd, ns=ns)
        os.fsync(temp.fd)
        parent, name = os.path.split(path)
        dir_fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            if old.st_nlink > 1:
                reader = self._rewrite_in_place(temp, path, old, nonce, ns)
                temp.discard()
            else:
                self._rename_into(temp, dir_fd, name, old.st_dev)
                reader = self._reader_for(temp.take_fd(), path, nonce)
            if durable:
                try:
                    os.fsync(dir_fd)
                except BaseException:
                    reader.close()
                    raise
        finally:
            os.close(dir_fd)
        return reader

    def _reader_for(self, fd: int, path: bytes, nonce: bytes | None) -> Reader:
        st = os.fstat(fd)
        if nonce is None or self.key is None:
            return PlainReader(fd, st.st_size)
        self._kinds.put(Identity.of(st), fmt.Kind.ENCRYPTED)
        return EnvelopeReader(
            fd, self.key.material, self.verdicts, self.rel(path), nonce=nonce, st=st
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
            _copy_metadata_fd(temp.fd, fd)
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
        path: bytes,
        old: os.stat_result,
        nonce: bytes | None,
        times: tuple[int, int] | None,
    ) -> Reader:
        record = {
            "target": os.fsdecode(path),
            "temp": temp.name.decode(),
            "dev": old.st_dev,
            "ino": old.st_ino,
        }
        rec_name = b"redo-" + temp.name
        _write_durably(self.instance_fd, rec_name, json.dumps(record).encode())
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            _overwrite(temp.fd, fd)
            if times is not None:
                os.utime(fd, ns=times)
            if self.key is not None and nonce is not None:
                _set_xattr(fd, KEY_ID_XATTR, self.key.key_id.encode())
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        os.unlink(rec_name, dir_fd=self.instance_fd)
        return self._reader_for(fd, path, nonce)

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


def _replaced(path: bytes) -> OSError:
    """The regular file the kernel knows was replaced by another kind of object behind
    the mount.  ESTALE makes the kernel look the name up again and retry."""
    return OSError(errno.ESTALE, "no longer a regular file", os.fsdecode(path))


def _age(entry: os.DirEntry) -> float:
    try:
        return time.time() - entry.stat(follow_symlinks=False).st_mtime
    except FileNotFoundError:
        return 0.0


def _write_durably(dir_fd: int, name: bytes, data: bytes) -> None:
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.fsync(dir_fd)


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


def _set_xattr(fd: int, name: str, value: bytes) -> None:
    try:
        os.setxattr(fd, name, value)
    except OSError as e:
        if e.errno not in (errno.ENOTSUP, errno.EPERM):
            raise


def _copy_xattrs(
    read: Callable[[str], bytes], names: list[str], fd: int, *, ours: bool = False
) -> None:
    """Copy extended attributes; stormfs' own (`ours`) only between two of its files."""
    for name in names:
        if name.startswith(VIRTUAL_XATTR_PREFIX) and not ours:
            continue
        try:
            os.setxattr(fd, name, read(name))
        except OSError as e:
            if e.errno not in (errno.ENOTSUP, errno.EPERM, errno.ENODATA, errno.EACCES):
                raise
            log.debug("extended attribute %s not carried over: %s", name, e.strerror)


def copy_metadata(path: bytes, old: os.stat_result, fd: int) -> None:
    """Mode, owner and extended attributes of the current version onto the new one."""
    if os.geteuid() == 0:
        os.fchown(fd, old.st_uid, old.st_gid)
    os.fchmod(fd, stat.S_IMODE(old.st_mode))
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as e:
        if e.errno != errno.ENOTSUP:
            raise
        return
    _copy_xattrs(lambda n: os.getxattr(path, n, follow_symlinks=False), names, fd)


def _copy_metadata_fd(src: int, dst: int) -> None:
    st = os.fstat(src)
    if os.geteuid() == 0:
        os.fchown(dst, st.st_uid, st.st_gid)
    os.fchmod(dst, stat.S_IMODE(st.st_mode))
    try:
        names = os.listxattr(src)
    except OSError:
        return
    _copy_xattrs(lambda n: os.getxattr(src, n), names, dst, ours=True)
    os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))
