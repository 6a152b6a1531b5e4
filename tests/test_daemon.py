"""The mount command and the daemon's life: start-up errors, background mode,
clean shutdown, crash recovery, bounded memory, the error boundary."""

from __future__ import annotations

import errno
import logging
import os
import signal
import subprocess
import time
from pathlib import Path

import pyfuse3
import pytest
import trio

from stormfs import fs, keys
from stormfs.daemon import MountError, MountOptions, seen_by_system
from stormfs.ops.base import boundary

from .helpers import Mount, force_unmount, is_mounted, scrubbed_env, stormfs_cmd, wait_for


def run_stormfs(*args: str, env: dict[str, str] | None = None, timeout: float = 30):
    full = scrubbed_env(**(env or {}))
    return subprocess.run(
        stormfs_cmd(*args), capture_output=True, text=True, env=full, timeout=timeout
    )


@pytest.fixture
def dirs(tmp_path: Path):
    src, mnt = tmp_path / "src", tmp_path / "mnt"
    src.mkdir()
    mnt.mkdir()
    yield src, mnt
    if is_mounted(mnt):
        subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True, timeout=30)
        wait_for(lambda: not is_mounted(mnt))


@pytest.mark.parametrize(
    "bad",
    [
        "not base64 !!",
        "c2hvcnQ",  # decodes to 5 bytes
        "A" * 44 + "AAAA",  # 36 bytes
        "K7xPq2mN8vR3tY6wZ9aB4cD5eF0gH1iJ2kL3mN4oP5s+",  # standard alphabet '+'
        "   ",
    ],
)
def test_malformed_key_refused_before_mounting(dirs, bad):
    src, mnt = dirs
    r = run_stormfs("mount", str(src), str(mnt), env={keys.ENV_KEY: bad})
    if not bad.strip():  # an empty key is no key: a plaintext mount, warned about
        assert r.returncode == 0
        return
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert bad.strip() not in r.stderr
    assert not is_mounted(mnt)


def test_key_file(dirs, tmp_path, key):
    src, mnt = dirs
    kf = tmp_path / "k"
    kf.write_text(key + "\n")
    kf.chmod(0o600)
    r = run_stormfs("mount", "--key-file", str(kf), str(src), str(mnt))
    assert r.returncode == 0, r.stderr
    (mnt / "f").write_bytes(b"secret")
    fd = os.open(mnt / "f", os.O_RDONLY)
    os.fsync(fd)  # published under its name now, not within the publish delay
    os.close(fd)
    assert (src / "f").read_bytes()[:1] == b"\x01"


def test_background_mount_returns_once_mount_answers(dirs, key):
    src, mnt = dirs
    r = run_stormfs("mount", str(src), str(mnt), env={keys.ENV_KEY: key})
    assert r.returncode == 0, r.stderr
    assert is_mounted(mnt)
    (mnt / "hello").write_text("hi")  # answers right away
    assert (mnt / "hello").read_text() == "hi"


def test_fstab_form_ignores_generic_options(dirs, tmp_path, key):
    """mount.fuse3 runs `stormfs SOURCE MOUNTPOINT -o OPTS` with generic options mixed in."""
    src, mnt = dirs
    kf = tmp_path / "k"
    kf.write_text(key)
    kf.chmod(0o600)
    opts = f"rw,nofail,_netdev,x-systemd.automount,dev,suid,key_file={kf},attr_timeout=2"
    r = run_stormfs(str(src), str(mnt), "-o", opts)
    assert r.returncode == 0, r.stderr
    assert is_mounted(mnt)
    with open("/proc/mounts") as f:
        line = next(ln for ln in f if ln.split()[1] == str(mnt))
    assert line.split()[2] == "fuse.stormfs"
    assert line.split()[0] == str(src)


@pytest.mark.parametrize(
    ("make_args", "needle"),
    [
        (lambda s, m: [str(s / "missing"), str(m)], "not a directory"),
        (lambda s, m: [str(s), str(m / "missing")], "No such file"),
        (lambda s, m: [str(s), str(s)], "inside SOURCE"),
        (lambda s, m: [str(s), str(m), "-o", "bogus_option"], "unknown mount option"),
        (lambda s, m: [str(s), str(m), "-o", "attr_timeout=soon"], "number of seconds"),
    ],
)
def test_mount_usage_errors(dirs, key, make_args, needle):
    src, mnt = dirs
    r = run_stormfs("mount", *make_args(src, mnt), env={keys.ENV_KEY: key})
    assert r.returncode == 2
    assert needle in r.stderr


def test_mount_over_existing_mount_refused(mounted: Mount):
    r = run_stormfs(
        "mount", str(mounted.source), str(mounted.mnt), env={keys.ENV_KEY: mounted.key or ""}
    )
    assert r.returncode == 2
    assert "already a mount point" in r.stderr


def test_dead_mount_explained(mounted: Mount):
    mounted.proc.kill()
    mounted.proc.wait(10)
    r = run_stormfs(
        "mount", str(mounted.source), str(mounted.mnt), env={keys.ENV_KEY: mounted.key or ""}
    )
    assert r.returncode == 2
    assert "fusermount3 -u -z" in r.stderr
    force_unmount(mounted.mnt)


def test_sigterm_commits_pending_writes_and_unmounts(mounted: Mount):
    fd = os.open(mounted.mnt / "open-at-shutdown", os.O_CREAT | os.O_WRONLY, 0o644)
    os.write(fd, b"written but never closed")
    assert mounted.stop() == 0
    with pytest.raises(OSError):
        os.close(fd)  # the mount is gone; the data is not
    assert not is_mounted(mounted.mnt)
    assert mounted.decrypt("open-at-shutdown") == b"written but never closed"
    assert sorted(os.listdir(mounted.source / ".stormfs" / "tmp")) == []


def test_crash_leaves_previous_version_and_is_cleaned_up(mount_factory):
    m = mount_factory()
    (m.mnt / "f").write_bytes(b"committed version")
    m.settle()
    fd = os.open(m.mnt / "f", os.O_WRONLY | os.O_TRUNC)
    os.write(fd, b"pending, never committed" * 1000)
    m.kill()
    with pytest.raises(OSError):
        os.close(fd)
    assert m.decrypt("f") == b"committed version"
    leftovers = os.listdir(m.source / ".stormfs" / "tmp")
    assert len(leftovers) == 1  # the dead daemon's instance directory
    m2 = mount_factory(m.source)
    assert (m2.mnt / "f").read_bytes() == b"committed version"
    assert len(os.listdir(m.source / ".stormfs" / "tmp")) == 1  # only the live one
    assert os.listdir(m2.mnt) == ["f"]


def test_memory_stays_bounded_for_a_large_file(mounted: Mount):
    size = 1 << 30
    chunk = os.urandom(1 << 20)
    with open(mounted.mnt / "big", "wb") as f:
        for _ in range(size // len(chunk)):
            f.write(chunk)
    with open(mounted.mnt / "big", "rb") as f:
        while f.read(1 << 20):
            pass
    status = Path(f"/proc/{mounted.proc.pid}/status").read_text()
    hwm_kib = int(next(ln for ln in status.splitlines() if ln.startswith("VmHWM")).split()[1])
    assert hwm_kib < 100 * 1024, f"peak RSS {hwm_kib} KiB"
    assert (mounted.source / "big").stat().st_size == size + 29


def test_unmount_by_fusermount_commits_and_exits(mounted: Mount):
    (mounted.mnt / "f").write_bytes(b"data")
    subprocess.run(["fusermount3", "-u", str(mounted.mnt)], check=True, timeout=30)
    assert mounted.proc.wait(30) == 0
    assert mounted.decrypt("f") == b"data"


def test_mount_options_parse():
    o = MountOptions.parse(["ro,allow_other", "key_file=/k,entry_timeout=0.5,readahead_kb=512"])
    assert o.fuse == {"ro", "allow_other"}
    assert (o.key_file, o.entry_timeout, o.readahead_kb) == ("/k", 0.5, 512)
    with pytest.raises(MountError):
        MountOptions.parse(["attr_timeout=-1"])


def test_unexpected_exception_answers_eio_and_is_logged(caplog):
    class Boom(fs.Operations):
        def __init__(self) -> None:
            pass

        @boundary
        async def getattr(self, inode, ctx):
            raise RuntimeError("bug")

        @boundary
        async def lookup(self, parent_inode, name, ctx):
            raise OSError(errno.ENAMETOOLONG, "long")

    ops = Boom()
    with caplog.at_level(logging.ERROR), pytest.raises(pyfuse3.FUSEError) as e:
        trio.run(ops.getattr, 1, None)
    assert e.value.errno == errno.EIO
    assert "unexpected error in getattr" in caplog.text
    assert "RuntimeError: bug" in caplog.text
    with pytest.raises(pyfuse3.FUSEError) as e:
        trio.run(ops.lookup, 1, b"x", None)
    assert e.value.errno == errno.ENAMETOOLONG


def test_plaintext_mount_without_key(mount_factory):
    m = mount_factory(key=None)
    (m.mnt / "f").write_bytes(b"stored as it is")
    m.settle()
    assert (m.source / "f").read_bytes() == b"stored as it is"
    assert os.getxattr(m.mnt / "f", "user.stormfs.encryption_method") == b"none"
    assert "WARNING" in m.logtext()


def test_daemon_keeps_serving_after_errors(mounted: Mount):
    for _ in range(3):
        with pytest.raises(FileNotFoundError):
            (mounted.mnt / "missing").read_bytes()
        with pytest.raises(OSError):
            os.rmdir(mounted.mnt / "missing")
    (mounted.mnt / "ok").write_bytes(b"fine")
    assert (mounted.mnt / "ok").read_bytes() == b"fine"
    time.sleep(0.1)
    assert mounted.proc.poll() is None


def test_hung_daemon_is_cleared_without_hanging(mounted: Mount):
    """A daemon that stops answering fails the caller, and teardown still clears it."""
    mounted.proc.send_signal(signal.SIGSTOP)
    try:
        probe = subprocess.Popen(["stat", str(mounted.mnt / "x")], stdout=subprocess.DEVNULL)
        with pytest.raises(subprocess.TimeoutExpired):
            probe.wait(1)
    finally:
        mounted.kill()  # SIGKILL works on a stopped process; then fusermount3 -u -z
    assert probe.wait(10) != 0
    assert not is_mounted(mounted.mnt)


def test_sigterm_right_after_mounting_stops_the_daemon(dirs, key):
    """A stop that comes while the daemon still checks that its own mount answers."""
    src, mnt = dirs
    env = scrubbed_env(key)
    for _ in range(15):
        proc = subprocess.Popen(
            stormfs_cmd("mount", "--foreground", str(src), str(mnt)),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env,
        )
        m = Mount(src, mnt, key, src / "unused.log", proc)
        try:
            wait_for(lambda p=proc: is_mounted(mnt) or p.poll() is not None)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0
        finally:
            m.stop()
        assert not is_mounted(mnt)


def test_seen_by_system_finds_this_mount_in_the_system_mount_table(mounted):
    """PID 1's table lists the mount, by its device and its path."""
    dev = os.stat(mounted.mnt).st_dev
    assert seen_by_system(str(mounted.mnt), dev) is True
    assert seen_by_system(str(mounted.source), dev) is False
    assert seen_by_system(str(mounted.mnt), os.stat(mounted.source).st_dev) is False


def test_seen_by_system_reads_escaped_paths(tmp_path):
    table = tmp_path / "mountinfo"
    table.write_bytes(
        b"22 27 0:21 / /proc rw,relatime - proc proc rw\n"
        b"342 306 0:59 / /srv/my\\040files\\134x rw shared:118 - fuse.stormfs /srv/s rw\n"
    )
    dev = os.makedev(0, 59)
    assert seen_by_system("/srv/my files\\x", dev, str(table)) is True
    assert seen_by_system("/srv/my files\\x", os.makedev(0, 60), str(table)) is False
    assert seen_by_system("/srv/my\\040files\\134x", dev, str(table)) is False
    assert seen_by_system("/srv/m", dev, str(tmp_path / "missing")) is None
