"""The kill -9 loops: `crash_loop`, shared by the fault tests over each kind of
SOURCE (a writer commits versions of a few files while the daemon is killed at
random moments; after each remount every file is one of its committed
versions, nothing else), and `kill_runs`, which kills `stormfs encrypt` runs
while they seal files.

A crash_loop run prints its seed; rerun a failure with STORMFS_CRASH_SEED=<seed>.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

from stormfs import redo

from .helpers import Mount, MountFactory

SIZES = (0, 1, 17, 4096, 10_000, 65_536, 300_000, 1_200_000)
# Errors a writer sees once its daemon is gone.
DEAD_MOUNT = (errno.ENOTCONN, errno.ECONNABORTED)


def digest(data: bytes | None) -> str:
    return "absent" if data is None else hashlib.sha256(data).hexdigest()[:16] + f"/{len(data)}"


class Versions:
    """Per name: the last acknowledged content and every content attempted since.

    After a crash a name may hold any of these, and nothing else (None: absent).
    """

    def __init__(self) -> None:
        self.acked: dict[str, bytes | None] = {}
        self.pending: dict[str, list[bytes | None]] = {}

    def begin(self, name: str, content: bytes | None) -> None:
        self.pending.setdefault(name, []).append(content)

    def ack(self, name: str, content: bytes | None) -> None:
        self.acked[name] = content
        self.pending[name] = []

    def current(self, name: str) -> bytes | None:
        return self.acked.get(name)

    def allowed(self, name: str) -> list[bytes | None]:
        return [self.acked.get(name), *self.pending.get(name, [])]

    def names(self) -> set[str]:
        return set(self.acked) | set(self.pending)


class Writer(threading.Thread):
    """A stream of writes and commits through the mount, recorded in a `Versions` model.

    Runs until the daemon dies under it; an error before `killed` is set is a failure.
    """

    LINKED = ("linked", "linked.2")

    def __init__(self, mnt: Path, versions: Versions, rng: random.Random) -> None:
        super().__init__(daemon=True)
        self.mnt = mnt
        self.v = versions
        self.rng = rng
        self.killed = threading.Event()
        self.error: BaseException | None = None
        self.ops = 0
        self.created = sum(1 for n in versions.names() if n.startswith("new-"))

    def run(self) -> None:
        ops = [self.rewrite, self.patch, self.append, self.truncate, self.linked]
        ops += [self.atomic_save, self.synced, self.create, self.remove]
        try:
            while True:
                self.rng.choice(ops)()
                self.ops += 1
        except OSError as e:
            if not (self.killed.is_set() and e.errno in DEAD_MOUNT):
                self.error = e
        except BaseException as e:
            self.error = e

    # ---- helpers -------------------------------------------------------------

    def data(self) -> bytes:
        n = self.rng.choice(SIZES)
        return self.rng.randbytes(self.rng.randint(n // 2, n) if n else 0)

    def _write_all(self, fd: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view[: 256 << 10]) :]

    # ---- operations: each has exactly one commit point, or says where its others are --

    def rewrite(self, name: str = "rewrite") -> None:
        new = self.data()
        fd = os.open(self.mnt / name, os.O_WRONLY | os.O_TRUNC)
        self.v.begin(name, new)
        try:
            self._write_all(fd, new)
        finally:
            os.close(fd)
        self.v.ack(name, new)

    def patch(self, name: str = "patch", path: str | None = None) -> None:
        old = self.v.current(name)
        assert old is not None
        off = self.rng.randint(0, len(old))
        data = self.rng.randbytes(self.rng.randint(1, 70_000))
        new = old[:off] + data + old[off + len(data) :]
        fd = os.open(self.mnt / (path or name), os.O_WRONLY)
        self.v.begin(name, new)
        try:
            os.pwrite(fd, data, off)
        finally:
            os.close(fd)
        self.v.ack(name, new)

    def append(self) -> None:
        old = self.v.current("append")
        assert old is not None
        data = self.rng.randbytes(self.rng.randint(1, 100_000))
        fd = os.open(self.mnt / "append", os.O_WRONLY | os.O_APPEND)
        self.v.begin("append", old + data)
        try:
            self._write_all(fd, data)
        finally:
            os.close(fd)
        self.v.ack("append", old + data)

    def truncate(self) -> None:
        old = self.v.current("truncate")
        assert old is not None
        size = self.rng.randint(0, max(2 * len(old), 4096))
        new = old[:size] + bytes(max(0, size - len(old)))
        self.v.begin("truncate", new)
        os.truncate(self.mnt / "truncate", size)  # truncate(path) commits at once
        self.v.ack("truncate", new)

    def linked(self) -> None:
        """A file with two hard links: commits rewrite it in place under a redo record."""
        path = self.rng.choice(self.LINKED)
        if self.rng.random() < 0.5:
            self.patch("linked", path)
            return
        new = self.data()
        fd = os.open(self.mnt / path, os.O_WRONLY | os.O_TRUNC)
        self.v.begin("linked", new)
        try:
            self._write_all(fd, new)
        finally:
            os.close(fd)
        self.v.ack("linked", new)

    def atomic_save(self) -> None:
        """An application's own safe save: write a temporary name, rename it over."""
        if self.v.current("saved.tmp") is not None:  # left by a crash
            self.v.begin("saved.tmp", None)
            os.unlink(self.mnt / "saved.tmp")
            self.v.ack("saved.tmp", None)
        new = self.data()
        self.v.begin("saved.tmp", b"")
        self.v.begin("saved.tmp", new)
        fd = os.open(self.mnt / "saved.tmp", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            self._write_all(fd, new)
        finally:
            os.close(fd)
        self.v.ack("saved.tmp", new)
        self.v.begin("saved", new)
        self.v.begin("saved.tmp", None)
        os.rename(self.mnt / "saved.tmp", self.mnt / "saved")
        self.v.ack("saved", new)
        self.v.ack("saved.tmp", None)

    def synced(self) -> None:
        """Two commit points: fsync in the middle, close at the end."""
        first, second = self.data(), self.data()
        fd = os.open(self.mnt / "synced", os.O_WRONLY | os.O_TRUNC)
        try:
            self.v.begin("synced", first)
            self._write_all(fd, first)
            os.fsync(fd)
            self.v.ack("synced", first)
            self.v.begin("synced", first + second)
            self._write_all(fd, second)
        finally:
            os.close(fd)
        self.v.ack("synced", first + second)

    def create(self) -> None:
        if self.created >= 12:
            return
        name = f"new-{self.created}"
        self.created += 1
        new = self.data()
        self.v.begin(name, b"")  # create() makes the (empty) backing file at once
        self.v.begin(name, new)
        fd = os.open(self.mnt / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        try:
            self._write_all(fd, new)
        finally:
            os.close(fd)
        self.v.ack(name, new)

    def remove(self) -> None:
        present = sorted(n for n in self.v.names() if n.startswith("new-") and self.v.current(n))
        if not present:
            return
        name = self.rng.choice(present)
        self.v.begin(name, None)
        os.unlink(self.mnt / name)
        self.v.ack(name, None)


def read_view(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def check_view(m: Mount, v: Versions, context: str) -> dict[str, int]:
    """Every name holds one of its allowed versions; settle the model on what it holds."""
    outcome = {"previous": 0, "newer": 0}
    for name in sorted(v.names()):
        actual = read_view(m.mnt / name)
        allowed = v.allowed(name)
        assert actual in allowed, (
            f"{context}: {name} holds {digest(actual)}, "
            f"allowed {[digest(a) for a in allowed]} (last acknowledged first)"
        )
        outcome["previous" if actual == allowed[0] else "newer"] += 1
        v.ack(name, actual)
    assert read_view(m.mnt / "linked.2") == v.current("linked"), context
    st1, st2 = os.stat(m.mnt / "linked"), os.stat(m.mnt / "linked.2")
    assert st1.st_ino == st2.st_ino and st1.st_nlink == 2, context
    expected = {n for n in v.names() if v.current(n) is not None} | {"linked.2"}
    assert set(os.listdir(m.mnt)) == expected, context
    hidden = [n for n in os.listdir(m.source) if n.startswith(".stormfs") and n != ".stormfs"]
    assert not hidden, f"{context}: temporary files left in SOURCE: {hidden}"
    return outcome


def crash_loop(
    mount_factory: MountFactory,
    tmp_path: Path,
    rounds: int,
    source: Path | None = None,
    args: tuple[str, ...] = (),
) -> dict[str, int]:
    """kill -9 the daemon `rounds` times at random moments while a writer commits;
    after each remount every file is one of its committed versions, nothing else.
    `args`: the mount's options."""
    seed = int(os.environ.get("STORMFS_CRASH_SEED", random.randrange(1 << 32)))
    print(f"crash seed {seed} (rerun with STORMFS_CRASH_SEED={seed})")
    rng = random.Random(seed)
    source, mnt = source or tmp_path / "src", tmp_path / "mnt"
    v = Versions()
    m = mount_factory(source, mnt, args=args)
    for name in ("rewrite", "patch", "append", "truncate", "linked", "saved", "synced"):
        data = rng.randbytes(rng.choice(SIZES))
        (m.mnt / name).write_bytes(data)
        v.ack(name, data)
    os.link(m.mnt / "linked", m.mnt / "linked.2")
    figures = {
        "kills": 0,
        "temps": 0,
        "redo": 0,
        "chunk records": 0,
        "previous": 0,
        "newer": 0,
        "ops": 0,
    }
    for round_ in range(rounds):
        context = f"seed {seed} round {round_}"
        writer = Writer(m.mnt, v, random.Random(rng.randrange(1 << 32)))
        writer.start()
        time.sleep(rng.uniform(0.0, 0.3))
        writer.killed.set()
        m.proc.send_signal(signal.SIGKILL)
        m.proc.wait(10)
        writer.join(30)
        assert not writer.is_alive(), f"{context}: writer stuck on a dead mount"
        assert writer.error is None, f"{context}: writer failed before the kill: {writer.error!r}"
        m.stop()  # clears the dead mount; the daemon is gone already
        figures["kills"] += 1
        figures["ops"] += writer.ops
        for inst in (source / ".stormfs" / "tmp").iterdir():
            names = os.listdir(inst) if not inst.name.endswith(".gone") else []
            figures["temps"] += sum(n.startswith("t-") for n in names)
            figures["redo"] += sum(n.startswith("redo-") for n in names)
            figures["chunk records"] += sum(
                n.startswith("chunks-") and (inst / n).read_bytes()[:8] == redo.MAGIC for n in names
            )
        m = mount_factory(source, mnt, args=args)
        live = m.instance_dirs()
        assert len(live) == 1 and f".{m.pid}." in live[0], f"{context}: leftovers {live}"
        outcome = check_view(m, v, context)
        figures["previous"] += outcome["previous"]
        figures["newer"] += outcome["newer"]
    print("crash figures:", json.dumps(figures))
    return figures


def encrypt_temps(root: Path) -> set[Path]:
    """The sealed copies of `stormfs encrypt` (and rotate) under root, not yet swapped in."""
    return set(root.rglob(".stormfs-tmp-enc-*"))


def kill_runs(
    cmd: list[str],
    env: dict[str, str],
    src: Path,
    rng: random.Random,
    kills: int,
    check: Callable[[], None],
) -> int:
    """Start `cmd` (a run that seals files of `src`) `kills` times, kill -9 it at a random
    moment while it is sealing, and `check()` the tree after each; how many runs died
    by the kill rather than finishing first."""
    killed = 0
    for _ in range(kills):
        stale = encrypt_temps(src)
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            # Strike while this run seals files, at a random point of its work.
            deadline = time.monotonic() + 30
            while proc.poll() is None and time.monotonic() < deadline:
                if encrypt_temps(src) - stale:
                    break
                time.sleep(0.002)
            # Within a few tens of ms: later runs have little left to do, and a run that
            # finishes before the kill tests nothing.
            time.sleep(rng.uniform(0, 0.03))
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                killed += 1
        finally:
            proc.kill()
            proc.wait(30)
        check()
    return killed
