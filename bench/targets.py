"""The filesystems under test: set up a fresh one, hand out its path and daemon,
and always take it down again."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

MOUNT_TIMEOUT = 30.0
EXIT_TIMEOUT = 30.0


class Unavailable(Exception):
    """The target cannot run here (missing program, refused to mount): reported as n/a."""


@dataclass
class Mounted:
    path: Path
    proc: subprocess.Popen[bytes] | None = None  # the FUSE daemon, None for the raw directory

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def alive(self) -> bool:
        return self.proc is None or self.proc.poll() is None


def mounts_under(root: Path) -> list[Path]:
    """Mount points at or below `root`, from /proc/self/mounts (sees dead FUSE mounts too)."""
    found = []
    prefix = str(root.resolve())
    for line in Path("/proc/self/mounts").read_bytes().splitlines():
        point = os.fsdecode(
            re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m[1], 8)]), line.split()[1])
        )
        if point == prefix or point.startswith(prefix + "/"):
            found.append(Path(point))
    return found


def unmount(mnt: Path) -> None:
    if subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True).returncode:
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)


def set_readahead(mnt: Path, kib: int) -> None:
    """The kernel's readahead for a FUSE mount, through its backing-device entry."""
    dev = os.stat(mnt).st_dev
    Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb").write_text(str(kib))


def _stop(proc: subprocess.Popen[bytes]) -> None:
    try:
        proc.wait(timeout=EXIT_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _tail(log: Path) -> str:
    lines = log.read_text(errors="replace").strip().splitlines() if log.exists() else []
    return " | ".join(lines[-3:]) or "no output"


class Target:
    """The raw SOURCE directory; subclasses put a FUSE daemon in front of it."""

    name = "raw"

    @contextmanager
    def mounted(self, workdir: Path, log: Path) -> Iterator[Mounted]:
        src = workdir / "src"
        src.mkdir(parents=True)
        yield Mounted(src)


class FuseTarget(Target):
    program = ""
    # Readahead the benchmark sets on the mount (None: the daemon's own choice).
    readahead_kb: int | None = None

    def prepare(self, workdir: Path, src: Path, log: Path) -> None:
        """One-time set-up of a fresh SOURCE before mounting."""

    def command(self, workdir: Path, src: Path, mnt: Path) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        return dict(os.environ)

    @contextmanager
    def mounted(self, workdir: Path, log: Path) -> Iterator[Mounted]:
        if not shutil.which(self.program) and not Path(self.program).is_file():
            raise Unavailable(f"{self.program} not found")
        src, mnt = workdir / "src", workdir / "mnt"
        src.mkdir(parents=True)
        mnt.mkdir()
        self.prepare(workdir, src, log)
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                self.command(workdir, src, mnt),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.env(),
                start_new_session=True,  # a Ctrl-C reaches us, not the daemon: we unmount first
            )
        ready = False
        try:
            deadline = time.monotonic() + MOUNT_TIMEOUT
            while not os.path.ismount(mnt):
                if proc.poll() is not None:
                    raise Unavailable(f"exited with status {proc.returncode}: {_tail(log)}")
                if time.monotonic() > deadline:
                    raise Unavailable(f"not mounted after {MOUNT_TIMEOUT:.0f} s: {_tail(log)}")
                time.sleep(0.05)
            ready = True
            if self.readahead_kb is not None:
                set_readahead(mnt, self.readahead_kb)
            yield Mounted(mnt, proc)
        finally:
            if mounts_under(mnt):
                unmount(mnt)
            if not ready:
                proc.terminate()
            _stop(proc)


class Passthrough(FuseTarget):
    name = "passthrough"
    readahead_kb = 1024  # what stormfs sets on its own mounts

    def __init__(self, python: str) -> None:
        self.program = python

    def command(self, workdir: Path, src: Path, mnt: Path) -> list[str]:
        script = Path(__file__).with_name("passthrough.py")
        return [self.program, str(script), str(src), str(mnt)]


class Gocryptfs(FuseTarget):
    """gocryptfs with its defaults (AES-256-GCM, encrypted names), password from a file."""

    name = "gocryptfs"
    program = "gocryptfs"

    def prepare(self, workdir: Path, src: Path, log: Path) -> None:
        passfile = workdir / "passfile"
        passfile.write_text("stormfs-bench\n")
        with open(log, "ab") as out:
            rc = subprocess.run(
                [self.program, "-init", "-q", "-passfile", str(passfile), str(src)],
                stdout=out,
                stderr=subprocess.STDOUT,
            ).returncode
        if rc:
            raise Unavailable(f"gocryptfs -init failed: {_tail(log)}")

    def command(self, workdir: Path, src: Path, mnt: Path) -> list[str]:
        passfile = str(workdir / "passfile")
        return [self.program, "-fg", "-q", "-passfile", passfile, str(src), str(mnt)]


class Stormfs(FuseTarget):
    """stormfs with its defaults (v1), or with extra mount options under another name."""

    name = "stormfs"

    def __init__(
        self, program: str, key: str, *, name: str = "stormfs", options: tuple[str, ...] = ()
    ) -> None:
        self.program = program
        self.name = name
        self._key = key
        self._options = options

    def command(self, workdir: Path, src: Path, mnt: Path) -> list[str]:
        return [self.program, "mount", "--foreground", *self._options, str(src), str(mnt)]

    def env(self) -> dict[str, str]:
        return {**os.environ, "STORMCLOUD_ENCRYPTION_KEY": self._key}
