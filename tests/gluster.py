"""A real GlusterFS volume on this machine, as SOURCE for tests.

glusterd is started by hand with a working directory of its own, listening on
127.0.0.1 only; a replica-2 volume gets two bricks under the test's directory and is
mounted by the FUSE client (``glusterfs``).  Nothing is installed here: `make
install` brings glusterfs-server and glusterfs-client.  Every process started
(glusterd, the bricks, the self-heal daemon, the clients) is stopped by its PID at
teardown, even after a failure.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from .helpers import is_mounted, wait_for

GLUSTERD_VOL = Path("/etc/glusterfs/glusterd.vol")
GLUSTERD_LIB = Path("/var/lib/glusterd")
RUN = Path("/var/run/gluster")
PORT = 24007
TIMEOUT = 120


def unavailable() -> str | None:
    """Why a volume cannot be made here (None: it can)."""
    if os.geteuid() != 0:
        return "GlusterFS volumes need root"
    missing = [t for t in ("glusterd", "gluster", "glusterfs") if shutil.which(t) is None]
    if missing or not GLUSTERD_VOL.exists():
        return "GlusterFS is not installed (make install adds glusterfs-server, glusterfs-client)"
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse"
    host = socket.gethostname()
    try:
        address = socket.gethostbyname(host)
    except OSError:
        address = ""
    if address != "127.0.0.1":
        return f"the host name {host} must resolve to 127.0.0.1 (/etc/hosts) for a local volume"
    with socket.socket() as s:
        if s.connect_ex(("127.0.0.1", PORT)) == 0:
            return f"another glusterd listens on 127.0.0.1:{PORT}"
    return None


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _pid_in(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


@dataclass
class Volume:
    name: str
    scratch: Path
    host: str = field(default_factory=socket.gethostname)
    pids: set[int] = field(default_factory=set)
    clients: dict[Path, int] = field(default_factory=dict)

    def gluster(self, *args: str) -> str:
        done = subprocess.run(
            ["gluster", "--mode=script", *args], capture_output=True, text=True, timeout=TIMEOUT
        )
        if done.returncode != 0:
            raise AssertionError(f"gluster {' '.join(args)}: {done.stdout}{done.stderr}")
        return done.stdout

    def start_glusterd(self) -> None:
        wd = self.scratch / "wd"
        wd.mkdir()
        for sub in ("hooks", "groups"):
            if (GLUSTERD_LIB / sub).exists():
                shutil.copytree(GLUSTERD_LIB / sub, wd / sub, symlinks=True)
        conf = GLUSTERD_VOL.read_text()
        conf = re.sub(
            r"option working-directory \S+",
            f"option working-directory {wd}\n"
            "    option transport.socket.bind-address 127.0.0.1\n"
            "    option transport.address-family inet",
            conf,
        )
        (self.scratch / "glusterd.vol").write_text(conf)
        pidfile = self.scratch / "glusterd.pid"
        subprocess.run(
            [
                "glusterd",
                "-f",
                str(self.scratch / "glusterd.vol"),
                f"--pid-file={pidfile}",
                f"--log-file={self.scratch / 'glusterd.log'}",
            ],
            check=True,
            timeout=TIMEOUT,
        )
        wait_for(lambda: _pid_in(pidfile) is not None, 30)
        self.pids.add(_pid_in(pidfile) or 0)
        wait_for(self._answers, 30)

    def _answers(self) -> bool:
        done = subprocess.run(
            ["gluster", "--mode=script", "volume", "list"], capture_output=True, timeout=TIMEOUT
        )
        return done.returncode == 0

    def create(self) -> None:
        bricks = [self.scratch / "brick1", self.scratch / "brick2"]
        for b in bricks:
            b.mkdir()
        self.gluster(
            "volume", "create", self.name, "replica", "2", *(f"{self.host}:{b}" for b in bricks),
            "force",
        )  # fmt: skip
        self.start()

    def server_pids(self) -> set[int]:
        """The bricks' and the self-heal daemon's PIDs, from their PID files."""
        files = [
            *(RUN / "vols" / self.name).glob("*.pid"),
            *(RUN / "shd" / self.name).glob("*.pid"),
        ]
        return {p for p in map(_pid_in, files) if p}

    def start(self) -> None:
        self.gluster("volume", "start", self.name)
        wait_for(lambda: len(self.server_pids()) >= 2, 30)
        self.pids |= self.server_pids()

    def stop(self) -> None:
        self.gluster("volume", "stop", self.name)

    def restart(self) -> None:
        """Stop and start the whole volume (it drops every lock its clients held)."""
        self.stop()
        self.start()

    def mount(self, path: Path) -> Path:
        """Mount the volume at `path` with the FUSE client."""
        path.mkdir(exist_ok=True)
        pidfile = self.scratch / f"client-{len(self.clients)}.pid"
        subprocess.run(
            [
                "glusterfs",
                "--volfile-server=127.0.0.1",
                f"--volfile-id={self.name}",
                f"--log-file={self.scratch / f'client-{len(self.clients)}.log'}",
                f"--pid-file={pidfile}",
                str(path),
            ],
            check=True,
            timeout=TIMEOUT,
        )
        wait_for(lambda: _pid_in(pidfile) is not None and is_mounted(path), 30)
        pid = _pid_in(pidfile) or 0
        self.pids.add(pid)
        self.clients[path] = pid
        wait_for(lambda: _statvfs_ok(path), 30)
        return path

    def close(self) -> None:
        """Unmount every client, stop the volume, stop every process started, by PID."""
        for path in self.clients:
            if is_mounted(path):
                done = subprocess.run(["umount", str(path)], capture_output=True, timeout=60)
                if done.returncode != 0:
                    subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=60)
        if any(_alive(p) for p in self.pids):
            with contextlib.suppress(AssertionError, subprocess.TimeoutExpired):
                self.stop()
                self.gluster("volume", "delete", self.name)
        self.pids |= self.server_pids()
        for sig, wait in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 10.0)):
            for pid in self.pids:
                if _alive(pid):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, sig)
            deadline = time.monotonic() + wait
            while any(_alive(p) for p in self.pids) and time.monotonic() < deadline:
                time.sleep(0.1)
        left = [p for p in self.pids if _alive(p)]
        assert not left, f"GlusterFS processes still running: {left}"


def _statvfs_ok(path: Path) -> bool:
    try:
        os.statvfs(path)
    except OSError:
        return False
    return True
