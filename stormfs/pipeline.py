"""The pipeline of `stormfs encrypt` and `stormfs rotate`: seal files beside their names,
swap them in by batches.

For one file (one inode):

1. open it read-only and take a read lease (`swap.take_lease`): the kernel
   refuses the lease while anyone has the file open for writing, and from
   then on makes any open for writing or truncate wait until we let go —
   which we do as soon as we notice, abandoning the attempt;
2. create ``.stormfs-tmp-enc-*`` in the same directory (hidden from the
   mount) and hand both descriptors to a worker process (`sealing`), which
   streams the original through `format.Sealer` (or `format_v2.Sealer`, for
   a v2 file kept or made so) into it, authenticates that copy, and gives
   it the original's mode, owner, times and other extended attributes plus
   ``user.stormfs.key_id`` and the method (``user.stormfs.encryption_method``);
   a file with several names gets its envelope
   linked beside each, under a journal (`journal`);
3. by batches: one ``syncfs`` makes the batch's copies (and journals)
   durable; each original whose identity (dev, ino, size, mtime, ctime) is
   unchanged is swapped with its copy by `swap.swap_in`, which undoes the
   swap if another version was renamed over the name meanwhile, so a
   concurrent commit is never lost; a second ``syncfs`` makes the swaps
   durable, and only then are the originals unlinked.

The authentication in step 2 proves the copy decrypts to the bytes that were
read (`sealing._verify` says why, for each format).

Each job is sealed with its own key (`Job.seal`, else the run's key): on a
per-user SOURCE, a file under an account is sealed with its user key.

A rotation's or a conversion's job is an envelope (`Job.key` opens it, and
`Job.version` is its format): step 2 decrypts it while sealing, and the copy
is kept only if the original authenticates under that key in full (the
unverified plaintext of a v1 original only ever lands in the new envelope,
hidden, which is then dropped).  An original that no longer opens under that
key, or is in another format than planned, is classified again: done if it
needs nothing any more, tried again as what it is now, reported
DECRYPTION_FAILED and left as it is if no key opens it.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import os
import secrets
import stat
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

from . import format as fmt
from . import format_v2 as v2
from . import swap
from .content import Identity, pread_stream
from .journal import write_journal
from .keys import Key, Keyring, account_of
from .plan import TMP_PREFIX, Job
from .scan import Layout, authenticate, describe, display, header_layout, opening_key, user_first
from .sealing import NotUnderKey, Seal, Workers, seal_file
from .source import open_dir, open_readonly, recorded_key_id, syncfs
from .swap import Retry, ino, lease_intact, put_back, take_lease
from .units import human_bytes

# A batch of sealed files is swapped in once it has this many files or bytes,
# once its oldest file has waited this long, or when nothing else is coming.
BATCH_FILES = 2048
BATCH_BYTES = 512 << 20
BATCH_AGE = 2.0
# Each file waiting in a batch holds its original and its directories open.
FDS_PER_FILE = 2
# How often files waiting in a batch are checked for a writer waiting on them.
POLL = 0.5
# A file up to this size is sealed by the thread that opened it: handing it to a
# process (a message, a wake-up, a reply) costs more than sealing it (measured).
SMALL = 64 << 10
NO_KEY_OPENS = (
    "DECRYPTION_FAILED: no key of the keyring opens it "
    "(wrong key, damaged or truncated, or plaintext starting with 0x01); left as is"
)


class Done(enum.Enum):
    ENCRYPTED = "encrypted"
    ALREADY = "already"
    VANISHED = "vanished"


@dataclass
class Outcome:
    done: Done | None
    status: str
    detail: str
    nbytes: int = 0
    sparse_growth: int = 0


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
    """Seals files in worker processes; swaps them in by batches, with one sync per batch.

    Durability comes from ``syncfs`` rather than an fsync per file and per
    directory: one sync makes a whole batch of envelopes (and journals) durable
    before any of them is swapped in, a second makes the swaps durable before
    the originals are unlinked.  Same guarantees, a fraction of the flushes.

    `keyring` (a rotation, with `rotate`, or a conversion) opens envelopes met
    meanwhile; without it, an envelope found where a legacy file was planned is
    simply done.
    """

    def __init__(
        self,
        root: bytes,
        key: Key,
        advance: Callable[[int], None],
        state_fd: int,
        sealers: Workers,
        keyring: Keyring | None = None,
        *,
        rotate: bool = False,
    ) -> None:
        self.root = root
        self.key = key
        self.keyring = keyring
        self.rotate = rotate
        self.advance = advance  # bytes read (negative: an attempt dropped)
        self.state_fd = state_fd
        self.run_id = secrets.token_hex(4).encode()
        self._seq = 0
        self._seq_lock = threading.Lock()
        self._reaper: ThreadPoolExecutor
        self._workers = sealers  # started by the caller, which also stops them

    def _temp_name(self) -> bytes:
        with self._seq_lock:
            self._seq += 1
            return TMP_PREFIX + self.run_id + b"-%d" % self._seq

    # ---- driving --------------------------------------------------------------

    def run(self, jobs: list[Job], workers: int) -> Iterator[tuple[Job, Outcome]]:
        """Every job's outcome, as it is known.

        Three stages overlap: the `workers` processes seal files; a committer thread
        syncs and swaps in one batch while the next fills; a reaper thread unlinks
        the originals (freeing, maybe discarding, their blocks).
        """
        todo = iter(jobs)
        pending: dict[Future[Sealed | Outcome], Job] = {}
        committing: list[Future[list[tuple[Job, Outcome]]]] = []
        batch: list[Sealed] = []
        batch_bytes = 0
        polled = time.monotonic()
        # A thread per job in flight: it opens and leases the original, waits for a
        # process to seal it, links the copy; twice as many as processes keeps them busy.
        threads = 2 * workers
        with (
            ThreadPoolExecutor(max_workers=threads) as pool,
            ThreadPoolExecutor(1) as committer,
            ThreadPoolExecutor(1) as reaper,
        ):
            self._reaper = reaper
            while True:
                while len(pending) < 2 * threads and (job := next(todo, None)) is not None:
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

    # ---- sealing (threads, each handing its file to a worker process) -------------

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
        self.advance(-counted[0])
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
            layout = header_layout(fd, st)
            if layout.version != job.version:
                outcome = self._reclassify(job, fd, st, layout)
                _close_all(fd, dirs)
                return outcome
            for rel in job.names:
                dirs.append(self._open_dir(rel))
            try:
                return self._seal_beside(job, fd, st, leased, dirs, counted)
            except NotUnderKey:
                self.advance(-counted[0])
                counted[0] = 0
                outcome = self._reclassify(job, fd, st, layout)
            _close_all(fd, dirs)
            return outcome
        except BaseException:
            _close_all(fd, dirs)
            raise

    def _reclassify(self, job: Job, fd: int, st: os.stat_result, layout: Layout) -> Outcome:
        """A file that is not what its job said (another format, or not under the key
        named): done if it needs nothing any more, tried again as what it is now
        (raising Retry), or reported if no key opens it."""
        if layout.version == 0:
            raise Retry("changed", "replaced by a plaintext file during the run")
        if self.keyring is None:
            return Outcome(Done.ALREADY, "already", "encrypted meanwhile")
        if not self.rotate and layout.version == job.sealed_as:
            return Outcome(Done.ALREADY, "already", f"{layout.name} meanwhile")
        seal = self.sealing(job)
        key = _opening_key(fd, st, layout, self.keyring, job.names[0], seal.account is not None)
        if key is None:
            return Outcome(None, "decryption_failed", NO_KEY_OPENS)
        if self.rotate and key == seal:
            return Outcome(Done.ALREADY, "already", "under the current key meanwhile")
        job.key, job.version = key, layout.version
        raise Retry("changed", f"found as {layout.name} under {named(key)}; try again")

    def sealing(self, job: Job) -> Key:
        """The key that seals `job`."""
        return job.seal or self.key

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

        def advance(n: int) -> None:
            counted[0] += n
            self.advance(n)

        try:
            seal = seal_file if st.st_size <= SMALL else self._workers.seal
            spec = Seal(
                st,
                self.sealing(job),
                old_key=job.key,
                version=job.version,
                target=job.sealed_as,
                leased=leased,
                path=os.path.join(self.root, job.names[0]),
            )
            t_st = seal(fd, out, spec, advance)
            for i in range(1, len(job.names)):
                holds.append(self._temp_name())
                os.link(holds[0], holds[i], src_dir_fd=dirs[0], dst_dir_fd=dirs[i])
            if len(job.names) > 1:
                journal = write_journal(self.state_fd, job.names, holds, st, t_st)
        except BaseException:
            self._unlink_holds(dirs, holds, journal)
            raise
        finally:
            os.close(out)
        return Sealed(job, fd, st, leased, dirs, holds, t_st, journal, counted[0])

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
        original, ours = ino(s.st), ino(s.t_st)
        done = 0
        try:
            for i, name in enumerate(names):
                if not swap.swap_in(s.dirs[i], s.holds[i], name, original):
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
            put_back(s.dirs[i], s.holds[i], os.path.basename(name), ino(s.t_st))

    def _done(self, s: Sealed) -> Outcome:
        self._reaper.submit(self._release, s)
        st, t_st = s.st, s.t_st
        detail = f"{st.st_size} bytes"
        if s.job.version and s.job.version != s.job.sealed_as:
            detail += f", v{s.job.version} to v{s.job.sealed_as}"
        seal = self.sealing(s.job)
        if s.job.key is not None and s.job.key != seal:
            detail += f", from {named(s.job.key)} to {named(seal) if seal.account else seal.key_id}"
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
        self.advance(-s.counted)
        return Outcome(None, status, detail)

    def _unlink_holds(self, dirs: list[int], holds: list[bytes], journal: str | None) -> None:
        for d, h in zip(dirs, holds, strict=False):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(h, dir_fd=d)
        if journal is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(journal, dir_fd=self.state_fd)


def _opening_key(
    fd: int, st: os.stat_result, layout: Layout, keyring: Keyring, rel: bytes, per_user: bool
) -> Key | None:
    """The key of `keyring` (or, for a file `rel` of an account, its user key) that
    opens the envelope `fd`, the recorded one tried first."""
    account = account_of(rel)
    recorded = recorded_key_id(fd)
    if layout.version == 1:
        opened = authenticate(fd, st.st_size, keyring, recorded, account=account, per_user=per_user)
        return None if opened is None else opened.key

    def opens(material: bytes) -> None:
        v2.verify_stream(material, pread_stream(fd), st.st_size)

    first = user_first(fd, account, per_user)
    return opening_key(keyring, recorded, opens, account=account, user_first=first)


def named(key: Key) -> str:
    """A key as reports name it: its id, and for a user key, whose."""
    if key.account is None:
        return f"key id {key.key_id}"
    return f"the user key of {display(key.account)} from key id {key.key_id}"


def _close_all(fd: int, dirs: list[int]) -> None:
    os.close(fd)
    for d in dirs:
        os.close(d)


def _sync(batch: list[Sealed]) -> None:
    """syncfs each filesystem the batch touches (SOURCE may hold other mounts)."""
    for fd in {s.st.st_dev: s.dirs[0] for s in batch}.values():
        syncfs(fd)
