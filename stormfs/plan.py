"""What `stormfs encrypt` has to do: the legacy files of SOURCE, grouped by inode.

One walk (`scan.walk`), each file classified by its header (`scan.kind_of`):
envelopes are already done, unreadable files and hard links leading outside
SOURCE are problems to report, and sealed copies a killed run left behind
(``.stormfs-tmp-enc-*``) are stale.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import partial

from . import format as fmt
from .scan import Entry, bounded_map, describe, kind_of, walk
from .source import LOCAL_TMP_PREFIX
from .swap import ino

# The name of a sealed copy beside its original, until it is swapped in.
TMP_PREFIX = LOCAL_TMP_PREFIX + b"enc-"


@dataclass
class Job:
    """One inode to encrypt and every name it has in SOURCE (relative paths)."""

    names: list[bytes]
    size: int


@dataclass
class Plan:
    """What the scan found."""

    scanned: int = 0
    already: int = 0
    jobs: list[Job] = field(default_factory=list)
    problems: list[tuple[bytes, str, str]] = field(default_factory=list)
    stale: list[bytes] = field(default_factory=list)
    sparse: set[bytes] = field(default_factory=set)


def plan(root: bytes, workers: int) -> Plan:
    """Walk SOURCE: legacy files to encrypt (grouped by inode), envelopes, problems.

    Headers are read by `workers` threads: on a cold cache each is a disk seek.
    """
    p = Plan()
    links: dict[tuple[int, int], list[bytes]] = {}
    link_st: dict[tuple[int, int], os.stat_result] = {}

    def hidden(rel: bytes, entry: os.DirEntry) -> None:
        if entry.name.startswith(TMP_PREFIX) and entry.is_file(follow_symlinks=False):
            p.stale.append(rel)

    for entry, kind in bounded_map(
        partial(_kind, root), walk(root, on_hidden=hidden), workers=workers
    ):
        if kind is None:
            continue  # removed since it was listed
        p.scanned += 1
        if isinstance(kind, str):
            p.problems.append((entry.rel, "unreadable", kind))
            continue
        if kind is fmt.Kind.ENCRYPTED:
            p.already += 1
            continue
        assert entry.st is not None
        if entry.st.st_blocks * 512 < entry.st.st_size:
            p.sparse.add(entry.rel)
        if entry.st.st_nlink > 1:
            links.setdefault(ino(entry.st), []).append(entry.rel)
            link_st[ino(entry.st)] = entry.st
        else:
            p.jobs.append(Job([entry.rel], entry.st.st_size))
    for inode, names in links.items():
        nlink = link_st[inode].st_nlink
        if len(names) == nlink:
            p.jobs.append(Job(names, link_st[inode].st_size))
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


def _kind(root: bytes, entry: Entry) -> fmt.Kind | str | None:
    """The file's class by its header, why it cannot be read, or None if it is gone."""
    if entry.error is not None:
        return describe(entry.error)
    assert entry.st is not None
    try:
        return kind_of(os.path.join(root, entry.rel), entry.st)[1]
    except FileNotFoundError:
        return None
    except OSError as e:
        return describe(e)
