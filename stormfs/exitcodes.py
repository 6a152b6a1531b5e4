"""Exit codes of every stormfs command, in one place (documented in the README)."""

OK = 0
# A usage error, a malformed key or key file, a missing argument.
USAGE = 2
# Mount refused by a safety check (key mismatch, encryption cannot be disabled).
KEY_SAFETY = 3
# The mount could not be set up (mountpoint missing or busy, FUSE unavailable).
MOUNT_FAILED = 4
