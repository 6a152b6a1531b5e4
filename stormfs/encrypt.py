"""`stormfs encrypt` and `stormfs rotate`: seal files of SOURCE into v1 envelopes, in place.

`encrypt` turns every legacy plaintext file into an envelope under the key;
`rotate` (given the keyring) seals every envelope under an older key again
under the current key, and legacy files too if asked.  One engine: it plans
(`plan`), finishes what a killed run left (`journal`), runs the pipeline
(`pipeline`) with retries, and returns the report that ``--json`` prints.
It prints nothing; progress goes through `Progress`.

A file that changed, or was open for writing, is tried again after the
others, then reported and left as it is.  Crash safety: a run killed at any
point leaves each name holding either the original or the complete envelope,
plus possibly ``.stormfs-tmp-enc-*`` files, which the next run removes (one
run per SOURCE at a time, under a lock, so any such file found at start is
stale).
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any, Protocol

from . import swap
from .journal import STATE_SUBDIR, recover_journals
from .keys import Key, Keyring
from .pipeline import BATCH_FILES, FDS_PER_FILE, Done, Migrator, Outcome, named
from .plan import Job, Plan, plan
from .scan import display
from .sealing import Workers
from .source import lock, open_dir, open_lock, state_dir

# Files sealed at once, each by a process of its own.
DEFAULT_JOBS = os.cpu_count() or 1
ATTEMPTS = 3
RETRY_DELAY = 0.5
RETRYABLE = ("changed", "busy", "hard_links")


class Busy(Exception):
    """Another `stormfs encrypt` or `stormfs rotate` holds the lock of this SOURCE."""


class CannotSwap(Exception):
    """SOURCE's filesystem cannot exchange names (GlusterFS, some FUSE filesystems):
    sealed copies cannot be swapped in without risking a concurrent commit."""


class Progress(Protocol):
    """What a run reports while it goes (the CLI draws it)."""

    def start(self, files: int, total_bytes: int) -> None: ...

    def advance(self, nbytes: int) -> None:
        """Bytes read; negative when an attempt is dropped."""

    def finished(self, job: Job, outcome: Outcome, *, sparse: bool) -> None:
        """A file's final outcome (after its last attempt)."""

    def close(self) -> None: ...


def dry_run(
    root: bytes,
    key: Key,
    workers: int,
    keyring: Keyring | None = None,
    *,
    include_legacy: bool = True,
    convert_to: int | None = None,
    per_user: bool = False,
) -> dict[str, Any]:
    """What a run would do, changing nothing (a rotation when `keyring` is given
    without `convert_to`)."""
    p = plan(
        root,
        workers,
        keyring,
        include_legacy=include_legacy,
        convert_to=convert_to,
        per_user=per_user,
    )
    return _report(root, key, p, [], 0.0, stale=len(p.stale), dry_run=True)


def encrypt(
    root: bytes,
    key: Key,
    workers: int,
    progress: Progress,
    keyring: Keyring | None = None,
    *,
    include_legacy: bool = True,
    convert_to: int | None = None,
    per_user: bool = False,
) -> dict[str, Any]:
    """Encrypt every legacy file, or with `keyring` (whose current key is `key`) rotate
    every envelope not under the key it belongs under, and legacy files if
    `include_legacy`.  A file belongs under `key`, or with `per_user`, for a file
    under ``SOURCE/ACCOUNT/``, under its user key of ACCOUNT.

    With `convert_to` (1 or 2; `keyring` opens the envelopes) it is no rotation:
    every legacy file and every envelope of the other format is sealed in that
    format under `key`.

    Raises Busy if another run holds SOURCE.
    """
    with _exclusive(root) as state_fd:
        if state_fd is None:
            raise Busy(os.fsdecode(root))
        why = swap.cannot_exchange(state_fd)
        if why is not None:
            raise CannotSwap(why.strerror)
        return _encrypt_all(
            root, key, workers, progress, state_fd, keyring, include_legacy, convert_to, per_user
        )


@contextlib.contextmanager
def _exclusive(root: bytes) -> Iterator[int | None]:
    """The run's state directory, locked against a second run on the same SOURCE."""
    state_fd = open_dir(state_dir(root, STATE_SUBDIR))
    lock_fd = open_lock(b"lock", dir_fd=state_fd)
    try:
        try:
            lock(lock_fd, wait=False)
        except BlockingIOError:
            yield None
            return
        yield state_fd
    finally:
        os.close(lock_fd)
        os.close(state_fd)


def _encrypt_all(
    root: bytes,
    key: Key,
    workers: int,
    progress: Progress,
    state_fd: int,
    keyring: Keyring | None,
    include_legacy: bool,
    convert_to: int | None,
    per_user: bool,
) -> dict[str, Any]:
    # A lease break is announced with SIGIO, whose default action kills the
    # process; the break itself is seen by polling F_GETLEASE.
    signal.signal(signal.SIGIO, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = FDS_PER_FILE * BATCH_FILES * 3
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))
    # The sealing processes start while SOURCE is walked, and serve every attempt.
    with contextlib.closing(Workers(workers)) as sealers:
        started = time.monotonic()
        problems, keep_holds = recover_journals(root, state_fd)
        # The pipeline authenticates what it seals again: recorded key ids save a read.
        p = plan(
            root,
            workers,
            keyring,
            include_legacy=include_legacy,
            hints=True,
            convert_to=convert_to,
            per_user=per_user,
        )
        p.problems[:0] = problems
        removed = 0
        for rel in p.stale:
            if rel in keep_holds:
                continue
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(root, rel))
                removed += 1
        progress.start(len(p.jobs), sum(j.size for j in p.jobs))
        rotate = keyring is not None and convert_to is None
        migrator = Migrator(root, key, progress.advance, state_fd, sealers, keyring, rotate=rotate)
        results: list[tuple[Job, Outcome]] = []
        queue = p.jobs
        for attempt in range(ATTEMPTS):
            retry: list[Job] = []
            for job, outcome in migrator.run(queue, workers):
                retryable = outcome.done is None and outcome.status in RETRYABLE
                if retryable and attempt + 1 < ATTEMPTS:
                    retry.append(job)
                    continue
                results.append((job, outcome))
                progress.finished(job, outcome, sparse=job.names[0] in p.sparse)
            if not retry:
                break
            time.sleep(RETRY_DELAY * (attempt + 1))
            queue = retry
        progress.close()
        seconds = time.monotonic() - started
        return _report(root, key, p, results, seconds, stale=removed, dry_run=False)


def _report(
    root: bytes,
    key: Key,
    p: Plan,
    results: list[tuple[Job, Outcome]],
    seconds: float,
    *,
    stale: int,
    dry_run: bool,
) -> dict[str, Any]:
    """The run's report, as ``--json`` prints it."""
    files: list[dict[str, str]] = []
    count: Counter[str] = Counter()
    nbytes = 0
    sparse_grown = 0
    for rel, status, detail in p.problems:
        files.append({"path": display(rel), "status": status, "detail": detail})
    if dry_run:
        for job in p.jobs:
            for n in job.names:
                if job.key is not None and job.target is not None:
                    detail = f"v{job.version} to v{job.target} ({job.size} bytes)"
                    status = "needs_conversion"
                elif job.key is not None:
                    detail = f"under {named(job.key)} ({job.size} bytes)"
                    status = "needs_rotation"
                else:
                    detail = f"legacy plaintext ({job.size} bytes)"
                    status = "needs_encryption"
                if n in p.sparse:
                    detail += "; sparse: will take its full size on disk"
                files.append({"path": display(n), "status": status, "detail": detail})
    from_keys: Counter[str] = Counter()
    for job in p.jobs:
        if job.key is not None and job.key.key_id != key.key_id:
            from_keys[job.key.key_id] += len(job.names)
    for job, o in results:
        count[o.status] += 1
        nbytes += o.nbytes
        sparse_grown += o.sparse_growth > 0
        if o.done is Done.ALREADY:
            continue
        for n in job.names:
            files.append({"path": display(n), "status": o.status, "detail": o.detail})
    return {
        "source": os.fsdecode(root),
        "dry_run": dry_run,
        "key_id": key.key_id,
        "scanned": p.scanned,
        "already_encrypted": p.already + count["already"],
        "encrypted_now": count["encrypted"],
        "would_encrypt": sum(len(j.names) for j in p.jobs) if dry_run else 0,
        "errors": len(p.problems) + sum(1 for _, o in results if o.done is None),
        "vanished": count["vanished"],
        "bytes_encrypted": nbytes,
        "sparse_grown": sparse_grown,
        "stale_temp_files": stale,
        "legacy_left": p.legacy_left,
        "from_key_ids": dict(sorted(from_keys.items())),
        "seconds": round(seconds, 3),
        "files": sorted(files, key=lambda f: f["path"]),
    }
