"""Mount lifecycle: options, checks on SOURCE and MOUNTPOINT, serving, clean shutdown."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import signal
import stat
from collections.abc import Callable
from dataclasses import dataclass, field

import pyfuse3
import trio

from . import notify
from .fs import Operations
from .keys import Keyring
from .source import open_dir, write_atomically
from .stats import METRICS_INTERVAL, Stats, prometheus
from .store import Store

log = logging.getLogger(__name__)

# The mount table of PID 1's mount namespace: the system's, where applications are.
SYSTEM_MOUNTINFO = "/proc/1/mountinfo"

# Passed to the kernel as they are.
FUSE_OPTIONS = frozenset(
    {
        "allow_other",
        "allow_root",
        "default_permissions",
        "auto_unmount",
        "ro",
        "nosuid",
        "nodev",
        "noexec",
        "noatime",
    }
)
# mount(8), fstab and systemd generic options that mean nothing to a FUSE daemon.
IGNORED_OPTIONS = frozenset(
    {"rw", "defaults", "auto", "noauto", "nofail", "_netdev", "user", "users", "nouser"}
    | {"dev", "suid", "exec", "atime", "relatime", "strictatime", "async", "owner", "group"}
)


STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}
V2_WARNING = (
    "format=v2: new versions of files are written as v2, which the Storm Cloud server "
    "cannot read (stormfs encrypt --format v1 converts them back)"
)


class MountError(Exception):
    """The mount cannot be set up; the message says why and what to do."""


@dataclass
class MountOptions:
    fuse: set[str] = field(default_factory=set)
    key_file: str | None = None
    keyring: str | None = None
    entry_timeout: float = 1.0
    attr_timeout: float = 1.0
    # FUSE mounts get the kernel's default 128 KiB readahead: every 128 KiB of a
    # sequential read costs one request.  1 MiB cuts the requests eightfold.
    readahead_kb: int = 1024
    # Run metadata syscalls in threads too (for a SOURCE on a network filesystem).
    metadata_threads: bool = False
    # Counters in Prometheus' text format, rewritten every METRICS_INTERVAL seconds.
    metrics_file: str | None = None
    # The format new versions are written in: 1 (v1, what Storm Cloud reads) or 2.
    write_format: int = 1

    def describe(self) -> list[str]:
        """The options in effect, as `-o` would give them (the key file's path included,
        never its content)."""
        out = sorted(self.fuse)
        out += [f"entry_timeout={self.entry_timeout:g}", f"attr_timeout={self.attr_timeout:g}"]
        out.append(f"readahead_kb={self.readahead_kb}")
        out.append(f"format=v{self.write_format}")
        if self.metadata_threads:
            out.append("metadata_threads")
        if self.key_file:
            out.append(f"key_file={self.key_file}")
        if self.keyring:
            out.append(f"keyring={self.keyring}")
        if self.metrics_file:
            out.append(f"metrics_file={self.metrics_file}")
        return out

    @classmethod
    def parse(cls, specs: list[str]) -> MountOptions:
        """`-o a,b=c` strings; unknown options are refused, generic mount options ignored."""
        opts = cls()
        for spec in specs:
            for item in filter(None, (s.strip() for s in spec.split(","))):
                name, _, value = item.partition("=")
                if name in FUSE_OPTIONS and not value:
                    opts.fuse.add(name)
                elif name == "metadata_threads" and not value:
                    opts.metadata_threads = True
                elif name == "key_file" and value:
                    opts.key_file = value
                elif name == "keyring" and value:
                    opts.keyring = value
                elif name == "format" and value:
                    if value not in ("v1", "v2"):
                        raise MountError("option format needs v1 or v2")
                    opts.write_format = int(value[1])
                elif name == "metrics_file" and value:
                    opts.metrics_file = os.path.abspath(value)
                elif name in ("entry_timeout", "attr_timeout") and value:
                    try:
                        seconds = float(value)
                    except ValueError:
                        raise MountError(f"option {name} needs a number of seconds") from None
                    if seconds < 0:
                        raise MountError(f"option {name} cannot be negative")
                    setattr(opts, name, seconds)
                elif name == "readahead_kb" and value:
                    if not value.isdigit():
                        raise MountError("option readahead_kb needs a whole number of KiB")
                    opts.readahead_kb = int(value)
                elif name in ("fsname", "subtype"):
                    continue  # stormfs sets these itself
                elif name in IGNORED_OPTIONS or name.startswith(("x-", "comment")):
                    continue
                else:
                    raise MountError(f"unknown mount option: {item}")
        return opts


def check_paths(source: str, mountpoint: str) -> tuple[str, str]:
    """Both must be directories, MOUNTPOINT not inside SOURCE and not mounted already."""
    src = os.path.realpath(source)
    if not os.path.isdir(src):
        raise MountError(f"SOURCE {source} is not a directory")
    try:
        os.statvfs(mountpoint)  # never answered from a cache: a dead FUSE mount shows here
        st = os.stat(mountpoint)
    except OSError as e:
        if e.errno == errno.ENOTCONN:
            raise MountError(
                f"MOUNTPOINT {mountpoint} is a dead mount (its daemon stopped); "
                f"clear it with: fusermount3 -u -z {mountpoint}"
            ) from None
        raise MountError(f"MOUNTPOINT {mountpoint}: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise MountError(f"MOUNTPOINT {mountpoint} is not a directory")
    mnt = os.path.realpath(mountpoint)
    if os.path.ismount(mnt):
        raise MountError(f"MOUNTPOINT {mountpoint} is already a mount point")
    if mnt == src or mnt.startswith(src.rstrip("/") + "/"):
        raise MountError("MOUNTPOINT must not be inside SOURCE")
    return src, mnt


def serve(
    source: str,
    mountpoint: str,
    keyring: Keyring | None,
    opts: MountOptions,
    *,
    ready: Callable[[], None],
) -> None:
    """Mount, call `ready()` once the mount answers, serve until unmounted or signalled."""
    # The kernel applies the caller's umask to the modes it sends; ours must not mask again.
    os.umask(0)
    store = Store(source, keyring, write_v2=opts.write_format == 2)
    if opts.write_format == 2:
        log.warning(V2_WARNING)
    try:
        stats = Stats(
            source=source,
            mountpoint=mountpoint,
            options=opts.describe(),
            format=f"v{opts.write_format}",
            key_ids=keyring.key_ids() if keyring else [],
            current_key_id=keyring.current.key_id if keyring else None,
        )
        stats.listen(logging.getLogger("stormfs"))
        ops = Operations(
            store,
            entry_timeout=opts.entry_timeout,
            attr_timeout=opts.attr_timeout,
            metadata_threads=opts.metadata_threads,
            stats=stats,
        )
        fuse_opts = {
            *opts.fuse,
            "default_permissions",
            f"fsname={source}",
            "subtype=stormfs",
        }
        # From the moment the mount exists, a SIGTERM must unmount it: held back
        # until the handler that does so is in place (_stop_on_signal).
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            pyfuse3.init(ops, mountpoint, fuse_opts)
        except RuntimeError as e:
            raise MountError(f"cannot mount on {mountpoint}: {e}") from None
        refused: list[str] = []
        try:
            trio.run(_main, ops, mountpoint, opts, ready, refused)
        finally:
            pyfuse3.close(unmount=True)
            ops.close()
    finally:
        store.close()
    if refused:
        raise MountError(refused[0])
    log.info("unmounted %s", mountpoint)


async def _main(
    ops: Operations,
    mountpoint: str,
    opts: MountOptions,
    ready: Callable[[], None],
    refused: list[str],
) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_stop_on_signal)
        nursery.start_soon(_announce, mountpoint, opts, ready, refused)
        if opts.metrics_file:
            nursery.start_soon(_write_metrics, ops, opts.metrics_file)
        await pyfuse3.main()
        await ops.drain()
        nursery.cancel_scope.cancel()


async def _announce(
    mountpoint: str, opts: MountOptions, ready: Callable[[], None], refused: list[str]
) -> None:
    """The mount answers once a stat of its root comes back (served by this daemon).

    Before a service manager hears "mounted", the system must see the mount:
    in a mount namespace of its own (a unit's ProtectSystem=, PrivateTmp=, ...)
    it would be running while programs write to the plain directory underneath.
    Then the daemon unmounts and fails instead (`refused`).

    A stop may come first: the thread is then left behind instead of awaited, since
    its request is answered (ENOTCONN) only once the session closes after `main()`.
    """
    st = await trio.to_thread.run_sync(os.stat, mountpoint, abandon_on_cancel=True)
    if os.environ.get(notify.ENV_SOCKET):
        seen = await trio.to_thread.run_sync(seen_by_system, mountpoint, st.st_dev)
        if seen is None:
            log.warning("cannot read %s to check that the system sees the mount", SYSTEM_MOUNTINFO)
        elif not seen:
            refused.append(
                f"MOUNTPOINT {mountpoint} is not mounted as the system sees it: this daemon "
                "runs in a mount namespace of its own, and programs would write to the plain "
                "directory underneath, unencrypted. Run it without the options that give a "
                "service its own mount namespace (ProtectSystem=, PrivateTmp=, "
                "ProtectKernelModules=, ... see the unit stormfs@.service)."
            )
            pyfuse3.terminate()
            return
    _set_readahead(st.st_dev, opts.readahead_kb)
    log.info("mounted %s", mountpoint)
    ready()


async def _write_metrics(ops: Operations, path: str) -> None:
    """Rewrite the metrics file atomically every METRICS_INTERVAL seconds."""
    failing = False
    while True:
        try:
            text = prometheus(ops.status())
            await trio.to_thread.run_sync(_replace_file, path, text.encode())
        except OSError as e:
            if not failing:
                log.warning("cannot write the metrics file %s: %s", path, e.strerror)
            failing = True
        else:
            failing = False
        await trio.sleep(METRICS_INTERVAL)


def _replace_file(path: str, data: bytes) -> None:
    dir_fd = open_dir(os.path.dirname(path))
    try:
        write_atomically(dir_fd, os.path.basename(path), data, mode=0o644, durable=False)
    finally:
        os.close(dir_fd)


def seen_by_system(mountpoint: str, dev: int, mountinfo: str = SYSTEM_MOUNTINFO) -> bool | None:
    """Whether the mount table `mountinfo` (the system's) has the filesystem
    `dev` mounted at `mountpoint`; None if the table cannot be read."""
    device = f"{os.major(dev)}:{os.minor(dev)}".encode()
    try:
        with open(mountinfo, "rb") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    target = os.fsencode(mountpoint)
    for line in lines:
        fields = line.split(b" ")
        if len(fields) > 4 and fields[2] == device and _unescape(fields[4]) == target:
            return True
    return False


def _unescape(field: bytes) -> bytes:
    """mountinfo writes space, tab, newline and backslash in paths as \\ooo."""
    return re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]), field)


def _set_readahead(dev: int, kib: int) -> None:
    path = f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb"
    try:
        with open(path, "w") as f:
            f.write(str(kib))
    except OSError as e:
        log.debug("readahead left at the kernel default (%s: %s)", path, e.strerror)


async def _stop_on_signal() -> None:
    with trio.open_signal_receiver(*STOP_SIGNALS) as signals:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        async for signum in signals:
            log.info("%s: committing pending writes and unmounting", signal.Signals(signum).name)
            with contextlib.suppress(OSError):
                notify.stopping()
            pyfuse3.terminate()
            return
