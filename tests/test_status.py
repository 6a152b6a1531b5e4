"""`stormfs status MOUNTPOINT`: the daemon's own account, read through the mount."""

from __future__ import annotations

import errno
import json
import os
import re
import stat
import subprocess
from pathlib import Path

import pytest

from stormfs.exitcodes import OK, USAGE
from stormfs.stats import METRICS_INTERVAL

from .helpers import Mount, MountFactory, storm_cloud_envelope, stormfs_cmd, wait_for


def status(mnt: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        stormfs_cmd("status", str(mnt), *extra), capture_output=True, text=True, timeout=60
    )


def test_status_counts_what_the_daemon_did(mount_factory: MountFactory, tmp_path: Path, key):
    source = tmp_path / "src"
    (source / "d").mkdir(parents=True)
    (source / "d" / "bad").write_bytes(bytearray(storm_cloud_envelope(key, b"x" * 100))[:-1])
    (source / "good").write_bytes(storm_cloud_envelope(key, b"lets the key check pass"))
    m = mount_factory(source, args=("-o", "attr_timeout=0.5"))
    (m.mnt / "a").write_bytes(b"A" * 1000)
    assert (m.mnt / "a").read_bytes() == b"A" * 1000
    with pytest.raises(OSError) as e:
        (m.mnt / "d" / "bad").read_bytes()
    assert e.value.errno == errno.EIO
    fd = os.open(m.mnt / "pending", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"p" * 5000)
        # What the command reads, read here: a child process would close its copy of
        # the descriptor at exec, and that close commits the file (FUSE flush).
        s = json.loads(os.getxattr(m.mnt, "user.stormfs.status"))
    finally:
        os.close(fd)
    done = status(m.mnt, "--json")
    assert done.returncode == OK, done.stderr
    assert json.loads(done.stdout)["unpublished_files"] == 0
    text = status(m.mnt)
    assert s["pid"] == m.pid
    assert s["source"] == str(source) and s["mountpoint"] == str(m.mnt)
    assert "attr_timeout=0.5" in s["options"] and s["format"] == "v1"
    assert s["current_key_id"] == "1" and s["key_ids"] == ["1"]
    assert 0 < s["uptime_seconds"] < 120
    assert s["open_files"] == 1
    assert (s["unpublished_files"], s["unpublished_bytes"]) == (1, 5000)
    assert s["unpublished"] == [{"path": "pending", "bytes": 5000}]
    assert s["commits"] >= 1 and s["commits_failed"] == 0
    assert s["bytes_written"] == 6000 and s["bytes_read"] >= 1000
    assert s["decryption_failed"] == 1 and s["decryption_failed_recent"] == ["d/bad"]
    assert "DECRYPTION_FAILED: d/bad" in s["last_error"]
    assert text.returncode == OK
    assert f"PID {m.pid}" in text.stdout and "commits:       2 done, 0 failed" in text.stdout
    assert "d/bad" in text.stdout
    # an attribute of the root only, and not listed: `cp -a` of the root does not copy it
    assert "user.stormfs.status" not in os.listxattr(m.mnt)
    with pytest.raises(OSError):
        os.getxattr(m.mnt / "a", "user.stormfs.status")
    assert m.key is not None and m.key not in done.stdout + text.stdout


def test_status_of_something_else_says_so(tmp_path: Path, mounted: Mount):
    done = status(tmp_path)
    assert done.returncode == USAGE
    assert "is not a stormfs mount" in done.stderr
    s = json.loads(status(mounted.mnt, "--json").stdout)
    assert (s["commits"], s["open_files"], s["last_error"]) == (0, 0, None)


def test_metrics_file_has_the_counters_in_prometheus_text_format(
    mount_factory: MountFactory, tmp_path: Path
):
    """Written at start and every 15 s, whole each time (renamed over the old one)."""
    prom = tmp_path / "textfile" / "stormfs.prom"
    prom.parent.mkdir()
    m = mount_factory(args=("-o", f"metrics_file={prom}"))
    wait_for(prom.exists)
    first = prom.read_text()
    assert f'stormfs_commits_total{{mountpoint="{m.mnt}"}} 0' in first
    assert stat.S_IMODE(prom.stat().st_mode) == 0o644
    (m.mnt / "f").write_bytes(b"x" * 100)
    ino = prom.stat().st_ino
    wait_for(lambda: prom.stat().st_ino != ino, timeout=METRICS_INTERVAL + 10)
    text = prom.read_text()
    sample = re.compile(r'^(stormfs_\w+)\{mountpoint="[^"]*"(,\w+="[^"]*")*\} (\S+)$')
    values = {}
    for line in text.splitlines():
        if line.startswith("#"):
            assert re.match(r"^# (HELP|TYPE) stormfs_\w+ .+$", line), line
            continue
        match = sample.match(line)
        assert match, line
        values[match.group(1)] = float(match.group(3))
    assert values["stormfs_commits_total"] == 1
    assert values["stormfs_written_bytes_total"] == 100
    assert values["stormfs_info"] == 1 and f'pid="{m.pid}"' in text
    assert values["stormfs_uptime_seconds"] >= METRICS_INTERVAL
    assert os.listdir(prom.parent) == ["stormfs.prom"]


def test_a_failed_commit_is_counted_and_is_the_last_error(mounted: Mount):
    (mounted.mnt / "f").write_bytes(b"before")

    def now() -> dict:
        return json.loads(os.getxattr(mounted.mnt, "user.stormfs.status"))

    subprocess.run(["chattr", "+i", str(mounted.source / "f")], check=True)
    try:
        with pytest.raises(OSError):
            (mounted.mnt / "f").write_bytes(b"after")
        # the kernel's release follows close(): its last try logs that it gave up
        wait_for(lambda: "pending writes to inode" in (now()["last_error"] or ""))
        s = now()
    finally:
        subprocess.run(["chattr", "-i", str(mounted.source / "f")], check=True)
    # close() (flush) tried, then the last release tried once more, and gave up
    assert (s["commits"], s["commits_failed"], s["open_files"]) == (1, 2, 0)
    assert s["last_error_at"] > 0
