"""The deployed service under a real systemd: Debian 12, systemd 252 booted as
PID 1 of a container (tests/container.py), `make deploy` run in it the way an
operator would, and every check made from outside the service, in the
system's mount namespace: where applications are.

One container for the module; the tests run in order on its one deployment
(`make test-systemd`, CI runs it after `make test`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from stormfs import keys

from . import container
from .container import SRC, WHEELS, CannotBoot, Container
from .deployment import REPO
from .keyscan import leaked_in, new_key

pytestmark = [pytest.mark.systemd, pytest.mark.timeout(600)]

NAME = "t"
UNIT = f"stormfs@{NAME}.service"
SOURCE, MOUNTPOINT = "/srv/s", "/srv/m"
KEY_FILE = f"/etc/stormfs/{NAME}.key"
# pip in the container installs from the wheels built on this host, and only them.
PIP_ENV = {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": WHEELS, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
MISMATCH = (
    "FATAL: Encryption key mismatch detected!\n"
    "Server has encrypted files with a different key.\n"
    "Deployment blocked to prevent data loss.\n"
)


@pytest.fixture(scope="module")
def box() -> Iterator[Container]:
    try:
        base = container.rootfs()
    except CannotBoot as e:
        pytest.skip(f"cannot boot a systemd container here: {e}")
    # Not under pytest's basetemp: another pytest run of root on this machine
    # may clean up old basetemps, this one included, while it is in use.
    work = Path(tempfile.mkdtemp(prefix="stormfs-test-systemd-", dir="/var/tmp"))
    try:
        container.build_wheels(REPO, work / "wheels")
        c = Container(base, work, work / "wheels", f"stormfs-test-{os.getpid()}")
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    try:
        try:
            state = c.wait_booted()
        except CannotBoot as e:
            pytest.skip(f"cannot boot a systemd container here: {e}")
        assert state in ("running", "degraded"), f"boot ended {state!r}"
        container.copy_checkout(REPO, c.host_path(SRC))
        # What `make install` leaves (minus the dev tools), from the wheels: the
        # virtualenv `make deploy` runs tools/deploy.py with, and the stamps that
        # say the Debian packages and the virtualenv are in place.
        proc = c.sh(
            f"cd {SRC} && python3 -m venv .venv && .venv/bin/pip install --quiet -e . "
            "&& touch .venv/.system-packages && touch .venv/.python-packages",
            env=PIP_ENV,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr
        assert c.run(["mkdir", "-p", SOURCE]).returncode == 0
        yield c
    finally:
        c.close()
        shutil.rmtree(work, ignore_errors=True)


@pytest.fixture(scope="module")
def service_key() -> str:
    return new_key()


def deploy(c: Container, key: str | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(PIP_ENV)
    if key is not None:
        env[keys.ENV_KEY] = key
    return c.run(
        [
            "make",
            "--no-print-directory",
            "-C",
            SRC,
            "deploy",
            f"SOURCE={SOURCE}",
            f"MOUNTPOINT={MOUNTPOINT}",
            f"NAME={NAME}",
        ],
        env=env,
        timeout=600,
    )


def prop(c: Container, name: str, unit: str = UNIT) -> str:
    return c.run(["systemctl", "show", "-p", name, "--value", unit], echo=False).stdout.strip()


def system_mounts(c: Container, mountpoint: str) -> list[str]:
    """`FSTYPE SOURCE` of each mount at `mountpoint` in the system's mount
    namespace (PID 1's), as findmnt lists them."""
    proc = c.run(["findmnt", "-n", "-o", "FSTYPE,SOURCE", "--mountpoint", mountpoint])
    return proc.stdout.split("\n")[:-1] if proc.returncode == 0 else []


def cursor(c: Container) -> str:
    out = c.run(["journalctl", "-n", "0", "--show-cursor", "-q"], echo=False).stdout
    return out.strip().removeprefix("-- cursor: ")


def journal_since(c: Container, after: str, unit: str = UNIT) -> str:
    c.run(["journalctl", "--sync"], echo=False)
    args = ["journalctl", "-u", unit, "-o", "cat", "--no-pager", f"--after-cursor={after}"]
    return c.run(args, echo=False).stdout


def wait_until(what: str, predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        time.sleep(0.2)


def envelope(c: Container, path: str, plaintext: bytes, key: str) -> bytes:
    """The file at `path` in SOURCE, once it is the envelope of `plaintext`
    (release is asynchronous), decrypted by the plain recipe of the README."""
    host = c.host_path(path)
    wait_until(
        f"{path} committed",
        lambda: host.exists() and host.stat().st_size == len(plaintext) + 29,
        timeout=15,
    )
    data = host.read_bytes()
    assert data[:1] == b"\x01"
    return AESGCM(keys.parse_key(key)).decrypt(data[1:13], data[13:], None)


def underneath(c: Container, mountpoint: str = MOUNTPOINT) -> list[str]:
    """What is in the directory MOUNTPOINT itself, underneath the mount."""
    return sorted(os.listdir(c.host_path(mountpoint)))


DAEMONS = r"""
import os, sys
for pid in filter(str.isdigit, os.listdir("/proc")):
    if int(pid) == os.getpid():
        continue
    try:
        words = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
    except OSError:
        continue
    if sys.argv[1].encode() in words and any(b"stormfs" in w for w in words):
        print(pid)
"""


def daemons(c: Container, source: str) -> list[str]:
    """PIDs of stormfs processes serving `source`, in the container."""
    return c.run(["python3", "-c", DAEMONS, source]).stdout.split()


@contextlib.contextmanager
def open_for_writing(c: Container, path: str, data: str) -> Iterator[None]:
    """A process outside the service holding `path` open after writing `data`;
    killed by PID on the way out."""
    proc = subprocess.Popen(
        [
            "nsenter",
            "-t",
            str(c.leader),
            "-a",
            "sh",
            "-c",
            f'exec 3>"{path}" && printf %s "{data}" >&3 && echo written && exec sleep 600',
        ],
        env={"PATH": container.PATH},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "written\n"
        yield
    finally:
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
        with contextlib.suppress(OSError):
            for child in children.read_text().split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(child), signal.SIGKILL)
        proc.kill()
        proc.wait(30)


# -- the tests, in order, on one deployment ------------------------------------


def test_make_deploy_installs_enables_and_starts(box, service_key):
    assert prop(box, "LoadState") == "not-found"  # a fresh system
    proc = deploy(box, service_key)
    assert proc.returncode == 0, proc.stderr
    assert "NOTICE: Server-side encryption being enabled for the first time." in proc.stdout
    assert f"deploy: starting {UNIT}\n" in proc.stdout
    assert proc.stdout.endswith(f"deploy: {UNIT} is running: {NAME} is mounted\n")
    assert box.run(["systemctl", "is-enabled", UNIT]).stdout == "enabled\n"
    assert prop(box, "ActiveState") == "active"
    assert prop(box, "StatusText") == f"mounted {MOUNTPOINT}"


def test_mount_is_in_the_system_mount_namespace(box):
    assert system_mounts(box, MOUNTPOINT) == [f"fuse.stormfs {SOURCE}"]
    main = prop(box, "MainPID")
    same = box.sh(f"readlink /proc/1/ns/mnt /proc/{main}/ns/mnt | uniq | wc -l")
    assert same.stdout == "1\n", "the daemon runs in a mount namespace of its own"
    # Another process sees the view, served by the daemon.
    proc = box.sh(f"printf 'a view' > {MOUNTPOINT}/seen.txt && cat {MOUNTPOINT}/seen.txt")
    assert (proc.returncode, proc.stdout) == (0, "a view")


def test_a_write_from_a_shell_lands_encrypted_in_source(box, service_key):
    text = b"written by a shell outside the service\n"
    proc = box.sh(f"printf '%s\\n' '{text.decode().strip()}' > {MOUNTPOINT}/outside.txt")
    assert proc.returncode == 0, proc.stderr
    assert envelope(box, f"{SOURCE}/outside.txt", text, service_key) == text
    assert underneath(box) == [], "files landed in the directory under MOUNTPOINT"


def test_restart_commits_pending_writes_and_mounts_again(box, service_key):
    before = prop(box, "MainPID")
    with open_for_writing(box, f"{MOUNTPOINT}/pending.txt", "open at restart"):
        proc = box.run(["systemctl", "restart", UNIT], timeout=180)
        assert proc.returncode == 0, proc.stderr
    assert envelope(box, f"{SOURCE}/pending.txt", b"open at restart", service_key)
    assert prop(box, "MainPID") not in ("0", before)
    assert system_mounts(box, MOUNTPOINT) == [f"fuse.stormfs {SOURCE}"]
    assert box.run(["cat", f"{MOUNTPOINT}/pending.txt"]).stdout == "open at restart"
    assert underneath(box) == []


def test_stop_commits_pending_writes_and_leaves_no_mount(box, service_key):
    try:
        with open_for_writing(box, f"{MOUNTPOINT}/at-stop.txt", "open at stop"):
            proc = box.run(["systemctl", "stop", UNIT], timeout=180)
            assert proc.returncode == 0, proc.stderr
        assert prop(box, "ActiveState") == "inactive"
        assert system_mounts(box, MOUNTPOINT) == []
        assert envelope(box, f"{SOURCE}/at-stop.txt", b"open at stop", service_key)
        assert underneath(box) == []
    finally:
        box.run(["systemctl", "start", UNIT], timeout=180)
    assert box.run(["cat", f"{MOUNTPOINT}/at-stop.txt"]).stdout == "open at stop"


def test_kill_9_is_restarted_and_the_dead_mount_cleared(box):
    main = prop(box, "MainPID")
    restarts = int(prop(box, "NRestarts"))
    assert box.sh(f"kill -9 {main}").returncode == 0

    def back() -> bool:
        return prop(box, "MainPID") not in ("0", main) and prop(box, "ActiveState") == "active"

    wait_until(f"{UNIT} restarted", back, timeout=60)
    assert int(prop(box, "NRestarts")) == restarts + 1
    # One mount, the new one: the dead one was cleared, not stacked under it.
    assert system_mounts(box, MOUNTPOINT) == [f"fuse.stormfs {SOURCE}"]
    proc = box.run(["cat", f"{MOUNTPOINT}/outside.txt"])
    assert proc.stdout == "written by a shell outside the service\n"


def test_a_wrong_key_fails_with_the_mismatch_text_and_is_not_retried(box):
    key_file = box.host_path(KEY_FILE)
    right = key_file.read_bytes()
    assert box.run(["systemctl", "stop", UNIT], timeout=180).returncode == 0
    # The starts of the tests before count towards the unit's start limit.
    box.run(["systemctl", "reset-failed", UNIT])
    try:
        key_file.write_text(new_key() + "\n")
        mark = cursor(box)
        proc = box.run(["systemctl", "start", UNIT], timeout=180)
        assert proc.returncode != 0
        time.sleep(3 * 2 + 1)  # three times RestartSec: a restart would have come
        assert prop(box, "ActiveState") == "failed"
        assert prop(box, "ExecMainStatus") == "3"
        assert prop(box, "NRestarts") == "0"
        log = journal_since(box, mark)
        assert MISMATCH in log
        assert log.count("FATAL: Encryption key mismatch detected!") == 1
        assert system_mounts(box, MOUNTPOINT) == []
    finally:
        key_file.write_bytes(right)
        box.run(["systemctl", "reset-failed", UNIT])
        box.run(["systemctl", "start", UNIT], timeout=180)
    assert prop(box, "ActiveState") == "active"


def test_a_second_deploy_without_a_key_keeps_the_deployed_key(box, service_key):
    key_file = box.host_path(KEY_FILE)
    assert key_file.read_text() == service_key + "\n"
    proc = deploy(box)
    assert proc.returncode == 0, proc.stderr
    said = proc.stdout.partition("\n")[2]  # after the command line make echoes
    assert said.startswith(
        f"deploy: keeping the key already deployed for {NAME} ({KEY_FILE})\n"
        f"OK: {SOURCE} can be mounted encrypted with key id 1\n"
    )
    assert "NOTICE" not in proc.stdout
    assert key_file.read_text() == service_key + "\n"
    assert prop(box, "ActiveState") == "active"
    proc = box.run(["cat", f"{MOUNTPOINT}/outside.txt"])
    assert proc.stdout == "written by a shell outside the service\n"


def test_the_key_appears_nowhere(box, service_key):
    main = prop(box, "MainPID")
    places = {
        "systemctl show": box.run(["systemctl", "show", UNIT], echo=False).stdout,
        "the journal": box.run(["journalctl", "-b", "-o", "verbose"], echo=False).stdout,
        "environ": box.run(["cat", f"/proc/{main}/environ"], echo=False).stdout,
        "cmdline": box.run(["cat", f"/proc/{main}/cmdline"], echo=False).stdout,
    }
    assert "CREDENTIALS_DIRECTORY=" in places["environ"]
    assert f"mount --foreground {SOURCE} {MOUNTPOINT}" in places["cmdline"].replace("\0", " ")
    assert "stormfs" in places["the journal"]
    assert [place for place, text in places.items() if leaked_in(text)] == []


# A program that uses the view as applications do: each kind of operation the
# README promises, through the service's mount.  The unit's system call filter
# must let every one of them through to SOURCE.
WORKLOAD = r"""
import mmap, os, sys
m = sys.argv[1]
os.mkdir(f"{m}/dir")
with open(f"{m}/dir/a", "wb") as f:
    f.write(b"0123456789")
    f.flush()
    os.fsync(f.fileno())
with open(f"{m}/dir/a", "r+b") as f:
    f.seek(4)
    f.write(b"xx")
    f.truncate(8)
with open(f"{m}/dir/a", "ab") as f:
    f.write(b"++")
with open(f"{m}/dir/a", "r+b") as f, mmap.mmap(f.fileno(), 0) as mm:
    mm[0:1] = b"M"
    mm.flush()
os.rename(f"{m}/dir/a", f"{m}/dir/b")
with open(f"{m}/dir/c", "w") as f:
    f.write("replaced")
os.rename(f"{m}/dir/c", f"{m}/dir/b2")
os.link(f"{m}/dir/b", f"{m}/dir/b-link")
os.symlink("b", f"{m}/dir/b-sym")
os.chmod(f"{m}/dir/b", 0o640)
os.chown(f"{m}/dir/b", 1000, 1000)
os.utime(f"{m}/dir/b", (1_000_000_000, 1_000_000_000))
os.setxattr(f"{m}/dir/b", "user.color", b"blue")
os.mkfifo(f"{m}/dir/fifo")
fd = os.open(f"{m}/dir/gone", os.O_RDWR | os.O_CREAT)
os.unlink(f"{m}/dir/gone")
os.write(fd, b"unlinked but open")
os.close(fd)
os.statvfs(m)
st = os.stat(f"{m}/dir/b")
print(open(f"{m}/dir/b", "rb").read().decode(), open(f"{m}/dir/b-sym").read() ==
      open(f"{m}/dir/b-link").read(), oct(st.st_mode & 0o777), st.st_uid, int(st.st_mtime),
      os.getxattr(f"{m}/dir/b", "user.color").decode(),
      os.getxattr(f"{m}/dir/b", "user.stormfs.encryption_method").decode(),
      sorted(os.listdir(f"{m}/dir")))
"""


def test_posix_operations_through_the_service(box, service_key):
    mark = cursor(box)
    proc = box.run(["python3", "-c", WORKLOAD, MOUNTPOINT])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == (
        "M123xx67++ True 0o640 1000 1000000000 blue server ['b', 'b-link', 'b-sym', 'b2', 'fifo']\n"
    )
    assert envelope(box, f"{SOURCE}/dir/b", b"M123xx67++", service_key) == b"M123xx67++"
    assert underneath(box) == []
    log = journal_since(box, mark)
    assert "Traceback" not in log and "ERROR" not in log, log


@pytest.mark.parametrize(
    "option", ["ProtectKernelModules", "ProtectKernelLogs", "ProtectControlGroups"]
)
def test_a_private_mount_namespace_is_refused_not_reported_as_running(box, option):
    """Each of these gives the service a mount namespace of its own, where the
    mount would be invisible to applications: the daemon must fail loudly."""
    # In /etc: the host sees the container's root filesystem, not its /run (a tmpfs).
    dropin = box.host_path(f"/etc/systemd/system/{UNIT}.d/private.conf")
    dropin.parent.mkdir(parents=True, exist_ok=True)
    try:
        dropin.write_text(f"[Service]\n{option}=yes\n")
        assert box.run(["systemctl", "daemon-reload"]).returncode == 0
        mark = cursor(box)
        proc = box.run(["systemctl", "restart", UNIT], timeout=180)
        assert proc.returncode != 0, "the unit started with its mount hidden from the system"
        log = journal_since(box, mark)
        assert f"stormfs: MOUNTPOINT {MOUNTPOINT} is not mounted as the system sees it" in log
        assert prop(box, "StatusText") != f"mounted {MOUNTPOINT}"
        assert system_mounts(box, MOUNTPOINT) == []
        if option == "ProtectControlGroups":  # once is enough: the retries end
            wait_until("the start limit", lambda: prop(box, "ActiveState") == "failed", 90)
            assert "Start request repeated too quickly." in journal_since(box, mark)
            restarts = prop(box, "NRestarts")
            time.sleep(3 * 2 + 1)
            assert (prop(box, "ActiveState"), prop(box, "NRestarts")) == ("failed", restarts)
    finally:
        box.run(["systemctl", "stop", UNIT], timeout=180)
        dropin.unlink(missing_ok=True)
        box.run(["systemctl", "daemon-reload"])
        box.run(["systemctl", "reset-failed", UNIT])
        box.run(["systemctl", "start", UNIT], timeout=180)
    assert prop(box, "ActiveState") == "active"
    assert system_mounts(box, MOUNTPOINT) == [f"fuse.stormfs {SOURCE}"]


FSTAB_SOURCE, FSTAB_MOUNTPOINT = "/srv/s2", "/srv/m2"
FSTAB_KEY = "/etc/stormfs/fstab.key"
FSTAB_UNIT = "srv-m2.mount"


@pytest.fixture(scope="module")
def fstab_key() -> str:
    return new_key()


def test_an_fstab_line_mounts_through_the_generated_mount_unit(box, fstab_key):
    for path in (FSTAB_SOURCE, FSTAB_MOUNTPOINT):
        box.host_path(path).mkdir()
    key_file = box.host_path(FSTAB_KEY)
    key_file.write_text(fstab_key + "\n")
    key_file.chmod(0o600)
    with open(box.host_path("/etc/fstab"), "a") as f:
        f.write(f"{FSTAB_SOURCE} {FSTAB_MOUNTPOINT} fuse.stormfs key_file={FSTAB_KEY},nofail 0 0\n")
    assert box.run(["systemctl", "daemon-reload"]).returncode == 0
    assert prop(box, "SourcePath", FSTAB_UNIT) == "/etc/fstab"
    assert "local-fs.target" in prop(box, "WantedBy", FSTAB_UNIT).split()  # mounted at boot
    proc = box.run(["systemctl", "start", FSTAB_UNIT], timeout=180)
    assert proc.returncode == 0, proc.stderr
    assert system_mounts(box, FSTAB_MOUNTPOINT) == [f"fuse.stormfs {FSTAB_SOURCE}"]
    assert box.sh(f"printf 'via fstab' > {FSTAB_MOUNTPOINT}/f.txt").returncode == 0
    assert envelope(box, f"{FSTAB_SOURCE}/f.txt", b"via fstab", fstab_key) == b"via fstab"
    assert underneath(box, FSTAB_MOUNTPOINT) == []

    proc = box.run(["systemctl", "stop", FSTAB_UNIT], timeout=180)
    assert proc.returncode == 0, proc.stderr
    assert system_mounts(box, FSTAB_MOUNTPOINT) == []
    wait_until("the fstab mount's daemon exits", lambda: daemons(box, FSTAB_SOURCE) == [])


def test_after_a_reboot_the_service_and_the_fstab_mount_are_up(box, service_key, fstab_key):
    box.reboot()
    assert prop(box, "ActiveState") == "active"
    assert system_mounts(box, MOUNTPOINT) == [f"fuse.stormfs {SOURCE}"]
    assert system_mounts(box, FSTAB_MOUNTPOINT) == [f"fuse.stormfs {FSTAB_SOURCE}"]
    assert box.run(["cat", f"{MOUNTPOINT}/pending.txt"]).stdout == "open at restart"
    assert box.run(["cat", f"{FSTAB_MOUNTPOINT}/f.txt"]).stdout == "via fstab"
    assert underneath(box) == [] and underneath(box, FSTAB_MOUNTPOINT) == []
