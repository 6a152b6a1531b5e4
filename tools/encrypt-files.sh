#!/usr/bin/env bash
# `make encrypt-files SOURCE=...`: encrypt every legacy plaintext file in place.
# Running the target is the operator's confirmation, so --force is passed;
# ARGS=--dry-run only reports. The key comes from $STORMCLOUD_ENCRYPTION_KEY
# (or --key-file in ARGS). Exit status is stormfs encrypt's.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
stormfs="${STORMFS:-$repo/.venv/bin/stormfs}"
if [[ $# -lt 1 || -z "$1" ]]; then
    echo "usage: make encrypt-files SOURCE=/path/to/storage [ARGS=--dry-run]" >&2
    exit 2
fi
exec "$stormfs" encrypt "$1" --force "${@:2}"
