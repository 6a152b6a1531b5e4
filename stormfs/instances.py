"""Instance directories: each daemon's own corner of ``SOURCE/.stormfs/tmp/``, and how
a daemon tells a dead owner's directory from a live one's.

An instance directory ``<host>.<pid>.<random>/`` holds ``lock``, on which its daemon
holds an exclusive ``flock`` for as long as it runs, and ``lease``, a small JSON
record (host, PID, the process's start time, boot id, PID namespace, and the wall
clock time it was last renewed) that the daemon rewrites every `LEASE_INTERVAL`
seconds.

A free lock is not proof that its owner is dead: a GlusterFS volume restart drops
every lock while the daemons holding them keep serving.  So another daemon's
directory is taken over only when its lock is free **and**

- on the same machine (same boot id and PID namespace): its PID is gone, or now
  belongs to another process (a different start time);
- otherwise: its lease was last renewed more than `LEASE_EXPIRY` seconds ago
  (the servers' clocks must agree to well within that: NTP).

A directory with no ``lock`` at all has no owner (an owner never removes its lock),
except briefly while a daemon creates it (``.starting``).

Taking over renames the directory ``<name>.gone`` (one daemon wins), after which
nothing in it is anyone's: it is emptied and removed, now or at a later start.  No
step depends on that removal succeeding: on NFS and libfuse high-level filesystems
a file unlinked while some process holds it open lives on as ``.nfs*`` or
``.fuse_hidden*`` until it is closed, and its directory cannot be removed
meanwhile.  Such a leftover is logged once and retried at later starts.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
from dataclasses import asdict, dataclass

from .source import lock, open_lock, write_atomically
from .threads import start_quietly

log = logging.getLogger(__name__)

LOCK = b"lock"
LEASE = b"lease"
# A directory's name while its daemon is starting, and how long a daemon may take
# from creating it to locking it.
STARTING = b".starting"
STARTING_GRACE = 60.0
# A directory taken over from a dead owner (or left by its own owner at exit).
GONE = b".gone"
# The lease is rewritten this often, and counts as expired this long after.
LEASE_INTERVAL = 10.0
LEASE_EXPIRY = 60.0
# In an instance directory whose daemon must be the only one serving SOURCE
# (-o exclusive, -o writeback_cache): those options, comma-separated.
SOLE = b"sole"
# Names NFS and libfuse give a file unlinked while it is open.
SILLY_PREFIXES = (b".nfs", b".fuse_hidden")


def _read_text(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def boot_id() -> str:
    return _read_text("/proc/sys/kernel/random/boot_id")


def pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def start_time(pid: int) -> int | None:
    """When process `pid` started (clock ticks since boot); None if there is none."""
    stat = _read_text(f"/proc/{pid}/stat")
    if not stat:
        return None
    # The command name (field 2) may hold spaces and parentheses: count from its end.
    return int(stat.rsplit(")", 1)[1].split()[19])


@dataclass(frozen=True)
class Lease:
    host: str
    pid: int
    start: int
    boot_id: str
    pid_ns: str
    renewed: float

    @classmethod
    def mine(cls) -> Lease:
        pid = os.getpid()
        return cls(
            socket.gethostname(), pid, start_time(pid) or 0, boot_id(), pid_namespace(), time.time()
        )

    def encode(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def read(cls, directory: bytes) -> Lease | None:
        """The lease recorded in an instance directory; None if missing or unreadable."""
        try:
            with open(os.path.join(directory, LEASE), "rb") as f:
                return cls(**json.loads(f.read()))
        except (OSError, ValueError, TypeError):
            return None

    def same_machine(self) -> bool:
        return self.boot_id == boot_id() and self.pid_ns == pid_namespace() != ""

    def owner_gone(self, now: float) -> bool:
        """Whether the daemon that held this lease is proven gone (its lock being free)."""
        if self.same_machine() and self.start:
            return start_time(self.pid) != self.start
        return now - self.renewed > LEASE_EXPIRY


def owner_gone(directory: bytes, now: float) -> bool:
    """Whether the owner of an instance directory whose lock is free is gone."""
    lease = Lease.read(directory)
    if lease is not None:
        return lease.owner_gone(now)
    # No readable lease (made by an older stormfs, or torn): unchanged for the expiry.
    try:
        return now - os.stat(directory).st_mtime > LEASE_EXPIRY
    except FileNotFoundError:
        return False


class Renewal:
    """Rewrites the lease of an instance directory every `LEASE_INTERVAL` seconds."""

    def __init__(self, dir_fd: int) -> None:
        self._dir_fd = dir_fd
        self._stop = threading.Event()
        self._failing = False
        self.renew()
        self._thread = threading.Thread(target=self._run, name="lease", daemon=True)

    def start(self) -> None:
        start_quietly(self._thread)

    def renew(self) -> None:
        write_atomically(self._dir_fd, LEASE, Lease.mine().encode(), durable=False)

    def _run(self) -> None:
        while not self._stop.wait(LEASE_INTERVAL):
            try:
                self.renew()
            except OSError as e:
                if not self._failing:
                    log.warning("cannot renew this daemon's lease in SOURCE: %s", e.strerror)
                self._failing = True
            else:
                if self._failing:
                    log.info("lease renewed again")
                self._failing = False

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


def live_instances(tmp_parent: bytes, mine: bytes) -> dict[bytes, str | None]:
    """Other daemons' instance directories in `tmp_parent` that are or may be in use
    (a daemon starting, a lock held, or a free lock whose owner is not proven gone),
    each with what its `SOLE` file says (None: it may share SOURCE)."""
    live: dict[bytes, str | None] = {}
    now = time.time()
    for entry in os.scandir(tmp_parent):
        name = os.fsencode(entry.name)
        if entry.path == mine or name.endswith(GONE) or not entry.is_dir(follow_symlinks=False):
            continue
        if _in_use(entry.path, name, now):
            try:
                with open(os.path.join(entry.path, SOLE), "rb") as f:
                    live[name] = f.read().decode(errors="replace")
            except FileNotFoundError:
                live[name] = None
    return live


def _in_use(path: bytes, name: bytes, now: float) -> bool:
    try:
        fd = open_lock(os.path.join(path, LOCK), create=False)
    except FileNotFoundError:
        # No lock: no owner, unless a daemon is between its mkdir and its lock.
        try:
            return name.endswith(STARTING) and now - os.stat(path).st_mtime < STARTING_GRACE
        except FileNotFoundError:
            return False
    try:
        lock(fd, wait=False)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return not owner_gone(path, now)


def remove_leftover(path: bytes) -> list[bytes]:
    """Empty and remove a taken-over directory as far as can be; the names left."""
    left: list[bytes] = []
    try:
        with os.scandir(path) as entries:
            names = [(e.name, e.is_dir(follow_symlinks=False)) for e in entries]
    except FileNotFoundError:
        return []
    except OSError:
        return [b"."]
    for name, is_dir in names:
        try:
            if is_dir:
                left += [os.path.join(name, n) for n in remove_leftover(os.path.join(path, name))]
            else:
                os.unlink(os.path.join(path, name))
        except FileNotFoundError:
            continue
        except OSError:
            left.append(name)
    try:
        os.rmdir(path)
    except FileNotFoundError:
        return []
    except OSError:
        # A file unlinked while still open lives on under a silly name until closed.
        with contextlib.suppress(OSError):
            left = os.listdir(path)
        return left or [b"."]
    return left


def is_silly(name: bytes) -> bool:
    return os.path.basename(name).startswith(SILLY_PREFIXES)
