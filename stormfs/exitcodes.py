"""Exit codes of every stormfs command, in one place (documented in the README)."""

OK = 0
# A usage error, a malformed key or key file, a missing argument.
USAGE = 2
# Mount refused by a safety check (key mismatch, encryption cannot be disabled).
KEY_SAFETY = 3
# The mount could not be set up (mountpoint missing or busy, FUSE unavailable).
MOUNT_FAILED = 4
# audit / encrypt: nothing is wrong, but legacy plaintext files remain to be
# encrypted (audit; encrypt --dry-run).
WORK_TO_DO = 5
# audit / encrypt: at least one file needs an operator (decryption_failed,
# unreadable, or a file encrypt had to leave as it was).  Wins over WORK_TO_DO.
ISSUES_FOUND = 6
# encrypt: another `stormfs encrypt` is already running on the same SOURCE.
BUSY = 7
