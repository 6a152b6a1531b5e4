"""systemd/stormfs@.service: systemd-analyze accepts it as shipped, and it says
what the service contract needs."""

from __future__ import annotations

import os
from pathlib import Path

from . import systemd_root

UNIT = Path(__file__).resolve().parent.parent / "systemd" / "stormfs@.service"


def settings() -> dict[str, list[str]]:
    """Each `Key=` of the unit with all its values, in order."""
    values: dict[str, list[str]] = {}
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            values.setdefault(key, []).append(value)
    return values


def scratch_root(root: Path, unit_text: str) -> None:
    """The unit installed in a scratch root, with a stand-in for the command."""
    systemd_root.prepare(root)
    unit_dir = root / "etc/systemd/system"
    unit_dir.mkdir(parents=True)
    (unit_dir / UNIT.name).write_text(unit_text)
    stormfs = root / "usr/local/bin/stormfs"
    stormfs.parent.mkdir(parents=True)
    stormfs.write_text("#!/bin/sh\n")
    os.chmod(stormfs, 0o755)


def test_systemd_analyze_verify(tmp_path):
    scratch_root(tmp_path, UNIT.read_text())
    proc = systemd_root.verify(tmp_path, "stormfs@demo.service")
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")


def test_verify_would_catch_a_mistake(tmp_path):
    """The check above means something: a bad setting shows on stderr."""
    scratch_root(tmp_path, UNIT.read_text().replace("LimitCORE=0", "LimitCORE=zero"))
    proc = systemd_root.verify(tmp_path, "stormfs@demo.service")
    assert "Failed to parse resource value" in proc.stderr


def test_service_contract():
    s = settings()
    assert s["Type"] == ["notify"]
    assert s["EnvironmentFile"] == ["/etc/stormfs/%i.conf"]
    assert s["LoadCredential"] == ["stormfs.key:/etc/stormfs/%i.key"]
    assert s["ExecStartPre"] == ["-/bin/fusermount3 -u -z ${MOUNTPOINT}"]
    assert s["ExecStart"] == [
        "/usr/local/bin/stormfs mount --foreground ${SOURCE} ${MOUNTPOINT} $STORMFS_OPTIONS"
    ]
    assert s["Restart"] == ["on-failure"]
    assert s["RestartPreventExitStatus"] == ["2 3"]
    assert s["LimitCORE"] == ["0"]
    assert s["KillMode"] == ["mixed"]
    assert s["KillSignal"] == ["SIGTERM"]
    assert s["WantedBy"] == ["multi-user.target"]
    assert "STORMCLOUD_ENCRYPTION_KEY=" not in UNIT.read_text()


def test_no_hardening_that_hides_the_mount():
    """Each of these puts the mount in a namespace the host never sees, keeps
    the daemon from opening /dev/fuse (device policies) or from tuning the
    mount (read-only /sys)."""
    hiding = {
        "ProtectSystem",
        "ProtectHome",
        "PrivateTmp",
        "PrivateDevices",
        "PrivateMounts",
        "MountFlags",
        "ReadOnlyPaths",
        "ReadWritePaths",
        "InaccessiblePaths",
        "TemporaryFileSystem",
        "BindPaths",
        "DevicePolicy",
        "ProtectClock",
        # Read-only /sys: the daemon could not set the mount's readahead.
        "ProtectKernelTunables",
    }
    assert hiding.isdisjoint(settings())
