"""`stormfs audit`: where a storage directory stands, changing nothing.

The engine: every regular file lands in exactly one class (`scan.Status`),
and each encrypted one is counted by format (v1, v2); the result is the
report that ``--json`` prints.  Files are also counted by encryption method
(``none``, ``server``, ``server-user``): a file under ``SOURCE/ACCOUNT/`` may
be under its account's user key.
"""

from __future__ import annotations

import os
from collections import Counter
from typing import Any

from .keys import MASTER_METHOD, USER_METHOD, Keyring, account_of
from .scan import Entry, Status, Verdict, bounded_map, classify_path, describe, display, walk

# Verification is I/O bound; a few threads keep a disk (or a RAID) busy.
WORKERS = 4


def audit(root: bytes, keyring: Keyring | None, *, quick: bool) -> dict[str, Any]:
    """Classify every file under `root` (`keyring` may be None only when `quick`)."""

    def check(entry: Entry) -> Verdict:
        if entry.error is not None:
            return Verdict(Status.UNREADABLE, describe(entry.error))
        path = os.path.join(root, entry.rel)
        return classify_path(path, keyring, quick=quick, account=account_of(entry.rel))

    counts: Counter[Status] = Counter()
    by_key: Counter[str] = Counter()
    methods: Counter[str] = Counter({m: 0 for m in ("none", MASTER_METHOD, USER_METHOD)})
    formats: Counter[str] = Counter({"v1": 0, "v2": 0})
    files: list[dict[str, str]] = []
    for entry, verdict in bounded_map(check, walk(root), workers=WORKERS):
        counts[verdict.status] += 1
        if verdict.key is not None:
            by_key[verdict.key.key_id] += 1
        if verdict.method is not None:
            methods[verdict.method] += 1
        if verdict.status is Status.ENCRYPTED and verdict.version is not None:
            formats[f"v{verdict.version}"] += 1
        if verdict.status is not Status.ENCRYPTED:
            files.append(
                {
                    "path": display(entry.rel),
                    "status": verdict.status.value,
                    "detail": verdict.detail,
                }
            )
    return {
        "source": os.fsdecode(root),
        "quick": quick,
        "key_id": keyring.current.key_id if keyring else None,
        "scanned": sum(counts.values()),
        "encrypted": counts[Status.ENCRYPTED],
        "needs_encryption": counts[Status.NEEDS_ENCRYPTION],
        "issues": counts[Status.DECRYPTION_FAILED] + counts[Status.UNREADABLE],
        "decryption_failed": counts[Status.DECRYPTION_FAILED],
        "unreadable": counts[Status.UNREADABLE],
        "key_ids": dict(sorted(by_key.items())),
        "methods": dict(methods),
        "formats": dict(sorted(formats.items())),
        "files": files,
    }
