"""The key safety checks of DESIGN §4, on real storage directories: every case
with its exact text, the recorded check itself, and the sample walk over
Storm Cloud envelopes (made with format.seal, as the server writes them)."""

from __future__ import annotations

import base64
import json
import os
import stat
from pathlib import Path

import pytest

from stormfs import cli, keycheck, keys
from stormfs import format as fmt
from stormfs import format_v2 as v2
from stormfs.exitcodes import KEY_SAFETY, OK

from .keyscan import STORMFS, forms, new_key, run

MISMATCH_TEXT = """\
FATAL: Encryption key mismatch detected!
Server has encrypted files with a different key.
Deployment blocked to prevent data loss."""

NO_KEY_TEXT = """\
FATAL: Server has encryption enabled, but no key provided.
Cannot disable encryption - this would make files unreadable."""


def notice_text(key_text: str) -> str:
    return (
        "NOTICE: Server-side encryption being enabled for the first time.\n"
        "SAVE YOUR ENCRYPTION KEY NOW:\n"
        f"  STORMCLOUD_ENCRYPTION_KEY={key_text[:16]}...\n"
        "Store this in your password manager. Losing this key = losing your files."
    )


def ring(text: str, key_id: str = "1") -> keys.Keyring:
    return keys.Keyring(keys.Key(key_id, keys.parse_key(text)))


def put(path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def storm_cloud_source(root, key_text: str):
    """A storage directory as the Storm Cloud server leaves it: envelopes under
    the key, legacy plaintext, no stormfs state."""
    key = keys.parse_key(key_text)
    put(root / "documents" / "report.pdf", fmt.seal(key, b"%PDF-1.7 " + os.urandom(3000)))
    put(root / "photos" / "2025" / "a.jpg", fmt.seal(key, os.urandom(10000)))
    put(root / "empty.txt", fmt.seal(key, b""))
    put(root / "legacy.txt", b"uploaded before encryption was enabled\n")
    return root


def preflight(source, keyring):
    verdict = keycheck.preflight(str(source), keyring)
    return verdict.mode, [verdict.notice] if verdict.notice is not None else []


def refused(source, keyring) -> keycheck.SafetyError:
    with pytest.raises(keycheck.SafetyError) as e:
        preflight(source, keyring)
    assert cli.preflight_or_refuse(str(source), keyring, echo=print) == KEY_SAFETY == 3
    return e.value


def snapshot(root) -> dict[str, tuple[int, bytes | None]]:
    """Every name under root with its mode and content: to prove nothing changed."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            data = Path(path).read_bytes() if stat.S_ISREG(st.st_mode) else None
            out[os.path.relpath(path, root)] = (st.st_mode, data)
    return out


# -- first time, and the recorded check ------------------------------------


def test_first_time_records_check_and_prints_notice(tmp_path):
    key = new_key()
    put(tmp_path / "legacy.txt", b"plain")
    mode, said = preflight(tmp_path, ring(key))
    assert mode is keycheck.Mode.ENCRYPTED
    assert said == [notice_text(key)]
    state = tmp_path / ".stormfs"
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    check = state / "keycheck"
    assert stat.S_IMODE(check.stat().st_mode) == 0o600
    assert sorted(os.listdir(state)) == ["keycheck"]  # no temporary file left behind


def test_notice_shows_only_16_characters(tmp_path):
    key = new_key()
    _, said = preflight(tmp_path, ring(key))
    assert key[:16] in said[0]
    assert key[:17] not in said[0]


def test_same_key_again_is_silent(tmp_path):
    key = new_key()
    preflight(tmp_path, ring(key))
    before = (tmp_path / ".stormfs" / "keycheck").read_bytes()
    assert preflight(tmp_path, ring(key)) == (keycheck.Mode.ENCRYPTED, [])
    assert (tmp_path / ".stormfs" / "keycheck").read_bytes() == before


def test_recorded_check_with_other_key_is_a_mismatch(tmp_path):
    preflight(tmp_path, ring(new_key()))
    before = snapshot(tmp_path)
    assert refused(tmp_path, ring(new_key())).message == MISMATCH_TEXT
    assert snapshot(tmp_path) == before


def test_recorded_check_without_key_cannot_disable(tmp_path):
    preflight(tmp_path, ring(new_key()))
    before = snapshot(tmp_path)
    assert refused(tmp_path, None).message == NO_KEY_TEXT
    assert snapshot(tmp_path) == before


def test_check_record_holds_key_id_and_no_key_material(tmp_path):
    key = new_key()
    preflight(tmp_path, ring(key, key_id="2026-01"))
    data = (tmp_path / ".stormfs" / "keycheck").read_bytes()
    record = json.loads(data)
    assert record["format"] == "stormfs-keycheck"
    assert record["version"] == 1
    assert record["key_id"] == "2026-01"
    # The check value is a v1 envelope of a fixed string: opening it is the test.
    envelope = base64.urlsafe_b64decode(record["check"])
    assert fmt.open_envelope(keys.parse_key(key), envelope) == keycheck.CHECK_PLAINTEXT
    raw = keys.parse_key(key)
    assert raw not in data
    assert not any(form.encode() in data for form in forms(key))
    assert not any(key[i : i + 8].encode() in data for i in range(0, len(key) - 8))


def test_check_is_a_fresh_envelope_each_time(tmp_path):
    """Two sources under one key get different check values (random nonce):
    a check value cannot be looked up in a precomputed table."""
    key = new_key()
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    preflight(a, ring(key))
    preflight(b, ring(key))
    check_a = json.loads((a / ".stormfs" / "keycheck").read_bytes())["check"]
    check_b = json.loads((b / ".stormfs" / "keycheck").read_bytes())["check"]
    assert check_a != check_b


def test_same_key_under_another_id_still_matches(tmp_path):
    key = new_key()
    preflight(tmp_path, ring(key, key_id="1"))
    assert preflight(tmp_path, ring(key, key_id="2")) == (keycheck.Mode.ENCRYPTED, [])


def test_unreadable_check_is_refused_not_replaced(tmp_path):
    key = new_key()
    put(tmp_path / ".stormfs" / "keycheck", b"{ torn")
    os.chmod(tmp_path / ".stormfs", 0o700)
    before = snapshot(tmp_path)
    error = refused(tmp_path, ring(key))
    path = tmp_path / ".stormfs" / "keycheck"
    assert error.message == (
        f"FATAL: The key check recorded in {path} cannot be read "
        "(not a stormfs key check record).\n"
        "Restore it from a backup of SOURCE, or move it aside so that the key is "
        "checked against the encrypted files again."
    )
    assert snapshot(tmp_path) == before
    # Without a key, a check that is there at all means encryption is on.
    assert refused(tmp_path, None).message == NO_KEY_TEXT


def test_check_from_a_newer_version_is_refused(tmp_path):
    put(tmp_path / ".stormfs" / "keycheck", b'{"format": "stormfs-keycheck", "version": 3}')
    assert "unknown key check version 3" in refused(tmp_path, ring(new_key())).message


def test_state_dir_mode_is_tightened(tmp_path):
    (tmp_path / ".stormfs").mkdir(mode=0o755)
    os.chmod(tmp_path / ".stormfs", 0o755)
    preflight(tmp_path, ring(new_key()))
    assert stat.S_IMODE((tmp_path / ".stormfs").stat().st_mode) == 0o700


# -- a storage directory written by the Storm Cloud server ------------------


def test_storm_cloud_source_right_key_is_adopted(tmp_path):
    key = new_key()
    storm_cloud_source(tmp_path, key)
    mode, said = preflight(tmp_path, ring(key))
    assert mode is keycheck.Mode.ENCRYPTED
    check = tmp_path / ".stormfs" / "keycheck"
    assert said == [
        f"Key verified against the encrypted files already in {tmp_path}; "
        f"key check recorded in {check}."
    ]
    assert check.exists()
    # From now on the recorded check decides.
    assert refused(tmp_path, ring(new_key())).message == MISMATCH_TEXT
    assert preflight(tmp_path, ring(key)) == (keycheck.Mode.ENCRYPTED, [])


def test_storm_cloud_source_wrong_key_is_a_mismatch(tmp_path):
    storm_cloud_source(tmp_path, new_key())
    before = snapshot(tmp_path)
    assert refused(tmp_path, ring(new_key())).message == MISMATCH_TEXT
    assert snapshot(tmp_path) == before  # not even .stormfs was created


def test_storm_cloud_source_without_key_cannot_disable(tmp_path):
    storm_cloud_source(tmp_path, new_key())
    before = snapshot(tmp_path)
    assert refused(tmp_path, None).message == NO_KEY_TEXT
    assert snapshot(tmp_path) == before


def test_one_authentic_envelope_in_the_sample_is_enough(tmp_path):
    """Damaged envelopes and plaintext that happens to start with 0x01 sit
    beside the server's files; the right key is still recognised."""
    key = new_key()
    good = fmt.seal(keys.parse_key(key), b"x" * 5000)
    put(tmp_path / "a" / "good.bin", good)
    flipped = bytearray(fmt.seal(keys.parse_key(key), b"y" * 100))
    flipped[40] ^= 1
    put(tmp_path / "damaged.bin", bytes(flipped))
    put(tmp_path / "truncated.bin", fmt.seal(keys.parse_key(key), b"z" * 100)[:-1])
    put(tmp_path / "binary.dat", b"\x01" + os.urandom(200))
    assert preflight(tmp_path, ring(key))[0] is keycheck.Mode.ENCRYPTED


def test_only_damaged_envelopes_are_a_mismatch(tmp_path):
    key = new_key()
    flipped = bytearray(fmt.seal(keys.parse_key(key), b"y" * 100))
    flipped[-1] ^= 1
    put(tmp_path / "damaged.bin", bytes(flipped))
    assert refused(tmp_path, ring(key)).message == MISMATCH_TEXT


def test_v2_files_are_sampled_like_v1_envelopes(tmp_path):
    """A SOURCE holding only v2 files: the right key is recognised from them, another
    key is a mismatch, no key cannot disable encryption."""
    key = new_key()
    put(tmp_path / "db.sqlite", v2.seal(keys.parse_key(key), os.urandom(70000)))
    put(tmp_path / "legacy.bin", b"\x02" + os.urandom(500))  # legacy, starts with 0x02
    before = snapshot(tmp_path)
    assert refused(tmp_path, ring(new_key())).message == MISMATCH_TEXT
    assert refused(tmp_path, None).message == NO_KEY_TEXT
    assert snapshot(tmp_path) == before
    assert preflight(tmp_path, ring(key))[0] is keycheck.Mode.ENCRYPTED


# -- no key, nothing encrypted ----------------------------------------------


def test_no_key_and_nothing_encrypted_is_a_passthrough(tmp_path):
    put(tmp_path / "legacy.txt", b"plain text, long enough to look like anything")
    put(tmp_path / "short.bin", b"\x01" * 28)  # starts with 0x01 but under 29 bytes
    put(tmp_path / "sub" / "other.bin", b"\x02" + bytes(100))
    before = snapshot(tmp_path)
    mode, said = preflight(tmp_path, None)
    assert mode is keycheck.Mode.PASSTHROUGH
    assert said == [
        f"WARNING: No encryption key provided and no encrypted files in {tmp_path}: "
        "mounting it as a plain pass-through (encryption_method none). "
        "Files are stored unencrypted until a key is configured."
    ]
    assert snapshot(tmp_path) == before


def test_passthrough_then_encryption_switched_on(tmp_path):
    put(tmp_path / "legacy.txt", b"plain")
    assert preflight(tmp_path, None)[0] is keycheck.Mode.PASSTHROUGH
    key = new_key()
    assert preflight(tmp_path, ring(key)) == (keycheck.Mode.ENCRYPTED, [notice_text(key)])
    assert refused(tmp_path, None).message == NO_KEY_TEXT


def test_not_a_directory(tmp_path):
    with pytest.raises(NotADirectoryError):
        preflight(tmp_path / "missing", ring(new_key()))


# -- the walk that finds envelopes ------------------------------------------


def test_walk_skips_stormfs_names(tmp_path):
    """stormfs' own state and temporary names are never taken for server files."""
    other = keys.parse_key(new_key())
    put(tmp_path / ".stormfs-tmp-123", fmt.seal(other, b"scratch"))
    put(tmp_path / "dir" / ".stormfs.commit", fmt.seal(other, b"temp"))
    put(tmp_path / ".stormfs" / "scratch" / "x", fmt.seal(other, b"state"))
    assert keycheck.find_envelopes(str(tmp_path), limit=10) == []
    key = new_key()
    assert preflight(tmp_path, ring(key))[1] == [notice_text(key)]


def test_walk_follows_no_symlink(tmp_path):
    outside = tmp_path / "outside"
    put(outside / "env.bin", fmt.seal(keys.parse_key(new_key()), b"x"))
    source = tmp_path / "source"
    source.mkdir()
    os.symlink(outside, source / "linked-dir")
    os.symlink(outside / "env.bin", source / "linked-file")
    assert keycheck.find_envelopes(str(source), limit=10) == []


def test_walk_is_bounded_and_returns_smallest_first(tmp_path):
    key = keys.parse_key(new_key())
    for i in range(5):
        put(tmp_path / f"f{i}", fmt.seal(key, bytes(100 * (5 - i))))
    found = keycheck.find_envelopes(str(tmp_path), limit=10)
    assert [os.path.basename(p) for p in found] == ["f4", "f3", "f2", "f1", "f0"]
    assert len(keycheck.find_envelopes(str(tmp_path), limit=2)) == 2
    assert keycheck.find_envelopes(str(tmp_path), limit=10, max_entries=0) == []
    # Breadth first: a shallow envelope is found before deep directories.
    deep = tmp_path / "deep"
    for depth in range(30):
        deep = deep / f"d{depth}"
    put(deep / "far.bin", fmt.seal(key, b"far"))
    assert all("far.bin" not in p for p in keycheck.find_envelopes(str(tmp_path), limit=5))


# -- the `stormfs check` command --------------------------------------------


def test_check_command_exit_codes_and_texts(tmp_path):
    key, other = new_key(), new_key()
    source = storm_cloud_source(tmp_path / "source", key)

    proc = run([*STORMFS, "check", str(source)], env={keys.ENV_KEY: other})
    assert (proc.returncode, proc.stdout, proc.stderr) == (KEY_SAFETY, "", MISMATCH_TEXT + "\n")

    proc = run([*STORMFS, "check", str(source)])
    assert (proc.returncode, proc.stdout, proc.stderr) == (KEY_SAFETY, "", NO_KEY_TEXT + "\n")

    proc = run([*STORMFS, "check", str(source)], env={keys.ENV_KEY: key})
    assert proc.returncode == OK, proc.stderr
    assert proc.stdout.splitlines()[-1] == f"OK: {source} can be mounted encrypted with key id 1"

    fresh = tmp_path / "fresh"
    fresh.mkdir()
    proc = run([*STORMFS, "check", str(fresh)], env={keys.ENV_KEY: key})
    assert proc.returncode == OK
    assert proc.stdout == (
        notice_text(key) + f"\nOK: {fresh} can be mounted encrypted with key id 1\n"
    )

    plain = tmp_path / "plain"
    plain.mkdir()
    proc = run([*STORMFS, "check", str(plain)])
    assert proc.returncode == OK
    assert proc.stdout.splitlines() == [
        f"WARNING: No encryption key provided and no encrypted files in {plain}: "
        "mounting it as a plain pass-through (encryption_method none). "
        "Files are stored unencrypted until a key is configured.",
        f"OK: {plain} can be mounted as a plain pass-through (no key)",
    ]


# -- several keys: the check follows a new key, older ones stay accepted -----


def several(current: str, key_id: str, older: dict[str, str]) -> keys.Keyring:
    return keys.Keyring(
        keys.Key(key_id, keys.parse_key(current)),
        tuple(keys.Key(i, keys.parse_key(k)) for i, k in older.items()),
    )


def new_key_notice(key_text: str, key_id: str, old: str) -> str:
    return (
        f"NOTICE: A new encryption key (key id {key_id}) seals new versions from now on; "
        f"{old} the files sealed before.\n"
        "SAVE YOUR ENCRYPTION KEY NOW:\n"
        f"  STORMCLOUD_ENCRYPTION_KEY={key_text[:16]}...\n"
        "Store this in your password manager. Losing this key = losing your files."
    )


def missing_text(source, ids: str, *, several_ids: bool = False) -> str:
    are, them = ("are", "them") if several_ids else ("is", "it")
    return (
        f"FATAL: Key id{'s' if several_ids else ''} {ids} {are} still needed by files in "
        f"{source}, but not in the keyring.\n"
        f"Add {them} to the keyring file (--keyring, -o keyring=, or the credential "
        "stormfs.keyring); `stormfs keys SOURCE --retire ID` forgets a key once no file needs it."
    )


@pytest.fixture
def rotated(tmp_path):
    """SOURCE recorded under key 1, then started with key 2 and key 1 in the keyring."""
    k1, k2 = new_key(), new_key()
    storm_cloud_source(tmp_path, k1)
    preflight(tmp_path, ring(k1))
    mode, said = preflight(tmp_path, several(k2, "2", {"1": k1}))
    assert mode is keycheck.Mode.ENCRYPTED
    assert said == [new_key_notice(k2, "2", "key id 1 still opens")]
    return tmp_path, k1, k2


def test_new_key_moves_the_check_and_keeps_the_old_one_accepted(rotated):
    source, k1, k2 = rotated
    data = (source / ".stormfs" / "keycheck").read_bytes()
    record = json.loads(data)
    assert (record["version"], record["key_id"]) == (2, "2")
    assert [a["key_id"] for a in record["accepted"]] == ["1"]
    envelope = base64.urlsafe_b64decode(record["check"])
    assert fmt.open_envelope(keys.parse_key(k2), envelope) == keycheck.CHECK_PLAINTEXT
    old = base64.urlsafe_b64decode(record["accepted"][0]["check"])
    assert fmt.open_envelope(keys.parse_key(k1), old) == keycheck.CHECK_PLAINTEXT
    for key in (k1, k2):  # listed by id, never by value
        assert keys.parse_key(key) not in data
        assert not any(form.encode() in data for form in forms(key))
    # From now on the same keys start silently, either as the current one.
    assert preflight(source, several(k2, "2", {"1": k1})) == (keycheck.Mode.ENCRYPTED, [])
    assert preflight(source, several(k1, "1", {"2": k2})) == (keycheck.Mode.ENCRYPTED, [])


def test_a_key_files_still_need_must_be_given(rotated):
    source, k1, k2 = rotated
    before = snapshot(source)
    assert refused(source, ring(k2, "2")).message == missing_text(source, "1")
    assert refused(source, ring(k1, "1")).message == missing_text(source, "2")
    k3 = new_key()
    assert refused(source, several(k3, "3", {"1": k1})).message == missing_text(source, "2")
    assert snapshot(source) == before


def test_a_key_matching_nothing_recorded_is_still_a_mismatch(rotated):
    source, _, _ = rotated
    assert refused(source, ring(new_key(), "3")).message == MISMATCH_TEXT
    assert refused(source, several(new_key(), "3", {"x": new_key()})).message == MISMATCH_TEXT
    assert refused(source, None).message == NO_KEY_TEXT


def test_a_second_new_key_keeps_every_older_one(rotated):
    source, k1, k2 = rotated
    k3 = new_key()
    _, said = preflight(source, several(k3, "3", {"1": k1, "2": k2}))
    assert said == [new_key_notice(k3, "3", "key ids 2, 1 still open")]
    recorded = keycheck.read_check(str(source))
    assert recorded is not None and recorded.ids() == ["3", "2", "1"]
    error = refused(source, ring(k3, "3"))
    assert error.message == missing_text(source, "2, 1", several_ids=True)


def test_a_new_key_under_a_recorded_id_is_refused(rotated):
    source, k1, k2 = rotated
    before = snapshot(source)
    error = refused(source, several(new_key(), "1", {"old": k1, "2": k2}))
    assert error.message == (
        f"FATAL: Key id 1 is recorded in {source / '.stormfs' / 'keycheck'} for another key.\n"
        "Give the new key an id of its own (STORMCLOUD_ENCRYPTION_KEY_ID)."
    )
    assert snapshot(source) == before


def test_retire_forgets_an_older_key(rotated):
    source, k1, k2 = rotated
    with pytest.raises(keycheck.NotRetirable, match="is the current key"):
        keycheck.retire(str(source), "2")
    with pytest.raises(keycheck.NotRetirable, match="is not recorded"):
        keycheck.retire(str(source), "7")
    now = keycheck.retire(str(source), "1")
    assert now.ids() == ["2"]
    record = json.loads((source / ".stormfs" / "keycheck").read_bytes())
    assert record["version"] == 1 and "accepted" not in record
    assert preflight(source, ring(k2, "2")) == (keycheck.Mode.ENCRYPTED, [])
    assert refused(source, ring(k1, "1")).message == MISMATCH_TEXT


def test_check_command_with_a_keyring(rotated, tmp_path_factory):
    source, k1, k2 = rotated
    keyring = tmp_path_factory.mktemp("ring") / "keyring"
    keyring.write_text(f"1 {k1}\n")
    keyring.chmod(0o600)
    env = {keys.ENV_KEY: k2, keys.ENV_KEY_ID: "2"}
    proc = run([*STORMFS, "check", str(source), "--keyring", str(keyring)], env=env)
    assert (proc.returncode, proc.stderr) == (OK, "")
    assert proc.stdout == f"OK: {source} can be mounted encrypted with key id 2\n"
    proc = run([*STORMFS, "check", str(source)], env=env)
    assert (proc.returncode, proc.stdout) == (KEY_SAFETY, "")
    assert proc.stderr == missing_text(source, "1") + "\n"
    mnt = tmp_path_factory.mktemp("mnt")
    proc = run([*STORMFS, "mount", str(source), str(mnt)], env=env)
    assert (proc.returncode, proc.stdout) == (KEY_SAFETY, "")
    assert proc.stderr == missing_text(source, "1") + "\n"


def test_first_check_with_a_keyring_accepts_every_key_of_it(tmp_path):
    """No check recorded yet: files may be under any key of the keyring, so each stays
    needed until it is retired."""
    k1, k2 = new_key(), new_key()
    storm_cloud_source(tmp_path, k1)
    mode, said = preflight(tmp_path, several(k2, "2", {"1": k1}))
    assert mode is keycheck.Mode.ENCRYPTED and said[0].startswith("Key verified against")
    recorded = keycheck.read_check(str(tmp_path))
    assert recorded is not None and recorded.ids() == ["2", "1"]
    assert refused(tmp_path, ring(k2, "2")).message == missing_text(tmp_path, "1")
