"""systemd's readiness protocol (``Type=notify``) without libsystemd.

The service manager passes a datagram socket in ``$NOTIFY_SOCKET``: a path, or
an abstract name written with a leading ``@``.  Each message is one datagram of
``KEY=value`` lines.  Without the variable (not started by systemd) every call
is a no-op.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

ENV_SOCKET = "NOTIFY_SOCKET"


def notify(message: str, environ: Mapping[str, str] = os.environ) -> bool:
    """Send `message`; False if there is no socket to send it to.

    OSError from the socket propagates: the caller decides whether a lost
    notification is worth a log line.
    """
    address = environ.get(ENV_SOCKET)
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        sock.sendto(message.encode("utf-8"), address)
    return True


def ready(status: str | None = None, environ: Mapping[str, str] = os.environ) -> bool:
    """The service is up: for stormfs, the mount answers."""
    return notify("READY=1" + (f"\nSTATUS={status}" if status else ""), environ)


def stopping(environ: Mapping[str, str] = os.environ) -> bool:
    return notify("STOPPING=1", environ)
