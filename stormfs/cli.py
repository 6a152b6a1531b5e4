"""The `stormfs` command: argument parsing, output and exit codes."""

from __future__ import annotations

import argparse
import os
import sys

from . import __version__, keycheck, keys
from .exitcodes import OK, USAGE


def _keygen(args: argparse.Namespace) -> int:
    print(keys.generate_key())
    return OK


def _check(args: argparse.Namespace) -> int:
    """Load the key as the mount would and run the safety checks, nothing more."""
    try:
        keyring = keys.load_keyring(key_file=args.key_file, environ=os.environ)
    except keys.InvalidKey as e:
        print(f"stormfs: error: {e}", file=sys.stderr)
        return USAGE
    try:
        mode = keycheck.preflight(args.source, keyring, echo=print)
    except keycheck.SafetyError as e:
        print(e.message, file=sys.stderr)
        return e.exit_code
    except OSError as e:
        print(f"stormfs: error: {args.source}: {e.strerror or e}", file=sys.stderr)
        return USAGE
    if mode is keycheck.Mode.PASSTHROUGH or keyring is None:
        print(f"OK: {args.source} can be mounted as a plain pass-through (no key)")
    else:
        print(f"OK: {args.source} can be mounted encrypted with key id {keyring.current.key_id}")
    return OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stormfs",
        description="Transparent encrypting filesystem, byte-compatible with "
        "Storm Cloud server-side encryption (AES-256-GCM).",
    )
    parser.add_argument("--version", action="version", version=f"stormfs {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    p = sub.add_parser("keygen", help="print a new random key (base64url, 32 bytes)")
    p.set_defaults(func=_keygen)
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
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return USAGE if e.code not in (0, None) else OK
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
