"""Process hygiene for the daemon: keep the key out of core dumps, /proc and
the environment of child processes.

Call `disable_core_dumps` first thing, then `scrub_key_environment` once the
keyring has been loaded.
"""

from __future__ import annotations

import ctypes
import os
import resource
from collections.abc import MutableMapping

from .keys import ENV_KEY
from .source import check_libc, libc

PR_SET_DUMPABLE = 4


def disable_core_dumps() -> None:
    """RLIMIT_CORE 0 and PR_SET_DUMPABLE 0.

    Not dumpable also makes /proc/PID/{environ,mem,maps} root-only and refuses
    ptrace attaches from processes of the same user.
    """
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    check_libc(libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0), "prctl(PR_SET_DUMPABLE): ")


def scrub_key_environment(environ: MutableMapping[str, str] = os.environ) -> None:
    """Remove the key variable so no child process inherits it.

    Before unsetting it, overwrite its value in the process's own environment
    block: unsetenv() only drops the pointer, and the original bytes would
    still show in /proc/PID/environ (and `ps e`).
    """
    prefix = ENV_KEY.encode("ascii") + b"="
    block = ctypes.POINTER(ctypes.c_void_p).in_dll(libc, "environ")
    i = 0
    while block[i]:
        address = block[i]
        entry = ctypes.string_at(address)
        if entry.startswith(prefix):
            ctypes.memset(address + len(prefix), 0, len(entry) - len(prefix))
        i += 1
    environ.pop(ENV_KEY, None)
