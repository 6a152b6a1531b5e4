"""Test keys that are tracked, and a runner whose output is scanned for them.

Every key a test makes through `new_key` is remembered.  `run` echoes a
process's output into the test's captured output, and conftest.py fails any
test whose captured output contains a remembered key, in its base64url or hex
form.  A failure report shows the test's own arguments (the key among them),
so keys are redacted from it rather than counted as a leak.
"""

from __future__ import annotations

import base64
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence

from stormfs import keys

_KEYS: list[str] = []


def new_key() -> str:
    text = keys.generate_key()
    _KEYS.append(text)
    return text


def track(raw: bytes) -> str:
    """Remember key material made another way (a derived key) as if `new_key` had made it."""
    text = base64.urlsafe_b64encode(raw).decode("ascii")
    _KEYS.append(text)
    return text


def forms(text: str) -> tuple[str, ...]:
    """The ways a leaked key could be spelled in output."""
    raw = keys.parse_key(text)
    b64 = base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")
    std = base64.b64encode(raw).decode("ascii").rstrip("=")
    return (b64, std, raw.hex())


def leaked_in(text: str) -> bool:
    return any(form in text for key in _KEYS for form in forms(key))


def redact(text: str) -> str:
    for key in _KEYS:
        for form in forms(key):
            text = text.replace(form, "[key]")
    return text


STORMFS = [sys.executable, "-m", "stormfs"]


def run(
    args: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    unset: Sequence[str] = (),
    timeout: float = 60,
    cwd: str | None = None,
    input: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a real process with `env` added to (and `unset` removed from) this
    environment; its output is echoed so the key scan sees it."""
    full_env = {k: v for k, v in os.environ.items() if k not in unset}
    full_env.pop(keys.ENV_KEY, None)
    full_env.update(env or {})
    proc = subprocess.run(
        list(args),
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        input=input,
        stdin=None if input is not None else subprocess.DEVNULL,
    )
    sys.stdout.write(f"$ {' '.join(args)}\n{proc.stdout}")
    sys.stderr.write(proc.stderr)
    return proc
