"""The key check value and the safety checks that run before every mount.

stormfs records in ``SOURCE/.stormfs/keycheck`` a v1 envelope of a fixed
string sealed under the key, with the key id.  Verifying it means decrypting
it, so it tells nothing about the key that AES-GCM itself does not.  Before a
mount appears, `preflight` compares the configured key with that record (or,
when there is none yet, with a sample of the envelopes already in SOURCE) and
refuses, with the exact texts of DESIGN §4, any start that could make files
unreadable.  It returns verdicts; the CLI prints them and picks exit codes.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import enum
import json
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass

from . import format as fmt
from .keys import ENV_KEY, Key, Keyring
from .scan import Status, classify_path, kind_of, opening_key, walk
from .source import STATE_DIR, lock, open_dir, state_dir, write_atomically

CHECK_NAME = "keycheck"
CHECK_FORMAT = "stormfs-keycheck"
CHECK_VERSION = 1
CHECK_PLAINTEXT = b"stormfs key check v1"
# How many envelopes to verify when SOURCE has no recorded check, and how far
# to look for them: the smallest of the first SAMPLE_POOL found, in a
# breadth-first walk of at most WALK_LIMIT directory entries.
SAMPLE_SIZE = 16
SAMPLE_POOL = 64
WALK_LIMIT = 100_000
NOTICE_PREFIX_CHARS = 16

MISMATCH = (
    "FATAL: Encryption key mismatch detected!\n"
    "Server has encrypted files with a different key.\n"
    "Deployment blocked to prevent data loss."
)
NO_KEY = (
    "FATAL: Server has encryption enabled, but no key provided.\n"
    "Cannot disable encryption - this would make files unreadable."
)
FIRST_TIME = (
    "NOTICE: Server-side encryption being enabled for the first time.\n"
    "SAVE YOUR ENCRYPTION KEY NOW:\n"
    f"  {ENV_KEY}={{prefix}}...\n"
    "Store this in your password manager. Losing this key = losing your files."
)
PASSTHROUGH = (
    "WARNING: No encryption key provided and no encrypted files in {source}: "
    "mounting it as a plain pass-through (encryption_method none). "
    "Files are stored unencrypted until a key is configured."
)
ADOPTED = (
    "Key verified against the encrypted files already in {source}; key check recorded in {path}."
)
UNREADABLE_CHECK = (
    "FATAL: The key check recorded in {path} cannot be read ({why}).\n"
    "Restore it from a backup of SOURCE, or move it aside so that the key is "
    "checked against the encrypted files again."
)


class Mode(enum.Enum):
    ENCRYPTED = "encrypted"
    PASSTHROUGH = "passthrough"


class SafetyError(Exception):
    """A start refused to protect data.  `message` is the exact text to print."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass(frozen=True)
class Preflight:
    """SOURCE may be mounted, this way; `notice` is a text the operator must see."""

    mode: Mode
    notice: str | None = None


@dataclass(frozen=True)
class KeyCheck:
    key_id: str
    envelope: bytes

    @classmethod
    def make(cls, key: Key) -> KeyCheck:
        return cls(key.key_id, fmt.seal(key.material, CHECK_PLAINTEXT))

    def matches(self, keyring: Keyring) -> bool:
        return opening_key(keyring, self.key_id, self._opens) is not None

    def _opens(self, material: bytes) -> None:
        if fmt.open_envelope(material, self.envelope) != CHECK_PLAINTEXT:
            raise fmt.DecryptionFailed("not a key check")

    def to_bytes(self) -> bytes:
        record = {
            "format": CHECK_FORMAT,
            "version": CHECK_VERSION,
            "key_id": self.key_id,
            "check": base64.urlsafe_b64encode(self.envelope).decode("ascii"),
        }
        return (json.dumps(record, indent=2) + "\n").encode("ascii")

    @classmethod
    def from_bytes(cls, data: bytes) -> KeyCheck:
        """Parse a record; ValueError says what is wrong with it."""
        try:
            record = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ValueError("not a stormfs key check record") from None
        if not isinstance(record, dict) or record.get("format") != CHECK_FORMAT:
            raise ValueError("not a stormfs key check record")
        if record.get("version") != CHECK_VERSION:
            raise ValueError(f"unknown key check version {record.get('version')!r}")
        key_id, check = record.get("key_id"), record.get("check")
        if not isinstance(key_id, str) or not isinstance(check, str):
            raise ValueError("incomplete key check record")
        try:
            envelope = base64.urlsafe_b64decode(check)
        except (binascii.Error, ValueError):
            raise ValueError("the check value is not base64url") from None
        return cls(key_id, envelope)


def check_path(source: str) -> str:
    return os.path.join(source, os.fsdecode(STATE_DIR), CHECK_NAME)


def read_check(source: str) -> KeyCheck | None:
    """The recorded check, or None if SOURCE has none.  Raises SafetyError if
    there is one that cannot be read: an unreadable record must not be taken
    for a missing one."""
    path = check_path(source)
    try:
        with open(path, "rb") as f:
            data = f.read(1 << 16)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise SafetyError(UNREADABLE_CHECK.format(path=path, why=e.strerror)) from None
    try:
        return KeyCheck.from_bytes(data)
    except ValueError as e:
        raise SafetyError(UNREADABLE_CHECK.format(path=path, why=e)) from None


def preflight(source: str, keyring: Keyring | None) -> Preflight:
    """Decide whether SOURCE may be mounted with `keyring` (None: no key), and how.

    Records the key check the first time a key is used on SOURCE.  Raises
    SafetyError for every start that DESIGN §4 refuses, and OSError when SOURCE
    cannot be examined or the check cannot be recorded.
    """
    if not os.path.isdir(source):
        raise NotADirectoryError(f"{source} is not a directory")
    if keyring is None:
        if os.path.lexists(check_path(source)) or find_envelopes(source, limit=1):
            raise SafetyError(NO_KEY)
        return Preflight(Mode.PASSTHROUGH, PASSTHROUGH.format(source=source))

    recorded = read_check(source)
    if recorded is not None:
        return _compare(recorded, keyring)
    envelopes = find_envelopes(source, limit=SAMPLE_POOL)
    if envelopes and not any(_authenticates(path, keyring) for path in envelopes[:SAMPLE_SIZE]):
        raise SafetyError(MISMATCH)
    with _locked_state_dir(source) as dir_fd:
        # Another start may have recorded a check since we looked.
        recorded = read_check(source)
        if recorded is not None:
            return _compare(recorded, keyring)
        write_atomically(dir_fd, CHECK_NAME, KeyCheck.make(keyring.current).to_bytes())
    if envelopes:
        return Preflight(Mode.ENCRYPTED, ADOPTED.format(source=source, path=check_path(source)))
    return Preflight(Mode.ENCRYPTED, FIRST_TIME.format(prefix=key_prefix(keyring.current)))


def key_prefix(key: Key) -> str:
    """The first characters of the key's base64url text, as the NOTICE shows them.

    They encode the first 12 bytes, so they are the same whichever padding the
    operator's copy of the key has.
    """
    return base64.urlsafe_b64encode(key.material).decode("ascii")[:NOTICE_PREFIX_CHARS]


def find_envelopes(source: str, *, limit: int, max_entries: int = WALK_LIMIT) -> list[str]:
    """Paths of up to `limit` files in SOURCE that look like envelopes (v1: first
    byte 0x01, at least 29 bytes; v2: its signature), smallest first.

    A breadth-first walk (`scan.walk`) of at most `max_entries` entries;
    unreadable places are passed over.
    """
    root = os.fsencode(source)
    found: list[tuple[int, str]] = []
    with contextlib.suppress(OSError):  # SOURCE itself cannot be listed: nothing found
        for entry in walk(root, breadth_first=True, max_entries=max_entries):
            if len(found) >= limit:
                break
            if entry.st is None:
                continue
            path = os.path.join(root, entry.rel)
            try:
                kind = kind_of(path, entry.st)[1]
            except OSError:
                continue
            if kind is fmt.Kind.ENCRYPTED:
                found.append((entry.st.st_size, os.fsdecode(path)))
    return [path for _, path in sorted(found)]


def _compare(recorded: KeyCheck, keyring: Keyring) -> Preflight:
    if not recorded.matches(keyring):
        raise SafetyError(MISMATCH)
    return Preflight(Mode.ENCRYPTED)


def _authenticates(path: str, keyring: Keyring) -> bool:
    """Whether the envelope at `path` verifies under a key of the keyring."""
    return classify_path(os.fsencode(path), keyring, quick=False).status is Status.ENCRYPTED


@contextlib.contextmanager
def _locked_state_dir(source: str) -> Iterator[int]:
    """SOURCE/.stormfs (created mode 0700 if missing), opened and exclusively
    locked, so that two starts cannot record different checks."""
    fd = open_dir(state_dir(os.fsencode(source)), nofollow=True)
    try:
        if stat.S_IMODE(os.fstat(fd).st_mode) != 0o700:
            os.fchmod(fd, 0o700)
        lock(fd, wait=True)
        yield fd
    finally:
        os.close(fd)
