"""The benchmark workloads. Each one times only the operations under test and then
checks that what it reads back is exactly what was written."""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import sqlite3
import struct
import subprocess
import sysconfig
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

KiB = 1 << 10
MiB = 1 << 20
PAGE = 4 * KiB
BASE = random.Random(0x5707).randbytes(MiB)  # page bodies; every page is stamped on top
STAMP = struct.Struct(">4sII")  # b"page", file id, page index: never starts with 0x01


class CheckFailed(Exception):
    """What was read back differs from what was written."""


def drop_caches() -> None:
    """Write back everything, then drop page cache, dentries and inodes."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def data(first_page: int, size: int, file_id: int = 0) -> bytearray:
    """Deterministic content: `size` bytes starting at page `first_page` of file `file_id`.

    Each 4 KiB page carries its file id and index, so a misplaced page cannot
    pass a check.
    """
    npages = -(-size // PAGE)
    start = (first_page % (MiB // PAGE)) * PAGE
    rotated = BASE[start:] + BASE[:start]
    buf = bytearray(rotated) * -(-npages * PAGE // MiB)
    for i in range(npages):
        STAMP.pack_into(buf, i * PAGE, b"page", file_id, first_page + i)
    del buf[size:]
    return buf


def vm_hwm_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / KiB
    raise RuntimeError(f"no VmHWM for pid {pid}")


def reset_hwm(pid: int) -> None:
    """Reset the peak RSS to the current RSS (Linux >= 4.0)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5\n")


def _timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _mbps(nbytes: int, seconds: float) -> float:
    return nbytes / 1e6 / seconds


def _run(*argv: str | Path) -> subprocess.CompletedProcess[bytes]:
    proc = subprocess.run([str(a) for a in argv], capture_output=True)
    if proc.returncode != 0:
        err = proc.stderr.decode(errors="replace").strip().splitlines()[-3:]
        raise CheckFailed(f"{argv[0]} exited {proc.returncode}: {' | '.join(err)}")
    return proc


def _write_file(path: Path, buf: bytes | bytearray, chunk: int = MiB) -> None:
    view = memoryview(buf)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for off in range(0, len(view), chunk):
            part = view[off : off + chunk]
            while part:
                part = part[os.write(fd, part) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_into(path: Path, view: memoryview, chunk: int = MiB) -> int:
    with open(path, "rb", buffering=0) as f:
        got = 0
        while n := f.readinto(view[got : got + chunk]):
            got += n
        return got


@dataclass
class StdlibTree:
    """A tar of the first `limit` files of the Python standard library, and what
    each file must hash to after extraction."""

    tar: Path
    manifest: dict[str, str] = field(default_factory=dict)

    @classmethod
    def build(cls, tar: Path, limit: int) -> StdlibTree:
        lib = Path(sysconfig.get_paths()["stdlib"])
        files: list[Path] = []
        for root, dirs, names in os.walk(lib):
            dirs[:] = sorted(d for d in dirs if d not in ("__pycache__", "site-packages"))
            paths = (Path(root, n) for n in sorted(names))
            files += [p for p in paths if p.is_file() and not p.is_symlink()]
            if len(files) >= limit:
                break
        tree = cls(tar)
        with tarfile.open(tar, "w") as out:
            for d in sorted({f.parent for f in files[:limit]}):
                out.add(d, arcname=f"Lib/{d.relative_to(lib)}", recursive=False)
            for f in files[:limit]:
                rel = f"Lib/{f.relative_to(lib)}"
                out.add(f, arcname=rel)
                tree.manifest[rel] = hashlib.sha256(f.read_bytes()).hexdigest()
        return tree


def extract(tree: StdlibTree, into: Path) -> Path:
    """The tree unpacked into a local directory (`into`/Lib), the source of `cp -r` and
    `rsync -a`; made once per run."""
    if into.exists():
        shutil.rmtree(into)
    into.mkdir(parents=True)
    _run("tar", "-xf", tree.tar, "-C", into)
    return into / "Lib"


def git_repo(tree: Path, path: Path, nfiles: int) -> dict[str, str]:
    """A local git repository of `nfiles` files (the tree's, then its first files again
    under ``more/`` until there are enough), one commit; what a checkout must hold."""
    files = sorted(p for p in tree.rglob("*") if p.is_file())
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    manifest = {}
    for i in range(nfiles):
        src = files[i % len(files)]
        rel = Path(*(["more"] * (i // len(files))), src.relative_to(tree))
        (path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, path / rel)
        manifest[f"{path.name}/{rel}"] = hashlib.sha256(src.read_bytes()).hexdigest()
    git = ("git", "-C", path, "-c", "user.name=bench", "-c", "user.email=bench@localhost")
    _run(*git, "init", "-q")
    _run(*git, "add", "-A")
    _run(*git, "commit", "-q", "-m", "tree")
    return manifest


def tree_op(
    mnt: Path, argv: tuple[str | Path, ...], manifest: dict[str, str], mark: Callable[[], None]
) -> float:
    """Run `argv` (which makes the files of `manifest` under `mnt`), timed; then `mark()`,
    check every file by hash, and remove what it made (neither timed)."""
    seconds = _timed(lambda: _run(*argv))
    mark()
    wrong = [k for k, v in manifest.items() if _sha256(mnt / k) != v]
    _check(not wrong, f"{argv[0]}: {len(wrong)} files differ or missing, e.g. {wrong[:1]}")
    for top in sorted({k.split("/", 1)[0] for k in manifest}):
        _run("rm", "-rf", mnt / top)
    return seconds


def _sha256(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def _check(cond: bool, what: str) -> None:
    if not cond:
        raise CheckFailed(what)


def seq_write(mnt: Path, seq: bytearray) -> dict[str, float]:
    seconds = _timed(lambda: _write_file(mnt / "seq.bin", seq))
    return {"seq_write": _mbps(len(seq), seconds)}


def seq_read(mnt: Path, seq: bytearray, scratch: bytearray) -> dict[str, float]:
    """Cold (after drop_caches), then warm; the first read checks the write."""
    out: dict[str, float] = {}
    expected = hashlib.sha256(seq).digest()
    view = memoryview(scratch)[: len(seq)]
    for key in ("seq_read_cold", "seq_read_warm"):
        if key == "seq_read_cold":
            drop_caches()
        t0 = time.perf_counter()
        got = _read_into(mnt / "seq.bin", view)
        out[key] = _mbps(got, time.perf_counter() - t0)
        _check(got == len(seq) and hashlib.sha256(view).digest() == expected, f"{key}: bad data")
    return out


def random_reads(mnt: Path, seq: bytearray, count: int) -> dict[str, float]:
    """4 KiB preads at page-aligned random offsets, cold and then warm (same offsets)."""
    pages = random.Random(count).choices(range(len(seq) // PAGE), k=count)
    out: dict[str, float] = {}
    for key in ("rand_read_cold", "rand_read_warm"):
        if key == "rand_read_cold":
            drop_caches()
        fd = os.open(mnt / "seq.bin", os.O_RDONLY)
        try:
            t0 = time.perf_counter()
            got = [os.pread(fd, PAGE, p * PAGE) for p in pages]
            out[key] = time.perf_counter() - t0
        finally:
            os.close(fd)
        bad = sum(g != seq[p * PAGE : (p + 1) * PAGE] for g, p in zip(got, pages, strict=True))
        _check(bad == 0, f"{key}: {bad} of {count} pages wrong")
    os.unlink(mnt / "seq.bin")
    return out


def small_files(mnt: Path, tree: StdlibTree) -> dict[str, float]:
    """Extract, stat walk cold/warm, read back cold, rm -rf."""
    out = {"tar_extract": _timed(lambda: _run("tar", "-xf", tree.tar, "-C", mnt))}
    nfiles = len(tree.manifest)
    for key in ("stat_walk_cold", "stat_walk_warm"):
        if key == "stat_walk_cold":
            drop_caches()
        t0 = time.perf_counter()
        listing = _run("ls", "-lR", mnt / "Lib").stdout
        out[key] = time.perf_counter() - t0
        seen = sum(line.startswith(b"-") for line in listing.splitlines())
        _check(seen == nfiles, f"{key}: saw {seen} files, expected {nfiles}")

    def read_all() -> dict[str, str]:
        found = {}
        for root, _dirs, names in os.walk(mnt / "Lib"):
            for name in names:
                path = Path(root, name)
                found[str(path.relative_to(mnt))] = hashlib.sha256(path.read_bytes()).hexdigest()
        return found

    drop_caches()
    t0 = time.perf_counter()
    found = read_all()
    out["read_all"] = time.perf_counter() - t0
    wrong = sum(found.get(k) != v for k, v in tree.manifest.items())
    _check(wrong == 0 and len(found) == nfiles, f"read_all: {wrong} files differ or missing")

    out["rm_rf"] = _timed(lambda: _run("rm", "-rf", mnt / "Lib"))
    _check(not (mnt / "Lib").exists(), "rm_rf: tree still there")
    return out


def overwrite(mnt: Path, count: int) -> dict[str, float]:
    """open / write 4 KiB in the middle / close, `count` times, on a 1 MiB file."""
    path, middle = mnt / "overwrite.bin", MiB // 2
    expected = data(0, MiB, file_id=7)
    _write_file(path, expected)
    patches = [STAMP.pack(b"over", i, i) * (PAGE // STAMP.size) for i in range(count)]
    patches = [p.ljust(PAGE, b"\0") for p in patches]

    def loop() -> None:
        for patch in patches:
            fd = os.open(path, os.O_WRONLY)
            try:
                os.pwrite(fd, patch, middle)
            finally:
                os.close(fd)

    seconds = _timed(loop)
    expected[middle : middle + PAGE] = patches[-1]
    drop_caches()
    _check(path.read_bytes() == expected, "overwrite: file content differs after drop_caches")
    path.unlink()
    return {"overwrite": seconds}


def synced_writes(mnt: Path, big: int, count: int) -> dict[str, float]:
    """ms per 4 KiB pwrite + fsync at random page-aligned offsets, and per 4 KiB append +
    fsync, in a 1 MiB file and in a `big` one: flat in the file size if a write costs
    the chunks it touches."""
    out: dict[str, float] = {}
    rng = random.Random(0x5EED)
    for label, size in (("small", MiB), ("big", big)):
        pwrite_ms, append_ms = _synced_file(mnt / f"synced-{label}.bin", size, count, rng)
        out[f"pwrite_fsync_{label}"] = pwrite_ms
        out[f"append_fsync_{label}"] = append_ms
    return out


def _synced_file(path: Path, size: int, count: int, rng: random.Random) -> tuple[float, float]:
    expected = data(0, size, file_id=9)
    _write_file(path, expected)
    patches = [STAMP.pack(b"sync", i, i).ljust(PAGE, b"\1") for i in range(2 * count)]
    offsets = [rng.randrange(size // PAGE) * PAGE for _ in range(count)]
    fd = os.open(path, os.O_WRONLY)

    def pwrites() -> None:
        for off, patch in zip(offsets, patches, strict=False):
            os.pwrite(fd, patch, off)
            os.fsync(fd)

    def appends() -> None:
        for i in range(count):
            os.pwrite(fd, patches[count + i], size + i * PAGE)
            os.fsync(fd)

    try:
        pwrite_ms = _timed(pwrites) * 1000 / count
        append_ms = _timed(appends) * 1000 / count
    finally:
        os.close(fd)
    for off, patch in zip(offsets, patches, strict=False):
        expected[off : off + PAGE] = patch
    expected += b"".join(patches[count:])
    drop_caches()
    _check(path.read_bytes() == expected, f"synced writes: {path.name} differs")
    path.unlink()
    return pwrite_ms, append_ms


def sqlite_updates(mnt: Path, scratch: Path, size: int, count: int) -> dict[str, float]:
    """ms per single-row UPDATE transaction (rollback journal, synchronous=FULL) in a
    database of `size` bytes, built outside the mount and copied in."""
    built = scratch / f"bench-{size}.db"
    rows = size // 1024
    if not built.exists():
        db = sqlite3.connect(built)
        db.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)")
        db.executemany(
            "INSERT INTO t(v) VALUES (?)", ((random.Random(i).randbytes(900),) for i in range(rows))
        )
        db.commit()
        db.close()
    path = mnt / "bench.db"
    shutil.copyfile(built, path)
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=DELETE")
        db.execute("PRAGMA synchronous=FULL")
        rng = random.Random(0xDB)
        ids = [rng.randrange(1, rows + 1) for _ in range(count)]

        def updates() -> None:
            for i, row in enumerate(ids):
                db.execute("BEGIN")
                db.execute("UPDATE t SET v = ? WHERE id = ?", (b"updated %d" % i, row))
                db.execute("COMMIT")

        seconds = _timed(updates)
        _check(
            db.execute("PRAGMA integrity_check").fetchone()[0] == "ok", "sqlite: integrity check"
        )
    finally:
        db.close()
    path.unlink()
    return {"sqlite_update": seconds * 1000 / count}


def big_file_rss(mnt: Path, pid: int, size: int) -> dict[str, float]:
    """Peak daemon RSS while writing `size` bytes in 1 MiB writes, then reading them back cold."""
    path, blocks = mnt / "big.bin", size // MiB
    reset_hwm(pid)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for b in range(blocks):
            os.write(fd, data(b * (MiB // PAGE), MiB, file_id=9))
        os.fsync(fd)
    finally:
        os.close(fd)
    rss_write = vm_hwm_mib(pid)
    drop_caches()
    with open(path, "rb", buffering=0) as f:
        for b in range(blocks):
            _check(f.read(MiB) == data(b * (MiB // PAGE), MiB, file_id=9), f"big: block {b}")
        _check(f.read(1) == b"", "big: file longer than written")
    path.unlink()
    return {"rss_write": rss_write, "peak_rss": vm_hwm_mib(pid)}


def legacy_tree(root: Path, size: int) -> dict[str, str]:
    """About `size` bytes of plaintext files: half in a few large files, a third in
    256 KiB - 2 MiB files, the rest in 1 - 64 KiB files, 100 per directory."""
    rng = random.Random(size)
    sizes = [size // 8] * 4
    for share, low, high in (
        (size * 35 // 100, 256 * KiB, 2 * MiB),
        (size * 15 // 100, KiB, 64 * KiB),
    ):
        while share > 0:
            sizes.append(min(share, rng.randint(low, high)))
            share -= sizes[-1]
    manifest = {}
    for i, n in enumerate(sizes):
        rel = f"d{i // 100:03d}/f{i:05d}.bin"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        content = data(0, n, file_id=i)
        (root / rel).write_bytes(content)
        manifest[rel] = hashlib.sha256(content).hexdigest()
    return manifest


def _hash_tree(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in root.rglob("*")
        if p.is_file()
    }


def _check_envelopes(root: Path, manifest: dict[str, str], key: str) -> None:
    """Every file must be a v1 envelope (DESIGN section 1) of its original bytes."""
    import base64

    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    aead = AESGCM(base64.urlsafe_b64decode(key + "=" * (-len(key) % 4)))
    for rel, digest in manifest.items():
        blob = (root / rel).read_bytes()
        _check(blob[:1] == b"\x01", f"migrate: {rel} is not an envelope")
        plain = aead.decrypt(blob[1:13], blob[13:], None)
        _check(hashlib.sha256(plain).hexdigest() == digest, f"migrate: {rel} decrypts wrongly")
    extra = {p for p in set(_hash_tree(root)) - set(manifest) if not p.startswith(".stormfs/")}
    _check(not extra, f"migrate: unexpected files left: {sorted(extra)[:3]}")


def _timed_stormfs(program: str, args: list[str], env: dict[str, str], log: Path) -> float:
    """Seconds `program ARGS` takes, from cold; its output goes to `log`."""
    drop_caches()
    with open(log, "ab") as out:
        t0 = time.perf_counter()
        rc = subprocess.run([program, *args], env=env, stdout=out, stderr=subprocess.STDOUT)
        seconds = time.perf_counter() - t0
    _check(rc.returncode == 0, f"migrate: stormfs {args[0]} exited {rc.returncode}, see {log}")
    return seconds


def migrate(
    workdir: Path, size: int, program: str, env: dict[str, str], keys: tuple[str, str], log: Path
) -> dict[str, Any]:
    """MB/s of `cp -a tree copy && sync`, of `stormfs encrypt tree --force` (key 1) and of
    `stormfs rotate tree --force` from key 1 to key 2 (key 1 in the keyring), each from cold."""
    tree, copy = workdir / "tree", workdir / "copy"
    manifest = legacy_tree(tree, size)
    nbytes = sum(p.stat().st_size for p in tree.rglob("*") if p.is_file())
    drop_caches()
    t0 = time.perf_counter()
    _run("cp", "-a", tree, copy)
    os.sync()
    cp_seconds = time.perf_counter() - t0
    _check(_hash_tree(copy) == manifest, "migrate: cp -a copy differs")
    shutil.rmtree(copy)
    old, new = keys
    encrypt_env = {**env, "STORMCLOUD_ENCRYPTION_KEY": old, "STORMCLOUD_ENCRYPTION_KEY_ID": "1"}
    encrypt_seconds = _timed_stormfs(program, ["encrypt", str(tree), "--force"], encrypt_env, log)
    _check_envelopes(tree, manifest, old)
    keyring = workdir / "keyring"
    fd = os.open(keyring, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f"1 {old}\n")
    rotate_env = {**env, "STORMCLOUD_ENCRYPTION_KEY": new, "STORMCLOUD_ENCRYPTION_KEY_ID": "2"}
    rotate = ["rotate", str(tree), "--force", "--keyring", str(keyring)]
    rotate_seconds = _timed_stormfs(program, rotate, rotate_env, log)
    _check_envelopes(tree, manifest, new)
    return {
        "files": len(manifest),
        "bytes": nbytes,
        "cp_a": _mbps(nbytes, cp_seconds),
        "encrypt": _mbps(nbytes, encrypt_seconds),
        "rotate": _mbps(nbytes, rotate_seconds),
    }
