#!/usr/bin/env bash
# `make encrypt-audit SOURCE=...`: where a storage directory stands, changing nothing.
# The key comes from $STORMCLOUD_ENCRYPTION_KEY (or --key-file in ARGS); extra
# arguments (--json, --quick) are passed on. Exit status is stormfs audit's.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
stormfs="${STORMFS:-$repo/.venv/bin/stormfs}"
if [[ $# -lt 1 || -z "$1" ]]; then
    echo "usage: make encrypt-audit SOURCE=/path/to/storage [ARGS='--json --quick']" >&2
    exit 2
fi
exec "$stormfs" audit "$@"
