"""Encrypting a SOURCE that is mounted and in use, and written to directly."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from stormfs import format as fmt
from stormfs import format_v2 as v2
from stormfs import keys
from stormfs.exitcodes import ISSUES_FOUND, OK

from .helpers import MountFactory, scrubbed_env
from .live_worker import version_bytes
from .trees import (
    DAEMON_INODE_REUSE,
    format_of,
    leftovers,
    legacy,
    plain_decrypt,
    plaintext,
    run_json,
    stormfs,
    write,
)

WORKER = str(Path(__file__).with_name("live_worker.py"))


def content(key: str, raw: bytes) -> bytes:
    return plain_decrypt(key, raw) if raw[:1] == b"\x01" else raw


@pytest.fixture(params=["disk", "tmpfs"])
def live_source(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Path]:
    """SOURCE on the test's own filesystem, and on a tmpfs, which never reuses inode numbers."""
    src = tmp_path / "src"
    src.mkdir()
    if request.param == "disk":
        yield src
        return
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512m", "tmpfs", str(src)])
    if r.returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield src
    finally:
        subprocess.run(["umount", "-l", str(src)], timeout=30)


def test_encrypt_while_mounted_and_in_use(
    tmp_path: Path, live_source: Path, key: str, mount_factory: MountFactory
):
    migrate_in_use(tmp_path, live_source, key, mount_factory, stored=lambda i, data: data)


@pytest.mark.parametrize("target", [2, 1])
def test_convert_while_mounted_and_in_use(
    tmp_path: Path, key: str, mount_factory: MountFactory, target: int
):
    """encrypt --format: legacy and v1 files become v2 (v2 files become v1) while the mount
    (writing v1) reads and appends, and another program replaces files in SOURCE."""
    raw = keys.parse_key(key)
    if target == 2:
        sealers = (lambda data: data, lambda data: fmt.seal(raw, data))
    else:
        sealers = (lambda data: v2.seal(raw, data),)
    migrate_in_use(
        tmp_path,
        tmp_path / "src",
        key,
        mount_factory,
        stored=lambda i, data: sealers[i % len(sealers)](data),
        target=target,
        static=20,
        appended=12,
    )


def migrate_in_use(
    tmp_path: Path,
    src: Path,
    key: str,
    mount_factory: MountFactory,
    *,
    stored: Callable[[int, bytes], bytes],
    target: int | None = None,
    static: int = 40,
    appended: int = 24,
) -> None:
    """Runs of encrypt (with ``--format v<target>`` if given; else legacy to v1) while
    readers and an appender use a mount of SOURCE and a writer replaces files in it
    directly; then every file is in the target format, nothing lost or torn.  The
    i-th original file is stored as `stored(i, content)`."""
    args = () if target is None else ("--format", f"v{target}")
    target = target or 1
    src.mkdir(exist_ok=True)
    manifest: dict[str, dict] = {}
    originals: dict[str, bytes] = {}
    for i in range(static):
        rel = f"static/s{i}"
        originals[rel] = legacy(10_000 + i * 25_000)
        manifest[rel] = {"kind": "static"}
    for i in range(appended):
        rel = f"append/a{i}"
        originals[rel] = legacy(1_500_000)
        manifest[rel] = {"kind": "append", "record": f"appended through the mount to {rel}\n"}
    for i, (rel, data) in enumerate(originals.items()):
        write(src / rel, stored(i, data))
        manifest[rel].update(
            size=len(data), sha256=hashlib.sha256(data).hexdigest(), head=data[:64].hex()
        )
    for i in range(3):
        rel = f"versions/v{i}"
        write(src / rel, version_bytes(rel, 0))
        manifest[rel] = {"kind": "versions"}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    m = mount_factory(src)
    stop = tmp_path / "stop"

    counter = iter(range(100))

    def worker(role: str, *args: str) -> tuple[subprocess.Popen, Path]:
        out = tmp_path / f"{role}-{next(counter)}.out"
        cmd = [sys.executable, WORKER, role, str(tmp_path / "manifest.json"), *args, str(out)]
        return subprocess.Popen(cmd), out

    readers = [worker("read", str(m.mnt), str(stop)) for _ in range(2)]
    writer = worker("versions", str(src), str(stop))
    appender = worker("append", str(m.mnt))
    runs = []
    for _ in range(2):
        rc, report = run_json("encrypt", str(src), "--force", *args, key=key)
        runs.append(report)
        assert rc in (OK, ISSUES_FOUND), report
    assert appender[0].wait(60) == 0
    time.sleep(0.5)
    stop.touch()
    for proc, _ in (*readers, writer):
        assert proc.wait(60) == 0
    rc, final = run_json("encrypt", str(src), "--force", *args, key=key)
    assert rc == OK, final

    foreign = []
    for _, out in readers:
        result = json.loads(out.read_text())
        assert result["reads"] > len(manifest)
        # Every read is a version the file had, except reads that returned another
        # file's content, which are the daemon's (see DAEMON_INODE_REUSE).
        assert [f for f in result["failures"] if not f["other"]] == [], result["failures"]
        foreign += [f for f in result["failures"] if f["other"]]
    assert not foreign or src.stat().st_dev == tmp_path.stat().st_dev, foreign
    assert sum(r["encrypted_now"] for r in runs) > 0  # the migration really raced the users
    for rel, data in originals.items():
        expect = data + manifest[rel].get("record", "").encode()
        raw = (src / rel).read_bytes()
        assert format_of(raw) == target, rel
        assert plaintext(key, raw) == expect, f"{rel}: a write was lost"
        assert (m.mnt / rel).read_bytes() == expect
    last = json.loads(writer[1].read_text())["last"]
    for rel, v in last.items():
        raw = (src / rel).read_bytes()
        assert format_of(raw) == target and plaintext(key, raw) == version_bytes(rel, v), rel
        assert (m.mnt / rel).read_bytes() == version_bytes(rel, v)
    assert leftovers(src) == []
    rc, audit = run_json("audit", str(src), key=key)
    assert audit["needs_encryption"] == 0 and audit["issues"] == 0, audit
    assert audit["formats"][f"v{target}"] == len(manifest), audit
    if foreign and src.stat().st_dev == tmp_path.stat().st_dev:
        pytest.xfail(f"{DAEMON_INODE_REUSE} ({len(foreign)} reads, e.g. {foreign[0]})")


def test_open_for_writing_during_encryption_is_not_lost(tmp_path: Path, key: str):
    """A writer that opens the file mid-encryption waits for the lease, then writes the original;
    the attempt is dropped and the new content encrypted on the retry."""
    src = tmp_path / "src"
    data = legacy(160 << 20)
    big = write(src / "big", data)
    env = scrubbed_env(key)
    proc = subprocess.Popen(
        [sys.executable, "-m", "stormfs", "encrypt", str(src), "--force", "--json"],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        temps = leftovers(src)
        if temps and 0 < (src / temps[0]).stat().st_size < len(data) // 4:
            break
        assert proc.poll() is None, "the run ended before the writer could start"
        time.sleep(0.001)
    with open(big, "ab") as f:  # waits until encrypt lets go of the file
        f.write(b"appended mid-run\n")
    out, _ = proc.communicate(timeout=120)
    report = json.loads(out)
    assert proc.returncode == OK, report
    assert report["encrypted_now"] == 1
    assert plain_decrypt(key, big.read_bytes()) == data + b"appended mid-run\n"
    assert leftovers(src) == []


def test_quiet_file_in_a_mounted_source(tmp_path: Path, key: str, mount_factory: MountFactory):
    """Through the mount, a file reads the same before and after it was encrypted underneath."""
    src = tmp_path / "src"
    data = legacy(300_000)
    write(src / "doc", data)
    m = mount_factory(src)
    with open(m.mnt / "doc", "rb") as held:  # a handle opened before the migration
        assert os.getxattr(m.mnt / "doc", "user.stormfs.encryption_method") == b"none"
        assert stormfs("encrypt", str(src), "--force", key=key).returncode == OK
        assert held.read() == data
    assert (m.mnt / "doc").read_bytes() == data
    assert os.getxattr(m.mnt / "doc", "user.stormfs.encryption_method") == b"server"
    assert (m.mnt / "doc").stat().st_size == len(data)
