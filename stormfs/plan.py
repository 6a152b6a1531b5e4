"""What `stormfs encrypt` or `stormfs rotate` has to do: the files of SOURCE to seal, by inode.

One walk (`scan.walk`).  For `encrypt` each file is classified by its header
(`scan.kind_of`): envelopes are already done.  For `rotate` (a keyring given)
each envelope is also told which key opens it: those under the key they
belong under are done, the others are to be sealed again, those no key
opens are problems, and legacy files are sealed only when asked.  A file
belongs under the current key, or on a per-user SOURCE, for a file under
``SOURCE/ACCOUNT/``, under the current key's user key of ACCOUNT.  Unreadable
files and hard links leading outside SOURCE are problems to report, and
sealed copies a killed run left behind (``.stormfs-tmp-enc-*``) are stale.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import partial

from . import format as fmt
from .keys import USER_METHOD, Key, Keyring, account_of
from .scan import Entry, Status, Verdict, bounded_map, classify_path, describe, layout_of, walk
from .source import LOCAL_TMP_PREFIX, recorded_key_id, recorded_method
from .swap import ino

# The name of a sealed copy beside its original, until it is swapped in.
TMP_PREFIX = LOCAL_TMP_PREFIX + b"enc-"


@dataclass
class Job:
    """One inode to seal and every name it has in SOURCE (relative paths).

    `key` opens it, for an envelope; None for legacy plaintext.  `version` is
    its format (0 legacy, 1, 2); `target` the format to seal it in, None to keep
    an envelope's (a legacy file becomes v1).  `seal` is the key to seal it with
    (None: the run's key).
    """

    names: list[bytes]
    size: int
    key: Key | None = None
    version: int = 0
    target: int | None = None
    seal: Key | None = None

    @property
    def sealed_as(self) -> int:
        """The format the new version is written in."""
        return self.target if self.target is not None else max(self.version, 1)


@dataclass
class Plan:
    """What the scan found."""

    scanned: int = 0
    already: int = 0
    jobs: list[Job] = field(default_factory=list)
    problems: list[tuple[bytes, str, str]] = field(default_factory=list)
    stale: list[bytes] = field(default_factory=list)
    sparse: set[bytes] = field(default_factory=set)
    legacy_left: int = 0  # legacy files a rotation leaves as they are


def plan(
    root: bytes,
    workers: int,
    keyring: Keyring | None = None,
    *,
    include_legacy: bool = True,
    hints: bool = False,
    convert_to: int | None = None,
    per_user: bool = False,
) -> Plan:
    """Walk SOURCE: files to seal (grouped by inode), files already done, problems.

    Without `keyring`, legacy files are to be sealed (`encrypt`).  With it,
    envelopes not under its current key are too, and legacy files only with
    `include_legacy` (`rotate`); with `per_user`, the key a file of an account
    belongs under is its user key.  With `convert_to` (`encrypt --format`, with
    the keyring to open envelopes), legacy files and envelopes of the other
    format are to be sealed in format `convert_to`; envelopes already in it
    are done, whatever their key.  Files are classified by `workers` threads:
    on a cold cache each is a disk seek, and for a rotation or a conversion a
    read in full, except, with `hints`, an envelope whose recorded key id names
    a key of the keyring (an older one, for a rotation).
    """
    p = Plan()
    links: dict[tuple[int, int], Job] = {}
    link_st: dict[tuple[int, int], os.stat_result] = {}

    def hidden(rel: bytes, entry: os.DirEntry) -> None:
        if entry.name.startswith(TMP_PREFIX) and entry.is_file(follow_symlinks=False):
            p.stale.append(rel)

    classify = partial(_verdict, root, keyring, hints, convert_to, per_user)
    for entry, found in bounded_map(classify, walk(root, on_hidden=hidden), workers=workers):
        if found is None:
            continue  # removed since it was listed
        verdict, version = found
        p.scanned += 1
        if verdict.status in (Status.UNREADABLE, Status.DECRYPTION_FAILED):
            p.problems.append((entry.rel, verdict.status.value, verdict.detail))
            continue
        key = verdict.key
        seal = _belongs(keyring, per_user, entry.rel)
        done = key is None if convert_to is not None else key is None or key == seal
        if verdict.status is Status.ENCRYPTED and done:
            p.already += 1
            continue
        if verdict.status is Status.NEEDS_ENCRYPTION and not include_legacy:
            p.legacy_left += 1
            continue
        assert entry.st is not None
        if entry.st.st_blocks * 512 < entry.st.st_size:
            p.sparse.add(entry.rel)
        group = links.get(ino(entry.st)) if entry.st.st_nlink > 1 else None
        if group is not None:
            group.names.append(entry.rel)
            continue
        job = Job([entry.rel], entry.st.st_size, key, version, convert_to, seal)
        if entry.st.st_nlink > 1:
            links[ino(entry.st)] = job
            link_st[ino(entry.st)] = entry.st
        else:
            p.jobs.append(job)
    for inode, group in links.items():
        names = group.names
        nlink = link_st[inode].st_nlink
        if len(names) == nlink:
            p.jobs.append(group)
        else:
            for n in names:
                p.problems.append(
                    (
                        n,
                        "hard_links",
                        f"has {nlink} hard links, only {len(names)} of them in SOURCE; "
                        "left as is (replacing it would split the links)",
                    )
                )
    return p


def _belongs(keyring: Keyring | None, per_user: bool, rel: bytes) -> Key | None:
    """The key the file `rel` belongs under (None: the run's key, for `encrypt`)."""
    if keyring is None:
        return None
    return keyring.sealing(account_of(rel)) if per_user else keyring.current


def _verdict(
    root: bytes,
    keyring: Keyring | None,
    hints: bool,
    convert_to: int | None,
    per_user: bool,
    entry: Entry,
) -> tuple[Verdict, int] | None:
    """The file's class and format (None if it is gone), and, where it is to be sealed
    again, the key that opens it.

    Without a keyring, by its header alone.  With one and `hints`, an envelope
    whose recorded key id and method name a key of the keyring or its user key
    (for a rotation, another than the one it belongs under) is taken to be under
    that key unread: sealing it again reads it in
    full and authenticates it under that key (and finds the right one if it
    was not).  Any other envelope to be sealed again is authenticated here.
    """
    if entry.error is not None:
        return Verdict(Status.UNREADABLE, describe(entry.error)), 0
    assert entry.st is not None
    path = os.path.join(root, entry.rel)
    try:
        layout = layout_of(path, entry.st)[1]
    except FileNotFoundError:
        return None
    except OSError as e:
        return Verdict(Status.UNREADABLE, describe(e)), 0
    if layout is None:
        return None  # no longer a regular file
    version = layout.version
    if layout.kind is fmt.Kind.PLAINTEXT:
        detail = f"legacy plaintext ({entry.st.st_size} bytes)"
        return Verdict(Status.NEEDS_ENCRYPTION, detail), version
    if keyring is None or version == convert_to:
        return Verdict(Status.ENCRYPTED, "envelope header"), version
    account = account_of(entry.rel)
    recorded = recorded_key_id(path) if hints else None
    hinted = keyring.get(recorded) if recorded is not None else None
    if hinted is not None and account is not None and recorded_method(path) == USER_METHOD:
        hinted = keyring.user(hinted, account)
    if hinted is not None and (
        convert_to is not None or hinted != _belongs(keyring, per_user, entry.rel)
    ):
        return Verdict(Status.ENCRYPTED, f"recorded under key id {hinted.key_id}", hinted), version
    verdict = classify_path(path, keyring, quick=False, account=account, per_user=per_user)
    return verdict, version
