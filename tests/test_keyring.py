"""Reads under any key of the keyring: the mount, audit and the store, on a SOURCE
holding envelopes sealed under three keys, legacy plaintext and a file no key opens."""

from __future__ import annotations

import errno
import os

import pytest

from stormfs import format_v2 as v2
from stormfs import keys
from stormfs.content import EnvelopeReader, Identity, Opened
from stormfs.exitcodes import ISSUES_FOUND
from stormfs.source import At
from stormfs.store import Store

from .keyscan import new_key
from .trees import (
    KEY_ID,
    plain_decrypt,
    run_json,
    sealed,
    stormfs,
    three_key_source,
    write,
    write_keyring,
)


@pytest.fixture
def three_keys() -> tuple[str, str, str]:
    return new_key(), new_key(), new_key()


def test_mount_reads_under_every_key_and_shows_which(tmp_path, mount_factory, three_keys):
    k1, k2, k3 = three_keys
    src = tmp_path / "src"
    expect = three_key_source(src, k1, k2, k3)
    ring = write_keyring(tmp_path / "keyring", {"1": k1, "2": k2})
    m = mount_factory(src, key=k3, args=("--keyring", ring), env={keys.ENV_KEY_ID: "3"})
    for rel, (key_id, data) in expect.items():
        assert (m.mnt / rel).read_bytes() == data, rel
        assert (m.mnt / rel).stat().st_size == len(data)
        method = os.getxattr(m.mnt / rel, "user.stormfs.encryption_method")
        if key_id is None:
            assert method == b"none"
            continue
        assert method == b"server"
        # the key that really opened it, whatever the file says
        assert os.getxattr(m.mnt / rel, KEY_ID) == key_id.encode(), rel
    with pytest.raises(OSError) as e:
        (m.mnt / "foreign").read_bytes()
    assert e.value.errno == errno.EIO
    assert "DECRYPTION_FAILED: foreign" in m.logtext()
    # A new version is always sealed under the current key.
    with open(m.mnt / "k1/recorded", "ab") as f:
        f.write(b"appended")
    raw = (src / "k1/recorded").read_bytes()
    assert plain_decrypt(k3, raw) == expect["k1/recorded"][1] + b"appended"
    assert os.getxattr(src / "k1/recorded", KEY_ID) == b"3"
    assert os.getxattr(m.mnt / "k1/recorded", KEY_ID) == b"3"


def test_audit_counts_every_key(tmp_path, three_keys):
    k1, k2, k3 = three_keys
    src = tmp_path / "src"
    three_key_source(src, k1, k2, k3)
    ring = write_keyring(tmp_path / "keyring", {"1": k1, "2": k2})
    env = {keys.ENV_KEY_ID: "3"}
    rc, report = run_json("audit", str(src), "--keyring", ring, key=k3, env=env)
    assert rc == ISSUES_FOUND
    assert (report["encrypted"], report["needs_encryption"], report["decryption_failed"]) == (
        6,
        1,
        1,
    )
    assert report["key_ids"] == {"1": 3, "2": 2, "3": 1}
    assert [f["path"] for f in report["files"] if f["status"] == "decryption_failed"] == ["foreign"]
    rc, report = run_json("audit", str(src), key=k3, env=env)  # the current key alone
    assert report["key_ids"] == {"3": 1}
    assert report["decryption_failed"] == 6


def rchar() -> int:
    """Bytes this process has read by syscalls so far."""
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar:")).split()[1])


def test_the_opening_key_is_remembered_with_the_verdict(tmp_path, three_keys):
    """The second reader of an unchanged file reads none of it to find its key again."""
    k1, k2, k3 = three_keys
    data = os.urandom(4 << 20)
    path = sealed(tmp_path / "old", k1, data, None)  # no hint: every key is tried
    ring = keys.Keyring(
        keys.Key("3", keys.parse_key(k3)),
        (keys.Key("1", keys.parse_key(k1)), keys.Key("2", keys.parse_key(k2))),
    )
    store = Store(tmp_path, ring)
    dir_fd = os.open(tmp_path, os.O_PATH | os.O_DIRECTORY)
    at = At(dir_fd, os.fsencode(path.name))
    try:
        assert store.key_id_of(at) is None  # not verified yet, nothing recorded
        first = store.open_reader(at)
        assert isinstance(first, EnvelopeReader)
        assert first.read(0, 10) == data[:10]
        opened = store.verdicts.get(Identity.of(path.stat()))
        assert isinstance(opened, Opened) and opened.key.key_id == "1"
        assert store.key_id_of(at) == "1"
        second = store.open_reader(at)
        before = rchar()
        assert second.read(len(data) - 5, 10) == data[-5:]
        assert rchar() - before < 4096
        first.close()
        second.close()
    finally:
        os.close(dir_fd)
        store.close()


def test_audit_text_names_the_keys(tmp_path, three_keys):
    k1, k2, k3 = three_keys
    src = tmp_path / "src"
    three_key_source(src, k1, k2, k3)
    ring = write_keyring(tmp_path / "keyring", {"1": k1, "2": k2})
    r = stormfs("audit", str(src), "--keyring", ring, key=k3, env={keys.ENV_KEY_ID: "3"})
    assert r.returncode == ISSUES_FOUND
    lines = r.stdout.splitlines()
    assert lines[0] == (
        f"Encryption audit of {src} (every envelope verified under the keyring, current key id 3)"
    )
    assert lines[3] == "    by key:                 key id 1: 3, key id 2: 2, key id 3: 1"


def test_v2_files_under_older_keys_read_through_the_keyring(tmp_path, mount_factory, three_keys):
    """A v2 header names its key by its MAC: the keyring's key that verifies it reads it."""
    k1, k2, k3 = three_keys
    src = tmp_path / "src"
    src.mkdir()
    data = {name: os.urandom(50_000) for name in ("old", "older", "current")}
    for name, key in (("older", k1), ("old", k2), ("current", k3)):
        write(src / name, v2.seal(keys.parse_key(key), data[name]))
    write(src / "nobody", v2.seal(keys.parse_key(new_key()), b"x" * 100))
    ring = write_keyring(tmp_path / "keyring", {"1": k1, "2": k2})
    m = mount_factory(src, key=k3, args=("--keyring", ring), env={keys.ENV_KEY_ID: "3"})
    for name, plain in data.items():
        assert (m.mnt / name).read_bytes() == plain, name
    with pytest.raises(OSError) as e:
        (m.mnt / "nobody").read_bytes()
    assert e.value.errno == errno.EIO
