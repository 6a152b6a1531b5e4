"""`stormfs encrypt SOURCE --force`: turn every legacy plaintext file into a v1 envelope.

One file (one inode) at a time, each on its own:

1. open it read-only and take a read lease (``F_SETLEASE``): the kernel refuses
   the lease while anyone has the file open for writing, and from then on
   makes any open for writing or truncate wait until we let go — which we do
   at once, abandoning the attempt;
2. stream it through `format.Sealer` into ``.stormfs-tmp-enc-*`` in the same
   directory (hidden from the mount), authenticate that copy with
   `format.verify_stream`, give it the original's mode, owner, times and other
   extended attributes plus ``user.stormfs.key_id``, fsync it;
3. if the original's identity (dev, ino, size, mtime, ctime) is unchanged,
   swap the two names with ``renameat2(RENAME_EXCHANGE)``: the original is
   then still linked under the temporary name, so we can check that the name
   really held it.  If someone renamed a new version over the name in the
   meantime, the swap is undone and that version is back in place — a
   concurrent commit is never lost;
4. fsync the directory, then unlink the old file.

The authentication in step 2 proves the copy decrypts to the bytes that were
read: the tag covers every ciphertext byte, and the ciphertext is those bytes
under AES-CTR.  A file that changed, or was open for writing, is tried again
after the others, then reported and left as it is.

Hard links: ``rename`` gives one name a new inode and leaves the other names on
the old one.  So every name of the inode must be in SOURCE; the new envelope is
linked beside each of them and all names are swapped in turn, under a journal
in ``SOURCE/.stormfs/encrypt/`` that a later run uses to roll an interrupted
group back (or forward).  At every moment each name holds a complete version
with the same plaintext, so readers never see a torn file.

Crash safety: a run killed at any point leaves each name holding either the
original or the complete envelope, plus possibly ``.stormfs-tmp-enc-*`` files,
which the next run removes (one run per SOURCE at a time, under a lock, so any
such file found at start is stale).
"""

from __future__ import annotations

import argparse
import contextlib
import enum
import errno
import fcntl
import json
import os
import resource
import secrets
import signal
import stat
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from . import format as fmt
from . import keycheck, keys
from .content import Identity, pread_stream
from .exitcodes import BUSY, ISSUES_FOUND, KEY_SAFETY, OK, USAGE, WORK_TO_DO
from .progress import Progress, human_bytes, human_duration
from .scan import Entry, bounded_map, describe, display, header_kind, kind_of, walk
from .source import (
    KEY_ID_XATTR,
    LOCAL_TMP_PREFIX,
    RENAME_EXCHANGE,
    STATE_DIR,
    copy_metadata,
    lock,
    open_dir,
    open_lock,
    open_readonly,
    pwrite_all,
    renameat2,
    state_dir,
    syncfs,
    write_atomically,
)

TMP_PREFIX = LOCAL_TMP_PREFIX + b"enc-"
STATE_SUBDIR = b"encrypt"
JOURNAL_PREFIX = "links-"
CHUNK = 1 << 20
DEFAULT_JOBS = 4
ATTEMPTS = 3
RETRY_DELAY = 0.5
# A batch of sealed files is swapped in once it has this many files or bytes,
# once its oldest file has waited this long, or when nothing else is coming.
BATCH_FILES = 2048
BATCH_BYTES = 512 << 20
BATCH_AGE = 2.0
FDS_PER_FILE = 2
# How often files waiting in a batch are checked for a writer waiting on them.
POLL = 0.5
RETRYABLE = ("changed", "busy", "hard_links")
F_RDLCK = fcntl.F_RDLCK


class Retry(Exception):
    """The file changed or is in use: leave it as it is and try again later."""

    def __init__(self, status: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


class Done(enum.Enum):
    ENCRYPTED = "encrypted"
    ALREADY = "already"
    VANISHED = "vanished"


@dataclass
class Job:
    """One inode to encrypt and every name it has in SOURCE (relative paths)."""

    names: list[bytes]
    size: int


@dataclass
class Outcome:
    done: Done | None
    status: str
    detail: str
    nbytes: int = 0
    sparse_growth: int = 0


@dataclass
class Plan:
    """What the scan found."""

    scanned: int = 0
    already: int = 0
    jobs: list[Job] = field(default_factory=list)
    problems: list[tuple[bytes, str, str]] = field(default_factory=list)
    stale: list[bytes] = field(default_factory=list)
    sparse: set[bytes] = field(default_factory=set)


# ---- system calls -------------------------------------------------------------


def exchange(dir_fd: int, a: bytes, b: bytes) -> None:
    """Atomically swap two names in one directory (renameat2 RENAME_EXCHANGE)."""
    renameat2(dir_fd, a, dir_fd, b, RENAME_EXCHANGE)


def take_lease(fd: int) -> bool:
    """A read lease on `fd`; False where none can be had (NFS, FUSE, another user's file)."""
    try:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, F_RDLCK)
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EBUSY):
            raise Retry("busy", "open for writing by another process") from None
        if e.errno in (errno.EINVAL, errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP):
            return False
        if e.errno in (errno.EACCES, errno.EPERM):
            return False  # not the owner, and no CAP_LEASE
        raise
    return True


def lease_intact(fd: int) -> bool:
    """False once another process has started opening the file for writing."""
    return fcntl.fcntl(fd, fcntl.F_GETLEASE) == F_RDLCK


def _ino(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


def _lstat_at(dir_fd: int, name: bytes) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def put_back(dir_fd: int, hold: bytes, name: bytes, placed: tuple[int, int]) -> None:
    """Undo an exchange: `hold` goes back to `name`, where we had put `placed`.

    If another version was renamed over `name` meanwhile, it is newer than what
    `hold` has: it goes back to `name` instead, and `hold` ends with the
    superseded file (which that rename would have replaced anyway).
    """
    for _ in range(16):
        exchange(dir_fd, hold, name)
        now = _lstat_at(dir_fd, hold)
        if now is None or _ino(now) == placed:
            return
        placed = _ino(os.stat(name, dir_fd=dir_fd, follow_symlinks=False))
    raise OSError(errno.EAGAIN, "name keeps being replaced", os.fsdecode(name))


def swap_in(dir_fd: int, hold: bytes, name: bytes, expect: tuple[int, int]) -> bool:
    """Exchange `hold` (our envelope) with `name` if `name` holds `expect`.

    True when it did: `hold` now links the original.  False when `name` held
    something else (checked again after the swap, which is then undone).
    """
    st = _lstat_at(dir_fd, name)
    if st is None or _ino(st) != expect:
        return False
    ours = _ino(os.stat(hold, dir_fd=dir_fd, follow_symlinks=False))
    exchange(dir_fd, hold, name)
    got = _lstat_at(dir_fd, hold)
    if got is not None and _ino(got) == expect:
        return True
    put_back(dir_fd, hold, name, ours)
    return False


# ---- the run ------------------------------------------------------------------


@dataclass(eq=False)
class Sealed:
    """A verified envelope of `job`, linked beside each of its names, not yet swapped in.

    Holds the original open (with its lease) and the directories of its names.
    """

    job: Job
    fd: int
    st: os.stat_result
    leased: bool
    dirs: list[int]
    holds: list[bytes]  # holds[i] is beside job.names[i]; all link the envelope
    t_st: os.stat_result
    journal: str | None
    counted: int
    since: float = field(default_factory=time.monotonic)

    def writer_waiting(self) -> bool:
        """Another process is opening the original for writing: let go of it at once."""
        return self.leased and not lease_intact(self.fd)

    def changed(self) -> bool:
        """Whether the original changed since it was read, or a writer is waiting for it."""
        return self.writer_waiting() or Identity.of(os.fstat(self.fd)) != Identity.of(self.st)


class Migrator:
    """Seals files in worker threads; swaps them in by batches, with one sync per batch.

    Durability comes from ``syncfs`` rather than an fsync per file and per
    directory: one sync makes a whole batch of envelopes (and journals) durable
    before any of them is swapped in, a second makes the swaps durable before
    the originals are unlinked.  Same guarantees, a fraction of the flushes.
    """

    def __init__(self, root: bytes, key: keys.Key, progress: Progress, state_fd: int) -> None:
        self.root = root
        self.key = key
        self.progress = progress
        self.state_fd = state_fd
        self.run_id = secrets.token_hex(4).encode()
        self._seq = 0
        self._seq_lock = threading.Lock()
        self._reaper: ThreadPoolExecutor

    def _temp_name(self) -> bytes:
        with self._seq_lock:
            self._seq += 1
            return TMP_PREFIX + self.run_id + b"-%d" % self._seq

    # ---- driving --------------------------------------------------------------

    def run(self, jobs: list[Job], workers: int) -> Iterator[tuple[Job, Outcome]]:
        """Every job's outcome, as it is known.

        Three stages overlap: workers seal files; a committer thread syncs and
        swaps in one batch while the next fills; a reaper thread unlinks the
        originals (freeing, maybe discarding, their blocks).
        """
        todo = iter(jobs)
        pending: dict[Future[Sealed | Outcome], Job] = {}
        committing: list[Future[list[tuple[Job, Outcome]]]] = []
        batch: list[Sealed] = []
        batch_bytes = 0
        polled = time.monotonic()
        with (
            ThreadPoolExecutor(max_workers=workers) as pool,
            ThreadPoolExecutor(1) as committer,
            ThreadPoolExecutor(1) as reaper,
        ):
            self._reaper = reaper
            while True:
                while len(pending) < 2 * workers and (job := next(todo, None)) is not None:
                    pending[pool.submit(self.prepare, job)] = job
                for done in [c for c in committing if c.done()]:
                    committing.remove(done)
                    yield from done.result()
                if not (pending or batch or committing):
                    return
                waiting: set[Future[Any]] = {*pending, *committing}
                for fut in wait(waiting, POLL, FIRST_COMPLETED).done & pending.keys():
                    job = pending.pop(fut)
                    result: Sealed | Outcome = fut.result()
                    if isinstance(result, Sealed):
                        batch.append(result)
                        batch_bytes += result.st.st_size
                    else:
                        yield job, result
                if time.monotonic() - polled >= POLL:
                    polled = time.monotonic()
                    waiting_writers = [b for b in batch if b.writer_waiting()]
                else:
                    waiting_writers = []
                for sealed in waiting_writers:
                    batch.remove(sealed)
                    batch_bytes -= sealed.st.st_size
                    yield (
                        sealed.job,
                        self._abandon(sealed, "opened for writing while being encrypted"),
                    )
                full = (
                    not pending
                    or len(batch) >= BATCH_FILES
                    or batch_bytes >= BATCH_BYTES
                    or (batch and time.monotonic() - batch[0].since >= BATCH_AGE)
                )
                if batch and full and len(committing) < 2:
                    committing.append(committer.submit(self._commit_all, batch))
                    batch, batch_bytes = [], 0

    # ---- sealing (worker threads) -----------------------------------------------

    def prepare(self, job: Job) -> Sealed | Outcome:
        counted = [0]
        try:
            return self._prepare(job, counted)
        except Retry as r:
            outcome = Outcome(None, r.status, r.detail)
        except fmt.DecryptionFailed:
            outcome = Outcome(
                None, "failed", "the encrypted copy did not verify (storage error?); left as is"
            )
        except OSError as e:
            if e.errno == errno.ENOENT and counted[0] == 0:
                outcome = Outcome(Done.VANISHED, "vanished", "removed during the run")
            else:
                outcome = Outcome(None, "failed", describe(e))
        self.progress.advance(-counted[0])
        return outcome

    def _prepare(self, job: Job, counted: list[int]) -> Sealed | Outcome:
        try:
            fd = open_readonly(os.path.join(self.root, job.names[0]))
        except OSError as e:
            if e.errno == errno.ENOENT:
                raise
            return Outcome(None, "unreadable", describe(e))
        dirs: list[int] = []
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                _close_all(fd, dirs)
                return Outcome(Done.VANISHED, "vanished", "no longer a regular file")
            if st.st_nlink != len(job.names) and (st.st_nlink > 1 or len(job.names) > 1):
                raise Retry("hard_links", "its hard links changed during the run")
            leased = take_lease(fd)
            if header_kind(fd, st) is fmt.Kind.ENCRYPTED:
                _close_all(fd, dirs)
                return Outcome(Done.ALREADY, "already", "encrypted meanwhile")
            for rel in job.names:
                dirs.append(self._open_dir(rel))
            return self._seal_beside(job, fd, st, leased, dirs, counted)
        except BaseException:
            _close_all(fd, dirs)
            raise

    def _open_dir(self, rel: bytes) -> int:
        return open_dir(os.path.join(self.root, os.path.dirname(rel)))

    def _seal_beside(
        self,
        job: Job,
        fd: int,
        st: os.stat_result,
        leased: bool,
        dirs: list[int],
        counted: list[int],
    ) -> Sealed:
        holds = [self._temp_name()]
        journal = None
        out = os.open(
            holds[0],
            os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o600,
            dir_fd=dirs[0],
        )
        try:
            nonce, tag = self._seal(fd, out, st, leased, counted)
            self._verify(out, nonce, tag, st.st_size)
            copy_metadata(os.path.join(self.root, job.names[0]), st, out)
            os.setxattr(out, KEY_ID_XATTR, self.key.key_id.encode())
            os.utime(out, ns=(st.st_atime_ns, st.st_mtime_ns))
            t_st = os.fstat(out)
            for i in range(1, len(job.names)):
                holds.append(self._temp_name())
                os.link(holds[0], holds[i], src_dir_fd=dirs[0], dst_dir_fd=dirs[i])
            if len(job.names) > 1:
                journal = self._write_journal(job, holds, st, t_st)
        except BaseException:
            self._unlink_holds(dirs, holds, journal)
            raise
        finally:
            os.close(out)
        return Sealed(job, fd, st, leased, dirs, holds, t_st, journal, counted[0])

    def _seal(
        self, fd: int, out: int, st: os.stat_result, leased: bool, counted: list[int]
    ) -> tuple[bytes, bytes]:
        sealer = fmt.Sealer(self.key.material)
        pwrite_all(out, sealer.header, 0)
        off = 0
        while True:
            data = os.pread(fd, CHUNK, off)
            if not data:
                break
            pwrite_all(out, sealer.update(data), fmt.HEADER_SIZE + off)
            off += len(data)
            counted[0] += len(data)
            self.progress.advance(len(data))
            if leased and not lease_intact(fd):
                raise Retry("changed", "opened for writing while being encrypted")
        if off != st.st_size:
            raise Retry("changed", "changed while being encrypted")
        tag = sealer.finalize()
        pwrite_all(out, tag, fmt.HEADER_SIZE + off)
        return sealer.nonce, tag

    def _verify(self, out: int, nonce: bytes, tag: bytes, plain_size: int) -> None:
        """The copy on disk authenticates, with our nonce and tag: it decrypts to what we read."""
        size = plain_size + fmt.OVERHEAD
        if os.fstat(out).st_size != size:
            raise fmt.DecryptionFailed("size")
        got = fmt.verify_stream(self.key.material, pread_stream(out), size)
        if got != nonce or os.pread(out, fmt.TAG_SIZE, size - fmt.TAG_SIZE) != tag:
            raise fmt.DecryptionFailed("mismatch")

    def _write_journal(
        self, job: Job, holds: list[bytes], st: os.stat_result, t_st: os.stat_result
    ) -> str:
        """The record `recover_journals` needs (made durable by the batch's first sync)."""
        record = {
            "original": [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns],
            "envelope": [t_st.st_dev, t_st.st_ino, t_st.st_size, t_st.st_mtime_ns],
            "pairs": [
                [os.fsdecode(n), os.fsdecode(os.path.join(os.path.dirname(n), h))]
                for n, h in zip(job.names, holds, strict=True)
            ],
        }
        name = f"{JOURNAL_PREFIX}{holds[0].decode()}.json"
        write_atomically(self.state_fd, name, json.dumps(record).encode(), durable=False)
        return name

    # ---- swapping in (main thread) --------------------------------------------

    def _commit_all(self, batch: list[Sealed]) -> list[tuple[Job, Outcome]]:
        return list(self.commit(batch))

    def commit(self, batch: list[Sealed]) -> Iterator[tuple[Job, Outcome]]:
        try:
            _sync(batch)
        except OSError as e:
            for s in batch:
                yield s.job, self._abandon(s, f"cannot sync: {describe(e)}", status="failed")
            return
        swapped = []
        for s in batch:
            try:
                self._swap(s)
            except Retry as r:
                yield s.job, self._abandon(s, r.detail, status=r.status)
            except OSError as e:
                yield s.job, self._abandon(s, describe(e), status="failed")
            else:
                swapped.append(s)
        try:
            _sync(swapped)
        except OSError as e:
            for s in swapped:
                self._unswap(s)
                yield s.job, self._abandon(s, f"cannot sync: {describe(e)}", status="failed")
            return
        undone = []
        for s in swapped:
            # Last look: a writer that reached the original before the swap is waiting.
            if s.leased and not lease_intact(s.fd):
                self._unswap(s)
                undone.append(s)
                yield s.job, self._abandon(s, "opened for writing while being encrypted")
            else:
                yield s.job, self._done(s)
        if undone:
            _sync(undone)

    def _swap(self, s: Sealed) -> None:
        """Every name to the envelope, or (raising Retry) none."""
        if s.changed():
            raise Retry("changed", "changed while being encrypted")
        names = [os.path.basename(n) for n in s.job.names]
        original, ours = _ino(s.st), _ino(s.t_st)
        done = 0
        try:
            for i, name in enumerate(names):
                if not swap_in(s.dirs[i], s.holds[i], name, original):
                    raise Retry("changed", "replaced during the run")
                done += 1
            # The swaps moved ctime: compare what a write or chmod would move.
            now, st = os.fstat(s.fd), s.st
            same = (now.st_size, now.st_mtime_ns, now.st_mode, now.st_uid, now.st_gid) == (
                st.st_size,
                st.st_mtime_ns,
                st.st_mode,
                st.st_uid,
                st.st_gid,
            )
            if not same or (s.leased and not lease_intact(s.fd)):
                raise Retry("changed", "changed while being encrypted")
        except BaseException:
            for i in reversed(range(done)):
                put_back(s.dirs[i], s.holds[i], names[i], ours)
            raise

    def _unswap(self, s: Sealed) -> None:
        for i, name in reversed(list(enumerate(s.job.names))):
            put_back(s.dirs[i], s.holds[i], os.path.basename(name), _ino(s.t_st))

    def _done(self, s: Sealed) -> Outcome:
        self._reaper.submit(self._release, s)
        st, t_st = s.st, s.t_st
        detail = f"{st.st_size} bytes"
        growth = 0
        if st.st_blocks * 512 < st.st_size:
            growth = max(0, (t_st.st_blocks - st.st_blocks) * 512)
            detail += (
                f"; sparse file grew on disk from {human_bytes(st.st_blocks * 512)} "
                f"to {human_bytes(t_st.st_blocks * 512)}"
            )
        return Outcome(Done.ENCRYPTED, "encrypted", detail, st.st_size, growth)

    def _release(self, s: Sealed) -> None:
        self._unlink_holds(s.dirs, s.holds, s.journal)  # they hold the original now
        _close_all(s.fd, s.dirs)

    def _abandon(self, s: Sealed, detail: str, *, status: str = "changed") -> Outcome:
        """Drop the envelope; the original stays as it is (and its lease is released)."""
        self._unlink_holds(s.dirs, s.holds, s.journal)
        _close_all(s.fd, s.dirs)
        self.progress.advance(-s.counted)
        return Outcome(None, status, detail)

    def _unlink_holds(self, dirs: list[int], holds: list[bytes], journal: str | None) -> None:
        for d, h in zip(dirs, holds, strict=False):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(h, dir_fd=d)
        if journal is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(journal, dir_fd=self.state_fd)


def _close_all(fd: int, dirs: list[int]) -> None:
    os.close(fd)
    for d in dirs:
        os.close(d)


def _sync(batch: list[Sealed]) -> None:
    """syncfs each filesystem the batch touches (SOURCE may hold other mounts)."""
    for fd in {s.st.st_dev: s.dirs[0] for s in batch}.values():
        syncfs(fd)


# ---- recovery of an interrupted hard-link group ----------------------------------


def recover_journals(root: bytes, state_fd: int) -> tuple[list[tuple[bytes, str, str]], set[bytes]]:
    """Finish the hard-link groups a killed run left half-swapped.

    If the envelope is unchanged, every name goes back to the original (the
    group is encrypted again later); if only the original is unchanged, every
    name moves to the envelope; if both changed, someone wrote through both
    sets of names: that is reported and nothing is touched.
    Returns the problems to report, and the temporary names still needed.
    """
    problems = []
    keep_holds: set[bytes] = set()
    for name in sorted(os.listdir(state_fd)):
        if not name.startswith(JOURNAL_PREFIX):
            continue
        try:
            with open(os.open(name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=state_fd), "rb") as f:
                rec = json.load(f)
            pairs = [(os.fsencode(n), os.fsencode(h)) for n, h in rec["pairs"]]
            original, envelope = rec["original"], rec["envelope"]
        except (ValueError, KeyError, TypeError):
            # Unfinished, or lost with a power cut before its batch's first sync:
            # either way no name of its group was swapped yet.
            os.unlink(name, dir_fd=state_fd)
            continue
        o_ino, t_ino = (original[0], original[1]), (envelope[0], envelope[1])
        if _unchanged(root, pairs, envelope):
            keep, drop = o_ino, t_ino
        elif _unchanged(root, pairs, original):
            keep, drop = t_ino, o_ino
        else:
            problems.append(
                (
                    pairs[0][0],
                    "failed",
                    "hard links were written to while half encrypted; both versions kept, "
                    f"see {os.fsdecode(STATE_DIR + b'/' + STATE_SUBDIR)}/{name}",
                )
            )
            keep_holds.update(h for _, h in pairs)
            continue
        for n, h in pairs:
            d = open_dir(os.path.join(root, os.path.dirname(n)))
            try:
                base, hold = os.path.basename(n), os.path.basename(h)
                at_name, at_hold = _lstat_at(d, base), _lstat_at(d, hold)
                if at_name and at_hold and _ino(at_name) == drop and _ino(at_hold) == keep:
                    exchange(d, hold, base)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(hold, dir_fd=d)
                os.fsync(d)
            finally:
                os.close(d)
        os.unlink(name, dir_fd=state_fd)
        os.fsync(state_fd)
    return problems, keep_holds


def _unchanged(root: bytes, pairs: list[tuple[bytes, bytes]], ident: list[int]) -> bool:
    """Whether the inode `ident` (dev, ino, size, mtime_ns) still has its recorded content."""
    for n, h in pairs:
        for p in (n, h):
            try:
                st = os.stat(os.path.join(root, p), follow_symlinks=False)
            except FileNotFoundError:
                continue
            if _ino(st) == (ident[0], ident[1]):
                return (st.st_size, st.st_mtime_ns) == (ident[2], ident[3])
    return True  # no name holds it any more


# ---- scanning -------------------------------------------------------------------


def plan(root: bytes, workers: int) -> Plan:
    """Walk SOURCE: legacy files to encrypt (grouped by inode), envelopes, problems.

    Headers are read by `workers` threads: on a cold cache each is a disk seek.
    """
    p = Plan()
    links: dict[tuple[int, int], list[bytes]] = {}
    link_st: dict[tuple[int, int], os.stat_result] = {}

    def hidden(rel: bytes, entry: os.DirEntry) -> None:
        if entry.name.startswith(TMP_PREFIX) and entry.is_file(follow_symlinks=False):
            p.stale.append(rel)

    for entry, kind in bounded_map(
        partial(_kind, root), walk(root, on_hidden=hidden), workers=workers
    ):
        if kind is None:
            continue  # removed since it was listed
        p.scanned += 1
        if isinstance(kind, str):
            p.problems.append((entry.rel, "unreadable", kind))
            continue
        if kind is fmt.Kind.ENCRYPTED:
            p.already += 1
            continue
        assert entry.st is not None
        if entry.st.st_blocks * 512 < entry.st.st_size:
            p.sparse.add(entry.rel)
        if entry.st.st_nlink > 1:
            links.setdefault(_ino(entry.st), []).append(entry.rel)
            link_st[_ino(entry.st)] = entry.st
        else:
            p.jobs.append(Job([entry.rel], entry.st.st_size))
    for ino, names in links.items():
        nlink = link_st[ino].st_nlink
        if len(names) == nlink:
            p.jobs.append(Job(names, link_st[ino].st_size))
        else:
            for n in names:
                p.problems.append(
                    (
                        n,
                        "hard_links",
                        f"has {nlink} hard links, only {len(names)} of them in SOURCE; "
                        "left as is (replacing it would split the links)",
                    )
                )
    return p


def _kind(root: bytes, entry: Entry) -> fmt.Kind | str | None:
    """The file's class by its header, why it cannot be read, or None if it is gone."""
    if entry.error is not None:
        return describe(entry.error)
    assert entry.st is not None
    try:
        return kind_of(os.path.join(root, entry.rel), entry.st)[1]
    except FileNotFoundError:
        return None
    except OSError as e:
        return describe(e)


# ---- command ----------------------------------------------------------------------


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "encrypt",
        help="encrypt every legacy plaintext file in SOURCE, in place (needs --force)",
        description="Encrypt every legacy plaintext file in SOURCE in place, atomically, "
        "keeping mode, owner, times and extended attributes, and recording the key id. "
        "Safe while SOURCE is mounted and in use: a file that changes, or is open for "
        "writing, is left as it is and reported. Files that are encrypted already, damaged "
        "envelopes and unreadable files are never touched. Idempotent: run it again after "
        "an interruption. The key comes from --key-file or "
        f"${keys.ENV_KEY}, its id from ${keys.ENV_KEY_ID}.",
        epilog=f"Exit status: {OK} done, nothing left; {WORK_TO_DO} (--dry-run) files would be "
        f"encrypted; {ISSUES_FOUND} some files could not be encrypted; {USAGE} usage or key "
        f"error; {KEY_SAFETY} key safety check refused; {BUSY} another encrypt is "
        "running on SOURCE.",
    )
    p.add_argument("source", metavar="SOURCE", help="the storage directory")
    p.add_argument("--force", action="store_true", help="really rewrite the files")
    p.add_argument("--dry-run", action="store_true", help="only report what would be done")
    p.add_argument("--json", action="store_true", help="print one JSON object at the end")
    p.add_argument("--key-file", metavar="PATH", help="file holding the base64url key")
    p.add_argument(
        "--jobs",
        type=int,
        default=DEFAULT_JOBS,
        metavar="N",
        help=f"files sealed at once (default {DEFAULT_JOBS})",
    )
    p.set_defaults(func=run)


def _err(message: str) -> None:
    print(f"stormfs: {message}", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    if not args.force and not args.dry_run:
        _err(
            "encrypt rewrites every legacy file in SOURCE: add --force to do it, "
            "or --dry-run to see what it would do"
        )
        return USAGE
    if args.jobs < 1:
        _err("--jobs must be at least 1")
        return USAGE
    source = os.path.realpath(args.source)
    if not os.path.isdir(source):
        _err(f"SOURCE {args.source} is not a directory")
        return USAGE
    try:
        keyring = keys.load_keyring(key_file=args.key_file, environ=os.environ)
    except keys.InvalidKey as e:
        _err(str(e))
        return USAGE
    if keyring is None:
        _err(f"no encryption key: set ${keys.ENV_KEY} or use --key-file")
        return USAGE
    root = os.fsencode(source)
    if args.dry_run:
        p = plan(root, args.jobs)
        return _report(args, root, keyring.current, p, [], 0.0, stale=len(p.stale), dry_run=True)
    refused = keycheck.preflight_or_refuse(
        source, keyring, echo=lambda line: print(line, file=sys.stderr)
    )
    if isinstance(refused, int):
        return refused
    with _exclusive(root) as state_fd:
        if state_fd is None:
            _err(f"another stormfs encrypt is running on {source}")
            return BUSY
        return _encrypt_all(args, root, keyring.current, state_fd)


@contextlib.contextmanager
def _exclusive(root: bytes) -> Iterator[int | None]:
    """The run's state directory, locked against a second run on the same SOURCE."""
    state_fd = open_dir(state_dir(root, STATE_SUBDIR))
    lock_fd = open_lock(b"lock", dir_fd=state_fd)
    try:
        try:
            lock(lock_fd, wait=False)
        except BlockingIOError:
            yield None
            return
        yield state_fd
    finally:
        os.close(lock_fd)
        os.close(state_fd)


def _encrypt_all(args: argparse.Namespace, root: bytes, key: keys.Key, state_fd: int) -> int:
    # A lease break is announced with SIGIO, whose default action kills the
    # process; the break itself is seen by polling F_GETLEASE.
    signal.signal(signal.SIGIO, signal.SIG_IGN)
    # Each file waiting in a batch holds its original and its directories open.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = FDS_PER_FILE * BATCH_FILES * 3
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))
    started = time.monotonic()
    problems, keep_holds = recover_journals(root, state_fd)
    p = plan(root, args.jobs)
    p.problems[:0] = problems
    removed = 0
    for rel in p.stale:
        if rel in keep_holds:
            continue
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(root, rel))
            removed += 1
    total = sum(j.size for j in p.jobs)
    progress = Progress(len(p.jobs), total, sys.stderr, label="encrypt")
    migrator = Migrator(root, key, progress, state_fd)
    results: list[tuple[Job, Outcome]] = []
    queue = p.jobs
    for attempt in range(ATTEMPTS):
        retry: list[Job] = []
        for job, outcome in migrator.run(queue, args.jobs):
            retryable = outcome.done is None and outcome.status in RETRYABLE
            if retryable and attempt + 1 < ATTEMPTS:
                retry.append(job)
                continue
            progress.file_done()
            results.append((job, outcome))
            if outcome.done is None:
                progress.note(f"error: {display(job.names[0])}: {outcome.detail}")
            elif job.names[0] in p.sparse and outcome.done is Done.ENCRYPTED:
                progress.note(f"note: {display(job.names[0])}: {outcome.detail}")
        if not retry:
            break
        time.sleep(RETRY_DELAY * (attempt + 1))
        queue = retry
    progress.close()
    seconds = time.monotonic() - started
    return _report(args, root, key, p, results, seconds, stale=removed, dry_run=False)


def _report(
    args: argparse.Namespace,
    root: bytes,
    key: keys.Key,
    p: Plan,
    results: list[tuple[Job, Outcome]],
    seconds: float,
    *,
    stale: int,
    dry_run: bool,
) -> int:
    files: list[dict[str, str]] = []
    count: Counter[str] = Counter()
    nbytes = 0
    sparse_grown = 0
    for rel, status, detail in p.problems:
        files.append({"path": display(rel), "status": status, "detail": detail})
    if dry_run:
        for job in p.jobs:
            for n in job.names:
                detail = f"legacy plaintext ({job.size} bytes)"
                if n in p.sparse:
                    detail += "; sparse: will take its full size on disk"
                files.append({"path": display(n), "status": "needs_encryption", "detail": detail})
    for job, o in results:
        count[o.status] += 1
        nbytes += o.nbytes
        sparse_grown += o.sparse_growth > 0
        if o.done is Done.ALREADY:
            continue
        for n in job.names:
            files.append({"path": display(n), "status": o.status, "detail": o.detail})
    errors = len(p.problems) + sum(1 for _, o in results if o.done is None)
    report: dict[str, Any] = {
        "source": os.fsdecode(root),
        "dry_run": dry_run,
        "key_id": key.key_id,
        "scanned": p.scanned,
        "already_encrypted": p.already + count["already"],
        "encrypted_now": count["encrypted"],
        "would_encrypt": sum(len(j.names) for j in p.jobs) if dry_run else 0,
        "errors": errors,
        "vanished": count["vanished"],
        "bytes_encrypted": nbytes,
        "sparse_grown": sparse_grown,
        "stale_temp_files": stale,
        "seconds": round(seconds, 3),
        "files": sorted(files, key=lambda f: f["path"]),
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_human(report)
    if errors:
        return ISSUES_FOUND
    return WORK_TO_DO if report["would_encrypt"] else OK


def _print_human(r: dict[str, Any]) -> None:
    if r["dry_run"]:
        for f in r["files"]:
            if f["status"] == "needs_encryption":
                print(f"would encrypt  {f['path']}: {f['detail']}")
    print(
        f"\n{'Dry run' if r['dry_run'] else 'Encryption'} of {r['source']} (key id {r['key_id']})"
    )
    print(f"  Files scanned:      {r['scanned']}")
    print(
        f"  Already encrypted:  {r['already_encrypted']} (envelope header; "
        "`stormfs audit` authenticates them)"
    )
    if r["dry_run"]:
        print(f"  Would encrypt:      {r['would_encrypt']}")
    else:
        rate = r["bytes_encrypted"] / r["seconds"] if r["seconds"] else 0
        print(
            f"  Encrypted now:      {r['encrypted_now']} ({human_bytes(r['bytes_encrypted'])} "
            f"in {human_duration(r['seconds'])}, {human_bytes(rate)}/s)"
        )
    print(f"  Errors:             {r['errors']}")
    if r["sparse_grown"]:
        print(f"  Sparse files grown: {r['sparse_grown']}")
    if r["stale_temp_files"]:
        verb = "to remove" if r["dry_run"] else "removed"
        print(f"  Stale temporary files {verb}: {r['stale_temp_files']}")
    errors = [f for f in r["files"] if f["status"] not in ("encrypted", "needs_encryption")]
    for f in errors:
        if f["status"] != "vanished":
            print(f"{f['status']}  {f['path']}: {f['detail']}")
