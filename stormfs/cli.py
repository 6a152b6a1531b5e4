"""The `stormfs` command: argument parsing, output and exit codes."""

from __future__ import annotations

import argparse
import sys

from . import __version__, keys
from .exitcodes import OK, USAGE


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
    p = sub.add_parser("keygen", help="print a new random key (base64url, 32 bytes)")
    p.set_defaults(func=_keygen)
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
