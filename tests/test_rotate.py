"""`stormfs rotate`: what it re-seals, what it keeps, what it never touches, and when it
refuses; `make rotate-keys`."""

from __future__ import annotations

import fcntl
import os
import subprocess
from pathlib import Path

from stormfs import keys
from stormfs.exitcodes import BUSY, ISSUES_FOUND, KEY_SAFETY, OK, USAGE, WORK_TO_DO

from .keyscan import STORMFS, forms, new_key, run
from .trees import (
    KEY_ID,
    leftovers,
    plain_decrypt,
    run_json,
    sealed,
    snapshot,
    stormfs,
    three_key_source,
    write,
    write_keyring,
)

REPO = Path(__file__).resolve().parent.parent


def test_rotate_a_tree_under_three_keys(tmp_path: Path):
    k1, k2, k3 = new_key(), new_key(), new_key()
    src = tmp_path / "src"
    expect = three_key_source(src, k1, k2, k3)
    links = [src / "k1/linked-a", src / "k1/linked-b", src / "other/linked-c"]
    sealed(links[0], k1, b"one inode, three names\n" * 9, "1")
    for name in links[1:]:
        name.parent.mkdir(parents=True, exist_ok=True)
        os.link(links[0], name)
    ring = write_keyring(tmp_path / "keyring", {"1": k1, "2": k2})
    env = {keys.ENV_KEY_ID: "3"}
    foreign = (src / "foreign").read_bytes()

    before = snapshot(src, atime=False)
    rc, dry = run_json("rotate", str(src), "--dry-run", "--keyring", ring, key=k3, env=env)
    assert rc == ISSUES_FOUND, dry  # the file no key opens
    assert snapshot(src, atime=False) == before
    assert dry["would_encrypt"] == 8 and dry["from_key_ids"] == {"1": 6, "2": 2}
    assert dry["already_encrypted"] == 1 and dry["legacy_left"] == 1
    by_path = {f["path"]: f for f in dry["files"]}
    assert by_path["k2/recorded"] == {
        "path": "k2/recorded",
        "status": "needs_rotation",
        "detail": "under key id 2 (300029 bytes)",
    }
    assert by_path["foreign"]["status"] == "decryption_failed"

    rc, report = run_json("rotate", str(src), "--force", "--keyring", ring, key=k3, env=env)
    assert rc == ISSUES_FOUND, report
    assert report["encrypted_now"] == 6  # inodes: the three names are one
    assert report["errors"] == 1 and report["legacy_left"] == 1
    for rel, (key_id, data) in expect.items():
        raw = (src / rel).read_bytes()
        if key_id is None:
            assert raw == data, rel  # legacy: left as it is
            continue
        assert plain_decrypt(k3, raw) == data, rel
        assert os.getxattr(src / rel, KEY_ID) == b"3", rel
    assert len({n.stat().st_ino for n in links}) == 1
    assert links[0].stat().st_nlink == 3
    assert plain_decrypt(k3, links[2].read_bytes()) == b"one inode, three names\n" * 9
    assert (src / "foreign").read_bytes() == foreign  # never touched
    assert leftovers(src) == []

    rc, again = run_json(
        "rotate", str(src), "--force", "--include-legacy", "--keyring", ring, key=k3, env=env
    )
    assert rc == ISSUES_FOUND and again["encrypted_now"] == 1  # the legacy file
    assert plain_decrypt(k3, (src / "legacy.txt").read_bytes()) == b"legacy plaintext\n"
    # The current key alone now opens everything but the foreign file.
    rc, audit = run_json("audit", str(src), key=k3, env=env)
    assert audit["key_ids"] == {"3": 10}
    assert (audit["needs_encryption"], audit["decryption_failed"]) == (0, 1)


def test_rotate_refuses(tmp_path: Path):
    k1, k2 = new_key(), new_key()
    src = tmp_path / "src"
    sealed(src / "old", k1, b"sealed under key 1", "1")
    assert stormfs("check", str(src), key=k1).returncode == OK  # records key 1's check
    ring = write_keyring(tmp_path / "keyring", {"1": k1})
    env = {keys.ENV_KEY_ID: "2"}
    before = snapshot(src, atime=False)

    r = stormfs("rotate", str(src), "--keyring", ring, key=k2, env=env)
    assert r.returncode == USAGE and "--force" in r.stderr
    assert stormfs("rotate", str(src), "--force", key=None).returncode == USAGE
    # Key 2 alone opens nothing recorded: the mismatch.
    r = stormfs("rotate", str(src), "--force", key=k2, env=env)
    assert r.returncode == KEY_SAFETY
    assert r.stderr.startswith("FATAL: Encryption key mismatch detected!\n")
    # Once key 2 is in use, key 2 without key 1: files still need key 1.
    assert stormfs("check", str(src), "--keyring", ring, key=k2, env=env).returncode == OK
    r = stormfs("rotate", str(src), "--force", key=k2, env=env)
    assert r.returncode == KEY_SAFETY
    assert r.stderr.startswith(f"FATAL: Key id 1 is still needed by files in {src}, but not")
    assert snapshot(src, atime=False) == before

    state = src / ".stormfs" / "encrypt"
    state.mkdir(parents=True, exist_ok=True)
    with open(state / "lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        r = stormfs("rotate", str(src), "--force", "--keyring", ring, key=k2, env=env)
        assert r.returncode == BUSY
        assert r.stderr == f"stormfs: another stormfs encrypt or rotate is running on {src}\n"
    assert plain_decrypt(k1, (src / "old").read_bytes()) == b"sealed under key 1"


def test_make_rotate_keys(tmp_path: Path):
    """The Make target, with the current key in the environment and the keyring in ARGS."""
    k1, k2 = new_key(), new_key()
    src = tmp_path / "src"
    sealed(src / "a", k1, b"a" * 1000, "1")
    write(src / "plain", b"legacy")
    ring = write_keyring(tmp_path / "keyring", {"1": k1})
    env = {keys.ENV_KEY: k2, keys.ENV_KEY_ID: "2"}
    make = ["make", "-s", "-C", str(REPO), "rotate-keys", f"SOURCE={src}"]
    proc = run([*make, f"ARGS=--keyring {ring} --dry-run"], env=env, timeout=300)
    # make fails with the command's status in its message
    assert proc.returncode != 0 and f"Error {WORK_TO_DO}" in proc.stderr, proc.stderr
    assert "would re-encrypt  a: under key id 1 (1029 bytes)" in proc.stdout
    proc = run([*make, f"ARGS=--keyring {ring}"], env=env, timeout=300)
    assert proc.returncode == OK, proc.stderr
    assert plain_decrypt(k2, (src / "a").read_bytes()) == b"a" * 1000
    assert (src / "plain").read_bytes() == b"legacy"
    assert "Legacy files left:        1 (--include-legacy encrypts them)" in proc.stdout
    # Every word of it, and the NOTICE of the new key, holds no key.
    assert not any(form in proc.stdout + proc.stderr for k in (k1, k2) for form in forms(k))
    proc = run([*STORMFS, "rotate", str(src), "--force", "--keyring", ring], env=env)
    assert proc.returncode == OK
    assert "Re-encrypted now:         0" in proc.stdout
    usage = subprocess.run(["make", "-s", "-C", str(REPO), "rotate-keys"], capture_output=True)
    assert usage.returncode != 0


def test_keys_counts_and_retires(tmp_path: Path):
    k1, k2 = new_key(), new_key()
    src = tmp_path / "src"
    for i in range(3):
        sealed(src / f"old{i}", k1, b"under key 1 " * i, "1")
    write(src / "plain", b"legacy")
    assert stormfs("check", str(src), key=k1).returncode == OK
    ring = write_keyring(tmp_path / "keyring", {"1": k1})
    env = {keys.ENV_KEY_ID: "2"}
    with_ring = ("--keyring", ring)
    assert stormfs("check", str(src), *with_ring, key=k2, env=env).returncode == OK

    rc, report = run_json("keys", str(src), *with_ring, key=k2, env=env)
    assert rc == OK
    assert (report["key_ids"], report["legacy"], report["recorded"]) == ({"1": 3}, 1, ["2", "1"])
    proc = run([*STORMFS, "keys", str(src), *with_ring], env={keys.ENV_KEY: k2, **env})
    assert proc.stdout == (
        f"Keys of {src} (current key id 2)\n"
        "  key id 2  0 file(s) (current, accepted by the key check)\n"
        "  key id 1  3 file(s) (accepted by the key check)\n"
        "  legacy plaintext    1 file(s)\n"
    )

    proc = run(
        [*STORMFS, "keys", str(src), *with_ring, "--retire", "1"], env={keys.ENV_KEY: k2, **env}
    )
    assert (proc.returncode, proc.stdout) == (KEY_SAFETY, "")
    assert proc.stderr == (
        f"stormfs: key id 1 is still needed by 3 file(s) in {src}: not retired "
        "(re-encrypt them under the current key first: make rotate-keys)\n"
    )
    r = stormfs("keys", str(src), "--retire", "1", key=k2, env=env)
    assert r.returncode == USAGE
    assert r.stderr == (
        "stormfs: cannot retire: key id 1 is not in the keyring: give it (--keyring), so that "
        "the files still under it can be counted\n"
    )
    r = stormfs("keys", str(src), *with_ring, "--retire", "2", key=k2, env=env)
    assert (r.returncode, r.stderr) == (
        USAGE,
        f"stormfs: cannot retire: key id 2 is the current key of {src}\n",
    )
    assert stormfs("check", str(src), key=k2, env=env).returncode == KEY_SAFETY  # 1 still needed

    assert stormfs("rotate", str(src), "--force", *with_ring, key=k2, env=env).returncode == OK
    rc, report = run_json("keys", str(src), *with_ring, "--retire", "1", key=k2, env=env)
    assert rc == OK, report
    assert (report["retired"], report["recorded"], report["key_ids"]) == ("1", ["2"], {"2": 3})
    # Key 2 alone now starts, and key 1 alone is a mismatch.
    assert stormfs("check", str(src), key=k2, env=env).returncode == OK
    r = stormfs("check", str(src), key=k1)
    assert r.returncode == KEY_SAFETY and r.stderr.startswith("FATAL: Encryption key mismatch")
