"""Keys: parsing, validation, key ids and the keyring.

A key is 32 random bytes given base64url-encoded (``secrets.token_urlsafe(32)``,
with or without ``=`` padding).  Key material never appears in a repr, a log
line or an exception message.
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

from . import format as fmt

ENV_KEY = "STORMCLOUD_ENCRYPTION_KEY"
ENV_KEY_ID = "STORMCLOUD_ENCRYPTION_KEY_ID"
DEFAULT_KEY_ID = "1"
# systemd's LoadCredential= puts the key at $CREDENTIALS_DIRECTORY/stormfs.key.
ENV_CREDENTIALS = "CREDENTIALS_DIRECTORY"
CREDENTIAL_NAME = "stormfs.key"
# A key file holds one base64url line; anything much larger is not a key.
MAX_KEY_FILE_SIZE = 4096

_B64URL = re.compile(r"[A-Za-z0-9_-]+={0,2}")
_KEY_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


class InvalidKey(ValueError):
    """The key text is malformed.  The message never contains the key."""


@dataclass(frozen=True)
class Key:
    key_id: str
    material: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if len(self.material) != fmt.KEY_SIZE:
            raise InvalidKey(f"an encryption key must be {fmt.KEY_SIZE} bytes")


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
        raise InvalidKey("the key id must be 1-64 characters of A-Z a-z 0-9 . _ -")
    return key_id


def generate_key() -> str:
    """A new key in the spec's form: ``secrets.token_urlsafe(32)``."""
    return secrets.token_urlsafe(fmt.KEY_SIZE)


class Keyring:
    """Key id -> key.  One key is current (used for new writes); the others, held
    for rotation, may only decrypt."""

    def __init__(self, current: Key, others: tuple[Key, ...] = ()) -> None:
        self.current = current
        self._by_id = {k.key_id: k for k in (*others, current)}

    def key_ids(self) -> list[str]:
        """The ids of every key in the ring (never the keys)."""
        return sorted(self._by_id)

    def get(self, key_id: str) -> Key | None:
        return self._by_id.get(key_id)

    def candidates(self, key_id: str | None) -> list[Key]:
        """Keys to try for a file, the one named by its recorded key id first."""
        first = self._by_id.get(key_id) if key_id else None
        rest = [k for k in self._by_id.values() if k is not first]
        return [first, *rest] if first else rest

    def __repr__(self) -> str:
        return f"Keyring(current={self.current.key_id!r}, ids={sorted(self._by_id)!r})"


def load_keyring(*, key_file: str | None, environ: Mapping[str, str]) -> Keyring | None:
    """The configured key, from the first source that has one:

    1. ``key_file`` (``--key-file PATH`` or ``-o key_file=PATH``),
    2. the systemd credential ``$CREDENTIALS_DIRECTORY/stormfs.key``,
    3. ``$STORMCLOUD_ENCRYPTION_KEY``.

    The key id comes from ``$STORMCLOUD_ENCRYPTION_KEY_ID`` (default ``1``).
    An empty variable counts as unset (a compose file that passes through an
    unset variable leaves it empty).  Returns None when no source holds a key.
    Raises InvalidKey, naming the source but never its content, when the
    chosen source is unusable.
    """
    key_id = parse_key_id(environ.get(ENV_KEY_ID))
    if key_file is not None:
        text, source = read_key_file(key_file), f"key file {key_file}"
    elif environ.get(ENV_CREDENTIALS) and os.path.lexists(
        path := os.path.join(environ[ENV_CREDENTIALS], CREDENTIAL_NAME)
    ):
        text, source = read_key_file(path), f"credential {path}"
    elif environ.get(ENV_KEY, "").strip():
        text, source = environ[ENV_KEY], f"${ENV_KEY}"
    else:
        return None
    try:
        material = parse_key(text)
    except InvalidKey as e:
        raise InvalidKey(f"{source}: {e}") from None
    return Keyring(Key(key_id, material))


def read_key_file(path: str) -> str:
    """The text of a key file that only its owner can access."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise InvalidKey(f"cannot open key file {path}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise InvalidKey(f"key file {path} is not a regular file")
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o077:
            access = "readable" if mode & 0o044 else "writable"
            raise InvalidKey(
                f"key file {path} is {access} by group or others (mode {mode:04o}); "
                f"restrict it with: chmod 600 {path}"
            )
        data = os.read(fd, MAX_KEY_FILE_SIZE + 1)
    except OSError as e:
        raise InvalidKey(f"cannot read key file {path}: {e.strerror}") from None
    finally:
        os.close(fd)
    if len(data) > MAX_KEY_FILE_SIZE:
        raise InvalidKey(f"key file {path} is too large to hold a key")
    try:
        return data.decode("ascii")
    except UnicodeDecodeError:
        raise InvalidKey(f"key file {path}: the encryption key is not base64url") from None
