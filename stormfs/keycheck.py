"""Key safety checks run before a mount appears (DESIGN §4)."""

from __future__ import annotations

import enum
from collections.abc import Callable

from .keys import Keyring


class Mode(enum.Enum):
    ENCRYPTED = "encrypted"
    PASSTHROUGH = "passthrough"


class SafetyError(Exception):
    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


def preflight(source: str, keyring: Keyring | None, *, echo: Callable[[str], None]) -> Mode:
    if keyring is None:
        echo("WARNING: no encryption key configured: files are stored as plaintext.")
        return Mode.PASSTHROUGH
    return Mode.ENCRYPTED
