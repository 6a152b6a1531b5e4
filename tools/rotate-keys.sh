#!/usr/bin/env bash
# `make rotate-keys SOURCE=...`: re-encrypt every file not under the current key.
# Running the target is the operator's confirmation, so --force is passed;
# ARGS=--dry-run only reports. The current key comes from
# $STORMCLOUD_ENCRYPTION_KEY (or --key-file in ARGS), its id from
# $STORMCLOUD_ENCRYPTION_KEY_ID, the older keys from --keyring in ARGS (or the
# credential stormfs.keyring). Exit status is stormfs rotate's.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
stormfs="${STORMFS:-$repo/.venv/bin/stormfs}"
if [[ $# -lt 1 || -z "$1" ]]; then
    echo "usage: make rotate-keys SOURCE=/path/to/storage [ARGS='--keyring FILE --dry-run']" >&2
    exit 2
fi
exec "$stormfs" rotate "$1" --force "${@:2}"
