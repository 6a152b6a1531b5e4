"""`make deploy` into a scratch root ($DESTDIR): what it installs and writes,
key auto-preservation, and every refusal leaving the deployment untouched.
All output passes through keyscan's runner, so no key may show in it.

The first deployment builds the real virtualenv under DESTDIR/opt/stormfs
(once per session); later runs find it current and skip the install.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from stormfs import format as fmt
from stormfs import keys
from stormfs.exitcodes import KEY_SAFETY, OK, USAGE

from . import systemd_root
from .deployment import DEPLOY, REPO, Deployment
from .keyscan import new_key, run

MISMATCH_TEXT = (
    "FATAL: Encryption key mismatch detected!\n"
    "Server has encrypted files with a different key.\n"
    "Deployment blocked to prevent data loss.\n"
)
NO_KEY_TEXT = (
    "FATAL: Server has encryption enabled, but no key provided.\n"
    "Cannot disable encryption - this would make files unreadable.\n"
)


def notice(key: str) -> str:
    return (
        "NOTICE: Server-side encryption being enabled for the first time.\n"
        "SAVE YOUR ENCRYPTION KEY NOW:\n"
        f"  STORMCLOUD_ENCRYPTION_KEY={key[:16]}...\n"
        "Store this in your password manager. Losing this key = losing your files.\n"
    )


@pytest.fixture
def root(destdir):
    return destdir


@pytest.fixture
def work(tmp_path):
    return tmp_path


def manual(deployment: Deployment, *, key: bool = True, key_id: str = "1") -> str:
    prefix = f"STORMCLOUD_ENCRYPTION_KEY_ID={key_id} " if key_id != "1" else ""
    key_part = f" --key-file /etc/stormfs/{deployment.name}.key" if key else ""
    return (
        f"  {prefix}/usr/local/bin/stormfs mount{key_part} "
        f"{deployment.source} {deployment.mountpoint}\n"
    )


def test_first_deploy_then_rerun_without_key_then_other_key(root, work):
    d = Deployment(root, work, "files")
    key = new_key()
    proc = d.deploy(key)
    assert proc.returncode == OK, proc.stderr
    assert proc.stdout.startswith(
        notice(key) + f"OK: {d.source} can be mounted encrypted with key id 1\n"
    )
    assert proc.stdout.endswith(
        "deploy: key written to /etc/stormfs/files.key (root only)\n"
        "deploy: stormfs@files.service is installed and enabled\n"
        "deploy: systemd is not running here, so the service was not started.\n"
        "deploy: Start the mount by hand with:\n" + manual(d)
    )
    # The key, root-only; the check recorded in SOURCE; the mountpoint made.
    key_file = d.etc(".key")
    assert key_file.read_text() == key + "\n"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert key_file.stat().st_uid == 0
    assert stat.S_IMODE((root / "etc/stormfs").stat().st_mode) == 0o700
    assert (d.source / ".stormfs" / "keycheck").exists()
    assert d.mountpoint.is_dir()
    assert d.etc(".conf").read_text() == (
        "# stormfs deployment files: written by make deploy, re-run it to change.\n"
        f'SOURCE="{d.source}"\n'
        f'MOUNTPOINT="{d.mountpoint}"\n'
        'STORMFS_OPTIONS=""\n'
        'STORMCLOUD_ENCRYPTION_KEY_ID="1"\n'
    )
    assert d.dropin.read_text() == f'[Unit]\nRequiresMountsFor="{d.source}"\n'
    # Software, the command on PATH, the unit, enabled.
    unit = root / "etc/systemd/system/stormfs@.service"
    assert unit.read_bytes() == (REPO / "systemd/stormfs@.service").read_bytes()
    wants = root / "etc/systemd/system/multi-user.target.wants/stormfs@files.service"
    assert os.readlink(wants) == "/etc/systemd/system/stormfs@.service"
    assert os.readlink(root / "usr/local/bin/stormfs") == "/opt/stormfs/bin/stormfs"
    version = run([str(root / "opt/stormfs/bin/stormfs"), "--version"])
    assert version.stdout == "stormfs 0.1.0\n"

    # Again without a key: the deployed key is kept, nothing is rewritten.
    before = d.state()
    proc = d.deploy()
    assert proc.returncode == OK, proc.stderr
    assert proc.stdout.startswith(
        "deploy: keeping the key already deployed for files (/etc/stormfs/files.key)\n"
        f"OK: {d.source} can be mounted encrypted with key id 1\n"
    )
    assert "NOTICE" not in proc.stdout
    assert "installing" not in proc.stdout
    assert proc.stdout.endswith(manual(d))
    assert d.state() == before

    # The same key given again is fine too.
    assert d.deploy(key).returncode == OK
    assert d.state() == before

    # A different key: blocked, exactly the mismatch text, nothing changed.
    proc = d.deploy(new_key())
    assert (proc.returncode, proc.stdout, proc.stderr) == (KEY_SAFETY, "", MISMATCH_TEXT)
    assert d.state() == before


def test_lost_key_file_does_not_allow_another_key(root, work):
    """The deployed key gone, a new key still meets the check recorded in SOURCE."""
    d = Deployment(root, work, "lost")
    assert d.deploy(new_key()).returncode == OK
    d.etc(".key").unlink()
    before = d.state()
    proc = d.deploy(new_key())
    assert (proc.returncode, proc.stderr) == (KEY_SAFETY, MISMATCH_TEXT)
    proc = d.deploy()
    assert (proc.returncode, proc.stderr) == (KEY_SAFETY, NO_KEY_TEXT)
    assert d.state() == before


def storm_cloud_files(source: Path, key: str) -> None:
    material = keys.parse_key(key)
    (source / "docs").mkdir()
    (source / "docs" / "report.pdf").write_bytes(fmt.seal(material, b"%PDF " + os.urandom(500)))
    (source / "notes.txt").write_bytes(fmt.seal(material, b"notes"))
    (source / "legacy.txt").write_bytes(b"plain, from before encryption\n")


def test_storm_cloud_source(root, work):
    d = Deployment(root, work, "cloud")
    key = new_key()
    storm_cloud_files(d.source, key)
    before = d.state()

    proc = d.deploy(new_key())
    assert (proc.returncode, proc.stdout, proc.stderr) == (KEY_SAFETY, "", MISMATCH_TEXT)
    proc = d.deploy()
    assert (proc.returncode, proc.stdout, proc.stderr) == (KEY_SAFETY, "", NO_KEY_TEXT)
    assert d.state() == before
    assert not d.etc(".key").exists() and not d.etc(".conf").exists()

    proc = d.deploy(key)
    assert proc.returncode == OK, proc.stderr
    check = d.source / ".stormfs" / "keycheck"
    assert proc.stdout.startswith(
        f"Key verified against the encrypted files already in {d.source}; "
        f"key check recorded in {check}.\n"
    )
    assert "NOTICE" not in proc.stdout
    assert d.etc(".key").read_text() == key + "\n"


def test_passthrough_then_encryption_switched_on(root, work):
    d = Deployment(root, work, "plain")
    (d.source / "legacy.txt").write_text("plain")
    proc = d.deploy()
    assert proc.returncode == OK, proc.stderr
    assert proc.stdout.startswith(
        f"WARNING: No encryption key provided and no encrypted files in {d.source}: "
        "mounting it as a plain pass-through (encryption_method none). "
        "Files are stored unencrypted until a key is configured.\n"
        f"OK: {d.source} can be mounted as a plain pass-through (no key)\n"
    )
    assert proc.stdout.endswith(manual(d, key=False))
    assert not d.etc(".key").exists()
    # No key file for LoadCredential= to load: the drop-in clears it.
    assert d.dropin.read_text() == (
        f'[Unit]\nRequiresMountsFor="{d.source}"\n\n[Service]\nLoadCredential=\n'
    )

    key = new_key()
    proc = d.deploy(key)
    assert proc.returncode == OK, proc.stderr
    assert proc.stdout.startswith(notice(key))
    assert d.etc(".key").read_text() == key + "\n"
    assert d.dropin.read_text() == f'[Unit]\nRequiresMountsFor="{d.source}"\n'
    # Encryption cannot be switched off again by forgetting the key file.
    d.etc(".key").unlink()
    proc = d.deploy()
    assert (proc.returncode, proc.stderr) == (KEY_SAFETY, NO_KEY_TEXT)


def test_key_id_is_recorded_and_kept(root, work):
    d = Deployment(root, work, "rotating")
    proc = d.deploy(new_key(), STORMCLOUD_ENCRYPTION_KEY_ID="2026-01")
    assert proc.returncode == OK, proc.stderr
    assert 'STORMCLOUD_ENCRYPTION_KEY_ID="2026-01"\n' in d.etc(".conf").read_text()
    assert proc.stdout.endswith(manual(d, key_id="2026-01"))
    proc = d.deploy()
    assert proc.returncode == OK, proc.stderr
    assert "with key id 2026-01" in proc.stdout
    assert 'STORMCLOUD_ENCRYPTION_KEY_ID="2026-01"\n' in d.etc(".conf").read_text()


def test_malformed_key_is_refused_before_anything_happens(root, work):
    d = Deployment(root, work, "typo")
    key = new_key()
    bad = key[:-3]
    proc = d.deploy(bad)
    assert proc.returncode == USAGE
    assert proc.stdout == ""
    assert proc.stderr.startswith("deploy: error: $STORMCLOUD_ENCRYPTION_KEY: ")
    assert proc.stderr.count("\n") == 1
    assert bad not in proc.stderr
    assert not d.etc(".conf").exists()
    assert not (d.source / ".stormfs").exists()


def test_deployed_key_file_opened_up_is_refused(root, work):
    d = Deployment(root, work, "opened")
    assert d.deploy(new_key()).returncode == OK
    os.chmod(d.etc(".key"), 0o644)
    proc = d.deploy()
    path = d.etc(".key")
    assert proc.returncode == USAGE
    assert proc.stderr == (
        f"deploy: error: the deployed key is unusable: key file {path} is readable by "
        f"group or others (mode 0644); restrict it with: chmod 600 {path}\n"
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--mountpoint", "/mnt/x", "--name", "n"], "SOURCE= is required"),
        (["--source", "/", "--mountpoint", "/mnt/x", "--name", "a/b"], "NAME= is required"),
        (["--source", "/tmp", "--mountpoint", "/tmp/view", "--name", "n"], "contain one another"),
        (["--source", "/nonexistent-dir", "--mountpoint", "/mnt", "--name", "n"], "not a dir"),
        (["--source", "/tmp", "--mountpoint", "/mnt/$HOME", "--name", "n"], "must not contain"),
    ],
)
def test_usage_errors(root, args, message):
    proc = run([*DEPLOY, *args], env={"DESTDIR": str(root)})
    assert proc.returncode == USAGE
    assert message in proc.stderr


def test_deployed_unit_verifies(root, work):
    """systemd-analyze on the installed unit, drop-in and command, as deployed."""
    d = Deployment(root, work, "verified")
    assert d.deploy(new_key()).returncode == OK
    if not (root / "usr/lib/systemd/system").exists():
        systemd_root.prepare(root)
    proc = systemd_root.verify(root, "stormfs@verified.service")
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")


def test_make_deploy(root, work):
    """The Makefile target passes SOURCE, MOUNTPOINT, NAME and the key through."""
    d = Deployment(root, work, "viamake")
    key = new_key()
    proc = run(
        [
            "make",
            "--no-print-directory",
            "-C",
            str(REPO),
            "deploy",
            f"SOURCE={d.source}",
            f"MOUNTPOINT={d.mountpoint}",
            "NAME=viamake",
        ],
        env={"DESTDIR": str(root), keys.ENV_KEY: key},
        timeout=900,
    )
    assert proc.returncode == OK, proc.stderr
    assert notice(key) in proc.stdout
    assert d.etc(".key").read_text() == key + "\n"


def test_rotation_with_a_keyring(root, work):
    """A new key replaces the deployed one only when the keyring in OPTIONS holds it."""
    d = Deployment(root, work, "rotation")
    k1, k2 = new_key(), new_key()
    assert d.deploy(k1).returncode == OK
    (d.source / "old").write_bytes(fmt.seal(keys.parse_key(k1), b"sealed under key 1"))
    keyring = "/etc/stormfs/rotation.keyring"
    ring_path = root / keyring.lstrip("/")
    ring_path.write_text(f"other {new_key()}\n")
    ring_path.chmod(0o600)
    before = d.state()
    proc = d.deploy(k2, STORMCLOUD_ENCRYPTION_KEY_ID="2")
    assert (proc.returncode, proc.stderr) == (KEY_SAFETY, MISMATCH_TEXT)
    proc = d.deploy(k2, options=f"keyring={keyring}", STORMCLOUD_ENCRYPTION_KEY_ID="2")
    assert (proc.returncode, proc.stderr) == (KEY_SAFETY, MISMATCH_TEXT)  # not key 1
    assert d.state() == before

    ring_path.write_text(f"1 {k1}\n")
    ring_path.chmod(0o600)
    proc = d.deploy(k2, options=f"keyring={keyring}", STORMCLOUD_ENCRYPTION_KEY_ID="2")
    assert proc.returncode == OK, proc.stderr
    assert proc.stdout.startswith(
        "NOTICE: A new encryption key (key id 2) seals new versions from now on; "
        "key id 1 still opens the files sealed before.\n"
    )
    assert d.etc(".key").read_text() == k2 + "\n"
    conf = d.etc(".conf").read_text()
    assert 'STORMCLOUD_ENCRYPTION_KEY_ID="2"\n' in conf
    assert f'STORMFS_OPTIONS="-o keyring={keyring}"\n' in conf
    # Re-run without the key: kept; without the keyring: key 1 is still needed.
    assert d.deploy(options=f"keyring={keyring}").returncode == OK
    proc = d.deploy()
    assert proc.returncode == KEY_SAFETY
    assert proc.stderr.startswith(f"FATAL: Key id 1 is still needed by files in {d.source}")
