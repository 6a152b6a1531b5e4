"""Sealing one file into a new envelope, in worker processes: the CPU-bound step of
`stormfs encrypt` and `stormfs rotate`.

`seal_file` reads an original through its descriptor and writes a complete,
authenticated copy under the key it is given into another descriptor.  AES-GCM
in `cryptography`, and the loop around it, hold the GIL, so threads do not
seal in parallel: `Workers` runs `seal_file` in processes.  Each is a fresh
interpreter, so it inherits none of the run's descriptors (its lock, the
originals it holds leased) and none of its threads; each job's two descriptors (the
original, open and leased, and the copy, created beside it) are passed over a
Unix socket (``SCM_RIGHTS``).  A worker reads the original through that
descriptor alone, never by opening its name: the lease and the identity
checks are on the very descriptor it reads.
"""

from __future__ import annotations

import errno
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from . import format as fmt
from . import format_v2 as v2
from .content import pread_stream
from .keys import Key
from .source import KEY_ID_XATTR, METHOD_XATTR, copy_metadata, pwrite_all
from .swap import Retry, lease_intact

CHUNK = 1 << 20
# One message of the protocol: a job, a progress report or an outcome.
MESSAGE_SIZE = 1 << 16
# How a worker starts: this package first on its path, whatever the run's was.
PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER_MAIN = "from stormfs.sealing import serve; serve(int(sys.argv[1]))"


class NotUnderKey(Exception):
    """The original did not authenticate under the key it was to be opened with."""


@dataclass(frozen=True)
class Seal:
    """What sealing one original takes, besides its two descriptors (pickled to a worker).

    `st` is the original's fstat and `path` its name; `version` its format (0 legacy,
    1 or 2), opened with `old_key`; `target` the format of the copy (1 or 2), sealed
    under `key`; `leased`: the original's descriptor holds a read lease to watch."""

    st: os.stat_result
    key: Key
    old_key: Key | None
    version: int
    target: int
    leased: bool
    path: bytes


def seal_file(fd: int, out: int, job: Seal, advance: Callable[[int], None]) -> os.stat_result:
    """Seal the original open at `fd` into the empty file `out` as `job` says;
    authenticate that copy, give it the original's metadata and the key's id; return
    the copy's fstat.

    A legacy original is read as it is; an envelope is opened with `job.old_key`
    on the way, and NotUnderKey raised unless all of it authenticates (a v1 tag is
    checked at the end: the unverified plaintext only lands in the copy, which
    is then dropped).  `advance(n)` is told each `n` bytes read, `st.st_size`
    in all.  Retry when the original changes, or a writer waits for its lease;
    DecryptionFailed when the copy read back does not verify.
    """
    st, key = job.st, job.key
    sealer: fmt.Sealer | v2.Sealer = (
        fmt.Sealer(key.material) if job.target == 1 else v2.Sealer(key.material)
    )
    pwrite_all(out, sealer.header, 0)
    pos = len(sealer.header)
    plain_size = 0
    for piece in _plaintext(fd, job, advance):
        sealed = sealer.update(piece)
        pwrite_all(out, sealed, pos)
        pos += len(sealed)
        plain_size += len(piece)
    tail = sealer.finalize()
    pwrite_all(out, tail, pos)
    _verify(out, key, sealer, tail, plain_size)
    copy_metadata(job.path, st, out)
    os.setxattr(out, KEY_ID_XATTR, key.key_id.encode())
    os.setxattr(out, METHOD_XATTR, key.method.encode())
    os.utime(out, ns=(st.st_atime_ns, st.st_mtime_ns))
    return os.fstat(out)


def _plaintext(fd: int, job: Seal, advance: Callable[[int], None]) -> Iterator[bytes]:
    """The original's plaintext, piece by piece (see `seal_file`)."""
    st = job.st
    if job.version == 0:
        pieces = _legacy(fd, st)
    elif job.old_key is None:
        raise ValueError("an envelope needs the key that opens it")
    elif job.version == 1:
        pieces = _v1(fd, st, job.old_key)
    else:
        pieces = _v2(fd, st, job.old_key)
    for piece, nread in pieces:
        advance(nread)
        if job.leased and not lease_intact(fd):
            raise Retry("changed", "opened for writing while being encrypted")
        yield piece
    if os.fstat(fd).st_size != st.st_size:
        raise Retry("changed", "changed while being encrypted")


def _legacy(fd: int, st: os.stat_result) -> Iterator[tuple[bytes, int]]:
    off = 0
    while data := os.pread(fd, CHUNK, off):
        off += len(data)
        yield data, len(data)
    if off != st.st_size:
        raise Retry("changed", "changed while being encrypted")


def _v1(fd: int, st: os.stat_result, key: Key) -> Iterator[tuple[bytes, int]]:
    """Decrypted while read; NotUnderKey unless the tag verifies at the end."""
    head = os.pread(fd, fmt.HEADER_SIZE, 0)
    if len(head) != fmt.HEADER_SIZE or head[:1] != fmt.VERSION_BYTE:
        raise Retry("changed", "changed while being re-encrypted")
    opener = Cipher(algorithms.AES(key.material), modes.GCM(head[1:])).decryptor()
    plain_size = st.st_size - fmt.OVERHEAD
    off = 0
    while off < plain_size:
        data = os.pread(fd, min(CHUNK, plain_size - off), fmt.HEADER_SIZE + off)
        if not data:
            raise Retry("changed", "changed while being re-encrypted")
        off += len(data)
        yield opener.update(data), len(data)
    tag = os.pread(fd, fmt.TAG_SIZE, fmt.HEADER_SIZE + plain_size)
    if len(tag) != fmt.TAG_SIZE:
        raise Retry("changed", "changed while being re-encrypted")
    try:
        opener.finalize_with_tag(tag)
    except InvalidTag:
        raise NotUnderKey from None
    yield b"", fmt.OVERHEAD  # the job's size is the envelope's


def _v2(fd: int, st: os.stat_result, key: Key) -> Iterator[tuple[bytes, int]]:
    """Chunk by chunk, each authenticated before it is used; NotUnderKey at the first
    part that does not (or for a size no v2 file has)."""
    try:
        cipher = v2.open_header(key.material, os.pread(fd, v2.HEADER_SIZE, 0))
    except fmt.DecryptionFailed:
        raise NotUnderKey from None
    size = cipher.chunk_size
    if not v2.size_is_valid(st.st_size, size):
        raise NotUnderKey
    plain_size = v2.plaintext_size(st.st_size, size)
    count = v2.chunk_count(plain_size, size)
    per_read = max(1, CHUNK // size)
    yield b"", v2.HEADER_SIZE
    for first in range(0, count, per_read):
        last = min(count, first + per_read)
        start = v2.chunk_offset(first, size)
        end = v2.chunk_offset(last, size) if last < count else st.st_size
        data = memoryview(os.pread(fd, end - start, start))
        if len(data) != end - start:
            raise Retry("changed", "changed while being re-encrypted")
        pieces = []
        pos = 0
        for i in range(first, last):
            n = v2.chunk_span(plain_size, i, size) + v2.CHUNK_OVERHEAD
            try:
                pieces.append(cipher.open_chunk(i, data[pos : pos + n], i == count - 1))
            except fmt.DecryptionFailed:
                raise NotUnderKey from None
            pos += n
        yield b"".join(pieces), len(data)


def _verify(
    out: int, key: Key, sealer: fmt.Sealer | v2.Sealer, tail: bytes, plain_size: int
) -> None:
    """The copy on disk authenticates as the file `sealer` wrote: it decrypts to what was
    read.  A v1 tag covers every ciphertext byte, which is the plaintext under AES-CTR
    with our nonce; a v2 file's chunks authenticate only under the subkeys of our
    fresh random file id, at their index, the last one as last."""
    if isinstance(sealer, fmt.Sealer):
        size = plain_size + fmt.OVERHEAD
        if os.fstat(out).st_size != size:
            raise fmt.DecryptionFailed("size")
        got = fmt.verify_stream(key.material, pread_stream(out), size)
        if got != sealer.nonce or os.pread(out, fmt.TAG_SIZE, size - fmt.TAG_SIZE) != tail:
            raise fmt.DecryptionFailed("mismatch")
        return
    size = v2.ondisk_size(plain_size, sealer.cipher.chunk_size)
    if os.fstat(out).st_size != size:
        raise fmt.DecryptionFailed("size")
    if v2.verify_stream(key.material, pread_stream(out), size).file_id != sealer.cipher.file_id:
        raise fmt.DecryptionFailed("mismatch")


# ---- the worker processes -------------------------------------------------------------


@dataclass(eq=False)
class _Call:
    """A job handed to a worker: its progress callback, then its outcome."""

    advance: Callable[[int], None]
    done: threading.Event = field(default_factory=threading.Event)
    reply: tuple[str, Any] = ("died", None)


class _Worker:
    """One sealing process, a fresh interpreter (it inherits no descriptor of the run but
    its socket), and the thread reading its replies.  Jobs queue in the socket, so the
    process goes from one to the next without waiting for the run."""

    def __init__(self) -> None:
        self.sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with theirs:
            code = f"import sys; sys.path.insert(0, {PACKAGE_DIR!r}); {WORKER_MAIN}"
            self.proc = subprocess.Popen(
                [sys.executable, "-c", code, str(theirs.fileno())],
                stdin=subprocess.DEVNULL,
                pass_fds=[theirs.fileno()],
            )
        self.calls: deque[_Call] = deque()  # in the order the process takes them
        self.lock = threading.Lock()
        self.alive = True
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def submit(self, job: bytes, fds: list[int], call: _Call) -> None:
        with self.lock:
            if not self.alive:
                raise OSError(errno.EIO, "a sealing process ended")
            self.calls.append(call)
            try:
                socket.send_fds(self.sock, [job], fds)
            except OSError:
                self.calls.pop()
                raise OSError(errno.EIO, "a sealing process ended") from None

    def _read(self) -> None:
        try:
            while True:
                raw = self.sock.recv(MESSAGE_SIZE)
                if not raw:
                    break
                kind, value, read = pickle.loads(raw)
                with self.lock:
                    call = self.calls[0]
                if read:
                    call.advance(read)
                if kind != "read":
                    with self.lock:
                        self.calls.popleft()
                    call.reply = (kind, value)
                    call.done.set()
        except OSError:
            pass
        with self.lock:
            self.alive = False
            left, self.calls = list(self.calls), deque()
        for call in left:
            call.done.set()  # its reply says the process died

    def stop(self) -> None:
        self.sock.shutdown(socket.SHUT_WR)  # the process ends once it has read every job
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.reader.join()
        self.sock.close()


class Workers:
    """`count` sealing processes; `seal` runs `seal_file` in the least busy one, blocking
    the calling thread (a thread per job in flight) until it is done."""

    def __init__(self, count: int) -> None:
        self._lock = threading.Lock()
        self._workers: list[_Worker] = []
        try:
            for _ in range(count):
                self._workers.append(_Worker())
        except BaseException:
            self.close()
            raise

    def _pick(self) -> _Worker:
        """The live worker with the fewest jobs; a dead one is replaced."""
        with self._lock:
            for i, w in enumerate(self._workers):
                if not w.alive:
                    w.stop()
                    self._workers[i] = _Worker()
            return min(self._workers, key=lambda w: len(w.calls))

    def seal(self, fd: int, out: int, job: Seal, advance: Callable[[int], None]) -> os.stat_result:
        """`seal_file` in a worker process."""
        call = _Call(advance)
        self._pick().submit(pickle.dumps(job), [fd, out], call)
        call.done.wait()
        kind, value = call.reply
        if kind == "done":
            return value  # type: ignore[no-any-return]
        raise _rebuild(kind, value)

    def close(self) -> None:
        """Stop every process, once it has done the jobs it was given."""
        with self._lock:
            for w in self._workers:
                w.stop()
            self._workers.clear()


def _rebuild(kind: str, value: Any) -> BaseException:
    """The exception a worker reported."""
    if kind == "retry":
        return Retry(*value)
    if kind == "not_under_key":
        return NotUnderKey()
    if kind == "decryption_failed":
        return fmt.DecryptionFailed(value)
    if kind == "oserror":
        return OSError(*value)
    if kind == "died":
        return OSError(errno.EIO, "a sealing process ended during a job")
    return RuntimeError(f"sealing process failed: {value}")


def _report(exc: BaseException) -> tuple[str, Any]:
    """What a worker tells of an exception (Retry has no pickling of its own)."""
    if isinstance(exc, Retry):
        return "retry", (exc.status, exc.detail)
    if isinstance(exc, NotUnderKey):
        return "not_under_key", None
    if isinstance(exc, fmt.DecryptionFailed):
        return "decryption_failed", str(exc)
    if isinstance(exc, OSError) and exc.errno is not None:
        args = (exc.errno, exc.strerror) if exc.filename is None else (*exc.args, exc.filename)
        return "oserror", args
    return "error", f"{type(exc).__name__}: {exc}"


def serve(sock_fd: int) -> None:
    """A worker's life: jobs from the socket `sock_fd`, one after the other, until it
    closes.  If the run is killed, the next progress report fails and the worker ends."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the run handles ^C, and stops us
    sock = socket.socket(fileno=sock_fd)
    while True:
        try:
            raw, fds, _, _ = socket.recv_fds(sock, MESSAGE_SIZE, 2)
        except ConnectionError:
            return
        if not raw:
            return
        fd, out = fds
        unreported = 0

        def advance(n: int) -> None:
            nonlocal unreported
            unreported += n
            if unreported >= CHUNK:  # a large file: tell as it goes
                sock.send(pickle.dumps(("read", None, unreported)))
                unreported = 0

        try:
            stat_out = seal_file(fd, out, pickle.loads(raw), advance)
            reply: tuple[str, Any] = ("done", stat_out)
        except ConnectionError:
            return
        except Exception as e:
            reply = _report(e)
        finally:
            os.close(fd)
            os.close(out)
        try:
            sock.send(pickle.dumps((*reply, unreported)))
        except ConnectionError:
            return
