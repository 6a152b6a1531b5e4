"""Leak scans (DESIGN §3 invariants 3 and 5): no plaintext in SOURCE, no key anywhere.

The workload writes marker strings through the mount in every way the daemon has of
holding data: streamed envelopes, scratch blocks (random writes), truncation, renames,
hard links, mmap.  A scanner reads every file in SOURCE, `.stormfs/` included, and every
file the daemon holds open (unlinked scratch files are reachable only through
/proc/<pid>/fd/), while the workload runs and after it.
"""

from __future__ import annotations

import base64
import mmap
import os
import random
import secrets
import shutil
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from stormfs import keys

from .helpers import MountFactory, scrubbed_env, storm_cloud_envelope, stormfs_cmd

pytestmark = pytest.mark.leaks

MARKER_LEN = 40
WINDOW = 16  # any 16 bytes of a marker count as a leak


def make_markers(n: int = 8) -> list[bytes]:
    return [f"LEAK-MARKER-{i:02d}-{secrets.token_hex(12)}|".encode()[:MARKER_LEN] for i in range(n)]


def needles(markers: list[bytes]) -> list[bytes]:
    """Windows covering each marker; payloads repeat markers back to back, so any leaked
    run of plaintext longer than a marker contains one of these."""
    out = []
    for m in markers:
        out += [m[i : i + WINDOW] for i in range(0, len(m) - WINDOW + 1, 8)]
        out.append(m[-WINDOW:])
    return out


def payload(marker: bytes, size: int) -> bytes:
    return (marker * (size // len(marker) + 1))[:size]


@dataclass
class Hit:
    where: str
    offset: int
    needle: bytes


def scan_file(path: str, pats: list[bytes], chunk: int = 1 << 20) -> tuple[list[Hit], int]:
    """Search one file for every needle (chunks overlap, so nothing hides on a boundary)."""
    hits: list[Hit] = []
    scanned = 0
    overlap = max(map(len, pats)) - 1
    try:
        f = open(path, "rb", buffering=0)  # noqa: SIM115
    except (FileNotFoundError, PermissionError, IsADirectoryError):
        # Gone since it was listed; a /proc/PID/fd number may even have been reused
        # for one of the daemon's directory descriptors meanwhile.
        return hits, 0
    with f:
        tail = b""
        pos = 0
        while True:
            try:
                data = f.read(chunk)
            except OSError:
                break
            if not data:
                break
            buf = tail + data
            for p in pats:
                i = buf.find(p)
                if i >= 0:
                    hits.append(Hit(path, pos - len(tail) + i, p))
            scanned += len(data)
            pos += len(data)
            tail = buf[-overlap:]
    return hits, scanned


def daemon_files(pid: int) -> list[str]:
    """Regular files the daemon holds open: /proc/<pid>/fd/N opens them even when unlinked."""
    out = []
    fd_dir = f"/proc/{pid}/fd"
    try:
        names = os.listdir(fd_dir)
    except FileNotFoundError:
        return out
    for n in names:
        p = os.path.join(fd_dir, n)
        try:
            if stat.S_ISREG(os.stat(p).st_mode):
                out.append(p)
        except OSError:
            continue
    return out


@dataclass
class Scanner:
    source: Path
    pid: int
    pats: list[bytes]
    hits: list[Hit] = field(default_factory=list)
    bytes_scanned: int = 0
    files_scanned: int = 0
    daemon_files_scanned: int = 0
    unlinked_scanned: int = 0
    passes: int = 0

    def scan_once(self) -> None:
        paths = [
            os.path.join(d, n)
            for d, _, names in os.walk(self.source)
            for n in names
            if not os.path.islink(os.path.join(d, n))
        ]
        held = daemon_files(self.pid)
        for p in paths + held:
            if not p.startswith("/proc/") and not stat.S_ISREG(_lstat_mode(p)):
                continue
            hits, n = scan_file(p, self.pats)
            self.hits += hits
            self.bytes_scanned += n
            self.files_scanned += 1
        self.daemon_files_scanned += len(held)
        self.unlinked_scanned += sum(_readlink(p).endswith("(deleted)") for p in held)
        self.passes += 1


def _readlink(p: str) -> str:
    try:
        return os.readlink(p)
    except OSError:
        return ""


def _lstat_mode(p: str) -> int:
    try:
        return os.lstat(p).st_mode
    except OSError:
        return 0


class Background(threading.Thread):
    """Scan over and over until stopped."""

    def __init__(self, scanner: Scanner) -> None:
        super().__init__(daemon=True)
        self.scanner = scanner
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                self.scanner.scan_once()
        except BaseException as e:
            self.error = e


def workload(
    mnt: Path, markers: list[bytes], rng: random.Random, pause: Callable[[], None]
) -> None:
    """Plaintext through every path the daemon has; `pause()` while scratch blocks are live."""
    m = iter(markers)
    (mnt / "small.txt").write_bytes(payload(next(m), 300))
    (mnt / "dir").mkdir()
    (mnt / "dir" / "large.bin").write_bytes(payload(next(m), 6 << 20))
    # random writes into a large file: scratch blocks, with the file held open
    scratch_marker = next(m)
    fd = os.open(mnt / "dir" / "large.bin", os.O_RDWR)
    try:
        for _ in range(200):
            off = rng.randrange(0, 6 << 20)
            os.pwrite(fd, payload(scratch_marker, rng.choice([100, 4096, 20_000])), off)
        os.pwrite(fd, payload(scratch_marker, 4096), 0)  # behind the streamed end
        os.fsync(fd)
        for _ in range(50):
            os.pwrite(fd, payload(scratch_marker, 8192), rng.randrange(0, 5 << 20))
        os.ftruncate(fd, 3 << 20)
        os.ftruncate(fd, 7 << 20)
        os.pwrite(fd, payload(scratch_marker, 1 << 20), 6 << 20)
        pause()
    finally:
        os.close(fd)
    # truncation, rename, hard link, O_TRUNC rewrite
    trunc_marker = next(m)
    (mnt / "t.bin").write_bytes(payload(trunc_marker, 500_000))
    os.truncate(mnt / "t.bin", 12_345)
    os.rename(mnt / "t.bin", mnt / "dir" / "renamed.bin")
    os.link(mnt / "dir" / "renamed.bin", mnt / "hardlink.bin")
    with open(mnt / "hardlink.bin", "r+b") as f:
        f.seek(100)
        f.write(payload(trunc_marker, 5000))
    (mnt / "small.txt").write_bytes(payload(next(m), 70_000))
    # mmap writes
    mmap_marker = next(m)
    with open(mnt / "mapped.bin", "wb") as f:
        f.truncate(1 << 20)
    with open(mnt / "mapped.bin", "r+b") as f, mmap.mmap(f.fileno(), 0) as mm:
        for off in range(0, 1 << 20, 65_536):
            mm[off : off + 4096] = payload(mmap_marker, 4096)
        mm.flush()
    # a legacy plaintext file (placed in SOURCE before), appended to through the mount
    legacy_marker = next(m)
    with open(mnt / "legacy.log", "ab") as f:
        for _ in range(100):
            f.write(payload(legacy_marker, 999))
            f.flush()


@pytest.mark.parametrize("fmt", ["v1", "v2"])
def test_no_plaintext_in_source_during_and_after_writes(
    mount_factory: MountFactory, tmp_path, fmt: str
):
    """v2 too: its chunk records, in-place chunk writes and streamed chunks."""
    markers = make_markers()
    pats = needles(markers)
    m = mount_factory(args=("-o", f"format={fmt}"))
    (m.source / "legacy.log").write_bytes(b"a legacy plaintext log line\n" * 100)
    scanner = Scanner(m.source, m.pid, pats)
    bg = Background(scanner)

    def pause() -> None:
        """Let the scanner make two full passes while the scratch file is live."""
        target = scanner.passes + 2
        deadline = time.monotonic() + 60
        while scanner.passes < target and bg.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert scanner.unlinked_scanned > 0, "the scratch file was never scanned"

    bg.start()
    try:
        workload(m.mnt, markers, random.Random(1), pause)
    finally:
        bg.stop.set()
        bg.join(120)
    assert bg.error is None, bg.error
    # Positive control: the same scan over the view finds every marker the workload wrote.
    found = set()
    for d, _, names in os.walk(m.mnt):
        for n in names:
            found |= {h.needle for h in scan_file(os.path.join(d, n), pats)[0]}
    assert {mk[:WINDOW] for mk in markers[1:7]} <= found  # marker 0 was overwritten
    # After: every file in SOURCE, once the daemon has committed and stopped.
    scanner.scan_once()
    m.stop()
    scanner.scan_once()
    print(
        f"leak scan: {scanner.passes} passes, {scanner.files_scanned} files, "
        f"{scanner.daemon_files_scanned} daemon-held files ({scanner.unlinked_scanned} "
        f"unlinked), {scanner.bytes_scanned} bytes, "
        f"{len(scanner.hits)} plaintext hits"
    )
    assert scanner.hits == []
    assert scanner.passes >= 3 and scanner.daemon_files_scanned > 0


def test_scanner_finds_plaintext_it_is_shown(tmp_path):
    """The scanner itself: a marker split across a chunk boundary, and a bare window."""
    markers = make_markers(2)
    f = tmp_path / "f"
    f.write_bytes(b"x" * ((1 << 20) - 20) + markers[0] + b"y" * 100 + markers[1][8:30])
    needles_found = {h.needle for h in scan_file(str(f), needles(markers))[0]}
    assert markers[0][:WINDOW] in needles_found
    assert markers[1][8 : 8 + WINDOW] in needles_found


# ---- the key ------------------------------------------------------------------


def key_forms(key: str) -> list[bytes]:
    """The key as text, raw bytes, hex and standard base64; and every 12-character window
    of the text past the first 16 (the NOTICE of a first use shows those 16 by design)."""
    raw = keys.parse_key(key)
    text = key.rstrip("=")
    forms = [text.encode(), raw, raw.hex().encode(), base64.b64encode(raw).rstrip(b"=")]
    forms += [text[i : i + 12].encode() for i in range(16, len(text) - 11)]
    return forms


def assert_no_key(blob: bytes, key: str, where: str) -> None:
    for form in key_forms(key):
        assert form not in blob, f"key material in {where}"


def test_key_absent_from_debug_log_cmdline_and_errors(mount_factory: MountFactory, tmp_path, key):
    """Key from the environment and from a key file, debug logging, errors on the way."""
    for source in (tmp_path / "src1", tmp_path / "src2"):
        source.mkdir()
        (source / "damaged").write_bytes(b"\x01" + os.urandom(100))
        (source / "other-key").write_bytes(storm_cloud_envelope(keys.generate_key(), b"x"))
        (source / "good").write_bytes(storm_cloud_envelope(key, b"lets the key check pass"))
    key_file = tmp_path / "keyfile"
    key_file.write_text(key + "\n")
    key_file.chmod(0o600)
    by_env = mount_factory(tmp_path / "src1")
    by_file = mount_factory(tmp_path / "src2", key=None, args=("--key-file", str(key_file)))
    for m in (by_env, by_file):
        (m.mnt / "f").write_bytes(b"data" * 10_000)
        with open(m.mnt / "f", "r+b") as f:
            f.seek(5000)
            f.write(b"patch")
        for name in ("damaged", "other-key", "missing", ".stormfs"):
            with pytest.raises(OSError):
                (m.mnt / name).read_bytes()
        with pytest.raises(OSError):
            (m.mnt / ".stormfs-x").write_bytes(b"x")
        os.listxattr(m.mnt / "f")
        cmdline = Path(f"/proc/{m.pid}/cmdline").read_bytes()
        assert_no_key(cmdline, key, "/proc/<pid>/cmdline")
        limits = Path(f"/proc/{m.pid}/limits").read_text()
        core = next(line for line in limits.splitlines() if line.startswith("Max core file size"))
        assert core.split()[4:6] == ["0", "0"], core  # no core dumps
        m.stop()
        log = m.log.read_bytes()
        assert b"DEBUG" in log and b"DECRYPTION_FAILED: other-key" in log
        assert_no_key(log, key, m.log.name)


@pytest.mark.parametrize(
    "mangle",
    [
        lambda k: k[:-2],  # too short
        lambda k: k + "AAAA",  # too long
        lambda k: k[:10] + "+" + k[11:],  # not base64url
        lambda k: k[:10] + "\u00e9" + k[11:],  # not ASCII
    ],
)
def test_bad_key_error_messages_do_not_echo_the_key(tmp_path, key, mangle):
    bad = mangle(key)
    (tmp_path / "src").mkdir()
    (tmp_path / "mnt").mkdir()
    env = scrubbed_env(bad)
    done = subprocess.run(
        stormfs_cmd("mount", "--foreground", str(tmp_path / "src"), str(tmp_path / "mnt")),
        env=env,
        capture_output=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert done.stderr.strip()
    out = done.stdout + done.stderr
    assert bad.encode() not in out and bad[4:20].encode() not in out
    with pytest.raises(keys.InvalidKey) as e:
        keys.parse_key(bad)
    assert bad[4:20] not in str(e.value) and bad[4:20] not in repr(e.value)


def test_key_objects_do_not_show_their_material(key):
    k = keys.Key("1", keys.parse_key(key))
    ring = keys.Keyring(k)
    for text in (repr(k), str(k), repr(ring), str(ring)):
        assert_no_key(text.encode(), key, "repr")


def test_python_tracebacks_from_the_key_path_hold_no_key(tmp_path, key):
    """An unreadable key file, as an operator would meet it: the message names the file."""
    missing = tmp_path / "no-such-keyfile"
    env = scrubbed_env(key)  # also set: the error must not print it either
    (tmp_path / "src").mkdir()
    (tmp_path / "mnt").mkdir()
    done = subprocess.run(
        stormfs_cmd(
            "mount",
            "--foreground",
            "--key-file",
            str(missing),
            str(tmp_path / "src"),
            str(tmp_path / "mnt"),
        ),
        env=env,
        capture_output=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert b"no-such-keyfile" in done.stderr
    assert_no_key(done.stdout + done.stderr, key, "stderr")


def test_key_absent_from_proc_environ_and_cmdline(mount_factory: MountFactory, tmp_path, key):
    """/proc/<pid>/environ outlives unsetenv(): the daemon overwrites the key's bytes in
    its environment block once loaded.  A key file keeps it out from the start."""
    by_env = mount_factory()
    key_file = tmp_path / "keyfile"
    key_file.write_text(key)
    key_file.chmod(0o600)
    by_file = mount_factory(key=None, args=("--key-file", str(key_file)))
    for m in (by_env, by_file):
        for where in ("environ", "cmdline"):
            assert_no_key(Path(f"/proc/{m.pid}/{where}").read_bytes(), key, where)


def test_root_can_read_the_key_from_daemon_memory(mounted):
    """Not protected against: whoever can read the daemon's memory (root, ptrace) has the
    key.  Shown here by finding the raw key in /proc/<pid>/mem."""
    raw = mounted.raw_key
    found = False
    with open(f"/proc/{mounted.pid}/maps") as maps, open(f"/proc/{mounted.pid}/mem", "rb") as mem:
        for line in maps:
            addr, perms = line.split()[:2]
            if not perms.startswith("rw"):
                continue
            start, end = (int(x, 16) for x in addr.split("-"))
            try:
                mem.seek(start)
                if raw in mem.read(end - start):
                    found = True
                    break
            except OSError:
                continue
    assert found


# ---- what stays visible in SOURCE (documented, so that a change is noticed) -----------


def test_names_sizes_times_owners_and_layout_are_visible_in_source(mounted):
    d = mounted.mnt / "projects" / "merger-with-acme"
    d.mkdir(parents=True)
    (d / "term-sheet.pdf").write_bytes(b"x" * 12_345)
    os.chmod(d / "term-sheet.pdf", 0o640)
    os.chown(d / "term-sheet.pdf", 1234, 5678)
    os.utime(d / "term-sheet.pdf", ns=(1_000_000_000, 2_000_000_000))
    os.symlink("term-sheet.pdf", d / "latest")
    backing = mounted.source / "projects" / "merger-with-acme" / "term-sheet.pdf"
    st = backing.stat()
    assert st.st_size == 12_345 + 29  # the plaintext size, exactly
    assert st.st_mtime_ns == 2_000_000_000
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1234, 5678, 0o640)
    assert os.readlink(backing.parent / "latest") == "term-sheet.pdf"
    assert os.getxattr(backing, "user.stormfs.key_id") == b"1"


def _scratch_files(pid: int) -> list[str]:
    out = []
    for n in os.listdir(f"/proc/{pid}/fd"):
        link = _readlink(f"/proc/{pid}/fd/{n}")
        if "/.stormfs/tmp/" in link and link.endswith("(deleted)"):
            out.append(f"/proc/{pid}/fd/{n}")
    return out


def test_scratch_reveals_which_blocks_change_while_a_file_is_written(mounted):
    """Scratch blocks are AES-XTS under a per-mount key, tweaked by block index: someone
    who reads the disk twice while a file has pending random writes learns which 4 KiB
    blocks changed, and that a block went back to an earlier content.  Not the data."""
    f = mounted.mnt / "f"
    f.write_bytes(os.urandom(1 << 20))
    fd = os.open(f, os.O_RDWR)
    try:
        os.pwrite(fd, b"a", 0)
        block_a, block_b = os.urandom(4096), os.urandom(4096)
        os.pwrite(fd, block_a, 0)  # behind the streamed end: scratch from here on
        (scratch,) = _scratch_files(mounted.pid)

        def snapshot() -> list[bytes]:
            data = Path(scratch).read_bytes()
            return [data[i : i + 4096] for i in range(0, len(data), 4096)]

        first = snapshot()
        os.pwrite(fd, os.urandom(4096), 5 * 4096)
        second = snapshot()
        assert second[0] == first[0]
        assert [i for i, b in enumerate(second) if b != bytes(4096)] == [0, 5]
        os.pwrite(fd, block_b, 0)
        assert snapshot()[0] != first[0]
        os.pwrite(fd, block_a, 0)
        assert snapshot()[0] == first[0]  # same block, same content: same ciphertext
        assert block_a not in Path(scratch).read_bytes()
    finally:
        os.close(fd)


def test_every_commit_uses_a_fresh_nonce(mounted):
    nonces = set()
    for _ in range(30):
        (mounted.mnt / "same").write_bytes(b"the same content every time")
        nonces.add((mounted.source / "same").read_bytes()[1:13])
    assert len(nonces) == 30


def test_state_directory_is_private(mounted):
    state = mounted.source / ".stormfs"
    (inst,) = mounted.instance_dirs()
    for d in (state, state / "tmp", state / "tmp" / inst):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, d
    assert stat.S_IMODE((state / "tmp" / inst / "lock").stat().st_mode) == 0o600


# ---- another local user ---------------------------------------------------------------

NOBODY = 65534


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A directory other users can traverse (pytest's tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="stormfs-access-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def as_nobody(*cmd: str) -> subprocess.CompletedProcess:
    """A command as user nobody (system tools: the virtualenv lives under /root)."""
    return subprocess.run(
        list(cmd),
        user=NOBODY,
        group=NOBODY,
        extra_groups=[],
        capture_output=True,
        timeout=60,
        cwd="/",
    )


def test_another_user_cannot_enter_the_view(mount_factory: MountFactory, public_dir: Path):
    """A mount without allow_other answers only its own user (root here)."""
    m = mount_factory(public_dir / "src", public_dir / "mnt")
    (m.mnt / "f").write_bytes(b"secret")
    os.chmod(m.mnt / "f", 0o644)
    os.chmod(m.source, 0o755)
    done = as_nobody("ls", str(m.mnt))
    assert done.returncode != 0 and b"Permission denied" in done.stderr
    done = as_nobody("ls", str(m.source / ".stormfs"))
    assert done.returncode != 0 and b"Permission denied" in done.stderr
    # what that user can read in SOURCE (mode 0644 passed through) is the envelope only
    done = as_nobody("cat", str(m.source / "f"))
    assert done.returncode == 0 and len(done.stdout) == 6 + 29 and b"secret" not in done.stdout


def test_with_allow_other_file_modes_decide(mount_factory: MountFactory, public_dir: Path):
    """allow_other: other users enter the view, and the kernel enforces file modes
    (default_permissions is always on)."""
    m = mount_factory(public_dir / "src", public_dir / "mnt", args=("-o", "allow_other"))
    os.chmod(m.mnt, 0o755)
    (m.mnt / "private").write_bytes(b"root only")
    (m.mnt / "shared").write_bytes(b"for everyone")
    os.chmod(m.mnt / "private", 0o600)
    os.chmod(m.mnt / "shared", 0o644)
    done = as_nobody("cat", str(m.mnt / "shared"))
    assert done.returncode == 0 and done.stdout == b"for everyone"
    done = as_nobody("cat", str(m.mnt / "private"))
    assert done.returncode != 0 and b"Permission denied" in done.stderr
    done = as_nobody("sh", "-c", f"echo x > {m.mnt / 'shared'}")
    assert done.returncode != 0 and b"Permission denied" in done.stderr
    assert (m.mnt / "shared").read_bytes() == b"for everyone"
