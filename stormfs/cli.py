"""The `stormfs` command: argument parsing, output and exit codes."""

from __future__ import annotations

import argparse
import logging
import logging.handlers
import os
import sys

from . import __version__, audit, hygiene, keycheck, keys, migrate, notify
from .daemon import MountError, MountOptions, check_paths, serve
from .exitcodes import MOUNT_FAILED, OK, USAGE

log = logging.getLogger("stormfs")

COMMANDS = ("mount", "check", "keygen", "audit", "encrypt")
LOG_FORMAT = "%(asctime)s stormfs[%(process)d] %(levelname)s %(message)s"


def _err(message: str) -> None:
    print(f"stormfs: {message}", file=sys.stderr)


def _stderr(line: str) -> None:
    print(line, file=sys.stderr)


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
    try:
        keyring = keys.load_keyring(key_file=args.key_file or opts.key_file, environ=os.environ)
    except keys.InvalidKey as e:
        _err(str(e))
        return USAGE
    hygiene.scrub_key_environment()
    refused = keycheck.preflight_or_refuse(source, keyring, echo=_stderr)
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
    try:
        keyring = keys.load_keyring(key_file=args.key_file, environ=os.environ)
    except keys.InvalidKey as e:
        _err(str(e))
        return USAGE
    mode = keycheck.preflight_or_refuse(args.source, keyring, echo=print)
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
        "key_file=PATH, entry_timeout=SECONDS, attr_timeout=SECONDS (default 1), "
        "readahead_kb=KIB (kernel readahead for the mount, default 1024), "
        "metadata_threads (run metadata syscalls in threads: for SOURCE on NFS/CephFS). "
        "Generic fstab options (nofail, _netdev, x-systemd.*, ...) are ignored. "
        "Unmount with: fusermount3 -u MOUNTPOINT (or stop the daemon with SIGTERM).",
    )
    p.add_argument("source", metavar="SOURCE", help="storage directory holding the files")
    p.add_argument("mountpoint", metavar="MOUNTPOINT", help="where the plaintext view appears")
    p.add_argument("-f", "--foreground", action="store_true", help="stay in the foreground")
    p.add_argument("-o", dest="options", action="append", metavar="OPT[,OPT...]")
    p.add_argument("--key-file", metavar="PATH", help="file holding the base64url key")
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
    p.set_defaults(func=_check)

    p = sub.add_parser("keygen", help="print a new random key (base64url, 32 bytes)")
    p.set_defaults(func=_keygen)
    audit.register(sub)
    migrate.register(sub)
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
