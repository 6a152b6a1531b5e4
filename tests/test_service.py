"""The service as systemd would run it, and the fstab form through mount(8).

systemd is not PID 1 here, so the tests do its part by hand, the way it is
specified: read the deployment's EnvironmentFile, hand the key over in a
credentials directory, give a NOTIFY_SOCKET, expand the unit's own Exec*
lines and run them with the program `make deploy` installed.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from stormfs import keys

from .deployment import REPO, Deployment
from .helpers import force_unmount, is_mounted
from .keyscan import leaked_in, new_key, run

pytestmark = pytest.mark.fuse  # every test here mounts, as the unit would

UNIT = REPO / "systemd" / "stormfs@.service"
READY_TIMEOUT = 20.0
STOP_TIMEOUT = 30.0


def environment_file(path: Path) -> dict[str, str]:
    """KEY="value" lines, as make deploy writes them."""
    values = {}
    for line in path.read_text().splitlines():
        name, sep, value = line.partition("=")
        if sep and not line.startswith("#"):
            values[name] = value.removeprefix('"').removesuffix('"')
    return values


def unit_command(setting: str, env: dict[str, str]) -> list[str]:
    """The unit's `setting=` command line with systemd's expansion: `${X}` is
    one word, a bare `$X` splits into words; a leading `-` only means that
    failure is ignored."""
    lines = [
        line.partition("=")[2]
        for line in UNIT.read_text().splitlines()
        if line.startswith(f"{setting}=")
    ]
    assert len(lines) == 1, setting
    words: list[str] = []
    for word in lines[0].removeprefix("-").split():
        if word.startswith("$") and not word.startswith("${"):
            words += env[word[1:]].split()
        else:
            for name, value in env.items():
                word = word.replace("${" + name + "}", value)
            words.append(word)
    return words


def installed(root: Path, program: str) -> str:
    """Where `program` (a path on the deployed system) lives: under `root` if
    make deploy put it there, else on this host (system programs)."""
    path = root / program.lstrip("/")
    if not os.path.lexists(path):
        return program
    while path.is_symlink():
        path = root / os.readlink(path).lstrip("/")
    return str(path)


def decrypt(source: Path, name: str, key: str) -> bytes:
    data = (source / name).read_bytes()
    return AESGCM(keys.parse_key(key)).decrypt(data[1:13], data[13:], None)


class Service:
    """stormfs@NAME.service started by hand from the deployed files."""

    def __init__(self, root: Path, d: Deployment, work: Path, key: str) -> None:
        self.root, self.d, self.key = root, d, key
        self.log = work / "service.log"
        creds = work / "credentials"
        creds.mkdir(mode=0o700)
        # What LoadCredential= does: a read-only copy only the service can read.
        shutil.copy(d.etc(".key"), creds / keys.CREDENTIAL_NAME)
        os.chmod(creds / keys.CREDENTIAL_NAME, 0o400)
        self.notify_path = str(work / "notify.sock")
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(self.notify_path)
        self.env = {
            "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "CREDENTIALS_DIRECTORY": str(creds),
            "NOTIFY_SOCKET": self.notify_path,
            **environment_file(d.etc(".conf")),
        }
        self.procs: list[subprocess.Popen[bytes]] = []

    def command(self, setting: str) -> list[str]:
        words = unit_command(setting, self.env)
        return [installed(self.root, words[0]), *words[1:]]

    def start(self) -> subprocess.Popen[bytes]:
        with open(self.log, "ab") as log:
            proc = subprocess.Popen(
                self.command("ExecStart"),
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.procs.append(proc)
        return proc

    def wait_ready(self, proc: subprocess.Popen[bytes]) -> str:
        """The first notification; the mount must answer by the time it comes."""
        deadline = time.monotonic() + READY_TIMEOUT
        self.notify.settimeout(0.1)
        while True:
            try:
                message = self.notify.recv(4096).decode()
                break
            except TimeoutError:
                if proc.poll() is not None:
                    pytest.fail(f"daemon exited {proc.returncode}:\n{self.log.read_text()}")
                if time.monotonic() > deadline:
                    pytest.fail(f"no READY=1 within {READY_TIMEOUT}s:\n{self.log.read_text()}")
        assert is_mounted(self.d.mountpoint), "READY=1 came before the mount"
        os.listdir(self.d.mountpoint)  # answers, served by this daemon
        return message

    def stop(self, proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> int:
        proc.send_signal(sig)
        return proc.wait(STOP_TIMEOUT)

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        if is_mounted(self.d.mountpoint):
            force_unmount(self.d.mountpoint)
        self.notify.close()


@pytest.fixture
def service(destdir, tmp_path):
    d = Deployment(destdir, tmp_path, tmp_path.name)  # one deployment per test
    key = new_key()
    proc = d.deploy(key)
    assert proc.returncode == 0, proc.stderr
    s = Service(destdir, d, tmp_path, key)
    yield s
    s.close()
    assert not leaked_in(s.log.read_text()), "key material in the service log"


def test_ready_after_mount_and_sigterm_commits(service):
    d, key = service.d, service.key
    proc = service.start()
    assert service.wait_ready(proc) == f"READY=1\nSTATUS=mounted {d.mountpoint}"

    (d.mountpoint / "closed.txt").write_bytes(b"written and closed\n")
    # Still open when the service is stopped: SIGTERM must commit it too.
    fd = os.open(d.mountpoint / "open.txt", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"still open at SIGTERM\n")
        assert service.stop(proc) == 0, service.log.read_text()
    finally:
        try:
            os.close(fd)
        except OSError as e:
            assert e.errno in (errno.ENOTCONN, errno.EIO, errno.EBADF)
    assert not is_mounted(d.mountpoint)
    assert decrypt(d.source, "closed.txt", key) == b"written and closed\n"
    assert decrypt(d.source, "open.txt", key) == b"still open at SIGTERM\n"


def test_restart_after_a_crash_clears_the_dead_mount(service):
    d, key = service.d, service.key
    proc = service.start()
    service.wait_ready(proc)
    (d.mountpoint / "kept.txt").write_bytes(b"committed before the crash\n")
    service.stop(proc, signal.SIGKILL)
    with pytest.raises(OSError) as e:
        os.stat(d.mountpoint)
    assert e.value.errno == errno.ENOTCONN  # the dead mount systemd would meet

    pre = run(service.command("ExecStartPre"), env=service.env)
    assert pre.returncode == 0, pre.stderr
    assert not is_mounted(d.mountpoint)

    proc = service.start()
    service.wait_ready(proc)
    assert (d.mountpoint / "kept.txt").read_bytes() == b"committed before the crash\n"
    assert service.stop(proc) == 0
    assert decrypt(d.source, "kept.txt", key) == b"committed before the crash\n"


def test_key_safety_refusal_is_not_retried(service):
    """A different key in the credential: exit 3, which the unit does not restart."""
    other = new_key()
    cred = Path(service.env["CREDENTIALS_DIRECTORY"]) / keys.CREDENTIAL_NAME
    os.chmod(cred, 0o600)
    cred.write_text(other)
    os.chmod(cred, 0o400)
    proc = service.start()
    assert proc.wait(READY_TIMEOUT) == 3
    assert "FATAL: Encryption key mismatch detected!" in service.log.read_text()
    assert not is_mounted(service.d.mountpoint)


def test_a_mount_the_system_cannot_see_is_refused(tmp_path):
    """Started for a service manager in a mount namespace of its own (what a
    unit's ProtectSystem= or PrivateTmp= does), the daemon fails instead of
    reporting "mounted": programs outside would write to the plain directory."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare (util-linux) is not installed")
    source, mnt = tmp_path / "source", tmp_path / "mnt"
    source.mkdir()
    mnt.mkdir()
    notify_path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(notify_path)
        sock.setblocking(False)
        proc = run(
            [
                "unshare",
                "--mount",
                "--propagation",
                "private",
                sys.executable,
                "-m",
                "stormfs",
                "mount",
                "--foreground",
                str(source),
                str(mnt),
            ],
            env={keys.ENV_KEY: new_key(), "NOTIFY_SOCKET": notify_path},
            timeout=READY_TIMEOUT + STOP_TIMEOUT,
        )
        with pytest.raises(BlockingIOError):
            sock.recv(4096)  # not a word to the service manager
    assert proc.returncode == 4, proc.stderr
    assert (
        f"stormfs: MOUNTPOINT {mnt} is not mounted as the system sees it: this daemon "
        "runs in a mount namespace of its own" in proc.stderr
    )
    assert not is_mounted(mnt)
    assert os.listdir(mnt) == []


# -- /etc/fstab: mount -t fuse.stormfs ---------------------------------------

# mount(8) runs mount.fuse3, which runs `stormfs SOURCE MOUNTPOINT -o OPTS`
# with a fixed PATH.  The driver runs in a private mount namespace where
# /usr/local/bin holds this checkout's `stormfs`, so the host is untouched.
FSTAB_DRIVER = r"""
import json, os, subprocess, sys
source, mnt, key_file, stormfs, bindir = sys.argv[1:]
os.symlink(stormfs, os.path.join(bindir, "stormfs"))
subprocess.run(["mount", "--bind", bindir, "/usr/local/bin"], check=True)
options = f"key_file={key_file},allow_other,nofail,_netdev,x-systemd.automount,noatime"
result = {}
try:
    p = subprocess.run(["mount", "-t", "fuse.stormfs", source, mnt, "-o", options],
                       capture_output=True, text=True, timeout=60)
    result["mount"] = [p.returncode, p.stdout + p.stderr]
    with open("/proc/self/mounts") as f:
        result["types"] = [line.split()[2] for line in f if line.split()[1] == mnt]
    if result["types"]:
        with open(os.path.join(mnt, "hello.txt"), "w") as f:
            f.write("through fstab\n")
        with open(os.path.join(mnt, "hello.txt")) as f:
            result["read"] = f.read()
finally:
    result["umount"] = subprocess.run(["umount", mnt], capture_output=True, text=True,
                                      timeout=60).returncode
    if result["umount"] != 0:
        subprocess.run(["fusermount3", "-u", "-z", mnt], capture_output=True, timeout=30)
print(json.dumps(result))
"""


def daemons_for(source: Path) -> list[int]:
    """Pids of stormfs daemons serving `source` (a path unique to the test)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmdline = Path("/proc", entry, "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if str(source).encode() in cmdline and any(b"stormfs" in w for w in cmdline):
                pids.append(int(entry))
    return pids


def test_mount_t_fuse_stormfs(tmp_path):
    if shutil.which("unshare") is None:
        pytest.skip("unshare (util-linux) is not installed")
    key = new_key()
    source, mnt, bindir = tmp_path / "source", tmp_path / "mnt", tmp_path / "bin"
    for path in (source, mnt, bindir):
        path.mkdir()
    key_file = tmp_path / "fstab.key"
    key_file.write_text(key + "\n")
    os.chmod(key_file, 0o600)
    stormfs = Path(sys.executable).parent / "stormfs"
    try:
        proc = run(
            [
                "unshare",
                "--mount",
                "--propagation",
                "private",
                sys.executable,
                "-c",
                FSTAB_DRIVER,
                str(source),
                str(mnt),
                str(key_file),
                str(stormfs),
                str(bindir),
            ],
            timeout=180,
        )
        assert proc.returncode == 0, proc.stderr
        result = json.loads(proc.stdout.splitlines()[-1])
        # A first mount of SOURCE: the NOTICE, on the terminal that ran mount(8).
        assert result["mount"] == [
            0,
            "NOTICE: Server-side encryption being enabled for the first time.\n"
            "SAVE YOUR ENCRYPTION KEY NOW:\n"
            f"  STORMCLOUD_ENCRYPTION_KEY={key[:16]}...\n"
            "Store this in your password manager. Losing this key = losing your files.\n",
        ]
        assert result["types"] == ["fuse.stormfs"]
        assert result["read"] == "through fstab\n"
        assert result["umount"] == 0
        deadline = time.monotonic() + STOP_TIMEOUT
        while daemons_for(source) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert daemons_for(source) == []
        assert decrypt(source, "hello.txt", key) == b"through fstab\n"
    finally:
        for pid in daemons_for(source):
            os.kill(pid, signal.SIGKILL)
