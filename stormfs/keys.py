"""Keys: parsing, validation, key ids and the keyring.

A key is 32 random bytes given base64url-encoded (``secrets.token_urlsafe(32)``,
with or without ``=`` padding).  Key material never appears in a repr, a log
line or an exception message.

The keyring holds the current key (which seals new versions) and older keys
from a keyring file, one ``KEY_ID KEY`` per line, which only open what they
sealed.  `user_key` derives an account's key from a master key, as Storm
Cloud's per-user mode (``server-user``) does: a file under ``SOURCE/ACCOUNT/``
may be under the user key of ACCOUNT (`account_of`) derived from any key of
the keyring, and carries that key's id.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import secrets
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from . import format as fmt

ENV_KEY = "STORMCLOUD_ENCRYPTION_KEY"
ENV_KEY_ID = "STORMCLOUD_ENCRYPTION_KEY_ID"
DEFAULT_KEY_ID = "1"
# systemd's LoadCredential= puts the key at $CREDENTIALS_DIRECTORY/stormfs.key.
ENV_CREDENTIALS = "CREDENTIALS_DIRECTORY"
CREDENTIAL_NAME = "stormfs.key"
KEYRING_CREDENTIAL_NAME = "stormfs.keyring"
# Storm Cloud's per-user keys (ADR 010): HKDF-SHA256 of the master key.
USER_KEY_SALT = b"stormcloud-user-key-v1"
USER_KEY_INFO_PREFIX = b"user-"
# `user.stormfs.encryption_method`: a master key's files, and a user key's (ADR 010).
MASTER_METHOD = "server"
USER_METHOD = "server-user"
# Derived user keys kept per keyring, so a scan does not derive them for every file.
USER_KEY_CACHE = 4096
# A key file holds one base64url line; anything much larger is not a key.
MAX_KEY_FILE_SIZE = 4096
# A keyring file: a line per key, with comments; a few hundred keys at most.
MAX_KEYRING_FILE_SIZE = 1 << 16

_B64URL = re.compile(r"[A-Za-z0-9_-]+={0,2}")
_KEY_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
KEY_ID_RULE = "the key id must be 1-64 characters of A-Z a-z 0-9 . _ -"


class InvalidKey(ValueError):
    """The key text is malformed.  The message never contains the key."""


@dataclass(frozen=True)
class Key:
    """A key of the keyring (`account` None), or the user key of `account` derived from
    the keyring's key of the same id: it carries that master key's id, as Storm Cloud
    records key ids per master key."""

    key_id: str
    material: bytes = field(repr=False)
    account: bytes | None = None

    def __post_init__(self) -> None:
        if len(self.material) != fmt.KEY_SIZE:
            raise InvalidKey(f"an encryption key must be {fmt.KEY_SIZE} bytes")

    @property
    def method(self) -> str:
        """``server`` for a master key, ``server-user`` for a user key."""
        return MASTER_METHOD if self.account is None else USER_METHOD

    def for_account(self, account: bytes) -> Key:
        """The user key of `account` derived from this master key."""
        if self.account is not None:
            raise ValueError("a user key is derived from a master key")
        return Key(self.key_id, user_key(self.material, account), account)


def account_of(rel: bytes) -> bytes | None:
    """The account of a path relative to SOURCE: its first component, None for a name
    directly in SOURCE (whose file is under the master key)."""
    head, sep, _ = rel.strip(b"/").partition(b"/")
    return head if sep else None


def parse_key(text: str) -> bytes:
    """Decode a base64url key; anything but exactly 32 bytes is refused."""
    text = text.strip()
    if not text:
        raise InvalidKey("the encryption key is empty")
    if not _B64URL.fullmatch(text):
        raise InvalidKey(
            "the encryption key is not base64url "
            "(only A-Z a-z 0-9 - _ and trailing '=' are allowed)"
        )
    try:
        raw = base64.urlsafe_b64decode(text.rstrip("=") + "=" * (-len(text.rstrip("=")) % 4))
    except (binascii.Error, ValueError):
        raise InvalidKey("the encryption key is not valid base64url") from None
    if len(raw) != fmt.KEY_SIZE:
        raise InvalidKey(
            f"the encryption key decodes to {len(raw)} bytes; it must be {fmt.KEY_SIZE} "
            "(generate one with: stormfs keygen)"
        )
    return raw


def parse_key_id(text: str | None) -> str:
    key_id = DEFAULT_KEY_ID if text is None or text.strip() == "" else text.strip()
    if not _KEY_ID.fullmatch(key_id):
        raise InvalidKey(KEY_ID_RULE)
    return key_id


def user_key(master: bytes, account: bytes) -> bytes:
    """The key of the files under ``SOURCE/ACCOUNT/``:
    ``HKDF-SHA256(master, length=32, salt=b"stormcloud-user-key-v1", info=b"user-" + ACCOUNT)``,
    ACCOUNT the first path component under SOURCE."""
    if not account or b"/" in account:
        raise ValueError("an account is one non-empty path component")
    hkdf = HKDF(
        algorithm=SHA256(),
        length=fmt.KEY_SIZE,
        salt=USER_KEY_SALT,
        info=USER_KEY_INFO_PREFIX + account,
    )
    return hkdf.derive(master)


def generate_key() -> str:
    """A new key in the spec's form: ``secrets.token_urlsafe(32)``."""
    return secrets.token_urlsafe(fmt.KEY_SIZE)


class Keyring:
    """Key id -> key.  One key is current (used for new writes); the others, held
    for rotation, may only decrypt."""

    def __init__(self, current: Key, others: tuple[Key, ...] = ()) -> None:
        self.current = current
        self._by_id = {k.key_id: k for k in (*others, current)}
        self._user: dict[tuple[str, bytes], Key] = {}

    def key_ids(self) -> list[str]:
        """The ids of every key in the ring (never the keys)."""
        return sorted(self._by_id)

    def get(self, key_id: str) -> Key | None:
        return self._by_id.get(key_id)

    def __len__(self) -> int:
        return len(self._by_id)

    def others(self) -> list[Key]:
        """The keys that are not the current one, by id."""
        return [self._by_id[i] for i in self.ids()[1:]]

    def ids(self) -> list[str]:
        """Every key id, the current one first."""
        return [self.current.key_id, *sorted(set(self._by_id) - {self.current.key_id})]

    def user(self, master: Key, account: bytes) -> Key:
        """`master`'s user key of `account` (derived once, then remembered)."""
        found = self._user.get((master.key_id, account))
        if found is None:
            if len(self._user) >= USER_KEY_CACHE:
                self._user.clear()
            found = self._user[(master.key_id, account)] = master.for_account(account)
        return found

    def sealing(self, account: bytes | None) -> Key:
        """The key that seals a new version of a file of `account` on a per-user SOURCE:
        the current key's user key, or the current key itself for a name in SOURCE."""
        return self.current if account is None else self.user(self.current, account)

    def candidates(
        self, key_id: str | None, account: bytes | None = None, *, user_first: bool = False
    ) -> list[Key]:
        """Keys to try for a file, the one named by its recorded key id first.

        A file of an `account` may be under each key's user key as well as under the
        key itself: both are tried, key by key, the user key first if `user_first`.
        """
        first = self._by_id.get(key_id) if key_id else None
        rest = [k for k in self._by_id.values() if k is not first]
        masters = [first, *rest] if first else rest
        if account is None:
            return masters
        out = []
        for master in masters:
            user = self.user(master, account)
            out += [user, master] if user_first else [master, user]
        return out

    def __repr__(self) -> str:
        return f"Keyring(current={self.current.key_id!r}, ids={sorted(self._by_id)!r})"


def load_keyring(
    *, key_file: str | None, environ: Mapping[str, str], keyring_file: str | None = None
) -> Keyring | None:
    """The configured keys.  The current key comes from the first source that has one:

    1. ``key_file`` (``--key-file PATH`` or ``-o key_file=PATH``),
    2. the systemd credential ``$CREDENTIALS_DIRECTORY/stormfs.key``,
    3. ``$STORMCLOUD_ENCRYPTION_KEY``.

    The key id comes from ``$STORMCLOUD_ENCRYPTION_KEY_ID`` (default ``1``).
    An empty variable counts as unset (a compose file that passes through an
    unset variable leaves it empty).  Older keys come from ``keyring_file``
    (``--keyring PATH`` or ``-o keyring=PATH``), else the credential
    ``$CREDENTIALS_DIRECTORY/stormfs.keyring`` (`read_keyring_file`).
    Returns None when no source holds a current key.  Raises InvalidKey,
    naming the source but never its content, when a source is unusable.
    """
    key_id = parse_key_id(environ.get(ENV_KEY_ID))
    creds = environ.get(ENV_CREDENTIALS)
    if keyring_file is None and creds:
        path = os.path.join(creds, KEYRING_CREDENTIAL_NAME)
        keyring_file = path if os.path.lexists(path) else None
    if key_file is not None:
        text, source = read_key_file(key_file), f"key file {key_file}"
    elif creds and os.path.lexists(path := os.path.join(creds, CREDENTIAL_NAME)):
        text, source = read_key_file(path), f"credential {path}"
    elif environ.get(ENV_KEY, "").strip():
        text, source = environ[ENV_KEY], f"${ENV_KEY}"
    elif keyring_file is not None:
        raise InvalidKey(
            f"keyring file {keyring_file} holds older keys only: the current key is "
            f"missing (--key-file, credential {CREDENTIAL_NAME} or ${ENV_KEY})"
        )
    else:
        return None
    try:
        current = Key(key_id, parse_key(text))
    except InvalidKey as e:
        raise InvalidKey(f"{source}: {e}") from None
    if keyring_file is None:
        return Keyring(current)
    others = []
    for line, key in read_keyring_file(keyring_file):
        if key.key_id == current.key_id and key.material != current.material:
            raise InvalidKey(
                f"keyring file {keyring_file}, line {line}: the key id of the current key "
                "is given to another key"
            )
        others.append(key)
    return Keyring(current, tuple(others))


def read_keyring_file(path: str) -> list[tuple[int, Key]]:
    """The keys of a keyring file, each with its line number.

    One ``KEY_ID KEY`` per line; blank lines and lines starting with ``#`` are
    skipped.  The file must be private to its owner, like a key file.  A
    malformed line or a key id given twice is refused with its line number.
    """
    text = _read_private(path, "keyring file", MAX_KEYRING_FILE_SIZE, " is not ASCII text")
    found: list[tuple[int, Key]] = []
    first: dict[str, int] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"keyring file {path}, line {number}"
        fields = line.split()
        if len(fields) != 2:
            raise InvalidKey(f"{where}: expected KEY_ID KEY, found {len(fields)} field(s)")
        if not _KEY_ID.fullmatch(fields[0]):
            raise InvalidKey(f"{where}: {KEY_ID_RULE}")
        try:
            key = Key(fields[0], parse_key(fields[1]))
        except InvalidKey as e:
            raise InvalidKey(f"{where}: {e}") from None
        if key.key_id in first:
            raise InvalidKey(f"{where}: the key id of line {first[key.key_id]} is given again")
        first[key.key_id] = number
        found.append((number, key))
    return found


def read_key_file(path: str) -> str:
    """The text of a key file that only its owner can access."""
    return _read_private(
        path, "key file", MAX_KEY_FILE_SIZE, ": the encryption key is not base64url"
    )


def _read_private(path: str, what: str, limit: int, not_ascii: str) -> str:
    """The ASCII text of a file that only its owner can access (`what` names it,
    `not_ascii` follows its name when it holds other bytes)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise InvalidKey(f"cannot open {what} {path}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise InvalidKey(f"{what} {path} is not a regular file")
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o077:
            access = "readable" if mode & 0o044 else "writable"
            raise InvalidKey(
                f"{what} {path} is {access} by group or others (mode {mode:04o}); "
                f"restrict it with: chmod 600 {path}"
            )
        data = os.read(fd, limit + 1)
    except OSError as e:
        raise InvalidKey(f"cannot read {what} {path}: {e.strerror}") from None
    finally:
        os.close(fd)
    if len(data) > limit:
        raise InvalidKey(f"{what} {path} is too large to hold keys")
    try:
        return data.decode("ascii")
    except UnicodeDecodeError:
        raise InvalidKey(f"{what} {path}{not_ascii}") from None
