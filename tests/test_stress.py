"""Stress and conformance: fsx, fio with verification, CPython's own file-system tests.

`make test` runs the short versions; `make stress` (pytest -m stress) the long ones.
"""

from __future__ import annotations

import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

from .helpers import Mount, MountFactory

CPYTHON_MODULES = [
    "test_os",
    "test_shutil",
    "test_tempfile",
    "test_fileio",
    "test_io",
    "test_glob",
    "test_pathlib",
    "test_mmap",
    "test_tarfile",
    "test_zipfile",
]


def run_fsx(m: Mount, files: dict[str, int], ops: int, max_size: int) -> None:
    """One fsx process per file (name -> seed), all at once; then the files as stored
    decrypt to what the view shows."""
    procs = {
        name: subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.fsx",
                str(m.mnt / name),
                f"--ops={ops}",
                f"--seed={seed}",
                f"--max-size={max_size}",
            ],
            cwd=Path(__file__).parent.parent,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for name, seed in files.items()
    }
    failures = []
    for proc in procs.values():
        out, _ = proc.communicate(timeout=3000)
        print(out.strip())
        if proc.returncode != 0:
            failures.append(out)
    assert not failures, "\n\n".join(failures)
    views = {name: (m.mnt / name).read_bytes() for name in files}
    m.stop()
    for name, data in views.items():
        assert m.decrypt(name) == data, name


def seeds(n: int) -> dict[str, int]:
    rng = random.Random()
    return {f"fsx{i}.bin": rng.randrange(1 << 32) for i in range(n)}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("fmt", ["v1", "v2"])
def test_fsx_short(mount_factory: MountFactory, fmt: str):
    run_fsx(mount_factory(args=("-o", f"format={fmt}")), seeds(3), ops=300, max_size=512 << 10)


@pytest.mark.stress
@pytest.mark.timeout(3600)
@pytest.mark.parametrize("fmt", ["v1", "v2"])
def test_fsx_long(mount_factory: MountFactory, fmt: str):
    mounted = mount_factory(args=("-o", f"format={fmt}"))
    ops = int(os.environ.get("STORMFS_FSX_OPS", "5000"))
    run_fsx(mounted, seeds(4), ops=ops, max_size=4 << 20)


# ---- fio: parallel readers and writers, shared and distinct files, verified --------------


def fio(*args: str, timeout: int) -> list[list[str]]:
    """Run fio; its terse lines, one per job, split into fields."""
    done = subprocess.run(
        ["fio", "--output-format=terse", "--terse-version=3", "--verify_state_save=0", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return [line.split(";") for line in done.stdout.splitlines() if line.startswith("3;")]


def fio_jobs(directory: Path, *, size: str, jobs: int, loops: int, fsync_every: int) -> list[str]:
    """Writers on files of their own and on one shared file (a region each), verified
    after writing; readers verify a file set written before, all at the same time.
    Each fsync commits the whole shared file (one envelope): `fsync_every` writes."""
    common = [
        f"--directory={directory}",
        "--bsrange=512-64k",
        "--verify=crc32c",
        "--verify_fatal=1",
        f"--loops={loops}",
    ]
    return [
        *common,
        "--name=distinct",
        "--rw=randwrite",
        f"--numjobs={jobs}",
        f"--size={size}",
        "--do_verify=1",
        "--end_fsync=1",
        "--name=shared",
        "--filename=shared.bin",
        "--rw=randwrite",
        f"--numjobs={jobs}",
        f"--size={size}",
        f"--offset_increment={size}",
        "--do_verify=1",
        f"--fsync={fsync_every}",
        "--name=readers",
        "--filename=prewritten.bin",
        "--rw=randwrite",
        "--verify_only=1",
        f"--numjobs={jobs}",
        f"--size={size}",
        f"--offset_increment={size}",
    ]


def run_fio(m: Mount, *, size: str, jobs: int, loops: int, fsync_every: int, timeout: int) -> None:
    # the file the readers verify, written first with the same layout
    fio(
        f"--directory={m.mnt}",
        "--bsrange=512-64k",
        "--verify=crc32c",
        "--name=readers",
        "--filename=prewritten.bin",
        "--rw=randwrite",
        f"--numjobs={jobs}",
        f"--size={size}",
        f"--offset_increment={size}",
        "--do_verify=1",
        timeout=timeout,
    )
    jobs_done = fio(
        *fio_jobs(m.mnt, size=size, jobs=jobs, loops=loops, fsync_every=fsync_every),
        timeout=timeout,
    )
    assert len(jobs_done) == 3 * jobs
    for fields in jobs_done:
        assert fields[4] == "0", f"fio job {fields[2]} reported error {fields[4]}"
    print(f"fio: {len(jobs_done)} jobs, all verified")
    m.stop()
    for name in os.listdir(m.source):
        if name != ".stormfs":
            assert (m.source / name).read_bytes()[:1] == b"\x01", name


@pytest.mark.timeout(600)
def test_fio_parallel_verify_short(mounted: Mount):
    run_fio(mounted, size="3m", jobs=3, loops=1, fsync_every=16, timeout=500)


@pytest.mark.stress
@pytest.mark.timeout(3600)
def test_fio_parallel_verify_long(mounted: Mount):
    run_fio(mounted, size="32m", jobs=4, loops=2, fsync_every=500, timeout=3500)


# ---- CPython's own file-system tests on a mount ------------------------------------------


@pytest.mark.stress
@pytest.mark.timeout(7200)
def test_cpython_file_system_tests_on_a_mount(mount_factory: MountFactory, tmp_path: Path):
    """CPython's test modules with TMPDIR (and their working directory) on a mount."""
    probe = subprocess.run([sys.executable, "-c", "import test.support"], capture_output=True)
    assert probe.returncode == 0, (
        f"{sys.executable} has no `test` package (Debian's python3.11: apt-get install "
        "libpython3.11-testsuite; pyenv and python.org builds ship it)"
    )
    m = mount_factory()
    work = m.mnt / "cpython"
    work.mkdir()
    env = dict(os.environ, TMPDIR=str(work))
    done = subprocess.run(
        [sys.executable, "-m", "test", f"--tempdir={work}", "-j2", *CPYTHON_MODULES],
        env=env,
        capture_output=True,
        text=True,
        timeout=7000,
    )
    out = done.stdout + done.stderr
    (tmp_path / "cpython-tests.log").write_text(out)
    passed = re.findall(r"(test_\w+) passed", out)
    print(f"CPython tests passing on the mount: {sorted(set(passed))}")
    summary = [line for line in out.splitlines() if line.startswith(("Total", "Result"))]
    print("\n".join(summary))
    assert done.returncode == 0, out[-5000:]
    assert set(CPYTHON_MODULES) <= set(passed)
