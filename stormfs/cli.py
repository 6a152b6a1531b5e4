"""The `stormfs` command: every parser, message, progress bar and exit code.

The engines (`keycheck`, `audit`, `encrypt`, `keyuse`) return verdicts and reports;
this module prints them and picks the exit status.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import logging.handlers
import os
import sys
from collections.abc import Callable
from typing import Any

from . import __version__, hygiene, keycheck, keys, notify
from .audit import audit
from .daemon import MountError, MountOptions, check_paths, serve
from .encrypt import DEFAULT_JOBS, Busy, CannotSwap, dry_run, encrypt
from .exitcodes import BUSY, ISSUES_FOUND, KEY_SAFETY, MOUNT_FAILED, OK, USAGE, WORK_TO_DO
from .keyuse import StillNeeded, census, retire
from .pipeline import Done, Outcome
from .plan import Job
from .progress import Progress
from .scan import display
from .stats import STATUS_XATTR
from .units import human_bytes, human_duration

log = logging.getLogger("stormfs")

COMMANDS = ("mount", "check", "keygen", "audit", "encrypt", "rotate", "keys", "status")
LOG_FORMAT = "%(asctime)s stormfs[%(process)d] %(levelname)s %(message)s"


def _err(message: str) -> None:
    print(f"stormfs: {message}", file=sys.stderr)


def _stderr(line: str) -> None:
    print(line, file=sys.stderr)


def preflight_or_refuse(
    source: str, keyring: keys.Keyring | None, *, echo: Callable[[str], None]
) -> keycheck.Mode | int:
    """The key-safety checks for a command: a notice goes to `echo`; a refusal is
    printed to stderr and its exit status returned."""
    try:
        verdict = keycheck.preflight(source, keyring)
    except keycheck.SafetyError as e:
        _stderr(e.message)
        return KEY_SAFETY
    except OSError as e:
        _err(f"cannot check the key against {source}: {e.strerror or e}")
        return USAGE
    if verdict.notice is not None:
        echo(verdict.notice)
    return verdict.mode


def _load_keyring(key_file: str | None, keyring_file: str | None) -> keys.Keyring | int | None:
    """The keyring the options and environment give, or USAGE (said why) if malformed."""
    try:
        return keys.load_keyring(key_file=key_file, keyring_file=keyring_file, environ=os.environ)
    except keys.InvalidKey as e:
        _err(str(e))
        return USAGE


def _setup_logging(log_file: str | None, *, debug: bool, background: bool) -> None:
    root = logging.getLogger()
    root.handlers.clear()
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    handler: logging.Handler
    if log_file:
        handler = logging.FileHandler(log_file)
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
    elif background and os.path.exists("/dev/log"):
        handler = logging.handlers.SysLogHandler("/dev/log")
        handler.setFormatter(logging.Formatter("stormfs[%(process)d]: %(levelname)s %(message)s"))
    elif background:
        handler = logging.NullHandler()
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root.addHandler(handler)


def _mount(args: argparse.Namespace) -> int:
    try:
        opts = MountOptions.parse(args.options or [])
        source, mountpoint = check_paths(args.source, args.mountpoint)
    except MountError as e:
        _err(str(e))
        return USAGE
    # Before the key is read: no core dump may ever hold it (or plaintext).
    hygiene.disable_core_dumps()
    keyring = _load_keyring(args.key_file or opts.key_file, args.keyring or opts.keyring)
    if isinstance(keyring, int):
        return keyring
    hygiene.scrub_key_environment()
    refused = preflight_or_refuse(source, keyring, echo=_stderr)
    if isinstance(refused, int):
        return refused
    if args.foreground:
        _setup_logging(args.log_file, debug=args.debug, background=False)
        try:
            serve(source, mountpoint, keyring, opts, ready=lambda: _notify_ready(mountpoint))
        except MountError as e:
            _err(str(e))
            return MOUNT_FAILED
        return OK
    return _daemonize(args, source, mountpoint, keyring, opts)


def _daemonize(
    args: argparse.Namespace,
    source: str,
    mountpoint: str,
    keyring: keys.Keyring | None,
    opts: MountOptions,
) -> int:
    """Fork a daemon; return once its mount answers (or report why it did not)."""
    sys.stdout.flush()
    sys.stderr.flush()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        os.setsid()
        _setup_logging(args.log_file, debug=args.debug, background=True)
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        os.close(null)

        def ready() -> None:
            os.write(w, b"ok\n")

        code = OK
        try:
            serve(source, mountpoint, keyring, opts, ready=ready)
        except MountError as e:
            os.write(w, f"{e}\n".encode())
            code = MOUNT_FAILED
        except BaseException as e:
            log.exception("daemon failed")
            os.write(w, f"daemon failed: {e}\n".encode())
            code = MOUNT_FAILED
        os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as pipe:
        first = pipe.readline().decode(errors="replace").strip()
    if first == "ok":
        return OK
    os.waitpid(pid, 0)
    _err(first or "the daemon stopped during start-up (see its log)")
    return MOUNT_FAILED


def _notify_ready(mountpoint: str) -> None:
    """Tell systemd (Type=notify) that the mount answers; a no-op elsewhere."""
    try:
        notify.ready(f"mounted {mountpoint}")
    except OSError as e:
        log.warning("could not notify the service manager: %s", e)


def _check(args: argparse.Namespace) -> int:
    """Load the key as the mount would and run the safety checks, nothing more."""
    keyring = _load_keyring(args.key_file, args.keyring)
    if isinstance(keyring, int):
        return keyring
    mode = preflight_or_refuse(args.source, keyring, echo=print)
    if isinstance(mode, int):
        return mode
    if mode is keycheck.Mode.PASSTHROUGH or keyring is None:
        print(f"OK: {args.source} can be mounted as a plain pass-through (no key)")
    else:
        print(f"OK: {args.source} can be mounted encrypted with key id {keyring.current.key_id}")
    return OK


def _keygen(args: argparse.Namespace) -> int:
    print(keys.generate_key())
    return OK


def _status(args: argparse.Namespace) -> int:
    try:
        raw = os.getxattr(args.mountpoint, STATUS_XATTR)
    except OSError as e:
        if e.errno in (errno.ENODATA, errno.ENOTSUP):
            _err(f"{args.mountpoint} is not a stormfs mount")
        else:
            _err(f"{args.mountpoint}: {e.strerror}")
        return USAGE
    status = json.loads(raw)
    if args.json:
        print(json.dumps(status, indent=2))
        return OK
    s = status
    print(f"stormfs mount {s['mountpoint']} of {s['source']}")
    print(f"  daemon:        PID {s['pid']}, up {human_duration(s['uptime_seconds'])}")
    print(f"  options:       {','.join(s['options']) or '(defaults)'}; writes {s['format']}")
    keys_in_use = ", ".join(s["key_ids"]) or "none"
    print(f"  keys:          current id {s['current_key_id'] or '(no key)'}; ids {keys_in_use}")
    print(f"  open files:    {s['open_files']}")
    print(
        f"  unpublished:   {s['unpublished_files']} file(s), {human_bytes(s['unpublished_bytes'])}"
    )
    for f in s["unpublished"]:
        print(f"    {f['path']}  {human_bytes(f['bytes'])}")
    print(f"  publishing:    {s['publishing']} closed file(s) waiting for their batch")
    print(f"  commits:       {s['commits']} done, {s['commits_failed']} failed")
    print(
        f"  transferred:   {human_bytes(s['bytes_read'])} read, "
        f"{human_bytes(s['bytes_written'])} written"
    )
    requests = sorted(s["requests"].items(), key=lambda kv: -kv[1]["count"])
    total = sum(r["count"] for _, r in requests)
    kinds = ", ".join(f"{kind} {r['count']}" for kind, r in requests)
    print(f"  requests:      {total}{': ' + kinds if kinds else ''}")
    print(f"  DECRYPTION_FAILED: {s['decryption_failed']}")
    for path in s["decryption_failed_recent"]:
        print(f"    {path}")
    print(f"  last error:    {s['last_error'] or 'none'}")
    return OK


def _source_dir(arg: str) -> str | None:
    source = os.path.realpath(arg)
    if not os.path.isdir(source):
        _err(f"SOURCE {arg} is not a directory")
        return None
    return source


def _audit(args: argparse.Namespace) -> int:
    source = _source_dir(args.source)
    if source is None:
        return USAGE
    keyring = _load_keyring(args.key_file, args.keyring)
    if isinstance(keyring, int):
        return keyring
    if keyring is None and not args.quick:
        _err(
            f"no encryption key: set ${keys.ENV_KEY} or use --key-file "
            "(or --quick to classify from headers alone)"
        )
        return USAGE
    report = audit(os.fsencode(source), keyring, quick=args.quick)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_audit(report)
    if report["issues"]:
        return ISSUES_FOUND
    return WORK_TO_DO if report["needs_encryption"] else OK


def _methods(counts: dict[str, int]) -> str:
    """Files per encryption method, as `audit` and `keys` print them."""
    return ", ".join(f"{method} {n}" for method, n in counts.items())


def _print_audit(r: dict[str, Any]) -> None:
    several = len(r["key_ids"]) > 1
    if r["quick"]:
        how = "headers only, tags not verified"
    elif several:
        how = f"every envelope verified under the keyring, current key id {r['key_id']}"
    else:
        how = f"every envelope verified under key id {r['key_id']}"
    print(f"Encryption audit of {r['source']} ({how})")
    print(f"  Files scanned:            {r['scanned']}")
    print(f"  Files already encrypted:  {r['encrypted']}")
    if several:
        per_key = ", ".join(f"key id {i}: {n}" for i, n in r["key_ids"].items())
        print(f"    by key:                 {per_key}")
    print(f"    by format:              v1: {r['formats']['v1']}, v2: {r['formats']['v2']}")
    print(f"  Files needing encryption: {r['needs_encryption']}")
    print(f"  By encryption method:     {_methods(r['methods'])}")
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


class _EncryptProgress(Progress):
    """The progress bar of `stormfs encrypt`, with a line for each error and grown sparse file."""

    def finished(self, job: Job, outcome: Outcome, *, sparse: bool) -> None:
        self.file_done()
        if outcome.done is None:
            self.note(f"error: {display(job.names[0])}: {outcome.detail}")
        elif sparse and outcome.done is Done.ENCRYPTED:
            self.note(f"note: {display(job.names[0])}: {outcome.detail}")


def _rewrite_options(p: argparse.ArgumentParser) -> None:
    """The options encrypt and rotate share."""
    p.add_argument("source", metavar="SOURCE", help="the storage directory")
    p.add_argument("--force", action="store_true", help="really rewrite the files")
    p.add_argument("--dry-run", action="store_true", help="only report what would be done")
    p.add_argument("--json", action="store_true", help="print one JSON object at the end")
    p.add_argument("--key-file", metavar="PATH", help="file holding the base64url key")
    _keyring_option(p)
    p.add_argument(
        "--jobs",
        type=int,
        default=DEFAULT_JOBS,
        metavar="N",
        help="files sealed at once, each by a process of its own "
        f"(default: the number of CPUs, here {DEFAULT_JOBS})",
    )


def _rewrite_setup(args: argparse.Namespace, refusal: str) -> tuple[str, keys.Keyring] | int:
    """What encrypt and rotate check before they read SOURCE: SOURCE and the keyring,
    or the exit code of a usage error."""
    if not args.force and not args.dry_run:
        _err(f"{refusal}: add --force to do it, or --dry-run to see what it would do")
        return USAGE
    if args.jobs < 1:
        _err("--jobs must be at least 1")
        return USAGE
    source = _source_dir(args.source)
    if source is None:
        return USAGE
    keyring = _load_keyring(args.key_file, args.keyring)
    if isinstance(keyring, int):
        return keyring
    if keyring is None:
        _err(f"no encryption key: set ${keys.ENV_KEY} or use --key-file")
        return USAGE
    return source, keyring


def _rewrite(
    source: str,
    keyring: keys.Keyring,
    label: str,
    busy: str,
    run: Callable[[_EncryptProgress], dict[str, Any]],
) -> dict[str, Any] | int:
    """Run encrypt or rotate after the key-safety checks: its report, or an exit code."""
    refused = preflight_or_refuse(source, keyring, echo=_stderr)
    if isinstance(refused, int):
        return refused
    try:
        return run(_EncryptProgress(sys.stderr, label=label))
    except Busy:
        _err(f"another {busy} is running on {source}")
        return BUSY
    except CannotSwap as e:
        _err(
            f"cannot {label} in place on {source}: its filesystem cannot exchange two "
            f"names atomically (renameat2 RENAME_EXCHANGE: {e}), which swapping a sealed "
            "copy in while the file may be in use needs. Nothing was changed. Encrypt "
            "the files through the mount instead: a legacy file written through a "
            "stormfs mount is stored encrypted (for one file: dd if=FILE of=FILE bs=1 "
            "count=1 conv=notrunc, FILE being its path on the mount)."
        )
        return USAGE


def _rewrite_done(
    args: argparse.Namespace, report: dict[str, Any], show: Callable[[dict[str, Any]], None]
) -> int:
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        show(report)
    if report["errors"]:
        return ISSUES_FOUND
    return WORK_TO_DO if report["would_encrypt"] else OK


def _encrypt(args: argparse.Namespace) -> int:
    what = "every legacy file" if args.format is None else f"every file not in {args.format}"
    setup = _rewrite_setup(args, f"encrypt rewrites {what} in SOURCE")
    if isinstance(setup, int):
        return setup
    source, keyring = setup
    root = os.fsencode(source)
    # A conversion opens envelopes: with the keyring (the current key first).
    convert_to = None if args.format is None else int(args.format[1:])
    ring = None if convert_to is None else keyring
    if args.dry_run:
        report = dry_run(root, keyring.current, args.jobs, ring, convert_to=convert_to)
    else:
        done = _rewrite(
            source,
            keyring,
            "encrypt",
            "stormfs encrypt",
            lambda progress: encrypt(
                root, keyring.current, args.jobs, progress, ring, convert_to=convert_to
            ),
        )
        if isinstance(done, int):
            return done
        report = done
    report["format"] = args.format
    return _rewrite_done(args, report, _print_encrypt)


def _print_encrypt(r: dict[str, Any]) -> None:
    if r["dry_run"]:
        for f in r["files"]:
            if f["status"] == "needs_encryption":
                print(f"would encrypt  {f['path']}: {f['detail']}")
            elif f["status"] == "needs_conversion":
                print(f"would convert  {f['path']}: {f['detail']}")
    into = f", into {r['format']}" if r["format"] else ""
    print(
        f"\n{'Dry run' if r['dry_run'] else 'Encryption'} of {r['source']} "
        f"(key id {r['key_id']}{into})"
    )
    print(f"  Files scanned:      {r['scanned']}")
    already = "in that format" if r["format"] else "encrypted"
    print(
        f"  Already {already}:  {r['already_encrypted']} (envelope header; "
        "`stormfs audit` authenticates them)"
    )
    if r["dry_run"]:
        print(f"  Would encrypt:      {r['would_encrypt']}")
    else:
        rate = r["bytes_encrypted"] / r["seconds"] if r["seconds"] else 0
        print(
            f"  Encrypted now:      {r['encrypted_now']} ({human_bytes(r['bytes_encrypted'])} "
            f"in {human_duration(r['seconds'])}, {human_bytes(rate)}/s)"
        )
    print(f"  Errors:             {r['errors']}")
    if r["sparse_grown"]:
        print(f"  Sparse files grown: {r['sparse_grown']}")
    if r["stale_temp_files"]:
        verb = "to remove" if r["dry_run"] else "removed"
        print(f"  Stale temporary files {verb}: {r['stale_temp_files']}")
    done = ("encrypted", "needs_encryption", "needs_conversion")
    errors = [f for f in r["files"] if f["status"] not in done]
    for f in errors:
        if f["status"] != "vanished":
            print(f"{f['status']}  {f['path']}: {f['detail']}")


def _keyring_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--keyring",
        metavar="PATH",
        help="file of older keys, one KEY_ID KEY per line (mode 0600; default: the "
        f"credential $CREDENTIALS_DIRECTORY/{keys.KEYRING_CREDENTIAL_NAME})",
    )


def _rotate(args: argparse.Namespace) -> int:
    setup = _rewrite_setup(args, "rotate rewrites every file not under the current key")
    if isinstance(setup, int):
        return setup
    source, keyring = setup
    root = os.fsencode(source)
    legacy, per_user = args.include_legacy, args.per_user_keys
    if args.dry_run:
        report = dry_run(
            root, keyring.current, args.jobs, keyring, include_legacy=legacy, per_user=per_user
        )
    else:
        done = _rewrite(
            source,
            keyring,
            "rotate",
            "stormfs encrypt or rotate",
            lambda progress: encrypt(
                root,
                keyring.current,
                args.jobs,
                progress,
                keyring,
                include_legacy=legacy,
                per_user=per_user,
            ),
        )
        if isinstance(done, int):
            return done
        report = done
    report["include_legacy"] = legacy
    report["per_user_keys"] = per_user
    return _rewrite_done(args, report, _print_rotate)


def _print_rotate(r: dict[str, Any]) -> None:
    if r["dry_run"]:
        for f in r["files"]:
            if f["status"] in ("needs_rotation", "needs_encryption"):
                print(f"would re-encrypt  {f['path']}: {f['detail']}")
    what = "Dry run of the rotation" if r["dry_run"] else "Rotation"
    users = " (per-user keys: files under an account to its user key)" if r["per_user_keys"] else ""
    print(f"\n{what} of {r['source']} to key id {r['key_id']}{users}")
    print(f"  Files scanned:            {r['scanned']}")
    print(f"  Under the current key:    {r['already_encrypted']}")
    olds = ", ".join(f"key id {i}: {n}" for i, n in r["from_key_ids"].items())
    if r["dry_run"]:
        print(f"  Would re-encrypt:         {r['would_encrypt']}" + (f" ({olds})" if olds else ""))
    else:
        rate = r["bytes_encrypted"] / r["seconds"] if r["seconds"] else 0
        print(
            f"  Re-encrypted now:         {r['encrypted_now']} "
            f"({human_bytes(r['bytes_encrypted'])} in {human_duration(r['seconds'])}, "
            f"{human_bytes(rate)}/s)"
        )
    if r["legacy_left"]:
        print(f"  Legacy files left:        {r['legacy_left']} (--include-legacy encrypts them)")
    print(f"  Errors:                   {r['errors']}")
    if r["stale_temp_files"]:
        verb = "to remove" if r["dry_run"] else "removed"
        print(f"  Stale temporary files {verb}: {r['stale_temp_files']}")
    done = ("encrypted", "needs_encryption", "needs_rotation", "vanished")
    for f in r["files"]:
        if f["status"] not in done:
            print(f"{f['status']}  {f['path']}: {f['detail']}")


def _keys(args: argparse.Namespace) -> int:
    source = _source_dir(args.source)
    if source is None:
        return USAGE
    keyring = _load_keyring(args.key_file, args.keyring)
    if isinstance(keyring, int):
        return keyring
    if keyring is None:
        _err(f"no encryption key: set ${keys.ENV_KEY} or use --key-file (and --keyring)")
        return USAGE
    root = os.fsencode(source)
    try:
        report = (
            census(root, keyring) if args.retire is None else retire(root, keyring, args.retire)
        )
    except keycheck.SafetyError as e:
        _stderr(e.message)
        return KEY_SAFETY
    except keycheck.NotRetirable as e:
        _err(f"cannot retire: {e}")
        return USAGE
    except StillNeeded as e:
        _err(
            f"key id {e.key_id} is still needed by {e.files} file(s) in {source}: not retired "
            "(re-encrypt them under the current key first: make rotate-keys)"
        )
        return KEY_SAFETY
    except OSError as e:
        _err(f"cannot retire the key: {e.strerror or e}")
        return USAGE
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_keys(report)
    return ISSUES_FOUND if report["decryption_failed"] or report["unreadable"] else OK


def _print_keys(r: dict[str, Any]) -> None:
    print(f"Keys of {r['source']} (current key id {r['current_key_id']})")
    ids = dict.fromkeys([r["current_key_id"], *r["recorded"], *r["key_ids"]])
    width = max(len(i) for i in ids)
    for key_id in ids:
        notes = []
        if key_id == r["current_key_id"]:
            notes.append("current")
        if key_id in r["recorded"]:
            notes.append("accepted by the key check")
        note = f" ({', '.join(notes)})" if notes else ""
        print(f"  key id {key_id:<{width}}  {r['key_ids'].get(key_id, 0)} file(s){note}")
    print(f"  legacy plaintext    {r['legacy']} file(s)")
    if r["methods"][keys.USER_METHOD]:
        print(f"  by method           {_methods(r['methods'])}")
    if r["decryption_failed"] or r["unreadable"]:
        print(
            f"  with issues         {r['decryption_failed'] + r['unreadable']} file(s) "
            f"(decryption_failed {r['decryption_failed']}, unreadable {r['unreadable']})"
        )
        for f in r["files"]:
            print(f"{f['status']}  {f['path']}: {f['detail']}")
    if r["retired"] is not None:
        print(
            f"Retired key id {r['retired']}: no file needs it; the key check no longer accepts it."
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stormfs",
        description="Transparent encrypting filesystem, byte-compatible with "
        "Storm Cloud server-side encryption (AES-256-GCM).",
    )
    parser.add_argument("--version", action="version", version=f"stormfs {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser(
        "mount",
        help="mount a plaintext view of SOURCE on MOUNTPOINT",
        description="Mount a plaintext view of the storage directory SOURCE on MOUNTPOINT. "
        "Files written through the mount land in SOURCE as AES-256-GCM envelopes; legacy "
        "plaintext files in SOURCE are served as they are. Without --foreground the command "
        "returns once the mount answers. The key comes from --key-file, -o key_file=, "
        f"$CREDENTIALS_DIRECTORY/{keys.CREDENTIAL_NAME} (systemd LoadCredential=) or "
        f"${keys.ENV_KEY}; its id from ${keys.ENV_KEY_ID} (default 1).",
        epilog="Mount options (-o, comma-separated): allow_other, allow_root, "
        "default_permissions, auto_unmount, ro, nosuid, nodev, noexec, noatime, "
        "key_file=PATH, keyring=PATH, entry_timeout=SECONDS, attr_timeout=SECONDS (default 1), "
        "readahead_kb=KIB (kernel readahead for the mount, default 1024), "
        "metadata_threads (run metadata syscalls in threads: for SOURCE on NFS/CephFS), "
        "metrics_file=PATH (the counters of stormfs status in Prometheus' text format, "
        "rewritten every 15 s), "
        "writeback_cache (the kernel merges small writes and keeps sizes and mtimes itself: "
        "only where nothing else writes SOURCE; refused beside another daemon), "
        "exclusive (a promise that nothing but this daemon changes SOURCE: entry and "
        "attribute timeouts of 300 s unless given, missing names remembered as long, the page "
        "cache kept across opens; "
        "refused beside another daemon). "
        "Generic fstab options (nofail, _netdev, x-systemd.*, ...) are ignored. "
        "Unmount with: fusermount3 -u MOUNTPOINT (or stop the daemon with SIGTERM).",
    )
    p.add_argument("source", metavar="SOURCE", help="storage directory holding the files")
    p.add_argument("mountpoint", metavar="MOUNTPOINT", help="where the plaintext view appears")
    p.add_argument("-f", "--foreground", action="store_true", help="stay in the foreground")
    p.add_argument("-o", dest="options", action="append", metavar="OPT[,OPT...]")
    p.add_argument("--key-file", metavar="PATH", help="file holding the base64url key")
    _keyring_option(p)
    p.add_argument(
        "--log-file",
        metavar="PATH",
        help="log here (default: stderr in the foreground, syslog in the background)",
    )
    p.add_argument("--debug", action="store_true", help="log at debug level")
    p.set_defaults(func=_mount)

    p = sub.add_parser(
        "check",
        help="run the key safety checks on SOURCE, as a mount would, without mounting",
        description="Load the key (--key-file, $CREDENTIALS_DIRECTORY/stormfs.key or "
        f"${keys.ENV_KEY}) and run the key safety checks on SOURCE. Records the key "
        "check the first time a key is used on SOURCE.",
    )
    p.add_argument("source", metavar="SOURCE", help="the storage directory")
    p.add_argument("--key-file", metavar="PATH", help="read the key from PATH (mode 0600)")
    _keyring_option(p)
    p.set_defaults(func=_check)

    p = sub.add_parser("keygen", help="print a new random key (base64url, 32 bytes)")
    p.set_defaults(func=_keygen)

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
    _keyring_option(p)
    p.set_defaults(func=_audit)

    p = sub.add_parser(
        "encrypt",
        help="encrypt every legacy plaintext file in SOURCE, in place (needs --force)",
        description="Encrypt every legacy plaintext file in SOURCE in place, atomically, "
        "keeping mode, owner, times and extended attributes, and recording the key id. "
        "Safe while SOURCE is mounted and in use: a file that changes, or is open for "
        "writing, is left as it is and reported. Files that are encrypted already, damaged "
        "envelopes and unreadable files are never touched. Idempotent: run it again after "
        "an interruption. The key comes from --key-file or "
        f"${keys.ENV_KEY}, its id from ${keys.ENV_KEY_ID}.",
        epilog=f"Exit status: {OK} done, nothing left; {WORK_TO_DO} (--dry-run) files would be "
        f"encrypted; {ISSUES_FOUND} some files could not be encrypted; {USAGE} usage or key "
        f"error; {KEY_SAFETY} key safety check refused; {BUSY} another encrypt is "
        "running on SOURCE.",
    )
    _rewrite_options(p)
    p.add_argument(
        "--format",
        choices=("v1", "v2"),
        help="convert: v2 seals every legacy and v1 file as v2 (chunked; the Storm Cloud "
        "server cannot read it), v1 every legacy and v2 file as v1 (to hand SOURCE back "
        "to the server); envelopes are opened with the key and the keyring, sealed under "
        "the current key (default: legacy files to v1, nothing else touched)",
    )
    p.set_defaults(func=_encrypt)

    p = sub.add_parser(
        "rotate",
        help="re-encrypt every file not under the current key, in place (needs --force)",
        description="Seal every envelope in SOURCE that an older key of the keyring opens "
        "again under the current key (and with --include-legacy every legacy plaintext "
        "file too), in place and atomically, as encrypt does: safe while SOURCE is mounted "
        "and in use, resumable after an interruption. Files that no key opens are reported "
        "and left as they are. The current key comes from --key-file or "
        f"${keys.ENV_KEY} (its id from ${keys.ENV_KEY_ID}), older keys from --keyring.",
        epilog=f"Exit status: {OK} done, nothing left; {WORK_TO_DO} (--dry-run) files would be "
        f"re-encrypted; {ISSUES_FOUND} some files could not be; {USAGE} usage or key error; "
        f"{KEY_SAFETY} key safety check refused; {BUSY} another encrypt or rotate is "
        "running on SOURCE.",
    )
    _rewrite_options(p)
    p.add_argument(
        "--include-legacy", action="store_true", help="encrypt legacy plaintext files too"
    )
    p.add_argument(
        "--per-user-keys",
        action="store_true",
        help="SOURCE is mounted with -o per_user_keys: a file under SOURCE/ACCOUNT/ belongs "
        "under the current key's user key of ACCOUNT (without it, every file belongs under "
        "the current key itself, and files under user keys are moved back to it)",
    )
    p.set_defaults(func=_rotate)

    p = sub.add_parser(
        "keys",
        help="count files per key id; retire an older key no file needs",
        description="Scan SOURCE (every envelope authenticated) and count the files under "
        "each key of the keyring, legacy files, and files no key opens; list the key ids the "
        "recorded key check accepts. With --retire ID, stop accepting the older key ID, "
        "only if no file is under it (the keyring must hold it, so that they can be counted).",
        epilog=f"Exit status: {OK} done; {ISSUES_FOUND} some files no key opens or cannot be "
        f"read; {USAGE} usage or key error, or ID cannot be retired; {KEY_SAFETY} files still "
        "need the key ID (not retired), or the key check cannot be read.",
    )
    p.add_argument("source", metavar="SOURCE", help="the storage directory")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--retire", metavar="ID", help="retire the older key ID if no file needs it")
    p.add_argument("--key-file", metavar="PATH", help="file holding the base64url key")
    _keyring_option(p)
    p.set_defaults(func=_keys)

    p = sub.add_parser(
        "status",
        help="what the daemon serving MOUNTPOINT is doing",
        description="Ask the daemon serving MOUNTPOINT, through the mount itself (the "
        f"read-only attribute {STATUS_XATTR} of its root): its PID, SOURCE, options and "
        "key ids (never a key), uptime, open files, files with unpublished writes, commits "
        "done and failed, bytes read and written, DECRYPTION_FAILED files seen, the last "
        "error.",
        epilog=f"Exit status: {OK} answered; {USAGE} not a stormfs mount.",
    )
    p.add_argument("mountpoint", metavar="MOUNTPOINT", help="a stormfs mount")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_status)
    return parser


def _fstab_form(argv: list[str]) -> list[str]:
    """mount.fuse3 runs `stormfs SOURCE MOUNTPOINT -o OPTS`: that is a mount."""
    if argv and argv[0] not in COMMANDS and not argv[0].startswith("-"):
        return ["mount", *argv]
    return argv


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(_fstab_form(sys.argv[1:] if argv is None else argv))
    except SystemExit as e:
        return USAGE if e.code not in (0, None) else OK
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
