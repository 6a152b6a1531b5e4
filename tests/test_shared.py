"""Shared storage: several stormfs daemons over one SOURCE (docs/SCALING.md).

On one machine this stands in for servers mounting one SOURCE from a distributed file
system: each daemon has its own kernel caches, inode table and instance directory, and
they meet only in SOURCE.  Short attribute and entry timeouts bound how stale a view is.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import subprocess
import threading
import time
from pathlib import Path

import pytest

from .helpers import Mount, MountFactory, scrubbed_env, stormfs_cmd, wait_for

pytestmark = pytest.mark.shared

TIMEOUTS = ("-o", "attr_timeout=0.5,entry_timeout=0.5")
SETTLE = 1.5  # comfortably past the timeouts above


def version(rng: random.Random, tag: bytes, max_size: int = 1 << 20) -> bytes:
    """A self-checking file content: body || sha256(body)."""
    body = tag + rng.randbytes(rng.randint(0, max_size))
    return body + hashlib.sha256(body).digest()


def complete(data: bytes) -> bool:
    return len(data) >= 32 and hashlib.sha256(data[:-32]).digest() == data[-32:]


@pytest.fixture
def pair(mount_factory: MountFactory, tmp_path: Path) -> tuple[Mount, Mount]:
    source = tmp_path / "shared"
    return mount_factory(source, args=TIMEOUTS), mount_factory(source, args=TIMEOUTS)


def test_two_daemons_each_have_their_instance(pair):
    a, b = pair
    names = a.instance_dirs()
    assert len(names) == 2
    assert any(f".{a.pid}." in n for n in names) and any(f".{b.pid}." in n for n in names)


def test_written_through_one_reads_through_the_other(pair):
    a, b = pair
    big = os.urandom(5 << 20)
    (a.mnt / "d").mkdir()
    (a.mnt / "d" / "big").write_bytes(big)
    (a.mnt / "small").write_bytes(b"from a")
    wait_for(lambda: (b.mnt / "small").exists(), timeout=SETTLE * 4)
    assert (b.mnt / "small").read_bytes() == b"from a"
    assert (b.mnt / "d" / "big").read_bytes() == big
    # rewrite through b, grow and shrink: a sees each new version after its timeouts
    for content in (b"from b, longer than before", b"b", os.urandom(300_000)):
        (b.mnt / "small").write_bytes(content)
        time.sleep(SETTLE)
        assert (a.mnt / "small").stat().st_size == len(content)
        assert (a.mnt / "small").read_bytes() == content
    # a patch in the middle of the big file through b
    with open(b.mnt / "d" / "big", "r+b") as f:
        f.seek(3 << 20)
        f.write(b"PATCHED")
    time.sleep(SETTLE)
    assert (a.mnt / "d" / "big").read_bytes() == big[: 3 << 20] + b"PATCHED" + big[(3 << 20) + 7 :]
    # names: rename and unlink through a, seen by b
    os.rename(a.mnt / "small", a.mnt / "d" / "moved")
    (a.mnt / "d" / "big").unlink()
    time.sleep(SETTLE)
    assert sorted(os.listdir(b.mnt)) == ["d"]
    assert os.listdir(b.mnt / "d") == ["moved"]
    assert (b.mnt / "d" / "moved").stat().st_size == 300_000


def test_open_handle_keeps_its_version_while_the_other_daemon_replaces_it(pair):
    a, b = pair
    first = os.urandom(200_000)
    (a.mnt / "f").write_bytes(first)
    time.sleep(SETTLE)
    with open(b.mnt / "f", "rb") as held:
        assert held.read(10) == first[:10]
        (a.mnt / "f").write_bytes(b"second version")
        time.sleep(SETTLE)
        held.seek(0)
        got = held.read()
    assert got in (first, first[: len(got)])  # never bytes of the second version
    assert (b.mnt / "f").read_bytes() == b"second version"


def test_handles_keep_their_version_when_another_open_sees_a_new_one(
    mount_factory: MountFactory, tmp_path: Path
):
    """A handle reads the version it opened to the end, even when a later open of the same
    name (still cached by the kernel: same inode) sees the new version."""
    a = mount_factory(tmp_path / "shared", args=TIMEOUTS)
    b = mount_factory(tmp_path / "shared", args=("-o", "attr_timeout=0.5,entry_timeout=60"))
    first, second = os.urandom(1 << 20), os.urandom(1 << 20)
    (a.mnt / "f").write_bytes(first)
    time.sleep(SETTLE)
    h1 = os.open(b.mnt / "f", os.O_RDONLY)
    try:
        assert os.pread(h1, 4096, 0) == first[:4096]
        (a.mnt / "f").write_bytes(second)
        time.sleep(SETTLE)
        assert (b.mnt / "f").read_bytes() == second
        os.posix_fadvise(h1, 0, 0, os.POSIX_FADV_DONTNEED)
        rest = b""
        while chunk := os.pread(h1, 1 << 16, 4096 + len(rest)):
            rest += chunk
    finally:
        os.close(h1)
    assert first[:4096] + rest == first


@pytest.mark.timeout(180)
def test_concurrent_writers_on_two_daemons_end_with_one_complete_version(
    mount_factory: MountFactory, tmp_path: Path, key: str
):
    """Writers on daemons a and b rewrite one file whole, over and over; readers on a third
    daemon c never see a mix or an error, nor does `stormfs audit` running all along; at
    the end every view shows one complete version, the same everywhere, and it is what
    SOURCE decrypts to."""
    source = tmp_path / "shared"
    a, b, c = (mount_factory(source, args=TIMEOUTS) for _ in range(3))
    rng = random.Random(5)
    (a.mnt / "f").write_bytes(version(rng, b"init"))
    written: set[bytes] = set()
    problems: list[str] = []
    stop = threading.Event()
    reads = [0]

    def writer(m: Mount, tag: bytes, seed: int) -> None:
        r = random.Random(seed)
        for i in range(25):
            data = version(r, b"%s-%d:" % (tag, i))
            written.add(hashlib.sha256(data).digest())
            try:
                fd = os.open(m.mnt / "f", os.O_WRONLY | os.O_TRUNC)
                try:
                    view = memoryview(data)
                    while view:
                        view = view[os.write(fd, view[: 256 << 10]) :]
                    if r.random() < 0.3:
                        os.fsync(fd)
                finally:
                    os.close(fd)
            except OSError as e:
                problems.append(f"writer {tag!r}: {e!r}")
                return

    def reader(m: Mount) -> None:
        while not stop.is_set():
            try:
                data = (m.mnt / "f").read_bytes()
            except OSError as e:
                if e.errno != errno.ENOENT:
                    problems.append(f"reader: {e!r}")
                continue
            reads[0] += 1
            if not complete(data):
                problems.append(f"reader saw a mix or a torn version ({len(data)} bytes)")

    writers = [
        threading.Thread(target=writer, args=(a, b"a", 1)),
        threading.Thread(target=writer, args=(b, b"b", 2)),
    ]
    # The audit loop runs in a process of its own, started before any writer opens the
    # file: a fork here would copy the writers' descriptors, and the child's close (at
    # exec) is a close() of the file, on which stormfs commits what was written so far.
    audit_dir, stop_file = tmp_path / "audits", tmp_path / "audits.stop"
    audit_dir.mkdir()
    loop = (
        'i=0; while [ ! -e "$1" ]; do "${@:3}" > "$2/$i.json"; echo $? > "$2/$i.rc"; '
        "i=$((i+1)); done"
    )
    audit_cmd = stormfs_cmd("audit", str(source), "--json")
    auditor = subprocess.Popen(
        ["bash", "-c", loop, "audit-loop", str(stop_file), str(audit_dir), *audit_cmd],
        env=scrubbed_env(key),
    )
    readers = [threading.Thread(target=reader, args=(c,)) for _ in range(2)]
    try:
        for t in writers + readers:
            t.start()
        for t in writers:
            t.join(150)
        stop.set()
        for t in readers:
            t.join(60)
    finally:
        stop_file.touch()
        try:
            auditor.wait(120)
        except subprocess.TimeoutExpired:
            auditor.kill()
            auditor.wait(10)
    audits: list[dict] = []
    for rc in sorted(audit_dir.glob("*.rc")):
        report = json.loads(rc.with_suffix(".json").read_text())
        audits.append(report)
        if rc.read_text().strip() != "0":
            problems.append(f"audit exited {rc.read_text().strip()}: {report['files']}")
    assert not problems, problems[:10]
    assert reads[0] > 0 and audits
    # the audit never saw a temporary, a half-written file or anything but one envelope
    assert all((r["encrypted"], r["issues"], r["needs_encryption"]) == (1, 0, 0) for r in audits)
    time.sleep(SETTLE)
    final = c.decrypt("f")
    assert complete(final) and hashlib.sha256(final).digest() in written
    for m in (a, b, c):
        assert (m.mnt / "f").read_bytes() == final
    assert sorted(os.listdir(source)) == [".stormfs", "f"]
    for m in (a, b, c):
        inst = next(n for n in m.instance_dirs() if f".{m.pid}." in n)
        wait_for(
            lambda i=inst: sorted(os.listdir(source / ".stormfs" / "tmp" / i)) == ["lease", "lock"]
        )
