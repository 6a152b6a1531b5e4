"""Deployments into one scratch root ($DESTDIR) shared by the session."""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

from stormfs import keys

from .keyscan import run

REPO = Path(__file__).resolve().parent.parent
DEPLOY = [sys.executable, str(REPO / "tools" / "deploy.py")]


class Deployment:
    """One NAME deployed into the shared scratch root."""

    def __init__(self, root: Path, work: Path, name: str) -> None:
        self.root, self.name = root, name
        self.source = work / name / "source"
        self.mountpoint = work / name / "mnt"
        self.source.mkdir(parents=True)

    def deploy(self, key: str | None = None, *, options: str = "", **env: str):
        if key is not None:
            env[keys.ENV_KEY] = key
        args = ["--source", str(self.source), "--mountpoint", str(self.mountpoint)]
        if options:
            args += ["--options", options]
        proc = run(
            [*DEPLOY, *args, "--name", self.name],
            env={"DESTDIR": str(self.root), **env},
            timeout=600,
        )
        return proc

    def etc(self, suffix: str) -> Path:
        return self.root / "etc/stormfs" / f"{self.name}{suffix}"

    @property
    def dropin(self) -> Path:
        return self.root / f"etc/systemd/system/stormfs@{self.name}.service.d/deploy.conf"

    def state(self) -> dict[str, tuple[int, int, bytes | None]]:
        """Everything deployed for this NAME and its SOURCE: names, modes,
        mtimes and contents, to show that a refusal changed nothing."""
        out = {}
        for top in (self.root / "etc", self.source):
            for dirpath, dirnames, filenames in os.walk(top):
                for name in dirnames + filenames:
                    path = Path(dirpath, name)
                    st = path.lstat()
                    data = path.read_bytes() if stat.S_ISREG(st.st_mode) else None
                    out[str(path)] = (st.st_mode, st.st_mtime_ns, data)
        return out
