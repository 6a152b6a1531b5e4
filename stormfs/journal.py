"""The journal of a hard-link group being encrypted, and its recovery after a crash.

A file with several hard links is encrypted once: its envelope is linked
beside every name and the names are swapped in turn.  Before the first swap
a record in ``SOURCE/.stormfs/encrypt/`` names the original and the envelope
(dev, ino, size, mtime) and every (name, temporary name) pair, so that a run
killed in the middle of a group is rolled back, or forward, by the next one.
"""

from __future__ import annotations

import contextlib
import json
import os

from .source import STATE_DIR, open_dir, write_atomically
from .swap import exchange, ino, lstat_at

# The run's own directory under SOURCE/.stormfs: its lock and the journals.
STATE_SUBDIR = b"encrypt"
JOURNAL_PREFIX = "links-"


def write_journal(
    state_fd: int, names: list[bytes], holds: list[bytes], st: os.stat_result, t_st: os.stat_result
) -> str:
    """The record `recover_journals` needs (made durable by the batch's first sync).

    `names` are the group's names relative to SOURCE, `holds[i]` the temporary
    name beside `names[i]`; `st` is the original's stat, `t_st` the envelope's.
    """
    record = {
        "original": [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns],
        "envelope": [t_st.st_dev, t_st.st_ino, t_st.st_size, t_st.st_mtime_ns],
        "pairs": [
            [os.fsdecode(n), os.fsdecode(os.path.join(os.path.dirname(n), h))]
            for n, h in zip(names, holds, strict=True)
        ],
    }
    name = f"{JOURNAL_PREFIX}{holds[0].decode()}.json"
    write_atomically(state_fd, name, json.dumps(record).encode(), durable=False)
    return name


def recover_journals(root: bytes, state_fd: int) -> tuple[list[tuple[bytes, str, str]], set[bytes]]:
    """Finish the hard-link groups a killed run left half-swapped.

    If the envelope is unchanged, every name goes back to the original (the
    group is encrypted again later); if only the original is unchanged, every
    name moves to the envelope; if both changed, someone wrote through both
    sets of names: that is reported and nothing is touched.
    Returns the problems to report, and the temporary names still needed.
    """
    problems = []
    keep_holds: set[bytes] = set()
    for name in sorted(os.listdir(state_fd)):
        if not name.startswith(JOURNAL_PREFIX):
            continue
        try:
            with open(os.open(name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=state_fd), "rb") as f:
                rec = json.load(f)
            pairs = [(os.fsencode(n), os.fsencode(h)) for n, h in rec["pairs"]]
            original, envelope = rec["original"], rec["envelope"]
        except (ValueError, KeyError, TypeError):
            # Unfinished, or lost with a power cut before its batch's first sync:
            # either way no name of its group was swapped yet.
            os.unlink(name, dir_fd=state_fd)
            continue
        o_ino, t_ino = (original[0], original[1]), (envelope[0], envelope[1])
        if _unchanged(root, pairs, envelope):
            keep, drop = o_ino, t_ino
        elif _unchanged(root, pairs, original):
            keep, drop = t_ino, o_ino
        else:
            problems.append(
                (
                    pairs[0][0],
                    "failed",
                    "hard links were written to while half encrypted; both versions kept, "
                    f"see {os.fsdecode(STATE_DIR + b'/' + STATE_SUBDIR)}/{name}",
                )
            )
            keep_holds.update(h for _, h in pairs)
            continue
        for n, h in pairs:
            d = open_dir(os.path.join(root, os.path.dirname(n)))
            try:
                base, hold = os.path.basename(n), os.path.basename(h)
                at_name, at_hold = lstat_at(d, base), lstat_at(d, hold)
                if at_name and at_hold and ino(at_name) == drop and ino(at_hold) == keep:
                    exchange(d, hold, base)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(hold, dir_fd=d)
                os.fsync(d)
            finally:
                os.close(d)
        os.unlink(name, dir_fd=state_fd)
        os.fsync(state_fd)
    return problems, keep_holds


def _unchanged(root: bytes, pairs: list[tuple[bytes, bytes]], ident: list[int]) -> bool:
    """Whether the inode `ident` (dev, ino, size, mtime_ns) still has its recorded content."""
    for n, h in pairs:
        for p in (n, h):
            try:
                st = os.stat(os.path.join(root, p), follow_symlinks=False)
            except FileNotFoundError:
                continue
            if ino(st) == (ident[0], ident[1]):
                return (st.st_size, st.st_mtime_ns) == (ident[2], ident[3])
    return True  # no name holds it any more
