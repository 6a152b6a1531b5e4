"""Real programs on a mount: copies, archives, a database, a repository, fio."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from stormfs import format_v2 as v2

from .helpers import Mount, MountFactory


def run(*cmd: str | os.PathLike, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(c) for c in cmd], cwd=cwd, check=True, capture_output=True, text=True, timeout=300
    )


def tree_digest(root: Path) -> dict[str, str]:
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            p = Path(dirpath) / name
            if p.is_symlink():
                out[str(p.relative_to(root))] = "->" + os.readlink(p)
            else:
                out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture
def sample_tree(tmp_path: Path) -> Path:
    """A slice of the Python standard library: many small files, some symlinks and xattrs."""
    src = Path(sysconfig.get_paths()["stdlib"]) / "json"
    tree = tmp_path / "tree"
    shutil.copytree(src, tree, ignore=shutil.ignore_patterns("__pycache__"))
    os.symlink("decoder.py", tree / "alias.py")
    os.setxattr(tree / "decoder.py", "user.origin", b"stdlib")
    (tree / "big.bin").write_bytes(os.urandom(3 << 20))
    return tree


def test_cp_a_onto_and_off_the_mount(mounted: Mount, sample_tree: Path, tmp_path: Path):
    run("cp", "-a", sample_tree, mounted.mnt / "copy")
    assert tree_digest(mounted.mnt / "copy") == tree_digest(sample_tree)
    assert os.getxattr(mounted.mnt / "copy" / "decoder.py", "user.origin") == b"stdlib"
    st_src, st_mnt = (sample_tree / "big.bin").stat(), (mounted.mnt / "copy" / "big.bin").stat()
    assert st_mnt.st_mtime_ns == st_src.st_mtime_ns
    run("cp", "-a", mounted.mnt / "copy", tmp_path / "back")
    assert tree_digest(tmp_path / "back") == tree_digest(sample_tree)


def test_rsync_ax_off_the_mount(mounted: Mount, sample_tree: Path, tmp_path: Path):
    run("rsync", "-aX", f"{sample_tree}/", f"{mounted.mnt}/r/")
    run("rsync", "-aX", f"{mounted.mnt}/r/", f"{tmp_path}/back/")
    assert tree_digest(tmp_path / "back") == tree_digest(sample_tree)
    assert os.getxattr(tmp_path / "back" / "big.bin", "user.stormfs.encryption_method") == (
        b"server"
    )


def test_tar_extract_and_compare(mounted: Mount, sample_tree: Path, tmp_path: Path):
    archive = tmp_path / "t.tar"
    run("tar", "-C", sample_tree.parent, "-cf", archive, sample_tree.name)
    run("tar", "-C", mounted.mnt, "-xf", archive)
    run("tar", "-C", mounted.mnt, "--compare", "-f", archive)
    assert tree_digest(mounted.mnt / sample_tree.name) == tree_digest(sample_tree)


@pytest.mark.parametrize("fmt", ["v1", "v2"])
def test_sqlite_workload_integrity(mount_factory: MountFactory, fmt: str):
    mounted = mount_factory(args=("-o", f"format={fmt}"))
    db = mounted.mnt / "app.db"
    script = """
    PRAGMA journal_mode=WAL;
    CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT);
    WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x+1 FROM c WHERE x < 20000)
      INSERT INTO t(v) SELECT hex(randomblob(40)) FROM c;
    UPDATE t SET v = 'changed' WHERE id % 7 = 0;
    DELETE FROM t WHERE id % 11 = 0;
    CREATE INDEX iv ON t(v);
    VACUUM;
    """
    run("sqlite3", db, script)
    # Many small transactions with a rollback journal, each synced: in-place writes
    # of a few pages in a file of several MiB.
    updates = "".join(
        f"BEGIN; UPDATE t SET v = 'u{i}' WHERE id = {i * 13 + 1}; COMMIT;\n" for i in range(200)
    )
    run("sqlite3", db, "PRAGMA journal_mode=DELETE; PRAGMA synchronous=FULL;\n" + updates)
    out = run("sqlite3", db, "PRAGMA integrity_check; SELECT count(*) FROM t;").stdout.split()
    assert out == ["ok", str(20000 - 20000 // 11)]
    signature = b"\x01" if fmt == "v1" else v2.SIGNATURE
    for name in os.listdir(mounted.source):
        if name.startswith("app.db") and (mounted.source / name).stat().st_size >= 29:
            assert (mounted.source / name).read_bytes()[: len(signature)] == signature
    assert mounted.decrypt("app.db") == (mounted.mnt / "app.db").read_bytes()


def test_git_init_add_commit_log(mounted: Mount, sample_tree: Path):
    repo = mounted.mnt / "repo"
    shutil.copytree(sample_tree, repo, symlinks=True)
    env = ["-c", "user.name=T", "-c", "user.email=t@example.com"]
    run("git", "init", "-q", cwd=repo)
    run("git", "add", "-A", cwd=repo)
    run("git", *env, "commit", "-qm", "first", cwd=repo)
    (repo / "decoder.py").write_text("changed\n")
    run("git", *env, "commit", "-qam", "second", cwd=repo)
    log = run("git", "log", "--oneline", cwd=repo).stdout.splitlines()
    assert len(log) == 2
    run("git", "fsck", "--strict", cwd=repo)
    assert run("git", "status", "--porcelain", cwd=repo).stdout == ""


@pytest.mark.parametrize("rw", ["write", "randwrite"])
def test_fio_verify(mounted: Mount, rw: str, tmp_path: Path):
    run(
        "fio",
        "--name=v",
        f"--directory={mounted.mnt}",
        f"--rw={rw}",
        "--bs=4k",
        "--size=16m",
        "--numjobs=2",
        "--verify=crc32c",
        "--verify_fatal=1",
        "--do_verify=1",
        "--end_fsync=1",
        cwd=tmp_path,  # fio leaves its verify state files in the working directory
    )


def test_python_tempfile_and_shutil(mounted: Mount):
    code = f"""
import os, shutil, tempfile
d = tempfile.mkdtemp(dir={str(mounted.mnt)!r})
with tempfile.NamedTemporaryFile(dir=d, delete=False) as f:
    f.write(b"x" * 100000)
shutil.copy2(f.name, f.name + ".copy")
shutil.move(f.name + ".copy", os.path.join(d, "moved"))
assert open(os.path.join(d, "moved"), "rb").read() == b"x" * 100000
shutil.rmtree(d)
"""
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
