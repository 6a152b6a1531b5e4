"""Real mounts for tests: a stormfs daemon in a subprocess over a real directory.

Every mount is taken down in teardown, even when the test failed: SIGTERM, then
SIGKILL after a deadline, then `fusermount3 -u -z`.  A daemon that dies or never
answers fails the test with its log instead of hanging the suite.

Key material must never reach any output: each test's captured stdout, stderr
and log and every daemon log are scanned for every key the suite made, and
keys are redacted from failure reports (see keyscan.py).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import settings

from stormfs import keys

from .keyscan import leaked_in, new_key, redact

MOUNT_TIMEOUT = 15.0
STOP_TIMEOUT = 30.0

# No per-example deadline: a loaded machine must not turn slowness into failures.
# `make stress` selects the "stress" profile (--hypothesis-profile=stress).
settings.register_profile("default", deadline=None)
settings.register_profile("stress", deadline=None, max_examples=5000)
settings.load_profile("default")


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

    def decrypt(self, name: str) -> bytes:
        """The plaintext of a file in SOURCE by the plain recipe of DESIGN §1."""
        data = (self.source / name).read_bytes()
        assert data[:1] == b"\x01", f"{name} is not an envelope"
        return AESGCM(self.raw_key).decrypt(data[1:13], data[13:], None)

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


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):
    outcome = yield
    report = outcome.get_result()
    # A report carries the sections of earlier phases too: each phase is
    # judged on its own output, and leaked text is withheld wherever it shows.
    leaked = {name for name, text in report.sections if leaked_in(text)}
    places = [name for name in leaked if name.endswith(f" {report.when}")]
    if report.longrepr is not None and leaked_in(str(report.longrepr)):
        # pytest shows the test's arguments, the key fixture among them: not a leak,
        # and the failure must stay readable.
        report.longrepr = redact(str(report.longrepr))
    if places:
        report.outcome = "failed"
        report.longrepr = f"key material appeared in: {', '.join(sorted(places))}"
    report.sections = [
        (name, "[withheld: contains key material]" if name in leaked else text)
        for name, text in report.sections
    ]


@pytest.fixture
def key() -> str:
    return new_key()


@pytest.fixture(scope="session")
def destdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A scratch root that `make deploy` installs into (see deployment.py)."""
    return tmp_path_factory.mktemp("destdir")


@pytest.fixture
def mount_factory(tmp_path: Path, key: str) -> Iterator[MountFactory]:
    mounts: list[Mount] = []
    counter = iter(range(1000))

    def start(
        source: Path | None = None,
        mnt: Path | None = None,
        *,
        key: str | None = key,
        args: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
    ) -> Mount:
        n = next(counter)
        source = source or tmp_path / f"source{n}"
        mnt = mnt or tmp_path / f"mnt{n}"
        source.mkdir(exist_ok=True)
        mnt.mkdir(exist_ok=True)
        log = tmp_path / f"daemon{n}.log"
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("STORMCLOUD_")}
        if key is not None:
            full_env[keys.ENV_KEY] = key
        full_env.update(env or {})
        with open(log, "ab") as logf:
            proc = subprocess.Popen(
                stormfs_cmd("mount", "--foreground", "--debug", *args, str(source), str(mnt)),
                stdout=logf,
                stderr=subprocess.STDOUT,
                env=full_env,
            )
        m = Mount(source, mnt, key, log, proc, full_env)
        mounts.append(m)
        deadline = time.monotonic() + MOUNT_TIMEOUT
        while not is_mounted(mnt):
            if proc.poll() is not None:
                pytest.fail(f"stormfs exited with {proc.returncode}:\n{m.logtext()}")
            if time.monotonic() > deadline:
                pytest.fail(f"stormfs did not mount within {MOUNT_TIMEOUT}s:\n{m.logtext()}")
            time.sleep(0.02)
        os.stat(mnt)  # answers
        return m

    yield start
    for m in mounts:
        m.stop()
    logs = [m.log.name for m in mounts if leaked_in(m.logtext())]
    assert not logs, f"key material appeared in daemon logs: {logs}"


@pytest.fixture
def mounted(mount_factory: MountFactory) -> Mount:
    return mount_factory()


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[..., Path]]:
    """Make size-limited tmpfs mounts; each is unmounted in teardown, even after a failure.

    Request it before `mount_factory`, so that stormfs mounts on top are stopped first;
    a tmpfs still busy is detached lazily all the same.
    """
    made: list[Path] = []

    def make(size: str, name: str = "tmpfs") -> Path:
        path = tmp_path / name
        path.mkdir()
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", name, str(path)],
            check=True,
            capture_output=True,
            timeout=30,
        )
        made.append(path)
        return path

    yield make
    for path in reversed(made):
        if is_mounted(path):
            done = subprocess.run(["umount", str(path)], capture_output=True, timeout=30)
            if done.returncode != 0:
                subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30)


@pytest.fixture
def silly_source(tmp_path: Path) -> Iterator[Callable[..., Path]]:
    """Make SOURCE directories served by tests/sillyfs.py (a FUSE passthrough that
    silly-renames files unlinked while open); each is unmounted in teardown.

    Request it before `mount_factory`, so that stormfs mounts on top are stopped first.
    """
    made: list[tuple[subprocess.Popen, Path]] = []

    def make(name: str = "silly", *, xattrs: bool = True) -> Path:
        backing, path = tmp_path / f"{name}-backing", tmp_path / name
        backing.mkdir()
        path.mkdir()
        cmd = [sys.executable, "-m", "tests.sillyfs", str(backing), str(path)]
        with open(tmp_path / f"{name}.log", "ab") as logf:
            proc = subprocess.Popen(
                cmd + ([] if xattrs else ["--no-xattr"]),
                cwd=Path(__file__).resolve().parent.parent,
                stdout=logf,
                stderr=subprocess.STDOUT,
            )
        made.append((proc, path))
        wait_for(lambda: is_mounted(path) or proc.poll() is not None, MOUNT_TIMEOUT)
        assert proc.poll() is None, (tmp_path / f"{name}.log").read_text()
        return path

    yield make
    for proc, path in reversed(made):
        proc.terminate()
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        if is_mounted(path):
            force_unmount(path)


@pytest.fixture
def ext4_image(tmp_path: Path) -> Iterator[Path]:
    """A small ext4 file system on a loop device, unmounted in teardown even after a failure.

    ext4 gives a freed inode number to the next object it creates; with few inodes it does
    so nearly every time.  Request it before `mount_factory`, so that stormfs stops first.
    """
    image, path = tmp_path / "ext4.img", tmp_path / "ext4"
    path.mkdir()
    with open(image, "wb") as f:
        f.truncate(32 << 20)
    made = subprocess.run(["mkfs.ext4", "-q", "-F", "-N", "256", str(image)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot make an ext4 image here: {made.stderr.decode().strip()}")
    done = subprocess.run(["mount", "-o", "loop", str(image), str(path)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot loop-mount an ext4 image here: {done.stderr.decode().strip()}")
    try:
        yield path
    finally:
        if is_mounted(path):
            gone = subprocess.run(["umount", str(path)], capture_output=True, timeout=30)
            if gone.returncode != 0:
                subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30)


def audit(source: Path, key: str) -> tuple[int, dict]:
    """`stormfs audit SOURCE --json` with `key`: its exit code and report."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("STORMCLOUD_")}
    env[keys.ENV_KEY] = key
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
