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
import ctypes
import enum
import errno
import fcntl
import json
import os
import secrets
import signal
import stat
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from . import format as fmt
from . import keycheck, keys
from .content import Identity
from .exitcodes import BUSY, ISSUES_FOUND, KEY_SAFETY, OK, USAGE, WORK_TO_DO
from .progress import Progress, human_bytes, human_duration
from .scan import Entry, bounded_map, describe, display, open_readonly, read_header, walk
from .store import KEY_ID_XATTR, LOCAL_TMP_PREFIX, STATE_DIR, copy_metadata

TMP_PREFIX = LOCAL_TMP_PREFIX + b"enc-"
STATE_SUBDIR = b"encrypt"
JOURNAL_PREFIX = "links-"
CHUNK = 1 << 20
DEFAULT_JOBS = 8
ATTEMPTS = 3
RETRY_DELAY = 0.5
RETRYABLE = ("changed", "busy", "hard_links")
RENAME_EXCHANGE = 2
F_RDLCK, F_UNLCK = fcntl.F_RDLCK, fcntl.F_UNLCK

_libc = ctypes.CDLL(None, use_errno=True)


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
    if _libc.renameat2(dir_fd, a, dir_fd, b, ctypes.c_uint(RENAME_EXCHANGE)) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), os.fsdecode(b))


def take_lease(fd: int) -> bool:
    """A read lease on `fd`; False where the filesystem has no leases (NFS, FUSE)."""
    try:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, F_RDLCK)
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EBUSY):
            raise Retry("busy", "open for writing by another process") from None
        if e.errno in (errno.EINVAL, errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP):
            return False
        raise
    return True


def lease_intact(fd: int) -> bool:
    """False once another process has started opening the file for writing."""
    return fcntl.fcntl(fd, fcntl.F_GETLEASE) == F_RDLCK


def fsync_dir(dir_fd: int) -> None:
    os.fsync(dir_fd)


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


class Migrator:
    def __init__(
        self,
        root: bytes,
        key: keys.Key,
        progress: Progress | None,
        state_fd: int,
    ) -> None:
        self.root = root
        self.key = key
        self.progress = progress
        self.state_fd = state_fd
        self.run_id = secrets.token_hex(4).encode()
        self._seq = 0
        self._seq_lock = threading.Lock()

    def _temp_name(self) -> bytes:
        with self._seq_lock:
            self._seq += 1
            return TMP_PREFIX + self.run_id + b"-%d" % self._seq

    def _advance(self, n: int) -> None:
        if self.progress is not None:
            self.progress.advance(n)

    def run_job(self, job: Job) -> Outcome:
        counted = [0]
        try:
            outcome = self._encrypt(job, counted)
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
        if outcome.done is None or outcome.done is not Done.ENCRYPTED:
            self._advance(-counted[0])
        return outcome

    def _encrypt(self, job: Job, counted: list[int]) -> Outcome:
        first = os.path.join(self.root, job.names[0])
        try:
            fd = open_readonly(first)
        except OSError as e:
            if e.errno == errno.ENOENT:
                raise
            return Outcome(None, "unreadable", describe(e))
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                return Outcome(Done.VANISHED, "vanished", "no longer a regular file")
            if st.st_nlink != len(job.names) and (st.st_nlink > 1 or len(job.names) > 1):
                raise Retry("hard_links", "its hard links changed during the run")
            leased = take_lease(fd)
            if read_header(fd, st) is fmt.Kind.ENCRYPTED:
                return Outcome(Done.ALREADY, "already", "encrypted meanwhile")
            dirs = [self._open_dir(n) for n in job.names]
            try:
                return self._encrypt_open(job, fd, st, leased, dirs, counted)
            finally:
                for d in dirs:
                    os.close(d)
        finally:
            os.close(fd)

    def _open_dir(self, rel: bytes) -> int:
        parent = os.path.join(self.root, os.path.dirname(rel))
        return os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)

    def _encrypt_open(
        self,
        job: Job,
        fd: int,
        st: os.stat_result,
        leased: bool,
        dirs: list[int],
        counted: list[int],
    ) -> Outcome:
        tmp = self._temp_name()
        out = os.open(
            tmp,
            os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o600,
            dir_fd=dirs[0],
        )
        swapped = False
        try:
            nonce, tag = self._seal(fd, out, st, leased, counted)
            self._verify(out, nonce, tag, st.st_size)
            copy_metadata(os.path.join(self.root, job.names[0]), st, out)
            os.setxattr(out, KEY_ID_XATTR, self.key.key_id.encode())
            os.utime(out, ns=(st.st_atime_ns, st.st_mtime_ns))
            os.fsync(out)
            t_st = os.fstat(out)
            if Identity.of(os.fstat(fd)) != Identity.of(st) or (leased and not lease_intact(fd)):
                raise Retry("changed", "changed while being encrypted")
            self._swap(job, fd, st, leased, dirs, tmp, t_st)
            swapped = True
        finally:
            os.close(out)
            if not swapped:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp, dir_fd=dirs[0])
        growth = max(0, t_st.st_blocks * 512 - st.st_blocks * 512)
        sparse = st.st_blocks * 512 < st.st_size
        detail = f"{st.st_size} bytes"
        if sparse:
            detail += (
                f"; sparse file grew on disk from {human_bytes(st.st_blocks * 512)} "
                f"to {human_bytes(t_st.st_blocks * 512)}"
            )
        return Outcome(Done.ENCRYPTED, "encrypted", detail, st.st_size, growth if sparse else 0)

    def _seal(
        self, fd: int, out: int, st: os.stat_result, leased: bool, counted: list[int]
    ) -> tuple[bytes, bytes]:
        sealer = fmt.Sealer(self.key.material)
        _pwrite_all(out, sealer.header, 0)
        off = 0
        while True:
            data = os.pread(fd, CHUNK, off)
            if not data:
                break
            _pwrite_all(out, sealer.update(data), fmt.HEADER_SIZE + off)
            off += len(data)
            counted[0] += len(data)
            self._advance(len(data))
            if leased and not lease_intact(fd):
                raise Retry("changed", "opened for writing while being encrypted")
        if off != st.st_size:
            raise Retry("changed", "changed while being encrypted")
        tag = sealer.finalize()
        _pwrite_all(out, tag, fmt.HEADER_SIZE + off)
        return sealer.nonce, tag

    def _verify(self, out: int, nonce: bytes, tag: bytes, plain_size: int) -> None:
        """The copy on disk authenticates, with our nonce and tag: it decrypts to what we read."""
        size = plain_size + fmt.OVERHEAD
        pos = 0

        def read(n: int) -> bytes:
            nonlocal pos
            data = os.pread(out, n, pos)
            pos += len(data)
            return data

        if os.fstat(out).st_size != size:
            raise fmt.DecryptionFailed("size")
        got = fmt.verify_stream(self.key.material, read, size)
        if got != nonce or os.pread(out, fmt.TAG_SIZE, size - fmt.TAG_SIZE) != tag:
            raise fmt.DecryptionFailed("mismatch")

    def _swap(
        self,
        job: Job,
        fd: int,
        st: os.stat_result,
        leased: bool,
        dirs: list[int],
        tmp: bytes,
        t_st: os.stat_result,
    ) -> None:
        """Put the envelope under every name of the inode, or under none."""
        names = [os.path.basename(n) for n in job.names]
        holds = [tmp] + [self._temp_name() for _ in names[1:]]
        for i in range(1, len(names)):
            os.link(tmp, holds[i], src_dir_fd=dirs[0], dst_dir_fd=dirs[i], follow_symlinks=False)
        journal = None
        if len(names) > 1:
            journal = self._write_journal(job, holds, st, t_st)
            for d in set(dirs):
                fsync_dir(d)
        original, ours = _ino(st), _ino(t_st)
        done = 0
        try:
            for i, name in enumerate(names):
                if not swap_in(dirs[i], holds[i], name, original):
                    raise Retry("changed", "replaced during the run")
                done += 1
            now = os.fstat(fd)
            same = (now.st_size, now.st_mtime_ns, now.st_mode, now.st_uid, now.st_gid) == (
                st.st_size,
                st.st_mtime_ns,
                st.st_mode,
                st.st_uid,
                st.st_gid,
            )
            if not same or (leased and not lease_intact(fd)):
                raise Retry("changed", "changed while being encrypted")
        except BaseException:
            for i in reversed(range(done)):
                put_back(dirs[i], holds[i], names[i], ours)
            self._drop_holds(dirs, holds, journal)
            raise
        for d in set(dirs):
            fsync_dir(d)
        self._drop_holds(dirs, holds, journal)

    def _drop_holds(self, dirs: list[int], holds: list[bytes], journal: str | None) -> None:
        for d, h in zip(dirs, holds, strict=True):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(h, dir_fd=d)
        if journal is not None:
            for d in set(dirs):
                fsync_dir(d)
            os.unlink(journal, dir_fd=self.state_fd)

    def _write_journal(
        self, job: Job, holds: list[bytes], st: os.stat_result, t_st: os.stat_result
    ) -> str:
        record = {
            "original": [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns],
            "envelope": [t_st.st_dev, t_st.st_ino, t_st.st_size, t_st.st_mtime_ns],
            "pairs": [
                [os.fsdecode(n), os.fsdecode(os.path.join(os.path.dirname(n), h))]
                for n, h in zip(job.names, holds, strict=True)
            ],
        }
        name = f"{JOURNAL_PREFIX}{self.run_id.decode()}-{holds[0].decode(errors='replace')}.json"
        name = name.replace(os.sep, "_")
        fd = os.open(
            name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600, dir_fd=self.state_fd
        )
        try:
            os.write(fd, json.dumps(record).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        fsync_dir(self.state_fd)
        return name


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


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
        if not (name.startswith(JOURNAL_PREFIX) and name.endswith(".json")):
            continue
        with open(os.open(name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=state_fd), "rb") as f:
            rec = json.load(f)
        pairs = [(os.fsencode(n), os.fsencode(h)) for n, h in rec["pairs"]]
        original, envelope = rec["original"], rec["envelope"]
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
            d = os.open(
                os.path.join(root, os.path.dirname(n)), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
            )
            try:
                base, hold = os.path.basename(n), os.path.basename(h)
                at_name, at_hold = _lstat_at(d, base), _lstat_at(d, hold)
                if at_name and at_hold and _ino(at_name) == drop and _ino(at_hold) == keep:
                    exchange(d, hold, base)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(hold, dir_fd=d)
                fsync_dir(d)
            finally:
                os.close(d)
        os.unlink(name, dir_fd=state_fd)
        fsync_dir(state_fd)
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


def plan(root: bytes) -> Plan:
    """Walk SOURCE: legacy files to encrypt (grouped by inode), envelopes, problems."""
    p = Plan()
    links: dict[tuple[int, int], list[bytes]] = {}
    link_st: dict[tuple[int, int], os.stat_result] = {}

    def hidden(rel: bytes, entry: os.DirEntry) -> None:
        if entry.name.startswith(TMP_PREFIX) and entry.is_file(follow_symlinks=False):
            p.stale.append(rel)

    for entry in walk(root, on_hidden=hidden):
        p.scanned += 1
        kind = _kind(root, entry, p)
        if kind is None:
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


def _kind(root: bytes, entry: Entry, p: Plan) -> fmt.Kind | None:
    if entry.error is not None:
        p.problems.append((entry.rel, "unreadable", describe(entry.error)))
        return None
    assert entry.st is not None
    if entry.st.st_size < fmt.OVERHEAD:
        return fmt.Kind.PLAINTEXT
    try:
        fd = open_readonly(os.path.join(root, entry.rel))
    except FileNotFoundError:
        p.scanned -= 1
        return None
    except OSError as e:
        p.problems.append((entry.rel, "unreadable", describe(e)))
        return None
    try:
        return read_header(fd, os.fstat(fd))
    except OSError as e:
        p.problems.append((entry.rel, "unreadable", describe(e)))
        return None
    finally:
        os.close(fd)


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
        help=f"files encrypted at once (default {DEFAULT_JOBS}: fsyncs overlap)",
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
        p = plan(root)
        return _report(args, root, keyring.current, p, [], 0.0, stale=len(p.stale), dry_run=True)
    try:
        keycheck.preflight(source, keyring, echo=lambda line: print(line, file=sys.stderr))
    except keycheck.SafetyError as e:
        print(e.message, file=sys.stderr)
        return e.exit_code
    with _exclusive(root) as state_fd:
        if state_fd is None:
            _err(f"another stormfs encrypt is running on {source}")
            return BUSY
        return _encrypt_all(args, root, keyring.current, state_fd)


@contextlib.contextmanager
def _exclusive(root: bytes) -> Iterator[int | None]:
    """The run's state directory, locked against a second run on the same SOURCE."""
    state = os.path.join(root, STATE_DIR, STATE_SUBDIR)
    os.makedirs(state, mode=0o700, exist_ok=True)
    state_fd = os.open(state, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    lock_fd = os.open(b"lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600, dir_fd=state_fd)
    try:
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
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
    started = time.monotonic()
    problems, keep_holds = recover_journals(root, state_fd)
    p = plan(root)
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
        for job, outcome in bounded_map(migrator.run_job, queue, workers=args.jobs):
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
