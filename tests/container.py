"""A Debian 12 container with systemd booted as its PID 1, for tests/test_systemd.py.

The root filesystem is made once by debootstrap from the mirror that this
machine's own apt sources name, and kept in CACHE between runs (rebuilt when
INCLUDE changes).  Each run boots a copy of it with systemd-nspawn, on a private
network (loopback only), with /dev/fuse bound in.  Commands run in the
container's namespaces through nsenter, in the system's mount namespace, as an
administrator's shell would.  Every container is stopped by PID in `close()`,
whatever happened: poweroff, then SIGKILL of its PID 1 and of nspawn.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path

CACHE = Path("/var/cache/stormfs-test")
SUITE = "bookworm"
# What the container needs: systemd as PID 1 and its bus, FUSE, the Python
# that `make deploy` installs stormfs with, make for `make deploy` itself.
INCLUDE = ("systemd", "systemd-sysv", "dbus", "fuse3", "python3", "python3-venv", "make")
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Where the stormfs checkout and the wheels it installs from go in the container.
SRC = "/root/stormfs"
WHEELS = "/var/lib/stormfs-wheels"
BOOT_TIMEOUT = 180.0
STOP_TIMEOUT = 60.0


class CannotBoot(Exception):
    """This machine cannot boot a container (the one reason to skip)."""


def apt_mirror(suite: str = SUITE) -> str:
    """The Debian mirror this machine's apt sources name for `suite` (deb822
    .sources files or one-line .list files), read each time, never stored."""
    fallback = None
    for path in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
        for stanza in Path(path).read_text().split("\n\n"):
            fields: dict[str, list[str]] = {}
            for line in stanza.splitlines():
                name, sep, value = line.partition(":")
                if sep and not line.startswith(("#", " ")):
                    fields[name.strip().lower()] = value.split()
            if "deb" not in fields.get("types", []) or not fields.get("uris"):
                continue
            if suite in fields.get("suites", []):
                return fields["uris"][0]
            if fields["uris"][0].rstrip("/").endswith("/debian"):
                fallback = fallback or fields["uris"][0]
    for path in ["/etc/apt/sources.list", *sorted(glob.glob("/etc/apt/sources.list.d/*.list"))]:
        with contextlib.suppress(OSError):
            for line in Path(path).read_text().splitlines():
                words = re.sub(r"\[[^]]*\]", "", line).split()
                if len(words) >= 3 and words[0] == "deb":
                    if words[2] == suite:
                        return words[1]
                    if words[1].rstrip("/").endswith("/debian"):
                        fallback = fallback or words[1]
    if fallback is None:
        raise CannotBoot(f"no Debian mirror in this machine's apt sources to debootstrap {suite}")
    return fallback


def rootfs() -> Path:
    """The cached root filesystem, made now if missing or if INCLUDE changed."""
    for tool in ("debootstrap", "systemd-nspawn", "nsenter"):
        if shutil.which(tool) is None:
            raise CannotBoot(f"{tool} is not installed (make install installs it)")
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        raise CannotBoot("needs root and /dev/fuse")
    tag = hashlib.sha256(f"{SUITE} minbase {','.join(INCLUDE)}".encode()).hexdigest()[:12]
    done = CACHE / f"rootfs-{tag}"
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build at a time; others wait for it
        if done.exists():
            return done
        work = CACHE / f"build-{tag}-{os.getpid()}"
        log = CACHE / f"build-{tag}.log"
        try:
            with open(log, "w") as out:
                proc = subprocess.run(
                    [
                        "debootstrap",
                        "--variant=minbase",
                        f"--include={','.join(INCLUDE)}",
                        SUITE,
                        str(work),
                        apt_mirror(),
                    ],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    timeout=900,
                )
            if proc.returncode != 0:
                tail = "".join(log.read_text(errors="replace").splitlines(True)[-15:])
                raise CannotBoot(f"debootstrap failed ({proc.returncode}):\n{tail}")
            # The container's own apt lists are not needed: nothing is installed later.
            shutil.rmtree(work / "var/cache/apt/archives", ignore_errors=True)
            os.rename(work, done)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        for old in CACHE.glob("rootfs-*"):
            if old != done:
                shutil.rmtree(old, ignore_errors=True)
        return done


def build_wheels(repo: Path, into: Path) -> None:
    """Wheels of stormfs' dependencies and its build backend, built on this
    host: the container installs from them alone (pip --no-index)."""
    meta = tomllib.loads((repo / "pyproject.toml").read_text())
    reqs = [*meta["project"]["dependencies"], *meta["build-system"]["requires"], "wheel"]
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--wheel-dir", str(into), *reqs],
        check=True,
        stdin=subprocess.DEVNULL,
        timeout=900,
    )


def copy_checkout(repo: Path, into: Path) -> None:
    """The files of this checkout that git knows (tracked or not ignored)."""
    listed = subprocess.run(
        ["git", "-C", str(repo), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        check=True,
        capture_output=True,
        timeout=60,
    ).stdout
    for name in filter(None, listed.decode().split("\0")):
        src = repo / name
        if src.is_file():
            dst = into / name
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)


class Container:
    """One booted container; `run` executes a command in its namespaces."""

    def __init__(self, base: Path, work: Path, wheels: Path, name: str) -> None:
        self.root = work / "root"
        self.log = work / "nspawn.log"
        self.name = name
        self.wheels = wheels
        subprocess.run(["cp", "-a", "--reflink=auto", str(base), str(self.root)], check=True)
        self.nspawn: subprocess.Popen[bytes] | None = None
        self.leader: int | None = None
        self._boot()

    def _boot(self) -> None:
        self.leader = None
        with open(self.log, "ab") as log:
            self.nspawn = subprocess.Popen(
                [
                    "systemd-nspawn",
                    f"--directory={self.root}",
                    f"--machine={self.name}",
                    "--boot",
                    # No system bus on this host to register with or to ask for a scope.
                    "--register=no",
                    "--keep-unit",
                    "--private-network",
                    "--bind=/dev/fuse",
                    f"--bind-ro={self.wheels}:{WHEELS}",
                    "--console=passive",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def nspawn_log(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def wait_booted(self) -> str:
        """PID 1 found and `systemctl is-system-running --wait` done: its answer."""
        assert self.nspawn is not None
        deadline = time.monotonic() + BOOT_TIMEOUT
        while self.leader is None:
            if self.nspawn.poll() is not None:
                raise CannotBoot(
                    f"systemd-nspawn exited {self.nspawn.returncode}:\n{self.nspawn_log()}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(f"no container PID 1 in time:\n{self.nspawn_log()}")
            self.leader = _namespace_init(self.nspawn.pid)
            time.sleep(0.05)
        # Until systemd has its private socket up, systemctl finds it "offline".
        while True:
            left = max(1.0, deadline - time.monotonic())
            proc = self.run(["systemctl", "is-system-running", "--wait"], timeout=left, echo=False)
            if proc.stdout.strip() not in ("", "offline"):
                return proc.stdout.strip()
            if time.monotonic() > deadline:
                raise AssertionError(f"systemd did not come up: {proc.stderr}{self.nspawn_log()}")
            time.sleep(0.2)

    def run(
        self,
        args: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        timeout: float = 120,
        input: str | None = None,
        echo: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        """`args` in the container's namespaces (its system mount namespace),
        with a clean environment: PATH, HOME and `env`.  Output is echoed into
        the test's captured output, where the key scan reads it."""
        assert self.leader is not None
        proc = subprocess.run(
            ["nsenter", "-t", str(self.leader), "-a", *args],
            env={"PATH": PATH, "HOME": "/root", "LANG": "C.UTF-8", **(env or {})},
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
        )
        if echo:
            sys.stdout.write(f"[{self.name}]$ {' '.join(args)}\n{proc.stdout}")
            sys.stderr.write(proc.stderr)
        return proc

    def sh(self, script: str, **kw) -> subprocess.CompletedProcess[str]:
        return self.run(["sh", "-c", script], **kw)

    def host_path(self, path: str) -> Path:
        """Where a file of the container's root filesystem is on this host (the
        directory itself, underneath anything mounted inside the container)."""
        return self.root / path.lstrip("/")

    def reboot(self) -> str:
        """Power off, wait for the container to end, boot it again."""
        self.shutdown()
        self._boot()
        return self.wait_booted()

    def shutdown(self) -> None:
        """Power off; whatever remains is killed by PID."""
        if self.nspawn is not None and self.nspawn.poll() is None:
            if self.leader is not None:
                with contextlib.suppress(subprocess.SubprocessError, OSError):
                    self.run(["systemctl", "poweroff"], timeout=30, echo=False)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.nspawn.wait(STOP_TIMEOUT)
        # The namespace's init takes every process of the container with it.
        if self.leader is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.leader, signal.SIGKILL)
        if self.nspawn is not None:
            if self.nspawn.poll() is None:
                self.nspawn.kill()
            self.nspawn.wait(30)
        with contextlib.suppress(OSError):
            os.rmdir(f"/run/systemd/nspawn/propagate/{self.name}")

    def close(self) -> None:
        """Stop the container, whatever state it is in, and remove its copy."""
        self.shutdown()
        shutil.rmtree(self.root, ignore_errors=True)


def _namespace_init(parent: int) -> int | None:
    """The child of `parent` that is PID 1 of its own PID namespace."""
    try:
        children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    except OSError:
        return None
    for child in children:
        try:
            status = Path(f"/proc/{child}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            nspid = line.split()[1:] if line.startswith("NSpid:") else []
            if len(nspid) >= 2 and nspid[-1] == "1":
                return int(child)
    return None
