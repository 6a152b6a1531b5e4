"""The key check value and the safety checks that run before every mount.

stormfs records in ``SOURCE/.stormfs/keycheck`` a v1 envelope of a fixed
string sealed under the key, with the key id.  Verifying it means decrypting
it, so it tells nothing about the key that AES-GCM itself does not.  Before a
mount appears, `preflight` compares the configured key with that record (or,
when there is none yet, with a sample of the envelopes already in SOURCE) and
refuses, with the exact texts of DESIGN §4, any start that could make files
unreadable.  It returns verdicts; the CLI prints them and picks exit codes.

Several keys: the record also holds a check for each older key still
accepted (by id, each an envelope under its key, never the key).  A start
with a new current key, whose keyring opens every recorded check, moves the
record to the new key and keeps the others accepted until `retire`.  A start
whose keyring lacks a recorded key is refused, naming its id.
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
from .keys import ENV_KEY, Key, Keyring, account_of
from .scan import Status, classify_path, kind_of, opening_key, walk
from .source import STATE_DIR, lock, open_dir, state_dir, write_atomically

CHECK_NAME = "keycheck"
CHECK_FORMAT = "stormfs-keycheck"
CHECK_VERSION = 1
# The version of a record that also accepts older keys: a stormfs that knows
# only one key refuses it rather than mount without them.
CHECK_VERSION_SEVERAL = 2
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
NEW_KEY = (
    "NOTICE: A new encryption key (key id {key_id}) seals new versions from now on; "
    "{old} still open{s} the files sealed before.\n"
    "SAVE YOUR ENCRYPTION KEY NOW:\n"
    f"  {ENV_KEY}={{prefix}}...\n"
    "Store this in your password manager. Losing this key = losing your files."
)
MISSING = (
    "FATAL: {ids} {are} still needed by files in {source}, but not in the keyring.\n"
    "Add {them} to the keyring file (--keyring, -o keyring=, or the credential "
    "stormfs.keyring); `stormfs keys SOURCE --retire ID` forgets a key once no file needs it."
)
ID_TAKEN = (
    "FATAL: Key id {key_id} is recorded in {path} for another key.\n"
    "Give the new key an id of its own (STORMCLOUD_ENCRYPTION_KEY_ID)."
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
    """The check of the current key, and (`accepted`) those of older keys still accepted."""

    key_id: str
    envelope: bytes
    accepted: tuple[KeyCheck, ...] = ()

    @classmethod
    def make(cls, key: Key, accepted: tuple[KeyCheck, ...] = ()) -> KeyCheck:
        return cls(key.key_id, fmt.seal(key.material, CHECK_PLAINTEXT), accepted)

    def every(self) -> tuple[KeyCheck, ...]:
        """The current key's check and every accepted one, each on its own."""
        return (KeyCheck(self.key_id, self.envelope), *self.accepted)

    def ids(self) -> list[str]:
        return [c.key_id for c in self.every()]

    def opener(self, keyring: Keyring) -> Key | None:
        """The key of `keyring` that opens this one check."""
        return opening_key(keyring, self.key_id, self._opens)

    def _opens(self, material: bytes) -> None:
        if fmt.open_envelope(material, self.envelope) != CHECK_PLAINTEXT:
            raise fmt.DecryptionFailed("not a key check")

    def to_bytes(self) -> bytes:
        record: dict[str, object] = {
            "format": CHECK_FORMAT,
            "version": CHECK_VERSION_SEVERAL if self.accepted else CHECK_VERSION,
            "key_id": self.key_id,
            "check": _b64(self.envelope),
        }
        if self.accepted:
            record["accepted"] = [
                {"key_id": c.key_id, "check": _b64(c.envelope)} for c in self.accepted
            ]
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
        version = record.get("version")
        if version not in (CHECK_VERSION, CHECK_VERSION_SEVERAL):
            raise ValueError(f"unknown key check version {version!r}")
        accepted = record.get("accepted", []) if version == CHECK_VERSION_SEVERAL else []
        if not isinstance(accepted, list) or not all(isinstance(a, dict) for a in accepted):
            raise ValueError("incomplete key check record")
        main = cls._one(record)
        return cls(main.key_id, main.envelope, tuple(cls._one(a) for a in accepted))

    @classmethod
    def _one(cls, record: dict) -> KeyCheck:
        key_id, check = record.get("key_id"), record.get("check")
        if not isinstance(key_id, str) or not isinstance(check, str):
            raise ValueError("incomplete key check record")
        try:
            envelope = base64.urlsafe_b64decode(check)
        except (binascii.Error, ValueError):
            raise ValueError("the check value is not base64url") from None
        return cls(key_id, envelope)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii")


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
    if recorded is not None and _current_is_recorded(recorded, keyring, source):
        return Preflight(Mode.ENCRYPTED)
    envelopes = [] if recorded else _sample(source, keyring)
    with _locked_state_dir(source) as dir_fd:
        # Another start may have recorded (or moved) the check since we looked.
        now = read_check(source)
        if now is not None and _current_is_recorded(now, keyring, source):
            return Preflight(Mode.ENCRYPTED)
        if now is not None:
            return _move_to_new_key(now, keyring, source, dir_fd)
        if recorded is not None:
            envelopes = _sample(source, keyring)
        # Files may be under any key of the keyring: each is accepted until retired.
        older = tuple(KeyCheck.make(k) for k in keyring.others())
        write_atomically(dir_fd, CHECK_NAME, KeyCheck.make(keyring.current, older).to_bytes())
    if envelopes:
        return Preflight(Mode.ENCRYPTED, ADOPTED.format(source=source, path=check_path(source)))
    return Preflight(Mode.ENCRYPTED, FIRST_TIME.format(prefix=key_prefix(keyring.current)))


def _sample(source: str, keyring: Keyring) -> list[str]:
    """The envelopes of SOURCE a first start looks at; SafetyError if there are some
    and none of a sample opens under the keyring."""
    envelopes = find_envelopes(source, limit=SAMPLE_POOL)
    sample = envelopes[:SAMPLE_SIZE]
    if envelopes and not any(_authenticates(source, path, keyring) for path in sample):
        raise SafetyError(MISMATCH)
    return envelopes


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


def _current_is_recorded(recorded: KeyCheck, keyring: Keyring, source: str) -> bool:
    """Whether the current key is one of the recorded keys.  Raises SafetyError when the
    keyring opens no recorded check (a mismatch) or lacks a recorded key."""
    openers = [c.opener(keyring) for c in recorded.every()]
    if not any(openers):
        raise SafetyError(MISMATCH)
    missing = [c.key_id for c, key in zip(recorded.every(), openers, strict=True) if key is None]
    if missing:
        several = len(missing) > 1
        raise SafetyError(
            MISSING.format(
                ids=f"Key id{'s' if several else ''} {', '.join(missing)}",
                are="are" if several else "is",
                them="them" if several else "it",
                source=source,
            )
        )
    current = Keyring(keyring.current)
    return any(c.opener(current) is not None for c in recorded.every())


def _move_to_new_key(recorded: KeyCheck, keyring: Keyring, source: str, dir_fd: int) -> Preflight:
    """A new current key, and the keyring holds every recorded one: record the new key's
    check, keeping the others accepted until they are retired."""
    new = keyring.current
    if new.key_id in recorded.ids():
        raise SafetyError(ID_TAKEN.format(key_id=new.key_id, path=check_path(source)))
    write_atomically(dir_fd, CHECK_NAME, KeyCheck.make(new, recorded.every()).to_bytes())
    old = recorded.ids()
    return Preflight(
        Mode.ENCRYPTED,
        NEW_KEY.format(
            key_id=new.key_id,
            old=f"key id{'s' if len(old) > 1 else ''} {', '.join(old)}",
            s="" if len(old) > 1 else "s",
            prefix=key_prefix(new),
        ),
    )


class NotRetirable(Exception):
    """`retire` was asked for a key id the record does not accept as an older key."""


def retire(source: str, key_id: str) -> KeyCheck:
    """Stop accepting the older key `key_id`: the record without it (written durably).

    Only the caller knows that no file needs it (`keyuse`).  Raises
    NotRetirable, SafetyError (no readable record) and OSError.
    """
    with _locked_state_dir(source) as dir_fd:
        recorded = read_check(source)
        if recorded is None:
            raise NotRetirable(f"{check_path(source)} records no key")
        if key_id == recorded.key_id:
            raise NotRetirable(f"key id {key_id} is the current key of {source}")
        kept = tuple(c for c in recorded.accepted if c.key_id != key_id)
        if len(kept) == len(recorded.accepted):
            raise NotRetirable(f"key id {key_id} is not recorded in {check_path(source)}")
        now = KeyCheck(recorded.key_id, recorded.envelope, kept)
        write_atomically(dir_fd, CHECK_NAME, now.to_bytes())
    return now


def _authenticates(source: str, path: str, keyring: Keyring) -> bool:
    """Whether the envelope at `path` in `source` verifies under a key of the keyring
    (or, under an account, its user key)."""
    account = account_of(os.fsencode(os.path.relpath(path, source)))
    verdict = classify_path(os.fsencode(path), keyring, quick=False, account=account)
    return verdict.status is Status.ENCRYPTED


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
