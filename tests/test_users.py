"""Per-user keys (Storm Cloud ADR 010, ``server-user``): the derivation, reads of
user-key and master-key files under accounts, the method each file shows, audit's
counts, renames on a mount with ``-o per_user_keys``."""

from __future__ import annotations

import errno
import hashlib
import hmac
import os
import subprocess
from pathlib import Path

import pytest

from stormfs import format as fmt
from stormfs import keys
from stormfs.content import EnvelopeReader
from stormfs.daemon import MountOptions
from stormfs.exitcodes import OK, WORK_TO_DO
from stormfs.source import METHOD_XATTR, At
from stormfs.store import Store

from .helpers import reference_decrypt
from .keyscan import STORMFS, leaked_in, new_key, run, track
from .trees import KEY_ID, run_json, stormfs, write, write_keyring

METHOD = "user.stormfs.encryption_method"


def hkdf_sha256(ikm: bytes, salt: bytes, info: bytes, length: int) -> bytes:
    """RFC 5869 from hmac alone: extract, then expand."""
    prk = hmac.new(salt, ikm, hashlib.sha256).digest()
    out, block = b"", b""
    for i in range(1, -(-length // 32) + 1):
        block = hmac.new(prk, block + info + bytes([i]), hashlib.sha256).digest()
        out += block
    return out[:length]


def user_key(key: str, account: str) -> bytes:
    """ADR 010's derivation, computed here without stormfs; the key is tracked by the scan."""
    raw = hkdf_sha256(
        keys.parse_key(key), b"stormcloud-user-key-v1", b"user-" + account.encode(), 32
    )
    track(raw)
    return raw


def seal_user(path: Path, key: str, account: str, data: bytes, recorded: bool = True) -> Path:
    """A file as a server in server-user mode writes it (with stormfs' record, if `recorded`)."""
    write(path, fmt.seal(user_key(key, account), data))
    if recorded:
        os.setxattr(path, KEY_ID, b"1")
        os.setxattr(path, METHOD_XATTR, b"server-user")
    return path


def seal_master(path: Path, key: str, data: bytes) -> Path:
    write(path, fmt.seal(keys.parse_key(key), data))
    os.setxattr(path, KEY_ID, b"1")
    return path


# -- the derivation -------------------------------------------------------------


def test_user_key_is_adr_010s_hkdf():
    master = bytes(range(32))
    # HKDF-SHA256(master=00 01 .. 1f, length=32, salt=b"stormcloud-user-key-v1",
    # info=b"user-alice"), computed once with cryptography's HKDF and written down.
    assert keys.user_key(master, b"alice").hex() == (
        "67639978568d6135ae82340d5fa29265606b7c20734e49c55ad247416652adc0"
    )
    assert keys.user_key(master, b"42").hex() == (
        "fceec24bb961a819c79a305fe372c28fcc3b00dc0642e80f11df451e537f6d84"
    )
    key = new_key()
    for account in ("alice", "bob", "42", "ü"):
        raw = keys.user_key(keys.parse_key(key), account.encode())
        assert raw == user_key(key, account)
    assert keys.user_key(master, b"alice") != keys.user_key(master, b"bob")
    for bad in (b"", b"a/b"):
        with pytest.raises(ValueError):
            keys.user_key(master, bad)


def test_user_keys_carry_their_master_keys_id():
    k1, k2 = new_key(), new_key()
    ring = keys.Keyring(keys.Key("2", keys.parse_key(k2)), (keys.Key("1", keys.parse_key(k1)),))
    user = ring.sealing(b"alice")
    assert (user.key_id, user.account, user.method) == ("2", b"alice", "server-user")
    assert user.material == user_key(k2, "alice")
    assert ring.sealing(None) == ring.current and ring.current.method == "server"
    assert ring.user(ring.current, b"alice") is user  # derived once
    assert "alice" in repr(user) and not any(f in repr(user) for f in (k1, k2))
    # A file directly in SOURCE: master keys only, the recorded one first.
    assert [k.key_id for k in ring.candidates("1")] == ["1", "2"]
    # A file of an account: each key in both forms, the recorded key first.
    forms = [(k.key_id, k.account) for k in ring.candidates("1", b"bob")]
    assert forms == [("1", None), ("1", b"bob"), ("2", None), ("2", b"bob")]
    forms = [(k.key_id, k.account) for k in ring.candidates("2", b"bob", user_first=True)]
    assert forms == [("2", b"bob"), ("2", None), ("1", b"bob"), ("1", None)]
    assert keys.account_of(b"alice/d/x") == b"alice"
    assert keys.account_of(b"top") is None


# -- reads ------------------------------------------------------------------------


def rchar() -> int:
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar:")).split()[1])


@pytest.mark.parametrize("per_user", [False, True])
def test_the_likely_key_is_tried_first(tmp_path, per_user):
    """Whatever the option, each file is read once: the method recorded on it names
    the key's form to try first."""
    key = new_key()
    data = os.urandom(2 << 20)
    seal_user(tmp_path / "alice/u", key, "alice", data)
    seal_master(tmp_path / "alice/m", key, data)
    os.setxattr(tmp_path / "alice/m", METHOD_XATTR, b"server")
    store = Store(
        tmp_path, keys.Keyring(keys.Key("1", keys.parse_key(key))), per_user_keys=per_user
    )
    dir_fd = os.open(tmp_path / "alice", os.O_PATH | os.O_DIRECTORY)
    try:
        for name, method in ((b"u", "server-user"), (b"m", "server")):
            at = At(dir_fd, name)
            assert store.account(at) == b"alice"
            reader = store.open_reader(at)
            assert isinstance(reader, EnvelopeReader)
            before = rchar()
            assert reader.read(0, 10) == data[:10]
            assert rchar() - before < len(data) + (1 << 20)  # one pass over the file
            assert store.method_of(at) == method and store.key_id_of(at) == "1"
            reader.close()
    finally:
        os.close(dir_fd)
        store.close()


@pytest.mark.parametrize("options", [(), ("-o", "per_user_keys")])
def test_a_mount_reads_both_kinds_under_an_account(tmp_path, mount_factory, key, options):
    """A user-key file opens with or without the option; a master-key file under an
    account (sealed before the option was switched on) still opens with it."""
    src = tmp_path / "src"
    files = {
        "alice/u": seal_user(src / "alice/u", key, "alice", os.urandom(70_000)),
        "alice/d/bare": seal_user(src / "alice/d/bare", key, "alice", b"x" * 99, recorded=False),
        "alice/m": seal_master(src / "alice/m", key, b"sealed under the master key"),
        "top": seal_master(src / "top", key, b"directly in SOURCE"),
        "bob/legacy": write(src / "bob/legacy", b"plaintext from before encryption"),
    }
    wrong = seal_user(src / "bob/alices", key, "alice", b"alice's key, bob's place")
    m = mount_factory(src, args=options)
    for rel, path in files.items():
        raw = path.read_bytes()
        if raw[:1] != b"\x01":
            assert (m.mnt / rel).read_bytes() == raw
            assert os.getxattr(m.mnt / rel, METHOD) == b"none"
            continue
        under = user_key(key, rel.split("/")[0]) if "/u" in rel or "bare" in rel else m.raw_key
        assert (m.mnt / rel).read_bytes() == reference_decrypt(under, raw), rel
        expect = b"server-user" if under != m.raw_key else b"server"
        assert os.getxattr(m.mnt / rel, METHOD) == expect, rel
        assert os.getxattr(m.mnt / rel, KEY_ID) == b"1", rel  # the master key's id
    with pytest.raises(OSError) as e:
        (m.mnt / "bob/alices").read_bytes()
    assert e.value.errno == errno.EIO
    assert "DECRYPTION_FAILED: bob/alices" in m.logtext()
    assert wrong.read_bytes()[:1] == b"\x01"  # never modified


def test_audit_and_keys_count_each_method(tmp_path, key):
    old = new_key()
    src = tmp_path / "src"
    seal_user(src / "alice/a", key, "alice", b"a" * 100)
    seal_user(src / "alice/d/b", key, "alice", b"b" * 100, recorded=False)
    seal_user(src / "bob/c", key, "bob", b"c" * 100)
    seal_master(src / "bob/m", key, b"m" * 100)
    seal_master(src / "top", key, b"t" * 100)
    write(src / "carol/legacy", b"plaintext")
    write(src / "alice/old", fmt.seal(user_key(old, "alice"), b"under the older key"))
    ring = write_keyring(tmp_path / "keyring", {"0": old})
    rc, report = run_json("audit", str(src), "--keyring", ring, key=key)
    assert rc == WORK_TO_DO
    assert report["methods"] == {"none": 1, "server": 2, "server-user": 4}
    assert report["key_ids"] == {"0": 1, "1": 5}
    assert (report["encrypted"], report["needs_encryption"], report["issues"]) == (6, 1, 0)
    r = stormfs("audit", str(src), "--keyring", ring, key=key)
    assert "  By encryption method:     none 1, server 2, server-user 4" in r.stdout
    rc, quick = run_json("audit", str(src), "--quick", key=None)
    assert quick["methods"] == {"none": 1, "server": 4, "server-user": 2}  # as recorded
    rc, census = run_json("keys", str(src), "--keyring", ring, key=key)
    assert rc == OK
    assert census["key_ids"] == {"0": 1, "1": 5}
    assert census["methods"] == report["methods"]
    r = stormfs("keys", str(src), "--keyring", ring, key=key)
    assert "  by method           none 1, server 2, server-user 4" in r.stdout


# -- renames on a per-user mount ------------------------------------------------


def test_renames_that_change_the_account_are_refused(tmp_path, mount_factory, key):
    src = tmp_path / "src"
    seal_user(src / "alice/x", key, "alice", b"alice's file")
    seal_user(src / "alice/d/y", key, "alice", b"in a directory")
    seal_user(src / "bob/z", key, "bob", b"bob's file")
    seal_master(src / "top", key, b"directly in SOURCE")
    (src / "carol").mkdir()
    os.symlink("x", src / "alice/link")
    m = mount_factory(src, args=("-o", "per_user_keys"))
    refused = [
        ("alice/x", "bob/x"),  # across accounts
        ("alice/x", "bob/z"),  # and over a file there
        ("alice/x", "moved"),  # to SOURCE's top level
        ("top", "alice/top"),  # from it
        ("alice/d", "bob/d"),  # a directory and all it holds
        ("alice", "alice2"),  # an account itself
        ("carol", "alice/carol"),  # even an empty one
    ]
    for old, new in refused:
        with pytest.raises(OSError) as e:
            os.rename(m.mnt / old, m.mnt / new)
        assert e.value.errno == errno.EXDEV, (old, new)
        assert (m.mnt / old).exists() and (src / old).exists()
    # Within an account, at the top level, and what holds nothing sealed: renamed.
    os.rename(m.mnt / "alice/x", m.mnt / "alice/d/x2")
    os.rename(m.mnt / "alice/d", m.mnt / "alice/e")
    os.rename(m.mnt / "top", m.mnt / "top2")
    os.rename(m.mnt / "alice/link", m.mnt / "bob/link")
    assert (m.mnt / "alice/e/x2").read_bytes() == b"alice's file"
    assert (m.mnt / "top2").read_bytes() == b"directly in SOURCE"
    assert os.readlink(m.mnt / "bob/link") == "x"


def test_renames_are_free_without_the_option(tmp_path, mount_factory, key):
    src = tmp_path / "src"
    seal_master(src / "alice/x", key, b"master key")
    m = mount_factory(src)
    os.rename(m.mnt / "alice/x", m.mnt / "bob")
    os.rename(m.mnt / "alice", m.mnt / "carol")
    assert (m.mnt / "bob").read_bytes() == b"master key"


def test_mount_option_is_described():
    opts = MountOptions.parse(["nofail,per_user_keys"])
    assert opts.per_user_keys and "per_user_keys" in opts.describe()
    assert not MountOptions.parse(["allow_other"]).per_user_keys


# -- rotate moves files between the two -----------------------------------------


def test_rotate_moves_files_between_master_and_user_keys(tmp_path, key):
    src = tmp_path / "src"
    data = {rel: os.urandom(n) for rel, n in (("alice/m", 5000), ("alice/u", 70), ("top", 9))}
    seal_master(src / "alice/m", key, data["alice/m"])
    seal_user(src / "alice/u", key, "alice", data["alice/u"])
    seal_master(src / "top", key, data["top"])
    data["bob/d/legacy"] = write(src / "bob/d/legacy", b"legacy plaintext").read_bytes()
    raw = keys.parse_key(key)

    def under(rel: str) -> bytes:
        return reference_decrypt(user_key(key, rel.split("/")[0]), (src / rel).read_bytes())

    rc, plan = run_json("rotate", str(src), "--dry-run", "--per-user-keys", key=key)
    assert rc == WORK_TO_DO and plan["would_encrypt"] == 1 and plan["per_user_keys"]
    [job] = [f for f in plan["files"] if f["status"] == "needs_rotation"]
    assert (job["path"], job["detail"]) == ("alice/m", "under key id 1 (5029 bytes)")

    args = ("rotate", str(src), "--force", "--per-user-keys", "--include-legacy")
    rc, report = run_json(*args, key=key)
    assert rc == OK, report
    assert (report["encrypted_now"], report["already_encrypted"]) == (2, 2)
    details = {f["path"]: f["detail"] for f in report["files"]}
    assert details["alice/m"] == "5029 bytes, from key id 1 to the user key of alice from key id 1"
    for rel in ("alice/m", "alice/u", "bob/d/legacy"):
        assert under(rel) == data[rel], rel
        assert os.getxattr(src / rel, KEY_ID) == b"1"
        assert os.getxattr(src / rel, METHOD_XATTR) == b"server-user"
    assert reference_decrypt(raw, (src / "top").read_bytes()) == data["top"]
    rc, audit = run_json("audit", str(src), key=key)
    assert audit["methods"] == {"none": 0, "server": 1, "server-user": 3}

    # Switched off again: every file back under the key itself.
    rc, report = run_json("rotate", str(src), "--force", key=key)
    assert rc == OK, report
    assert (report["encrypted_now"], report["already_encrypted"]) == (3, 1)
    details = {f["path"]: f["detail"] for f in report["files"]}
    assert details["alice/u"] == "99 bytes, from the user key of alice from key id 1 to 1"
    for rel, plain in data.items():
        assert reference_decrypt(raw, (src / rel).read_bytes()) == plain, rel
        if rel != "top":  # untouched
            assert os.getxattr(src / rel, METHOD_XATTR) == b"server"
    rc, audit = run_json("audit", str(src), key=key)
    assert audit["methods"] == {"none": 0, "server": 4, "server-user": 0}


# -- writes on a per-user mount ---------------------------------------------------


def test_a_per_user_mount_seals_each_account_with_its_key(tmp_path, mount_factory, key):
    src = tmp_path / "src"
    seal_master(src / "alice/old", key, b"sealed before the option was on")
    m = mount_factory(src, args=("-o", "per_user_keys"))
    (m.mnt / "alice").mkdir(exist_ok=True)
    (m.mnt / "bob/deep").mkdir(parents=True)
    files = {"alice/x": b"alice's data" * 1000, "bob/deep/y": b"bob's", "top": b"in SOURCE"}
    for rel, data in files.items():
        (m.mnt / rel).write_bytes(data)
    with open(m.mnt / "alice/old", "ab") as f:
        f.write(b", now appended")
    files["alice/old"] = b"sealed before the option was on, now appended"
    for rel, data in files.items():
        user = rel != "top"
        expect = user_key(key, rel.split("/")[0]) if user else m.raw_key
        assert reference_decrypt(expect, (src / rel).read_bytes()) == data, rel
        assert (m.mnt / rel).read_bytes() == data
        method = b"server-user" if user else b"server"
        assert os.getxattr(m.mnt / rel, METHOD) == method, rel
        assert os.getxattr(m.mnt / rel, KEY_ID) == b"1", rel  # the master key's id
        assert os.getxattr(src / rel, METHOD_XATTR) == method, rel
    # A rename within the account keeps the key; the file stays readable.
    os.rename(m.mnt / "bob/deep", m.mnt / "bob/deeper")
    (m.mnt / "bob/deeper/z").write_bytes(b"after the rename")
    assert reference_decrypt(user_key(key, "bob"), (src / "bob/deeper/z").read_bytes()) == (
        b"after the rename"
    )
    m.stop()
    # Read back by a mount without the option.
    m = mount_factory(src)
    for rel, data in files.items():
        rel = rel.replace("deep", "deeper")
        assert (m.mnt / rel).read_bytes() == data, rel


def test_the_account_follows_a_directory_moved_behind_the_mount(tmp_path, mount_factory, key):
    """The account is where the file's directory is when a new version starts, even
    when a directory above it was moved in SOURCE itself."""
    src = tmp_path / "src"
    m = mount_factory(src, args=("-o", "per_user_keys"))
    (m.mnt / "alice/d").mkdir(parents=True)
    (m.mnt / "bob").mkdir()
    with open(m.mnt / "alice/d/f", "wb", buffering=0) as f:
        f.write(b"first")
        os.fsync(f.fileno())
        first = (src / "alice/d/f").read_bytes()
        assert reference_decrypt(user_key(key, "alice"), first) == b"first"
        os.rename(src / "alice/d", src / "bob/d")  # not through the mount
        f.seek(0)
        f.write(b"again")
    raw = (src / "bob/d/f").read_bytes()
    assert reference_decrypt(user_key(key, "bob"), raw) == b"again"
    assert (m.mnt / "bob/d/f").read_bytes() == b"again"


def test_mv_across_accounts_copies_under_the_new_key(tmp_path, mount_factory, key):
    src = tmp_path / "src"
    seal_user(src / "alice/x", key, "alice", b"moved by mv")
    seal_user(src / "alice/d/y", key, "alice", b"a directory moved by mv")
    (src / "bob").mkdir()
    m = mount_factory(src, args=("-o", "per_user_keys"))
    for old, new in (("alice/x", "bob/x"), ("alice/d", "bob/d"), ("alice", "carol")):
        done = subprocess.run(["mv", m.mnt / old, m.mnt / new], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
    assert not (src / "carol/x").exists() and not (src / "alice").exists()
    for rel, data in (("bob/x", b"moved by mv"), ("bob/d/y", b"a directory moved by mv")):
        assert (m.mnt / rel).read_bytes() == data
        assert reference_decrypt(user_key(key, "bob"), (src / rel).read_bytes()) == data
        assert os.getxattr(m.mnt / rel, METHOD) == b"server-user"
    with pytest.raises(OSError) as e:
        os.link(m.mnt / "bob/x", m.mnt / "carol/x")
    assert e.value.errno == errno.EXDEV
    os.link(m.mnt / "bob/x", m.mnt / "bob/x2")  # within the account
    assert (m.mnt / "bob/x2").read_bytes() == b"moved by mv"


def test_v2_files_take_user_keys_too(tmp_path, mount_factory, key):
    src = tmp_path / "src"
    m = mount_factory(src, args=("-o", "per_user_keys,format=v2"))
    (m.mnt / "alice").mkdir()
    data = os.urandom(300_000)
    (m.mnt / "alice/v").write_bytes(data)
    with open(m.mnt / "alice/v", "r+b") as f:
        f.seek(1000)
        f.write(b"in place")
    data = data[:1000] + b"in place" + data[1008:]
    assert os.getxattr(src / "alice/v", METHOD_XATTR) == b"server-user"
    m.stop()
    m = mount_factory(src)
    assert (m.mnt / "alice/v").read_bytes() == data
    assert os.getxattr(m.mnt / "alice/v", "user.stormfs.format") == b"v2"


def test_no_key_in_any_output(tmp_path, mount_factory, key):
    """Neither the master key nor a derived one is printed by the commands or logged
    by the daemon (the fixtures scan the daemon logs and this test's output)."""
    src = tmp_path / "src"
    seal_user(src / "alice/u", key, "alice", b"user key")
    seal_master(src / "alice/m", key, b"master key")
    write(src / "bob/bad", fmt.seal(user_key(new_key(), "bob"), b"no key of ours"))
    user_key(key, "bob")
    m = mount_factory(src, args=("-o", "per_user_keys"))
    (m.mnt / "bob/new").write_bytes(b"sealed by the mount")
    with pytest.raises(OSError):
        (m.mnt / "bob/bad").read_bytes()
    env = {keys.ENV_KEY: key}
    outputs = [
        run([*STORMFS, *args], env=env)
        for args in (
            ("audit", str(src)),
            ("audit", str(src), "--json"),
            ("keys", str(src), "--json"),
            ("rotate", str(src), "--dry-run", "--per-user-keys"),
            ("rotate", str(src), "--force", "--per-user-keys", "--json"),
            ("status", str(m.mnt), "--json"),
        )
    ]
    assert all(p.stdout for p in outputs)
    text = "".join(p.stdout + p.stderr for p in outputs) + m.logtext()
    assert "DECRYPTION_FAILED: bob/bad" in text
    assert not leaked_in(text)
