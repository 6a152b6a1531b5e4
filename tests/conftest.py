"""Real mounts for tests: a stormfs daemon in a subprocess over a real directory.

Every mount is taken down in teardown, even when the test failed: SIGTERM, then
SIGKILL after a deadline, then `fusermount3 -u -z`.  A daemon that dies or never
answers fails the test with its log instead of hanging the suite.

Key material must never reach any output: each test's captured stdout, stderr
and log and every daemon log are scanned for every key the suite made, and
keys are redacted from failure reports (see keyscan.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import settings

from .helpers import (
    MOUNT_TIMEOUT,
    STOP_TIMEOUT,
    Mount,
    MountFactory,
    force_unmount,
    is_mounted,
    scrubbed_env,
    stormfs_cmd,
    wait_for,
)
from .keyscan import leaked_in, new_key, redact

# No per-example deadline: a loaded machine must not turn slowness into failures.
# `make stress` selects the "stress" profile (--hypothesis-profile=stress).
settings.register_profile("default", deadline=None)
settings.register_profile("stress", deadline=None, max_examples=5000)
settings.load_profile("default")


# Tests that mount file systems: they need root and /dev/fuse.
MOUNTING_FIXTURES = {"mount_factory", "mounted", "ext4_image", "tmpfs", "dirs", "silly_source"}


def _cannot_mount() -> str | None:
    if os.geteuid() != 0:
        return "mount tests need root"
    if not os.path.exists("/dev/fuse"):
        return "mount tests need /dev/fuse"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = _cannot_mount()
    for item in items:
        if MOUNTING_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.fuse)
        if reason and item.get_closest_marker("fuse"):
            item.add_marker(pytest.mark.skip(reason=reason))


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
        full_env = scrubbed_env(key, **(env or {}))
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
def mount_args() -> tuple[str, ...]:
    """Arguments of the `mounted` mount; a module overrides this fixture, parametrized,
    to run its tests on mounts with other options too."""
    return ()


@pytest.fixture
def mounted(mount_factory: MountFactory, mount_args: tuple[str, ...]) -> Mount:
    return mount_factory(args=mount_args)


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
