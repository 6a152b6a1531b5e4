"""stormfs over a real GlusterFS volume (tests/gluster.py: glusterd on 127.0.0.1, a
replica-2 volume with two bricks, the FUSE client), as docs/SCALING.md describes.

What GlusterFS does not have, and what stormfs does there:
``renameat2(RENAME_NOREPLACE)`` answers EINVAL (EEXIST when the target exists) and
``RENAME_EXCHANGE`` EINVAL: a rename with these flags through the view gets the same
answer, and programs fall back to a plain rename (``mv``); `stormfs encrypt` needs
the exchange to swap a sealed copy in and refuses such a SOURCE with a message
before it touches a file.  ``O_TMPFILE`` answers EOPNOTSUPP: scratch files are made
and unlinked in the daemon's instance directory instead.

`make stress` runs the longer loops (STORMFS_GLUSTER_CRASH_ROUNDS).
"""

from __future__ import annotations

import ctypes
import errno
import functools
import hashlib
import mmap
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from stormfs import keys

from . import test_posix
from .crashes import crash_loop
from .gluster import Volume, unavailable
from .helpers import Mount, MountFactory, audit, storm_cloud_envelope, stormfs_cmd, wait_for

pytestmark = pytest.mark.gluster

TIMEOUTS = ("-o", "attr_timeout=0.5,entry_timeout=0.5")
CRASH_ROUNDS = int(os.environ.get("STORMFS_GLUSTER_CRASH_ROUNDS", "5"))
libc = ctypes.CDLL(None, use_errno=True)
NOREPLACE, EXCHANGE = 1, 2


@pytest.fixture(scope="module")
def volume(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Volume]:
    why = unavailable()
    if why:
        pytest.skip(why)
    v = Volume(f"stormfs{os.getpid()}", tmp_path_factory.mktemp("gluster"))
    try:
        v.start_glusterd()
        v.create()
        v.mount(v.scratch / "client0")
        v.mount(v.scratch / "client1")  # a second "server" of the same volume
        yield v
    finally:
        v.close()


@pytest.fixture
def source(volume: Volume, request: pytest.FixtureRequest) -> Path:
    """A fresh SOURCE directory on the volume, through the first client."""
    path = next(iter(volume.clients)) / request.node.name.replace("[", "-").replace("]", "")
    path.mkdir()
    return path


def elsewhere(volume: Volume, path: Path) -> Path:
    """The same directory through the second client (another server)."""
    first, second = volume.clients
    return second / path.relative_to(first)


@pytest.fixture
def gmounted(source: Path, mount_factory: MountFactory) -> Mount:
    return mount_factory(source, args=("-o", "metadata_threads"))


def renameat2(a: Path, b: Path, flags: int) -> int:
    if libc.renameat2(-100, os.fsencode(a), -100, os.fsencode(b), flags) == 0:
        return 0
    return ctypes.get_errno()


# ---- the POSIX view ------------------------------------------------------------

# Every test of the view, unchanged, with SOURCE on the volume, but for what Gluster
# itself lacks: the rename flags and the metadata of unlinked files (tests below).
ON_GLUSTER = {"test_rename_over_existing_and_noreplace", "test_unlinked_open_file_keeps_working"}
POSIX = sorted(n for n in dir(test_posix) if n.startswith("test_") and n not in ON_GLUSTER)


@pytest.mark.parametrize("name", POSIX)
def test_posix_view(gmounted: Mount, name: str):
    getattr(test_posix, name)(gmounted)
    assert "Traceback" not in gmounted.logtext()


def test_smoke(gmounted: Mount):
    """Create, read, rename, unlink while open, hard links and xattrs, checked in SOURCE."""
    m = gmounted
    data = os.urandom(300_000)
    (m.mnt / "d").mkdir()
    (m.mnt / "d" / "f").write_bytes(data)
    assert m.decrypt("d/f") == data
    os.rename(m.mnt / "d" / "f", m.mnt / "g")
    assert (m.mnt / "g").read_bytes() == data
    os.link(m.mnt / "g", m.mnt / "g2")
    with open(m.mnt / "g2", "r+b") as f:
        f.write(b"LINKED")
    assert m.decrypt("g")[:6] == b"LINKED" and (m.mnt / "g").read_bytes()[:6] == b"LINKED"
    fd = os.open(m.mnt / "g", os.O_RDWR)
    try:
        os.unlink(m.mnt / "g")
        os.unlink(m.mnt / "g2")
        os.pwrite(fd, b"still", 0)
        assert os.pread(fd, 5, 0) == b"still"
    finally:
        os.close(fd)
    os.setxattr(m.mnt / "d", "user.tag", b"v")
    assert os.getxattr(m.mnt / "d", "user.tag") == b"v"
    (m.mnt / "x").write_bytes(b"x")
    os.setxattr(m.mnt / "x", "user.mine", b"kept")
    (m.mnt / "x").write_bytes(b"rewritten")  # the commit carries it over
    dump = subprocess.run(["getfattr", "-d", "-m", "-", str(m.mnt / "x")], capture_output=True)
    assert dump.returncode == 0
    assert b'user.mine="kept"' in dump.stdout and b'encryption_method="server"' in dump.stdout
    assert sorted(os.listdir(m.mnt)) == ["d", "x"]
    assert "Traceback" not in m.logtext()


def test_rename_flags(gmounted: Mount):
    """Gluster has neither flag: the view answers as SOURCE does, changes nothing, and
    `mv` (which tries RENAME_NOREPLACE first) still works."""
    m = gmounted
    a, b, c = m.mnt / "a", m.mnt / "b", m.mnt / "c"
    a.write_bytes(b"A")
    b.write_bytes(b"B")
    assert renameat2(a, c, NOREPLACE) == errno.EINVAL
    assert renameat2(a, b, NOREPLACE) in (errno.EINVAL, errno.EEXIST)
    assert renameat2(a, b, EXCHANGE) == errno.EINVAL
    assert (a.read_bytes(), b.read_bytes(), c.exists()) == (b"A", b"B", False)
    subprocess.run(["mv", "-n", str(a), str(b)], check=True)
    assert b.read_bytes() == b"B"
    subprocess.run(["mv", str(a), str(c)], check=True)
    subprocess.run(["mv", str(c), str(b)], check=True)
    assert b.read_bytes() == b"A" and not a.exists() and not c.exists()
    assert "Traceback" not in m.logtext()


def test_unlinked_open_file(gmounted: Mount):
    """Data calls on an unlinked open file work; fchmod, fchown, futimens and fsetxattr
    answer ESTALE directly on the volume (Gluster 10 cannot change an unlinked file's
    metadata), and the same through the view, where the daemon keeps serving."""
    m = gmounted
    seen = {}
    for root in (m.source, m.mnt):
        fd = os.open(root / "t", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.unlink(root / "t")
            os.write(fd, b"0123456789" * 10)
            os.fsync(fd)
            os.ftruncate(fd, 20)
            assert os.pread(fd, 100, 0) == b"01234567890123456789"
            assert os.fstat(fd).st_size == 20
            answers = {}
            for name, call in (
                ("fchmod", functools.partial(os.fchmod, fd, 0o640)),
                ("fchown", functools.partial(os.fchown, fd, 0, 0)),
                ("futimens", functools.partial(os.utime, fd, ns=(1, 1))),
                ("fsetxattr", functools.partial(os.setxattr, fd, "user.a", b"1")),
            ):
                try:
                    call()
                    answers[name] = 0
                except OSError as e:
                    answers[name] = e.errno
            seen[root] = answers
        finally:
            os.close(fd)
    assert seen[m.source] == dict.fromkeys(seen[m.source], errno.ESTALE)
    # the view answers as the volume does; xattrs are reached by name, which it has not
    assert seen[m.mnt] == {**seen[m.source], "fsetxattr": errno.ENOENT}
    assert os.listdir(m.mnt) == []
    assert "Traceback" not in m.logtext()


def test_scratch_files_without_o_tmpfile(gmounted: Mount):
    """Random writes behind the streamed end go to scratch files: on Gluster (no
    O_TMPFILE) made and unlinked in the instance directory, gone after the commit."""
    m = gmounted
    with pytest.raises(OSError) as e:
        os.open(m.source, os.O_TMPFILE | os.O_RDWR, 0o600)
    assert e.value.errno == errno.EOPNOTSUPP
    base = os.urandom(2 << 20)
    (m.mnt / "f").write_bytes(base)
    fd = os.open(m.mnt / "f", os.O_RDWR)
    try:
        for off in (1 << 20, 10, 500_000):
            os.pwrite(fd, b"patched", off)
        with mmap.mmap(fd, 0) as mm:
            mm[100:104] = b"MMAP"
    finally:
        os.close(fd)
    expect = bytearray(base)
    for off in (1 << 20, 10, 500_000):
        expect[off : off + 7] = b"patched"
    expect[100:104] = b"MMAP"
    assert (m.mnt / "f").read_bytes() == expect
    assert m.decrypt("f") == expect
    (inst,) = m.instance_dirs()
    wait_for(lambda: sorted(os.listdir(m.source / ".stormfs" / "tmp" / inst)) == ["lease", "lock"])


# ---- crashes and several daemons ---------------------------------------------------


@pytest.mark.timeout(600)
def test_kill_9_and_restart(source: Path, mount_factory: MountFactory, tmp_path: Path):
    figures = crash_loop(mount_factory, tmp_path, CRASH_ROUNDS, source=source)
    assert figures["kills"] == CRASH_ROUNDS


@pytest.mark.stress
@pytest.mark.timeout(3600)
def test_kill_9_and_restart_many_times(source: Path, mount_factory: MountFactory, tmp_path):
    rounds = int(os.environ.get("STORMFS_GLUSTER_STRESS_ROUNDS", "30"))
    figures = crash_loop(mount_factory, tmp_path, rounds, source=source)
    assert figures["kills"] == rounds


def test_two_daemons_on_two_clients(volume: Volume, source: Path, mount_factory: MountFactory):
    """Write through a daemon over one client, read through another over the second
    client, both with the default timeouts: close-to-open once they have passed; prints
    how long a close took to show on the other (docs/SCALING.md)."""
    a = mount_factory(source)
    b = mount_factory(elsewhere(volume, source))
    delays = []
    for i in range(5):
        data = os.urandom(100_000 + i)
        (a.mnt / "f").write_bytes(data)
        closed = time.monotonic()
        wait_for(lambda d=data: _reads(b.mnt / "f") == d, timeout=30)
        delays.append(time.monotonic() - closed)
        assert _reads(b.mnt / "f") == data  # never an older version once seen
    print(f"close on one daemon visible on the other after {max(delays):.2f} s at most")
    big = os.urandom(5 << 20)
    (b.mnt / "big").write_bytes(big)
    wait_for(lambda: _reads(a.mnt / "big") == big, timeout=30)
    os.rename(b.mnt / "big", b.mnt / "moved")
    wait_for(lambda: sorted(os.listdir(a.mnt)) == ["f", "moved"], timeout=30)
    assert len(a.instance_dirs()) == 2


def _listing(path: Path) -> list[str] | None:
    try:
        return os.listdir(path)
    except OSError:
        return None


def _reads(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


def test_volume_restart_under_two_live_daemons(
    volume: Volume, source: Path, mount_factory: MountFactory
):
    """The volume restarts under two daemons holding unpublished writes: Gluster drops
    their locks.  A third daemon starting then leaves their state alone, and each
    commits what it was given, byte for byte."""
    a = mount_factory(source, args=TIMEOUTS)
    b = mount_factory(elsewhere(volume, source), args=TIMEOUTS)
    fds, expected = {}, {}
    for m in (a, b):
        fds[m.pid] = os.open(m.mnt / f"open-{m.pid}", os.O_RDWR | os.O_CREAT, 0o644)
        os.pwrite(fds[m.pid], b"x" * 300_000, 0)
        os.pwrite(fds[m.pid], b"y" * 10, 50_000)  # scratch blocks and a temporary
        expected[m.pid] = b"x" * 50_000 + b"y" * 10 + b"x" * 249_990
    try:
        volume.restart()
        tmp = source / ".stormfs" / "tmp"
        wait_for(lambda: len(_listing(tmp) or ()) == 2, timeout=60)  # clients reconnected
        before = {n: sorted(os.listdir(tmp / n)) for n in os.listdir(tmp)}
        c = mount_factory(source, args=TIMEOUTS)
        assert "cleaned up" not in c.logtext(), c.logtext()
        for name, names in before.items():
            assert sorted(os.listdir(tmp / name)) == names
        for m in (a, b):
            os.pwrite(fds[m.pid], b"z", 0)
            expected[m.pid] = b"z" + expected[m.pid][1:]
    finally:
        for fd in fds.values():
            os.close(fd)
    for m in (a, b):
        assert (m.mnt / f"open-{m.pid}").read_bytes() == expected[m.pid]
        assert c.decrypt(f"open-{m.pid}") == expected[m.pid]


@pytest.mark.stress
@pytest.mark.timeout(1800)
def test_tar_x_timings(volume: Volume, source: Path, mount_factory: MountFactory, tmp_path):
    """tar -x of one tree (Python's standard library and Debian's dist-packages, 2,449
    files) on a local directory, directly on the volume, and through stormfs over it."""
    trees = [Path("/usr/lib/python3.11"), Path("/usr/lib/python3/dist-packages")]
    if not all(t.is_dir() for t in trees):
        pytest.skip("the tree to extract is not on this machine")
    tarball = tmp_path / "tree.tar"
    subprocess.run(
        ["tar", "-cf", str(tarball), "--exclude=__pycache__", *map(str, trees)],
        check=True,
        capture_output=True,
    )
    files = int(subprocess.run(f"tar -tf {tarball} | grep -vc /$", shell=True,
                               capture_output=True, text=True).stdout)  # fmt: skip
    plain = mount_factory(source / "plain", args=TIMEOUTS)
    threads = mount_factory(source / "threads", args=(*TIMEOUTS, "-o", "metadata_threads"))
    targets = {
        "local directory": tmp_path / "local",
        "GlusterFS volume": source / "direct",
        "stormfs over it": plain.mnt,
        "stormfs -o metadata_threads over it": threads.mnt,
    }
    timings = {}
    for label, target in targets.items():
        target.mkdir(exist_ok=True)
        started = time.monotonic()
        subprocess.run(["tar", "-xf", str(tarball), "-C", str(target)], check=True)
        timings[label] = time.monotonic() - started
    print(f"tar -x of {files} files ({tarball.stat().st_size >> 20} MiB):")
    for label, seconds in timings.items():
        print(f"  {label:40s} {seconds:6.2f} s")
    for m in (plain, threads):
        assert (m.mnt / "usr/lib/python3.11/os.py").read_bytes() == Path(
            "/usr/lib/python3.11/os.py"
        ).read_bytes()


# ---- audit and encrypt ---------------------------------------------------------------


def test_audit_and_encrypt_while_mounted(source: Path, mount_factory: MountFactory, key: str):
    """audit counts while a daemon serves; encrypt refuses this SOURCE, before touching a
    file, with a message that says why (no RENAME_EXCHANGE on Gluster) and what to do."""
    (source / "legacy.txt").write_bytes(b"written before encryption")
    (source / "sealed").write_bytes(storm_cloud_envelope(key, b"by the server"))
    m = mount_factory(source, args=TIMEOUTS)
    (m.mnt / "new").write_bytes(b"through the mount")
    code, report = audit(source, key)
    assert code == 5, report
    assert (report["encrypted"], report["needs_encryption"], report["issues"]) == (2, 1, 0)
    env = {k: v for k, v in os.environ.items() if not k.startswith("STORMCLOUD_")}
    env[keys.ENV_KEY] = key
    before = hashlib.sha256((source / "legacy.txt").read_bytes()).digest()
    done = subprocess.run(
        stormfs_cmd("encrypt", str(source), "--force"),
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert "RENAME_EXCHANGE" in done.stderr and "Traceback" not in done.stderr
    assert "through the mount" in done.stderr
    assert hashlib.sha256((source / "legacy.txt").read_bytes()).digest() == before
    assert sorted(os.listdir(source)) == [".stormfs", "legacy.txt", "new", "sealed"]
    # what the message advises: rewriting a byte through the mount encrypts the file
    f = m.mnt / "legacy.txt"
    subprocess.run(["dd", f"if={f}", f"of={f}", "bs=1", "count=1", "conv=notrunc"], check=True)
    assert m.decrypt("legacy.txt") == b"written before encryption"
    assert audit(source, key)[0] == 0
