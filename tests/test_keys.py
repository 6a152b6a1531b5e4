"""Loading the key: every source, their order, key ids, the key file's mode,
and malformed keys refused without their text in the message."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os

import pytest

from stormfs import keys
from stormfs.exitcodes import USAGE

from .keyscan import STORMFS, forms, new_key, run


def write_key_file(path, text: str, mode: int = 0o600) -> str:
    path = str(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, mode)
    return path


def material(text: str) -> bytes:
    return keys.parse_key(text)


def test_no_key_anywhere_is_none(tmp_path):
    assert keys.load_keyring(key_file=None, environ={}) is None
    # A credentials directory without stormfs.key holds no key for us.
    creds = {"CREDENTIALS_DIRECTORY": str(tmp_path)}
    assert keys.load_keyring(key_file=None, environ=creds) is None


def test_environment_key_with_default_id():
    text = new_key()
    ring = keys.load_keyring(key_file=None, environ={keys.ENV_KEY: text})
    assert ring is not None
    assert ring.current.key_id == "1"
    assert ring.current.material == material(text)


def test_key_id_from_environment():
    text = new_key()
    env = {keys.ENV_KEY: text, keys.ENV_KEY_ID: "2024-a"}
    ring = keys.load_keyring(key_file=None, environ=env)
    assert ring is not None and ring.current.key_id == "2024-a"
    assert ring.get("2024-a") is ring.current


def test_sources_in_order(tmp_path):
    file_key, cred_key, env_key = new_key(), new_key(), new_key()
    key_file = write_key_file(tmp_path / "file.key", file_key + "\n")
    creds = tmp_path / "creds"
    creds.mkdir()
    write_key_file(creds / "stormfs.key", cred_key)
    env = {keys.ENV_KEY: env_key, "CREDENTIALS_DIRECTORY": str(creds)}

    def loaded(key_file):
        ring = keys.load_keyring(key_file=key_file, environ=env)
        assert ring is not None
        return ring.current.material

    assert loaded(key_file) == material(file_key)
    assert loaded(None) == material(cred_key)
    del env["CREDENTIALS_DIRECTORY"]
    assert loaded(None) == material(env_key)


def test_padded_and_unpadded_keys_are_the_same_key(tmp_path):
    text = new_key()
    padded = base64.urlsafe_b64encode(material(text)).decode()
    assert padded.endswith("=") and padded.rstrip("=") == text
    for spelling in (text, padded, f"  {padded}\n"):
        path = write_key_file(tmp_path / "k", spelling)
        ring = keys.load_keyring(key_file=path, environ={})
        assert ring is not None and ring.current.material == material(text)


@pytest.mark.parametrize(
    ("mode", "access"),
    [(0o644, "readable"), (0o640, "readable"), (0o604, "readable"), (0o620, "writable")],
)
def test_key_file_open_to_group_or_others_is_refused(tmp_path, mode, access):
    path = write_key_file(tmp_path / "k", new_key(), mode)
    with pytest.raises(keys.InvalidKey) as e:
        keys.load_keyring(key_file=path, environ={})
    assert str(e.value) == (
        f"key file {path} is {access} by group or others (mode {mode:04o}); "
        f"restrict it with: chmod 600 {path}"
    )


@pytest.mark.parametrize("mode", [0o600, 0o400])
def test_key_file_private_to_owner_is_accepted(tmp_path, mode):
    path = write_key_file(tmp_path / "k", new_key(), mode)
    assert keys.load_keyring(key_file=path, environ={}) is not None


def test_credential_file_mode_is_checked_too(tmp_path):
    write_key_file(tmp_path / "stormfs.key", new_key(), 0o644)
    with pytest.raises(keys.InvalidKey, match="chmod 600"):
        keys.load_keyring(key_file=None, environ={"CREDENTIALS_DIRECTORY": str(tmp_path)})


def test_unusable_key_files(tmp_path):
    missing = str(tmp_path / "missing.key")
    with pytest.raises(keys.InvalidKey) as e:
        keys.load_keyring(key_file=missing, environ={})
    assert str(e.value) == f"cannot open key file {missing}: No such file or directory"
    directory = tmp_path / "dir"
    directory.mkdir(mode=0o700)
    with pytest.raises(keys.InvalidKey, match="is not a regular file"):
        keys.load_keyring(key_file=str(directory), environ={})
    big = write_key_file(tmp_path / "big", "A" * 5000)
    with pytest.raises(keys.InvalidKey, match="too large"):
        keys.load_keyring(key_file=big, environ={})


def malformed_keys() -> list[tuple[str, str]]:
    good = new_key()
    short = base64.urlsafe_b64encode(os.urandom(16)).decode()
    long = base64.urlsafe_b64encode(os.urandom(48)).decode()
    return [
        ("empty", ""),
        ("blank", "   \n"),
        ("standard base64 alphabet", good[:20] + "+/" + good[22:]),
        ("not base64 at all", "correct horse battery staple and more words"),
        ("16 bytes", short),
        ("48 bytes", long),
        ("key and a second line", good + "\nsecond line"),
    ]


MALFORMED = malformed_keys()


@pytest.mark.parametrize(("label", "text"), MALFORMED, ids=[label for label, _ in MALFORMED])
def test_malformed_keys_refused_without_key_text(tmp_path, label, text):
    path = write_key_file(tmp_path / "k", text)
    sources = [(path, {})]
    if text.strip():  # an empty variable is no key at all (test below)
        sources.append((None, {keys.ENV_KEY: text}))
    for key_file, env in sources:
        with pytest.raises(keys.InvalidKey) as e:
            keys.load_keyring(key_file=key_file, environ=env)
        message = str(e.value)
        assert "\n" not in message
        for part in text.split():
            assert len(part) < 8 or part not in message, label


@pytest.mark.parametrize("value", ["", "  "])
def test_empty_variable_counts_as_unset(value):
    """What a compose file leaves for a variable it passes through unset."""
    assert keys.load_keyring(key_file=None, environ={keys.ENV_KEY: value}) is None


def test_key_id_validated():
    with pytest.raises(keys.InvalidKey, match="key id"):
        keys.load_keyring(key_file=None, environ={keys.ENV_KEY: new_key(), keys.ENV_KEY_ID: "a b"})


def test_cli_refuses_malformed_key_with_exit_2(tmp_path):
    """A real `stormfs check` run: one line on stderr, exit 2, no key text anywhere."""
    text = new_key()[:-4]  # 29 bytes: base64url, wrong length
    proc = run([*STORMFS, "check", str(tmp_path)], env={keys.ENV_KEY: text})
    assert proc.returncode == USAGE
    assert proc.stdout == ""
    assert proc.stderr == (
        f"stormfs: ${keys.ENV_KEY}: the encryption key decodes to 29 bytes; "
        "it must be 32 (generate one with: stormfs keygen)\n"
    )
    assert text not in proc.stderr
    assert not os.path.exists(tmp_path / ".stormfs")


def test_cli_refuses_key_file_readable_by_others(tmp_path):
    key = new_key()
    path = write_key_file(tmp_path / "k", key, 0o644)
    source = tmp_path / "source"
    source.mkdir()
    proc = run([*STORMFS, "check", str(source), "--key-file", path])
    assert proc.returncode == USAGE
    assert proc.stderr == (
        f"stormfs: key file {path} is readable by group or others (mode 0644); "
        f"restrict it with: chmod 600 {path}\n"
    )
    assert not any(form in proc.stderr + proc.stdout for form in forms(key))


# -- the keyring file -------------------------------------------------------


def test_keyring_file_holds_older_keys(tmp_path):
    current, old1, old2 = new_key(), new_key(), new_key()
    path = write_key_file(
        tmp_path / "keyring",
        f"# keys retired from sealing, kept to open what they sealed\n\n"
        f"1 {old1}\n   \n  2024-b\t{old2}  \n# the current key may be listed too\n3 {current}\n",
    )
    env = {keys.ENV_KEY: current, keys.ENV_KEY_ID: "3"}
    ring = keys.load_keyring(key_file=None, keyring_file=path, environ=env)
    assert ring is not None
    assert ring.current.key_id == "3" and ring.current.material == material(current)
    assert ring.ids() == ["3", "1", "2024-b"]
    assert ring.get("1").material == material(old1)
    assert ring.get("2024-b").material == material(old2)
    assert ring.candidates("2024-b")[0].key_id == "2024-b"
    assert not any(form in repr(ring) for key in (current, old1, old2) for form in forms(key))


def test_keyring_from_the_credential(tmp_path):
    current, old = new_key(), new_key()
    write_key_file(tmp_path / "stormfs.key", current)
    write_key_file(tmp_path / "stormfs.keyring", f"old {old}\n")
    ring = keys.load_keyring(key_file=None, environ={"CREDENTIALS_DIRECTORY": str(tmp_path)})
    assert ring is not None and ring.ids() == ["1", "old"]
    # --keyring wins over the credential
    other = write_key_file(tmp_path / "other", f"other {new_key()}\n")
    env = {"CREDENTIALS_DIRECTORY": str(tmp_path)}
    ring = keys.load_keyring(key_file=None, keyring_file=other, environ=env)
    assert ring is not None and ring.ids() == ["1", "other"]


@pytest.mark.parametrize(("mode", "access"), [(0o644, "readable"), (0o660, "readable")])
def test_keyring_file_open_to_others_is_refused(tmp_path, mode, access):
    path = write_key_file(tmp_path / "keyring", f"1 {new_key()}\n", mode)
    with pytest.raises(keys.InvalidKey) as e:
        keys.load_keyring(key_file=None, keyring_file=path, environ={keys.ENV_KEY: new_key()})
    assert str(e.value) == (
        f"keyring file {path} is {access} by group or others (mode {mode:04o}); "
        f"restrict it with: chmod 600 {path}"
    )


def malformed_keyrings() -> list[tuple[str, str, str]]:
    """(label, file text, the message after "keyring file PATH, ")."""
    a, b = new_key(), new_key()
    short = base64.urlsafe_b64encode(os.urandom(16)).decode()
    return [
        ("key without id", f"# old\n{a}\n", "line 2: expected KEY_ID KEY, found 1 field(s)"),
        ("three fields", f"1 {a} extra\n", "line 1: expected KEY_ID KEY, found 3 field(s)"),
        ("trailing comment", f"1 {a} # old\n", "line 1: expected KEY_ID KEY, found 4 field(s)"),
        (
            "id with a slash",
            f"\n\nold/1 {a}\n",
            "line 3: the key id must be 1-64 characters of A-Z a-z 0-9 . _ -",
        ),
        (
            "id too long",
            f"{'x' * 65} {a}\n",
            "line 1: the key id must be 1-64 characters of A-Z a-z 0-9 . _ -",
        ),
        (
            "short key",
            f"1 {a}\n2 {short}\n",
            "line 2: the encryption key decodes to 16 bytes; it must be 32 "
            "(generate one with: stormfs keygen)",
        ),
        (
            "standard base64",
            f"1 {a[:20]}+/{a[22:]}\n",
            "line 1: the encryption key is not base64url "
            "(only A-Z a-z 0-9 - _ and trailing '=' are allowed)",
        ),
        ("duplicate id", f"1 {a}\n#\n1 {b}\n", "line 3: the key id of line 1 is given again"),
        (
            "duplicate id, same key",
            f"1 {a}\n1 {a}\n",
            "line 2: the key id of line 1 is given again",
        ),
        (
            "current id, another key",
            f"cur {b}\n",
            "line 1: the key id of the current key is given to another key",
        ),
    ]


MALFORMED_KEYRINGS = malformed_keyrings()


@pytest.mark.parametrize(
    ("label", "text", "said"), MALFORMED_KEYRINGS, ids=[m[0] for m in MALFORMED_KEYRINGS]
)
def test_malformed_keyring_refused_with_line_number(tmp_path, label, text, said):
    path = write_key_file(tmp_path / "keyring", text)
    env = {keys.ENV_KEY: new_key(), keys.ENV_KEY_ID: "cur"}
    with pytest.raises(keys.InvalidKey) as e:
        keys.load_keyring(key_file=None, keyring_file=path, environ=env)
    assert str(e.value) == f"keyring file {path}, {said}"
    for part in text.split():
        assert len(part) < 8 or part not in str(e.value), label


def test_unusable_keyring_files(tmp_path):
    env = {keys.ENV_KEY: new_key()}
    missing = str(tmp_path / "missing")
    with pytest.raises(keys.InvalidKey) as e:
        keys.load_keyring(key_file=None, keyring_file=missing, environ=env)
    assert str(e.value) == f"cannot open keyring file {missing}: No such file or directory"
    path = tmp_path / "latin1"
    path.write_bytes(f"# caf\xe9\n1 {new_key()}\n".encode("latin-1"))
    os.chmod(path, 0o600)
    with pytest.raises(keys.InvalidKey) as e:
        keys.load_keyring(key_file=None, keyring_file=str(path), environ=env)
    assert str(e.value) == f"keyring file {path} is not ASCII text"
    big = write_key_file(tmp_path / "big", "#" * 70000)
    with pytest.raises(keys.InvalidKey, match="too large"):
        keys.load_keyring(key_file=None, keyring_file=big, environ=env)


def test_keyring_without_current_key_is_refused(tmp_path):
    path = write_key_file(tmp_path / "keyring", f"1 {new_key()}\n")
    with pytest.raises(keys.InvalidKey) as e:
        keys.load_keyring(key_file=None, keyring_file=path, environ={})
    assert str(e.value) == (
        f"keyring file {path} holds older keys only: the current key is missing "
        "(--key-file, credential stormfs.key or $STORMCLOUD_ENCRYPTION_KEY)"
    )


def test_cli_refuses_a_malformed_keyring_with_exit_2(tmp_path):
    old = new_key()
    path = write_key_file(tmp_path / "keyring", f"1 {old}\n2 {old[:30]}\n")
    source = tmp_path / "source"
    source.mkdir()
    for args in (
        ["check", str(source), "--keyring", path],
        ["audit", str(source), "--keyring", path],
    ):
        proc = run([*STORMFS, *args], env={keys.ENV_KEY: new_key()})
        assert proc.returncode == USAGE
        assert proc.stderr == (  # 30 characters of base64url are 22 bytes
            f"stormfs: keyring file {path}, line 2: the encryption key decodes to 22 bytes; "
            "it must be 32 (generate one with: stormfs keygen)\n"
        )
    os.chmod(path, 0o644)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = run(
        [*STORMFS, "mount", str(source), str(mnt), "-o", f"keyring={path}"],
        env={keys.ENV_KEY: new_key()},
    )
    assert proc.returncode == USAGE
    assert proc.stderr == (
        f"stormfs: keyring file {path} is readable by group or others (mode 0644); "
        f"restrict it with: chmod 600 {path}\n"
    )


# -- per-user keys (Storm Cloud ADR 010) ------------------------------------


def hkdf_sha256(ikm: bytes, salt: bytes, info: bytes, length: int = 32) -> bytes:
    """RFC 5869 with the standard library's HMAC: an independent computation."""
    prk = hmac.new(salt, ikm, hashlib.sha256).digest()
    okm, block = b"", b""
    for counter in range(1, -(-length // 32) + 1):
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        okm += block
    return okm[:length]


def test_user_key_known_answers():
    master = bytes(range(32))
    assert keys.user_key(master, b"alice").hex() == (
        "67639978568d6135ae82340d5fa29265606b7c20734e49c55ad247416652adc0"
    )
    assert keys.user_key(master, b"42").hex() == (
        "fceec24bb961a819c79a305fe372c28fcc3b00dc0642e80f11df451e537f6d84"
    )


@pytest.mark.parametrize("account", [b"alice", b"42", b"a" * 200, "grüße".encode()])
def test_user_key_is_hkdf_sha256_of_the_master(account):
    master = material(new_key())
    expect = hkdf_sha256(master, b"stormcloud-user-key-v1", b"user-" + account)
    assert keys.user_key(master, account) == expect
    assert len(expect) == 32 and expect != master


def test_user_keys_differ_per_account_and_master():
    a, b = material(new_key()), material(new_key())
    assert keys.user_key(a, b"alice") != keys.user_key(a, b"bob")
    assert keys.user_key(a, b"alice") != keys.user_key(b, b"alice")
    for bad in (b"", b"alice/docs"):
        with pytest.raises(ValueError):
            keys.user_key(a, bad)
