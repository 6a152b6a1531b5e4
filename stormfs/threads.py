"""Helper threads of the daemon."""

from __future__ import annotations

import signal
import threading


def start_quietly(thread: threading.Thread) -> None:
    """Start `thread` with every signal blocked.  Signals are the main thread's
    business: a SIGTERM delivered to a helper thread before the daemon handles
    SIGTERM would kill the process."""
    before = signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
    try:
        thread.start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)
