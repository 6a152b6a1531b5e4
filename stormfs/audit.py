"""`stormfs audit SOURCE`: where a storage directory stands, changing nothing.

Every regular file lands in exactly one class (see `scan.Status`).  Exit codes:
OK when everything is encrypted and authentic, WORK_TO_DO when only legacy
plaintext files remain, ISSUES_FOUND when any file is decryption_failed or
unreadable, USAGE for bad arguments or a bad key.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from typing import Any

from . import keys
from .exitcodes import ISSUES_FOUND, OK, USAGE, WORK_TO_DO
from .scan import Entry, Status, Verdict, bounded_map, classify_path, describe, display, walk

# Verification is I/O bound; a few threads keep a disk (or a RAID) busy.
WORKERS = 4


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "audit",
        help="count files already encrypted, needing encryption, with issues (changes nothing)",
        description="Walk SOURCE and put every regular file in one class: encrypted (its "
        "envelope authenticates under the key), needs_encryption (legacy plaintext), "
        "decryption_failed (looks like an envelope but does not authenticate), unreadable "
        "(permission or I/O error, or removed during the scan). Changes nothing. The key "
        f"comes from --key-file or ${keys.ENV_KEY}, as for the mount.",
        epilog=f"Exit status: {OK} everything encrypted and authentic; {WORK_TO_DO} legacy "
        f"files need encryption; {ISSUES_FOUND} some files have issues; {USAGE} usage or "
        "key error.",
    )
    p.add_argument("source", metavar="SOURCE", help="the storage directory")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument(
        "--quick",
        action="store_true",
        help="classify from file headers only, without verifying tags (no key needed)",
    )
    p.add_argument("--key-file", metavar="PATH", help="file holding the base64url key")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    source = os.path.realpath(args.source)
    if not os.path.isdir(source):
        print(f"stormfs: SOURCE {args.source} is not a directory", file=sys.stderr)
        return USAGE
    try:
        keyring = keys.load_keyring(key_file=args.key_file, environ=os.environ)
    except keys.InvalidKey as e:
        print(f"stormfs: {e}", file=sys.stderr)
        return USAGE
    if keyring is None and not args.quick:
        print(
            f"stormfs: no encryption key: set ${keys.ENV_KEY} or use --key-file "
            "(or --quick to classify from headers alone)",
            file=sys.stderr,
        )
        return USAGE
    root = os.fsencode(source)

    def check(entry: Entry) -> Verdict:
        if entry.error is not None:
            return Verdict(Status.UNREADABLE, describe(entry.error))
        return classify_path(os.path.join(root, entry.rel), keyring, quick=args.quick)

    counts: Counter[Status] = Counter()
    files: list[dict[str, str]] = []
    for entry, verdict in bounded_map(check, walk(root), workers=WORKERS):
        counts[verdict.status] += 1
        if verdict.status is not Status.ENCRYPTED:
            files.append(
                {
                    "path": display(entry.rel),
                    "status": verdict.status.value,
                    "detail": verdict.detail,
                }
            )
    issues = counts[Status.DECRYPTION_FAILED] + counts[Status.UNREADABLE]
    report: dict[str, Any] = {
        "source": source,
        "quick": args.quick,
        "key_id": keyring.current.key_id if keyring else None,
        "scanned": sum(counts.values()),
        "encrypted": counts[Status.ENCRYPTED],
        "needs_encryption": counts[Status.NEEDS_ENCRYPTION],
        "issues": issues,
        "decryption_failed": counts[Status.DECRYPTION_FAILED],
        "unreadable": counts[Status.UNREADABLE],
        "files": files,
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_human(report)
    if issues:
        return ISSUES_FOUND
    return WORK_TO_DO if report["needs_encryption"] else OK


def _print_human(r: dict[str, Any]) -> None:
    how = (
        "headers only, tags not verified"
        if r["quick"]
        else f"every envelope verified under key id {r['key_id']}"
    )
    print(f"Encryption audit of {r['source']} ({how})")
    print(f"  Files scanned:            {r['scanned']}")
    print(f"  Files already encrypted:  {r['encrypted']}")
    print(f"  Files needing encryption: {r['needs_encryption']}")
    print(
        f"  Files with issues:        {r['issues']}"
        f" (decryption_failed {r['decryption_failed']}, unreadable {r['unreadable']})"
    )
    if r["files"]:
        print()
        width = max(len(f["status"]) for f in r["files"])
        for f in r["files"]:
            print(f"{f['status']:<{width}}  {f['path']}: {f['detail']}")
    if r["needs_encryption"]:
        print(
            f"\n{r['needs_encryption']} legacy file(s) can be encrypted with: "
            "make encrypt-files (stormfs encrypt SOURCE --force)"
        )
    if r["decryption_failed"]:
        print(
            "\nDECRYPTION_FAILED files: check that STORMCLOUD_ENCRYPTION_KEY is the key they "
            "were encrypted with; otherwise restore them from backup. They are never modified."
        )
    if r["unreadable"]:
        print(
            "\nUnreadable files: fix their permissions or the disk, or, for files removed "
            "during the scan, clean the orphaned records (rebuild_index --mode clean)."
        )
