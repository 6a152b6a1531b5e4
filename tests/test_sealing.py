"""Sealing in worker processes: what `stormfs encrypt` and `stormfs rotate` hand them,
what comes back, and that no worker outlives its run."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from stormfs import format as fmt
from stormfs import format_v2 as v2
from stormfs import keys, swap
from stormfs.exitcodes import OK
from stormfs.sealing import NotUnderKey, Seal, Workers

from .helpers import reference_decrypt, scrubbed_env
from .trees import KEY_ID, leftovers, legacy, plain_decrypt, stormfs, write

KEY = keys.Key("7", os.urandom(32))


@pytest.fixture
def workers() -> Iterator[Workers]:
    pool = Workers(2)
    yield pool
    pool.close()


def seal_into(
    workers: Workers,
    src: Path,
    old_key: keys.Key | None = None,
    *,
    version: int = 0,
    target: int = 1,
) -> tuple[bytes, int]:
    """Seal `src` (in format `version`) beside itself as `target` through `workers`;
    the copy's bytes and the bytes reported read."""
    fd = os.open(src, os.O_RDONLY)
    out = os.open(src.with_name(src.name + ".sealed"), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    read = [0]
    try:
        job = Seal(
            os.fstat(fd),
            KEY,
            old_key=old_key,
            version=version,
            target=target,
            leased=swap.take_lease(fd),
            path=os.fsencode(src),
        )
        t_st = workers.seal(fd, out, job, lambda n: read.__setitem__(0, read[0] + n))
        assert t_st.st_ino == os.fstat(out).st_ino
        return os.pread(out, t_st.st_size + 1, 0), read[0]
    finally:
        os.close(fd)
        os.close(out)


def test_files_sealed_at_once_by_the_processes(tmp_path: Path, workers: Workers):
    files = {tmp_path / f"f{i}": legacy(n) for i, n in enumerate((1, 5000, 3 << 20, 9 << 20))}
    for path, data in files.items():
        write(path, data)
        os.setxattr(path, "user.origin", b"kept")
        os.chmod(path, 0o640)
    results: dict[Path, tuple[bytes, int]] = {}
    threads = [
        threading.Thread(target=lambda p=p: results.__setitem__(p, seal_into(workers, p)))
        for p in files
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for path, data in files.items():
        sealed, read = results[path]
        assert reference_decrypt(KEY.material, sealed) == data
        assert read == len(data)  # progress, as the worker read
        copy = path.with_name(path.name + ".sealed")
        assert os.getxattr(copy, KEY_ID) == b"7"
        assert os.getxattr(copy, "user.origin") == b"kept"
        assert copy.stat().st_mode & 0o777 == 0o640
        assert copy.stat().st_mtime_ns == path.stat().st_mtime_ns


def test_a_rotation_keeps_the_copy_only_under_the_old_key(tmp_path: Path, workers: Workers):
    old = keys.Key("1", os.urandom(32))
    data = legacy(2 << 20)
    write(tmp_path / "under-old", fmt.seal(old.material, data))
    sealed, read = seal_into(workers, tmp_path / "under-old", old_key=old, version=1)
    assert reference_decrypt(KEY.material, sealed) == data
    assert read == len(data) + fmt.OVERHEAD
    write(tmp_path / "under-another", fmt.seal(os.urandom(32), data))
    with pytest.raises(NotUnderKey):
        seal_into(workers, tmp_path / "under-another", old_key=old, version=1)


@pytest.mark.parametrize("size", [0, 1, v2.CHUNK_SIZE, v2.CHUNK_SIZE + 1, (3 << 20) + 7])
def test_conversions_between_the_formats(tmp_path: Path, workers: Workers, size: int):
    """v1 to v2 and back, under another key; the bytes read are the original's size."""
    old = keys.Key("1", os.urandom(32))
    data = os.urandom(size)
    write(tmp_path / "v1", fmt.seal(old.material, data))
    sealed, read = seal_into(workers, tmp_path / "v1", old_key=old, version=1, target=2)
    assert v2.open_file(KEY.material, sealed) == data
    assert read == size + fmt.OVERHEAD
    write(tmp_path / "v2", sealed)
    back, read = seal_into(workers, tmp_path / "v2", old_key=KEY, version=2, target=1)
    assert reference_decrypt(KEY.material, back) == data
    assert read == len(sealed)


def test_a_damaged_v2_chunk_is_not_converted(tmp_path: Path, workers: Workers):
    damaged = bytearray(v2.seal(KEY.material, os.urandom(3 * v2.CHUNK_SIZE)))
    damaged[v2.chunk_offset(2, v2.CHUNK_SIZE) + 20] ^= 1
    write(tmp_path / "damaged", bytes(damaged))
    with pytest.raises(NotUnderKey):
        seal_into(workers, tmp_path / "damaged", old_key=KEY, version=2, target=1)


def test_a_worker_that_dies_fails_its_job_and_is_replaced(tmp_path: Path, workers: Workers):
    """Killed in the middle of a job: that job fails; killed between jobs: the next job
    goes to a new process."""
    write(tmp_path / "big", legacy(64 << 20))
    fd = os.open(tmp_path / "big", os.O_RDONLY)
    out = os.open(tmp_path / "big.sealed", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)

    def kill_them(n: int) -> None:  # told of the first MiB read: the job is under way
        for w in workers._workers:
            if w.proc.poll() is None:
                w.proc.kill()

    try:
        with pytest.raises(OSError, match="sealing process ended"):
            job = Seal(os.fstat(fd), KEY, None, 0, 1, False, os.fsencode(tmp_path / "big"))
            workers.seal(fd, out, job, kill_them)
    finally:
        os.close(fd)
        os.close(out)
    for w in workers._workers:
        w.proc.kill()
        w.proc.wait()
    write(tmp_path / "next", b"sealed by a new process")
    sealed, _ = seal_into(workers, tmp_path / "next")
    assert reference_decrypt(KEY.material, sealed) == b"sealed by a new process"


def children(pid: int) -> set[int]:
    """The children of every thread of `pid` (a thread may end while they are listed)."""
    found = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            found |= {int(c) for c in (task / "children").read_text().split()}
    return found


def alive(pid: int) -> bool:
    """Running (a zombie waiting for its new parent to reap it has ended)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def test_no_worker_outlives_a_killed_run(tmp_path: Path, key: str):
    """kill -9 of the run: its sealing processes end too, and the next run is not locked out."""
    src = tmp_path / "src"
    data = {f"f{i}": legacy(16 << 20) for i in range(4)}
    for rel, content in data.items():
        write(src / rel, content)
    cmd = [sys.executable, "-m", "stormfs", "encrypt", str(src), "--force", "--jobs", "2"]
    proc = subprocess.Popen(
        cmd, env=scrubbed_env(key), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    pids: set[int] = set()
    try:
        deadline = time.monotonic() + 60
        while not (leftovers(src) and len(pids) >= 2) and time.monotonic() < deadline:
            assert proc.poll() is None, "the run ended before it could be killed"
            pids = children(proc.pid)
            time.sleep(0.005)
        assert len(pids) >= 2, "no sealing processes seen"
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        deadline = time.monotonic() + 10
        while any(map(alive, pids)) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not [p for p in pids if alive(p)], "a worker outlived its run"
    finally:
        proc.kill()
        proc.wait(10)
        for p in pids:
            if alive(p):
                os.kill(p, signal.SIGKILL)
    r = stormfs("encrypt", str(src), "--force", key=key)
    assert r.returncode == OK, r.stderr
    for rel, content in data.items():
        assert plain_decrypt(key, (src / rel).read_bytes()) == content
    assert leftovers(src) == []
