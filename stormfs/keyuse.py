"""`stormfs keys`: which key each file of SOURCE is under, and retiring a key no file needs.

The engine: a full scan (`audit`: every envelope authenticated, so each is
counted under the key that really opens it; a file under a user key, under
the id of the key it is derived from) next to the key check record
(`keycheck`); `retire` takes an older key out of the record only when the
scan finds no file under it.  It returns reports and prints nothing.
"""

from __future__ import annotations

import os
from typing import Any

from .audit import audit
from .keycheck import NotRetirable, read_check
from .keycheck import retire as retire_check
from .keys import Keyring


class StillNeeded(Exception):
    """Files are still under the key asked to be retired."""

    def __init__(self, key_id: str, files: int) -> None:
        super().__init__(f"{files} file(s) under key id {key_id}")
        self.key_id = key_id
        self.files = files


def census(root: bytes, keyring: Keyring) -> dict[str, Any]:
    """Files per key id, legacy and problem files, and the key ids the record accepts.

    Raises keycheck.SafetyError when the record cannot be read.
    """
    scan = audit(root, keyring, quick=False)
    recorded = read_check(os.fsdecode(root))
    return {
        "source": scan["source"],
        "current_key_id": keyring.current.key_id,
        "scanned": scan["scanned"],
        "key_ids": scan["key_ids"],
        "methods": scan["methods"],
        "legacy": scan["needs_encryption"],
        "decryption_failed": scan["decryption_failed"],
        "unreadable": scan["unreadable"],
        "recorded": recorded.ids() if recorded is not None else [],
        "retired": None,
        "files": [f for f in scan["files"] if f["status"] != "needs_encryption"],
    }


def retire(root: bytes, keyring: Keyring, key_id: str) -> dict[str, Any]:
    """Stop accepting the older key `key_id`, once a scan finds no file under it.

    The keyring must hold that key: a file under it would otherwise look
    like one that no key opens.  Raises NotRetirable, StillNeeded, and
    keycheck.SafetyError when the record cannot be read.
    """
    source = os.fsdecode(root)
    recorded = read_check(source)
    if recorded is None:
        raise NotRetirable(f"{source} has no recorded key check")
    check = next((c for c in recorded.accepted if c.key_id == key_id), None)
    if check is None:
        if key_id == recorded.key_id:
            raise NotRetirable(f"key id {key_id} is the current key of {source}")
        raise NotRetirable(f"key id {key_id} is not an older key recorded for {source}")
    key = check.opener(keyring)
    if key is None:
        raise NotRetirable(
            f"key id {key_id} is not in the keyring: give it (--keyring), so that the "
            "files still under it can be counted"
        )
    report = census(root, keyring)
    # The record names the key by its own id; the keyring may know it by another.
    files = report["key_ids"].get(key.key_id, 0)
    if files:
        raise StillNeeded(key_id, files)
    report["recorded"] = retire_check(source, key_id).ids()
    report["retired"] = key_id
    return report
