"""`make deploy`: install stormfs system-wide and run one deployment as a service.

    make deploy SOURCE=/srv/storage MOUNTPOINT=/srv/files NAME=files [OPTIONS=allow_other]

The key comes from $STORMCLOUD_ENCRYPTION_KEY.  Without it, the key already
deployed under NAME is kept (key auto-preservation); a different key than the
deployed one is a mismatch and nothing is changed, unless OPTIONS name a
keyring file (keyring=PATH) that holds the deployed key: then the new key
replaces it as the current key (a key rotation).  The key safety checks run
(`stormfs check`) before anything is written.  Then:

    /opt/stormfs/                    a virtualenv with stormfs
    /usr/local/bin/stormfs           -> /opt/stormfs/bin/stormfs
    /etc/stormfs/NAME.key            the key, 0600 (absent for a pass-through)
    /etc/stormfs/NAME.conf           SOURCE, MOUNTPOINT, options, key id
    /etc/systemd/system/stormfs@.service (+ stormfs@NAME.service.d/deploy.conf)

and stormfs@NAME.service is enabled and (re)started.  Where systemd is not
running, everything but the start is done and the command to mount by hand is
printed.  Re-running is safe.  $DESTDIR installs under another root (tests).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from stormfs import keycheck, keys  # noqa: E402
from stormfs.exitcodes import KEY_SAFETY, MOUNT_FAILED, OK, USAGE  # noqa: E402
from stormfs.source import open_dir, write_atomically  # noqa: E402

PYTHON = "/usr/bin/python3"
PREFIX = "/opt/stormfs"
BIN_LINK = "/usr/local/bin/stormfs"
ETC = "/etc/stormfs"
UNIT_DIR = "/etc/systemd/system"
UNIT = "stormfs@.service"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_OPTIONS = re.compile(r"[A-Za-z0-9_.,=/:+-]*")
# Characters that systemd would expand or unquote in EnvironmentFile= and
# RequiresMountsFor= values: refused in paths rather than escaped.
_UNSAFE_IN_PATH = re.compile(r'["\\$%\x00-\x1f\x7f]')


class DeployError(Exception):
    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def say(line: str) -> None:
    print(f"deploy: {line}", flush=True)


class Target:
    """Paths as the deployed system sees them, and where they are written
    (under $DESTDIR)."""

    def __init__(self, root: str, name: str) -> None:
        self.root = root
        self.name = name
        self.unit_instance = f"stormfs@{name}.service"
        self.key = f"{ETC}/{name}.key"
        self.conf = f"{ETC}/{name}.conf"
        self.dropin = f"{UNIT_DIR}/{self.unit_instance}.d/deploy.conf"

    def path(self, target_path: str) -> Path:
        return Path(self.root, target_path.lstrip("/"))

    @property
    def live(self) -> bool:
        """This root is the running system and systemd manages it."""
        return os.path.realpath(self.root) == "/" and os.path.isdir("/run/systemd/system")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="make deploy", description=__doc__.split("\n")[0])
    p.add_argument("--source", default="", help="the storage directory (SOURCE)")
    p.add_argument("--mountpoint", default="", help="where the plaintext view appears")
    p.add_argument("--name", default="", help="deployment name (systemd instance)")
    p.add_argument("--options", default="", help="mount options, comma-separated")
    args = p.parse_args(argv)
    for label, value in (("SOURCE", args.source), ("MOUNTPOINT", args.mountpoint)):
        if not value:
            raise DeployError(f"{label}= is required", USAGE)
        if _UNSAFE_IN_PATH.search(value):
            raise DeployError(
                f"{label}= must not contain quotes, '\\', '$', '%' or control characters", USAGE
            )
    if not _NAME.fullmatch(args.name):
        raise DeployError("NAME= is required: letters, digits, '_', '.', '-'", USAGE)
    if not _OPTIONS.fullmatch(args.options):
        raise DeployError("OPTIONS= must be comma-separated mount options", USAGE)
    args.source = os.path.abspath(args.source)
    args.mountpoint = os.path.abspath(args.mountpoint)
    if not os.path.isdir(args.source):
        raise DeployError(f"SOURCE {args.source} is not a directory", USAGE)
    src, mnt = os.path.realpath(args.source), os.path.realpath(args.mountpoint)
    if os.path.commonpath([src, mnt]) in (src, mnt):
        raise DeployError("SOURCE and MOUNTPOINT must not contain one another", USAGE)
    return args


def keyring_option(options: str) -> str | None:
    """The keyring file named in the mount options (keyring=PATH), if any."""
    for item in options.split(","):
        name, _, value = item.partition("=")
        if name == "keyring" and value:
            return value
    return None


def holds_key(target: Target, keyring: str | None, material: bytes) -> bool:
    """Whether the deployment's keyring file holds the key `material`."""
    if keyring is None:
        return False
    try:
        found = keys.read_keyring_file(str(target.path(keyring)))
    except keys.InvalidKey as e:
        raise DeployError(str(e), USAGE) from None
    return any(key.material == material for _, key in found)


def resolve_key(
    target: Target, environ: dict[str, str], keyring: str | None
) -> tuple[str | None, bool, bool]:
    """The key text to deploy, whether a key is already deployed, and whether the
    given key replaces it.

    A given key must be the deployed one, if there is one: a different key is
    a mismatch and stops the deployment before anything is written, unless
    the keyring holds the deployed key (a rotation).
    """
    given = environ.get(keys.ENV_KEY) or None
    deployed_path = target.path(target.key)
    deployed = None
    if deployed_path.exists():
        try:
            deployed = keys.read_key_file(str(deployed_path))
            deployed_material = keys.parse_key(deployed)
        except keys.InvalidKey as e:
            raise DeployError(f"the deployed key is unusable: {e}", USAGE) from None
    if given is None:
        if deployed is not None:
            say(f"keeping the key already deployed for {target.name} ({target.key})")
        return deployed, deployed is not None, False
    try:
        given_material = keys.parse_key(given)
    except keys.InvalidKey as e:
        raise DeployError(f"${keys.ENV_KEY}: {e}", USAGE) from None
    rotated = deployed is not None and given_material != deployed_material
    if rotated and not holds_key(target, keyring, deployed_material):
        raise DeployError(keycheck.MISMATCH, KEY_SAFETY)
    return given.strip(), deployed is not None, rotated


def resolve_key_id(target: Target, environ: dict[str, str]) -> str:
    """$STORMCLOUD_ENCRYPTION_KEY_ID, else the deployed one, else 1."""
    given = environ.get(keys.ENV_KEY_ID)
    if not given:
        given = read_conf(target.path(target.conf)).get(keys.ENV_KEY_ID)
    try:
        return keys.parse_key_id(given)
    except keys.InvalidKey as e:
        raise DeployError(f"${keys.ENV_KEY_ID}: {e}", USAGE) from None


def run_checks(
    source: str, key: str | None, key_file: Path | None, key_id: str, keyring: Path | None
) -> None:
    """`stormfs check` in a child process, the key in its environment only."""
    env = {k: v for k, v in os.environ.items() if k not in (keys.ENV_KEY, keys.ENV_CREDENTIALS)}
    env[keys.ENV_KEY_ID] = key_id
    cmd = [sys.executable, "-m", "stormfs", "check", source]
    if keyring is not None:
        cmd += ["--keyring", str(keyring)]
    if key_file is not None:
        cmd += ["--key-file", str(key_file)]
    elif key is not None:
        env[keys.ENV_KEY] = key
    proc = subprocess.run(cmd, env=env, cwd=REPO, stdin=subprocess.DEVNULL)
    if proc.returncode != OK:
        raise DeployError("", proc.returncode)


def install_software(target: Target) -> bool:
    """The virtualenv under /opt/stormfs and the command's symlink; True if
    anything changed.  Skipped when the installed copy is of this source."""
    prefix = target.path(PREFIX)
    stamp = prefix / ".source-sha256"
    digest = source_digest()
    changed = False
    if not (stamp.exists() and stamp.read_text() == digest):
        say(f"installing stormfs into {PREFIX}")
        if not (prefix / "bin" / "python").exists():
            subprocess.run([PYTHON, "-m", "venv", str(prefix)], check=True)
        pip = [str(prefix / "bin" / "python"), "-m", "pip", "install", "--quiet"]
        subprocess.run([*pip, str(REPO)], check=True, cwd=REPO)
        # Same version number, new code: replace the package itself.
        subprocess.run([*pip, "--force-reinstall", "--no-deps", str(REPO)], check=True, cwd=REPO)
        write_file(stamp, digest.encode(), 0o644)
        changed = True
    link = target.path(BIN_LINK)
    link_to = f"{PREFIX}/bin/stormfs"
    if not (link.is_symlink() and os.readlink(link) == link_to):
        link.parent.mkdir(parents=True, exist_ok=True)
        tmp = link.with_name(f".{link.name}.tmp-{os.getpid()}")
        os.symlink(link_to, tmp)
        os.replace(tmp, link)
        changed = True
    return changed


def source_digest() -> str:
    h = hashlib.sha256()
    for path in [REPO / "pyproject.toml", *sorted((REPO / "stormfs").glob("*.py"))]:
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def conf_text(args: argparse.Namespace, key_id: str) -> str:
    options = f"-o {args.options}" if args.options else ""
    values = {
        "SOURCE": args.source,
        "MOUNTPOINT": args.mountpoint,
        "STORMFS_OPTIONS": options,
        keys.ENV_KEY_ID: key_id,
    }
    lines = [f"# stormfs deployment {args.name}: written by make deploy, re-run it to change."]
    lines += [f"{k}={systemd_quote(v)}" for k, v in values.items()]
    return "\n".join(lines) + "\n"


def systemd_quote(value: str) -> str:
    """A value for an EnvironmentFile= line (paths are free of characters that
    systemd would expand or unquote, see _UNSAFE_IN_PATH)."""
    return f'"{value}"'


def read_conf(path: Path) -> dict[str, str]:
    """Values of a conf file this script wrote (its own quoting only)."""
    values = {}
    if path.exists():
        for line in path.read_text().splitlines():
            name, sep, value = line.partition("=")
            if sep and not line.startswith("#"):
                values[name] = value.removeprefix('"').removesuffix('"')
    return values


def dropin_text(source: str, with_key: bool) -> str:
    text = f'[Unit]\nRequiresMountsFor="{source}"\n'
    if not with_key:
        # A pass-through deployment has no key file for LoadCredential= to load.
        text += "\n[Service]\nLoadCredential=\n"
    return text


def write_file(path: Path, data: bytes, mode: int) -> bool:
    """Atomically replace `path` with `data` unless it already holds exactly
    that; True if written."""
    if path.exists() and path.read_bytes() == data and (path.stat().st_mode & 0o777) == mode:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    dir_fd = open_dir(path.parent)
    try:
        write_atomically(dir_fd, path.name, data, mode=mode)
    finally:
        os.close(dir_fd)
    return True


def write_config(
    target: Target, args: argparse.Namespace, key: str | None, key_id: str, *, rotated: bool
) -> bool:
    etc = target.path(ETC)
    etc.mkdir(parents=True, exist_ok=True)
    os.chmod(etc, 0o700)
    changed = False
    if key is not None:
        key_path = target.path(target.key)
        if not key_path.exists() or rotated:
            changed |= write_file(key_path, (key + "\n").encode("ascii"), 0o600)
            say(f"key written to {target.key} (root only)")
    changed |= write_file(target.path(target.conf), conf_text(args, key_id).encode(), 0o600)
    unit = (REPO / "systemd" / UNIT).read_bytes()
    changed |= write_file(target.path(f"{UNIT_DIR}/{UNIT}"), unit, 0o644)
    dropin = dropin_text(args.source, key is not None).encode()
    changed |= write_file(target.path(target.dropin), dropin, 0o644)
    return changed


def manual_command(target: Target, args: argparse.Namespace, key_id: str, key: bool) -> str:
    words = [BIN_LINK, "mount"]
    if key:
        words += ["--key-file", target.key]
    words += [args.source, args.mountpoint]
    if args.options:
        words += ["-o", args.options]
    prefix = f"{keys.ENV_KEY_ID}={shlex.quote(key_id)} " if key and key_id != "1" else ""
    return prefix + shlex.join(words)


def systemctl(*args: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["systemctl", *args], check=check, stdin=subprocess.DEVNULL)


def start_service(target: Target, changed: bool) -> None:
    systemctl("daemon-reload")
    systemctl("enable", "--quiet", target.unit_instance)
    active = systemctl("is-active", "--quiet", target.unit_instance, check=False).returncode == 0
    if changed or not active:
        say(f"{'restarting' if active else 'starting'} {target.unit_instance}")
        if systemctl("restart", target.unit_instance, check=False).returncode != 0:
            raise DeployError(
                f"{target.unit_instance} did not start; see: journalctl -u {target.unit_instance}",
                MOUNT_FAILED,
            )
    say(f"{target.unit_instance} is running: {target.name} is mounted")


def deploy(argv: list[str], environ: dict[str, str]) -> int:
    args = parse_args(argv)
    target = Target(environ.get("DESTDIR") or "/", args.name)
    keyring = keyring_option(args.options)
    key, deployed, rotated = resolve_key(target, environ, keyring)
    key_id = resolve_key_id(target, environ)
    key_file = target.path(target.key) if deployed and not rotated else None
    ring = target.path(keyring) if keyring is not None else None
    run_checks(args.source, key, key_file, key_id, ring)
    changed = install_software(target)
    changed |= write_config(target, args, key, key_id, rotated=rotated)
    os.makedirs(args.mountpoint, exist_ok=True)
    if target.live:
        start_service(target, changed)
        return OK
    if shutil.which("systemctl"):
        # --root: work on the unit files alone, with no service manager to ask.
        systemctl("--root", target.root, "enable", "--quiet", target.unit_instance)
        say(f"{target.unit_instance} is installed and enabled")
    else:
        say(f"{target.unit_instance} is installed (no systemctl here to enable it)")
    say("systemd is not running here, so the service was not started.")
    say("Start the mount by hand with:")
    print(f"  {manual_command(target, args, key_id, key is not None)}", flush=True)
    return OK


def main() -> int:
    environ = dict(os.environ)
    # Only `stormfs check` gets the key (run_checks); pip, venv and systemctl do not.
    os.environ.pop(keys.ENV_KEY, None)
    try:
        return deploy(sys.argv[1:], environ)
    except DeployError as e:
        if e.exit_code == KEY_SAFETY and str(e):
            print(e, file=sys.stderr)
        elif str(e):
            print(f"deploy: error: {e}", file=sys.stderr)
        return e.exit_code
    except subprocess.CalledProcessError as e:
        print(f"deploy: error: {shlex.join(map(str, e.cmd))} failed", file=sys.stderr)
        return MOUNT_FAILED


if __name__ == "__main__":
    sys.exit(main())
