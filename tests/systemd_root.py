"""A scratch root that `systemd-analyze verify --root=` can load units from:
the host's unit directory (for targets the unit refers to) and the programs
the unit runs."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ANALYZE = shutil.which("systemd-analyze")


def prepare(root: Path) -> None:
    if ANALYZE is None:
        pytest.skip("systemd-analyze is not installed (make install installs the systemd package)")
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    (root / "bin").mkdir(parents=True, exist_ok=True)
    shutil.copy2("/bin/fusermount3", root / "bin/fusermount3")


def verify(root: Path, unit: str) -> subprocess.CompletedProcess[str]:
    """Verify `unit` as loaded from `root`.  systemd-analyze exits 0 even for
    unknown or unparsable settings, so callers assert that stderr is empty."""
    assert ANALYZE is not None
    return subprocess.run(
        [ANALYZE, "verify", f"--root={root}", unit],
        capture_output=True,
        text=True,
        timeout=60,
    )
