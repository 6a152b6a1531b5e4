"""What the tests share: running stormfs, a clean environment, the reference
envelope recipe, and the mount harness (fixtures that use it live in conftest.py).

Every mount is taken down, even when the test failed: SIGTERM, then SIGKILL after
a deadline, then `fusermount3 -u -z`; a daemon that outlives SIGKILL has its FUSE
connection aborted.  A daemon that dies or never answers fails the test with its
log instead of hanging the suite.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from stormfs import format_v2 as v2
from stormfs import keys

MOUNT_TIMEOUT = 15.0
STOP_TIMEOUT = 30.0

# For tests on the `mounted` fixture: each runs on a mount with the defaults, on one
# with the kernel's writeback cache, on one that also has SOURCE to itself, and on one
# with group commit (conftest's `mount_args`).  A test that looks at SOURCE itself
# calls `settle()` first: with group commit a closed file is published within the delay.
MOUNT_VARIANTS = pytest.mark.parametrize(
    "mount_args",
    [
        (),
        ("-o", "writeback_cache"),
        ("-o", "writeback_cache,exclusive"),
        ("-o", "publish_delay=0.05"),
    ],
    ids=["default", "writeback_cache", "writeback_cache+exclusive", "group_commit"],
)


def changed_chunks(before: bytes, after: bytes, chunk_size: int = v2.CHUNK_SIZE) -> list[int]:
    """Indices of the chunk slots whose bytes differ between two versions (a slot
    past the end of either counts as changed); -1 for the header."""
    if before[: v2.HEADER_SIZE] != after[: v2.HEADER_SIZE]:
        return [-1]
    slot = v2.slot_size(chunk_size)
    count = -(-(max(len(before), len(after)) - v2.HEADER_SIZE) // slot)
    return [
        i
        for i in range(count)
        if before[v2.chunk_offset(i, chunk_size) :][:slot]
        != after[v2.chunk_offset(i, chunk_size) :][:slot]
    ]


def scrubbed_env(key: str | None = None, **extra: str) -> dict[str, str]:
    """This process's environment without any STORMCLOUD_* variable; `key` as the key."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("STORMCLOUD_")}
    if key is not None:
        env[keys.ENV_KEY] = key
    env.update(extra)
    return env


def reference_decrypt(key: bytes, blob: bytes) -> bytes:
    """DESIGN §1's recipe, nothing else: the plaintext of a v1 envelope."""
    assert blob[:1] == b"\x01", "not a v1 envelope"
    return AESGCM(key).decrypt(blob[1:13], blob[13:], None)


def storm_cloud_envelope(key: str, data: bytes) -> bytes:
    """A file as the Storm Cloud server writes it: the plain AESGCM recipe, no stormfs state."""
    nonce = os.urandom(12)
    return b"\x01" + nonce + AESGCM(keys.parse_key(key)).encrypt(nonce, data, None)


def stormfs_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "stormfs", *args]


def real_mountpoint(path: Path) -> str:
    """The canonical path of a mount point, found without asking the mount (it may hang)."""
    return os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))


def is_mounted(path: Path) -> bool:
    target = real_mountpoint(path)
    with open("/proc/mounts") as f:
        return any(line.split()[1] == target for line in f)


def force_unmount(path: Path) -> None:
    subprocess.run(["fusermount3", "-u", "-z", str(path)], capture_output=True, timeout=30)


def abort_fuse_connection(path: Path) -> None:
    """End every request pending on the FUSE mount at `path`, as a dead daemon's would be.

    A daemon process that cannot exit (one of its threads waits for an answer from its
    own mount) keeps the connection alive; aborting it frees the process.
    """
    target = real_mountpoint(path)
    with open("/proc/self/mountinfo") as f:
        devs = [line.split()[2] for line in f if line.split()[4] == target]
    if not devs:
        return
    connections = Path("/sys/fs/fuse/connections")
    mounted_here = not any(connections.iterdir()) if connections.is_dir() else False
    if mounted_here:
        subprocess.run(["mount", "-t", "fusectl", "fusectl", str(connections)], timeout=30)
    try:
        for dev in devs:
            abort = connections / dev.split(":")[1] / "abort"
            if abort.exists():
                abort.write_text("1")
    finally:
        if mounted_here:
            subprocess.run(["umount", str(connections)], timeout=30)


@dataclass
class Mount:
    source: Path
    mnt: Path
    key: str | None
    log: Path
    proc: subprocess.Popen
    env: dict[str, str] = field(repr=False, default_factory=dict)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def instance_dirs(self) -> list[str]:
        """Names in SOURCE/.stormfs/tmp/: one per daemon alive (or dead and not yet taken
        over); directories already retired (``*.gone``, being removed) are not counted."""
        return sorted(
            n for n in os.listdir(self.source / ".stormfs" / "tmp") if not n.endswith(".gone")
        )

    @property
    def raw_key(self) -> bytes:
        assert self.key is not None
        return keys.parse_key(self.key)

    def logtext(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def settle(self) -> None:
        """Wait until every file closed through the mount has its new version under its
        name in SOURCE (group commit publishes within a bound, not at close).  A daemon
        that stopped published all at its shutdown; one that was killed, nothing more."""
        deadline = time.monotonic() + 10
        while self.proc.poll() is None:
            try:
                status = json.loads(os.getxattr(self.mnt, "user.stormfs.status"))
            except OSError:
                return  # the mount is gone, or dying
            if not status["publishing"]:
                return
            assert time.monotonic() < deadline, "closed files not published within 10 s"
            time.sleep(0.01)

    def decrypt(self, name: str, *, settle: bool = True) -> bytes:
        """The plaintext of a file in SOURCE: a v1 envelope by the plain recipe of
        DESIGN §1, a v2 file authenticated whole (`format_v2.open_file`); after
        `settle`, unless told to take SOURCE as it is now."""
        if settle:
            self.settle()
        blob = (self.source / name).read_bytes()
        if v2.is_v2(blob):
            return v2.open_file(self.raw_key, blob)
        return reference_decrypt(self.raw_key, blob)

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        """Stop the daemon (committing pending writes on SIGTERM) and make sure it is unmounted."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    abort_fuse_connection(self.mnt)
                    self.proc.wait(10)
                    raise AssertionError(f"the daemon did not stop:\n{self.logtext()}") from None
        if is_mounted(self.mnt):
            force_unmount(self.mnt)
        return self.proc.returncode

    def kill(self) -> None:
        """A crash: SIGKILL, then clear the dead mount."""
        self.stop(signal.SIGKILL)


MountFactory = Callable[..., Mount]


def audit(source: Path, key: str) -> tuple[int, dict]:
    """`stormfs audit SOURCE --json` with `key`: its exit code and report."""
    env = scrubbed_env(key)
    done = subprocess.run(
        stormfs_cmd("audit", str(source), "--json"),
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return done.returncode, json.loads(done.stdout)


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.02)
