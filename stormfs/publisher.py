"""Group commit: new versions of closed files, published in batches.

A close commits a file without waiting for the disk: the new version is
complete in a temporary file, and the mount already serves it, but its name
in SOURCE still holds the previous version.  A publisher thread takes what
has gathered (at most `DELAY` after the first close, or `BATCH` files), syncs
every temporary file of the batch at once (concurrent fsyncs share the
filesystem's journal commits), and only then renames each over its name.  So
a rename still only ever publishes durable bytes, and one disk flush is paid
per batch rather than per file.

Until its rename, a pending version is reached through its place (`find`):
the store serves stat, reads and metadata changes from the temporary file,
and anything that needs the name itself (rename, link, unlink, fsync) first
publishes it (`settle`).  A publish that fails keeps the version pending,
with its error, which the next `settle` of that place (the file's next
close, fsync, or a change of its name) returns after trying again.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from .threads import start_quietly

log = logging.getLogger(__name__)

DELAY = 0.05  # seconds from the first close of a batch to its publish: the bound
BATCH = 256
SYNC_THREADS = 8

Place = tuple[int, int, bytes]  # the directory's (dev, ino), and the name


@dataclass(eq=False)
class Pending:
    """A version waiting for its rename: `fd` is the complete temporary file."""

    place: Place
    dir_fd: int  # owned: a descriptor of the directory the name is in
    name: bytes
    temp_dir_fd: int
    temp_name: bytes
    fd: int  # owned: its own descriptor of the temporary file
    error: OSError | None = None
    done: threading.Event = field(default_factory=threading.Event)
    published: bool = False


class Publisher:
    """The pending versions of one store, and the thread that publishes them."""

    def __init__(self, rename: Callable[[Pending], None], *, delay: float = DELAY) -> None:
        self._rename = rename
        self._delay = delay
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._pending: dict[Place, Pending] = {}
        self._queue: list[Pending] = []
        self._in_flight: set[Place] = set()
        self._stopping = False
        self._sync = ThreadPoolExecutor(SYNC_THREADS, thread_name_prefix="stormfs-sync")
        self._thread = threading.Thread(target=self._loop, name="stormfs-publish", daemon=True)
        start_quietly(self._thread)  # its sync threads inherit its blocked signals

    def __len__(self) -> int:
        return len(self._pending)

    def find(self, place: Place) -> Pending | None:
        return self._pending.get(place)

    def stat(self, place: Place) -> os.stat_result | None:
        """The pending version's stat (its descriptor is closed once it is published)."""
        with self._lock:
            p = self._pending.get(place)
            return os.fstat(p.fd) if p is not None else None

    def reopen(self, place: Place, flags: int) -> int | None:
        """A new descriptor of the pending version, None if there is none."""
        with self._lock:
            p = self._pending.get(place)
            if p is None:
                return None
            return os.open(b"/proc/self/fd/%d" % p.fd, flags | os.O_CLOEXEC)

    def add(self, p: Pending) -> None:
        """Queue `p`; a version still queued at the same place is superseded by it."""
        while True:
            with self._lock:
                old = self._pending.get(p.place)
                if old is None or old.place not in self._in_flight:
                    if old is not None:
                        self._drop(old)
                    self._pending[p.place] = p
                    self._queue.append(p)
                    self._wake.notify()
                    return
                done = old.done  # taken under the lock: a failed publish replaces it
            done.wait()

    def settle(self, place: Place) -> None:
        """Publish the version pending at `place` now, if any; raise its error if that
        fails."""
        while True:
            with self._lock:
                p = self._pending.get(place)
                if p is None:
                    return
                if place in self._in_flight:
                    done: threading.Event | None = p.done
                else:
                    if p in self._queue:
                        self._queue.remove(p)
                    self._in_flight.add(place)
                    done = None
            if done is not None:
                done.wait()
                continue
            self._publish([p])
            if p.error is not None:
                raise p.error

    def settle_dir(self, dev: int, ino: int) -> None:
        """`settle` every version pending in the directory (dev, ino)."""
        for place in [p for p in list(self._pending) if p[:2] == (dev, ino)]:
            self.settle(place)

    def failed(self, place: Place) -> OSError | None:
        p = self._pending.get(place)
        return p.error if p is not None else None

    def forget(self, place: Place) -> Pending | None:
        """Take the version pending at `place` out unpublished (its name is going away);
        the caller owns its temporary file then."""
        while True:
            with self._lock:
                p = self._pending.get(place)
                if p is None or place not in self._in_flight:
                    if p is not None:
                        del self._pending[place]
                        if p in self._queue:
                            self._queue.remove(p)
                        os.close(p.dir_fd)
                        os.close(p.fd)
                    return p
                done = p.done
            done.wait()

    def _drop(self, old: Pending) -> None:
        """A queued version superseded by a newer one (lock held): never published."""
        del self._pending[old.place]
        if old in self._queue:
            self._queue.remove(old)
        os.close(old.dir_fd)
        os.close(old.fd)
        try:
            os.unlink(old.temp_name, dir_fd=old.temp_dir_fd)
        except OSError as e:
            log.warning("superseded temporary file %s not removed: %s", old.temp_name, e)
        old.done.set()

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._queue and not self._stopping:
                    self._wake.wait()
                if not self._queue and self._stopping:
                    return
            with self._lock:
                # Let the batch gather: until the delay is over, the batch is full, or
                # the publisher stops.
                deadline = time.monotonic() + self._delay
                while not self._stopping and len(self._queue) < BATCH:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._wake.wait(left)
                batch, self._queue = self._queue[:BATCH], self._queue[BATCH:]
                self._in_flight.update(p.place for p in batch)
            self._publish(batch)

    def _publish(self, batch: list[Pending]) -> None:
        """Sync every temporary file of the batch together, then rename each."""
        for p in batch:
            p.error = None
        for p, result in zip(batch, self._sync.map(_fsync, [p.fd for p in batch]), strict=True):
            if result is not None:
                p.error = result
        for p in batch:
            if p.error is None:
                try:
                    self._rename(p)
                    p.published = True
                except OSError as e:
                    p.error = e
            if p.error is not None:
                log.error("publishing %s failed: %s", os.fsdecode(p.name), p.error.strerror)
        with self._lock:
            for p in batch:
                self._in_flight.discard(p.place)
                if p.published:
                    del self._pending[p.place]
                    os.close(p.dir_fd)
                    os.close(p.fd)
                p.done.set()
                if not p.published:  # kept, with its error, for the next settle
                    p.done = threading.Event()

    def flush(self) -> list[Pending]:
        """Publish everything pending (at shutdown); returns what could not be."""
        for place in list(self._pending):
            with contextlib.suppress(OSError):  # logged; the caller reports what is left
                self.settle(place)
        return list(self._pending.values())

    def close(self) -> None:
        with self._lock:
            self._stopping = True
            self._wake.notify()
        self._thread.join()
        self._sync.shutdown()


def _fsync(fd: int) -> OSError | None:
    try:
        os.fsync(fd)
    except OSError as e:
        return e
    return None
