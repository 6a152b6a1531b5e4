"""`stormfs encrypt`: what it changes, what it keeps, and what it never touches."""

from __future__ import annotations

import fcntl
import os
import pty
import shutil
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest

from stormfs import format as fmt
from stormfs import keys, swap
from stormfs.exitcodes import BUSY, ISSUES_FOUND, KEY_SAFETY, OK, USAGE, WORK_TO_DO

from .helpers import scrubbed_env
from .trees import (
    leftovers,
    legacy_bytes,
    make_mixed,
    plain_decrypt,
    run_json,
    snapshot,
    stormfs,
    write,
)

NO_DAC = (
    "setpriv",
    "--bounding-set=-dac_override,-dac_read_search",
    "--inh-caps=-dac_override,-dac_read_search",
)


def test_refuses_without_force(tmp_path: Path, key: str):
    src = tmp_path / "src"
    make_mixed(src, key)
    before = snapshot(src)
    r = stormfs("encrypt", str(src), key=key)
    assert r.returncode == USAGE
    assert "--force" in r.stderr
    assert snapshot(src) == before


def test_key_errors(tmp_path: Path, key: str):
    src = tmp_path / "src"
    write(src / "a", b"legacy")
    assert stormfs("encrypt", str(src), "--force", key=None).returncode == USAGE
    assert stormfs("encrypt", str(src), "--force", key="short").returncode == USAGE
    assert (src / "a").read_bytes() == b"legacy"


def test_wrong_key_is_refused_before_any_change(tmp_path: Path, key: str):
    """The mount's key safety check runs first: envelopes under another key block the run."""
    src = tmp_path / "src"
    other = keys.generate_key()
    write(src / "enc", fmt.seal(keys.parse_key(other), b"written with the other key"))
    write(src / "legacy", b"legacy")
    before = snapshot(src, atime=False)  # the check reads envelopes, as at every mount
    r = stormfs("encrypt", str(src), "--force", key=key)
    assert r.returncode == KEY_SAFETY
    assert "FATAL: Encryption key mismatch detected!" in r.stderr
    assert snapshot(src, atime=False) == before


def test_dry_run_changes_nothing(tmp_path: Path, key: str):
    src = tmp_path / "src"
    tree = make_mixed(src, key)
    write(src / "docs/.stormfs-tmp-enc-dead0000-1", b"stale")
    before = snapshot(src)
    rc, report = run_json("encrypt", str(src), "--dry-run", key=key)
    assert rc == WORK_TO_DO
    assert snapshot(src) == before  # bytes, inodes, modes, owners, all three times, xattrs
    assert sorted(os.listdir(src / ".stormfs")) == ["state-of-the-daemon"]
    assert report["dry_run"] is True
    assert report["would_encrypt"] == len(tree["legacy"])
    assert report["encrypted_now"] == 0
    assert report["stale_temp_files"] == 1
    assert {f["path"] for f in report["files"] if f["status"] == "needs_encryption"} == set(
        tree["legacy"]
    )
    r = stormfs("encrypt", str(src), "--dry-run", key=key)
    assert "would encrypt  notes.txt" in r.stdout
    assert snapshot(src) == before


def test_mixed_tree(tmp_path: Path, key: str):
    src = tmp_path / "src"
    tree = make_mixed(src, key)
    untouched = {rel: (src / rel).read_bytes() for rel in (*tree["encrypted"], *tree["broken"])}
    inodes = {rel: (src / rel).stat().st_ino for rel in untouched}
    daemon_temp = (src / "docs/.stormfs-tmp-0123456789abcdef").read_bytes()
    rc, report = run_json("encrypt", str(src), "--force", key=key)
    assert rc == OK, report
    assert report["encrypted_now"] == len(tree["legacy"])
    assert report["already_encrypted"] == len(tree["encrypted"]) + len(tree["broken"])
    assert report["errors"] == 0
    assert report["scanned"] == len(tree["legacy"]) + len(untouched)
    for rel, data in tree["legacy"].items():
        assert plain_decrypt(key, (src / rel).read_bytes()) == data, rel
        assert os.getxattr(src / rel, "user.stormfs.key_id") == b"1"
    for rel, data in untouched.items():  # never touched: damaged, 0x01 plaintext, other key
        assert (src / rel).read_bytes() == data
        assert (src / rel).stat().st_ino == inodes[rel]
    assert (src / "docs/.stormfs-tmp-0123456789abcdef").read_bytes() == daemon_temp
    assert (src / "fifo").is_fifo() and (src / "link-to-notes").is_symlink()
    assert leftovers(src) == []
    # the audit agrees: nothing left to encrypt; the damaged ones are still issues
    rc, audit = run_json("audit", str(src), key=key)
    assert audit["needs_encryption"] == 0
    assert audit["encrypted"] == len(tree["legacy"]) + len(tree["encrypted"])
    assert audit["issues"] == len(tree["broken"])
    # idempotent: a second run changes nothing at all
    before = snapshot(src)
    rc, again = run_json("encrypt", str(src), "--force", key=key)
    assert rc == OK and again["encrypted_now"] == 0
    assert snapshot(src) == before


def test_metadata_is_kept(tmp_path: Path, key: str):
    src = tmp_path / "src"
    f = write(src / "dir/file", legacy_bytes(10_000))
    os.chown(f, 1234, 5678)
    f.chmod(0o2741)
    os.setxattr(f, "user.color", b"blue")
    os.setxattr(f, "user.stormfs.key_id", b"stale-value")
    data = f.read_bytes()
    # The key check, once recorded, reads no file: only encrypt touches this one now.
    assert stormfs("check", str(src), key=key).returncode == OK
    atime = 1_111_111_111_222_333_444
    os.utime(f, ns=(atime, 1_234_567_890_123_456_789))
    key_id_env = {keys.ENV_KEY_ID: "k7"}
    r = stormfs("encrypt", str(src), "--force", key=key, env=key_id_env)
    assert r.returncode == OK, r.stderr
    st = f.stat()
    assert (st.st_uid, st.st_gid) == (1234, 5678)
    assert st.st_mode & 0o7777 == 0o2741
    assert st.st_mtime_ns == 1_234_567_890_123_456_789
    assert st.st_atime_ns == atime
    assert os.getxattr(f, "user.color") == b"blue"
    assert os.getxattr(f, "user.stormfs.key_id") == b"k7"
    assert plain_decrypt(key, f.read_bytes()) == data


def test_hard_links(tmp_path: Path, key: str):
    src = tmp_path / "src"
    data = legacy_bytes(300_000)
    a = write(src / "a/one", data)
    os.link(a, write(src / "b/x", b"").parent / "two")
    os.link(a, src / "three")
    (src / "b/x").unlink()
    outside = write(tmp_path / "elsewhere/outside", b"linked from outside SOURCE")
    os.link(outside, src / "half")
    rc, report = run_json("encrypt", str(src), "--force", key=key)
    assert rc == ISSUES_FOUND
    names = [src / "a/one", src / "b/two", src / "three"]
    inos = {p.stat().st_ino for p in names}
    assert len(inos) == 1 and names[0].stat().st_nlink == 3
    assert plain_decrypt(key, names[0].read_bytes()) == data
    (problem,) = [f for f in report["files"] if f["status"] == "hard_links"]
    assert problem["path"] == "half"
    assert (src / "half").read_bytes() == b"linked from outside SOURCE"
    assert (src / "half").stat().st_ino == outside.stat().st_ino
    assert leftovers(src) == []
    assert not list((src / ".stormfs/encrypt").glob("links-*"))


CRASH_AT_SWAP = """
import os, sys
from stormfs import cli, swap
real, calls = swap.swap_in, [0]
def crashing(*args):
    calls[0] += 1
    if calls[0] == {n}:
        os._exit(9)
    return real(*args)
swap.swap_in = crashing
sys.exit(cli.main(["encrypt", {src!r}, "--force", "--jobs", "1"]))
"""


@pytest.mark.parametrize("write_between", [False, True])
def test_hard_link_group_interrupted(tmp_path: Path, key: str, write_between: bool):
    """Killed after the first of three names was swapped; the next run puts it right."""
    src = tmp_path / "src"
    data = b"original content\n" * 1000
    names = [write(src / "one", data), src / "d/two", src / "three"]
    names[1].parent.mkdir()
    for n in names[1:]:
        os.link(names[0], n)
    env = scrubbed_env(key)
    code = CRASH_AT_SWAP.format(n=2, src=str(src))
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, timeout=60)
    assert r.returncode == 9, r.stderr
    assert list((src / ".stormfs/encrypt").glob("links-*.json"))
    # every name still reads as the same plaintext, whichever inode it holds
    for n in names:
        raw = n.read_bytes()
        assert (plain_decrypt(key, raw) if raw[:1] == b"\x01" else raw) == data
    if write_between:  # a writer appends through a name still on the original inode
        with open(names[2], "ab") as f:
            f.write(b"appended after the crash\n")
        data += b"appended after the crash\n"
    r = stormfs("encrypt", str(src), "--force", key=key)
    assert r.returncode == OK, r.stdout + r.stderr
    assert len({n.stat().st_ino for n in names}) == 1
    assert names[0].stat().st_nlink == 3
    for n in names:
        assert plain_decrypt(key, n.read_bytes()) == data
    assert leftovers(src) == []
    assert not list((src / ".stormfs/encrypt").glob("links-*"))


def test_file_open_for_writing_is_left_alone(tmp_path: Path, key: str):
    src = tmp_path / "src"
    busy = write(src / "busy.log", b"line 1\n")
    write(src / "idle", b"idle")
    with open(busy, "ab") as f:  # held open for writing for the whole run
        rc, report = run_json("encrypt", str(src), "--force", key=key)
        f.write(b"line 2\n")
    assert rc == ISSUES_FOUND
    (entry,) = [f for f in report["files"] if f["path"] == "busy.log"]
    assert entry["status"] == "busy"
    assert busy.read_bytes() == b"line 1\nline 2\n"
    assert plain_decrypt(key, (src / "idle").read_bytes()) == b"idle"
    assert run_json("encrypt", str(src), "--force", key=key)[0] == OK
    assert plain_decrypt(key, busy.read_bytes()) == b"line 1\nline 2\n"


def test_unreadable_file_is_reported_not_touched(tmp_path: Path, key: str):
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is needed to drop root's file-access override")
    src = tmp_path / "src"
    write(src / "secret", b"no access").chmod(0)
    write(src / "ok", b"fine")
    rc, report = run_json("encrypt", str(src), "--force", key=key, prefix=NO_DAC)
    assert rc == ISSUES_FOUND
    (entry,) = [f for f in report["files"] if f["path"] == "secret"]
    assert entry["status"] == "unreadable"
    (src / "secret").chmod(0o600)
    assert (src / "secret").read_bytes() == b"no access"
    assert plain_decrypt(key, (src / "ok").read_bytes()) == b"fine"


def test_one_run_at_a_time(tmp_path: Path, key: str):
    src = tmp_path / "src"
    write(src / "a", b"legacy")
    state = src / ".stormfs/encrypt"
    state.mkdir(parents=True)
    with open(state / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        r = stormfs("encrypt", str(src), "--force", key=key)
    assert r.returncode == BUSY
    assert "already running" in r.stderr or "another stormfs encrypt" in r.stderr
    assert (src / "a").read_bytes() == b"legacy"


def test_stale_temporary_files_are_removed(tmp_path: Path, key: str):
    src = tmp_path / "src"
    write(src / "a", b"legacy")
    write(src / "d/.stormfs-tmp-enc-deadbeef-7", b"left by a killed run")
    write(src / "d/.stormfs-tmp-0123456789abcdef", b"a daemon's: not ours")
    # journals of a run killed while writing them (before any of their names moved)
    write(src / ".stormfs/encrypt/links-.stormfs-tmp-enc-deadbeef-8.json", b"")
    write(src / ".stormfs/encrypt/links-.stormfs-tmp-enc-deadbeef-9.json.part", b'{"orig')
    rc, report = run_json("encrypt", str(src), "--force", key=key)
    assert rc == OK
    assert report["stale_temp_files"] == 1
    assert leftovers(src) == []
    assert not list((src / ".stormfs/encrypt").glob("links-*"))
    assert (src / "d/.stormfs-tmp-0123456789abcdef").exists()


def test_sparse_file_growth_is_reported(tmp_path: Path, key: str):
    src = tmp_path / "src"
    src.mkdir()
    with open(src / "sparse", "wb") as f:
        f.truncate(20_000_000)
        f.write(b"head")
    rc, report = run_json("encrypt", str(src), "--force", key=key)
    assert rc == OK
    assert report["sparse_grown"] == 1
    (entry,) = report["files"]
    assert "sparse" in entry["detail"]
    plain = plain_decrypt(key, (src / "sparse").read_bytes())
    assert plain[:4] == b"head" and len(plain) == 20_000_000 and not plain[4:].strip(b"\0")


def test_progress_plain_lines_and_summary(tmp_path: Path, key: str):
    src = tmp_path / "src"
    for i in range(5):
        write(src / f"f{i}", legacy_bytes(1000))
    r = stormfs("encrypt", str(src), "--force", key=key)
    assert r.returncode == OK
    assert "encrypt: files 5/5" in r.stderr  # a plain line, no bar, off a terminal
    assert "\r" not in r.stderr
    for label in ("Files scanned:", "Already encrypted:", "Encrypted now:", "Errors:"):
        assert label in r.stdout


def test_progress_bar_on_a_terminal(tmp_path: Path, key: str):
    src = tmp_path / "src"
    for i in range(3):
        write(src / f"f{i}", legacy_bytes(100_000))
    env = scrubbed_env(key)
    primary, secondary = pty.openpty()
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))
    proc = subprocess.Popen(
        [sys.executable, "-m", "stormfs", "encrypt", str(src), "--force"],
        stdout=subprocess.DEVNULL,
        stderr=secondary,
        env=env,
    )
    os.close(secondary)
    out = b""
    while True:
        try:
            chunk = os.read(primary, 4096)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    assert proc.wait(60) == OK
    os.close(primary)
    text = out.decode(errors="replace")
    assert "files 3/3" in text and "B/s" in text and "\r" in text


def test_swap_puts_back_a_version_committed_meanwhile(tmp_path: Path, monkeypatch):
    """A commit renamed over the name just before the exchange is restored, not lost."""
    d = tmp_path / "d"
    original = write(d / "file", b"original")
    write(d / "hold", b"our envelope")
    write(d / "newer", b"committed by someone else")
    expect = (original.stat().st_dev, original.stat().st_ino)
    real = swap.exchange
    raced = []

    def racing_exchange(dir_fd: int, a: bytes, b: bytes) -> None:
        if not raced:
            raced.append(True)
            os.rename("newer", "file", src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        real(dir_fd, a, b)

    monkeypatch.setattr(swap, "exchange", racing_exchange)
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert swap.swap_in(fd, b"hold", b"file", expect) is False
    finally:
        os.close(fd)
    assert (d / "file").read_bytes() == b"committed by someone else"
    assert (d / "hold").read_bytes() == b"our envelope"


def test_envelopes_are_never_encrypted_twice(tmp_path: Path, key: str):
    src = tmp_path / "src"
    raw = keys.parse_key(key)
    envelope = write(src / "e", fmt.seal(raw, b"x" * 100)).read_bytes()
    for _ in range(2):
        assert stormfs("encrypt", str(src), "--force", key=key).returncode == OK
    assert (src / "e").read_bytes() == envelope


def test_refuses_a_source_that_cannot_exchange_names(silly_source, key: str):
    """tests/sillyfs.py, like GlusterFS, answers RENAME_EXCHANGE with EINVAL: encrypt
    stops before it touches a file, says why and what to do instead, and leaves nothing."""
    src = silly_source()
    write(src / "legacy.txt", legacy_bytes(5000))
    before = snapshot(src, atime=False)
    done = stormfs("encrypt", str(src), "--force", key=key)
    assert done.returncode == USAGE, done.stderr
    assert "cannot exchange two names atomically (renameat2 RENAME_EXCHANGE" in done.stderr
    assert "Encrypt the files through the mount instead" in done.stderr
    assert "Traceback" not in done.stderr
    assert snapshot(src, atime=False) == before
    assert leftovers(src) == []
    assert os.listdir(src / ".stormfs" / "encrypt") == ["lock"]


def test_a_probe_left_by_a_killed_run_is_removed(tmp_path: Path, key: str):
    src = tmp_path / "src"
    data = legacy_bytes(100)
    write(src / "legacy.txt", data)
    (src / ".stormfs" / "encrypt").mkdir(parents=True)
    (src / ".stormfs" / "encrypt" / "exchange-probe-a-0000dead").write_bytes(b"")
    assert stormfs("encrypt", str(src), "--force", key=key).returncode == OK
    assert os.listdir(src / ".stormfs" / "encrypt") == ["lock"]
    assert plain_decrypt(key, (src / "legacy.txt").read_bytes()) == data
