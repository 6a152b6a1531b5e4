"""A FUSE inode number stands for one object for the whole mount (DESIGN §3).

The backing file system hands a freed inode number to the next object it
creates (ext4 does so at once).  These tests remove an object while the kernel
still holds a reference to it (a cwd, a descriptor, an O_PATH descriptor), make
a new object that inherits its backing number, and check that the new object
is a fresh inode of the view and that nothing done through the old reference
reaches it.
"""

from __future__ import annotations

import errno
import fcntl
import os
import random
import stat
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from .helpers import Mount, MountFactory

DEAD = (errno.ENOENT, errno.ESTALE)


def _mode(path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def _try(fn, *args) -> int | None:
    """The errno of fn(*args), or None if it succeeded."""
    try:
        fn(*args)
    except OSError as e:
        return e.errno
    return None


def test_removed_cwd_does_not_become_the_next_directory(mounted: Mount):
    script = textwrap.dedent(
        """
        import os, sys
        M = sys.argv[1]; d, e = M + "/d", M + "/e"
        os.mkdir(d)
        os.chdir(d)
        os.rmdir(d)
        os.mkdir(e)
        try:
            print(os.getcwd())
        except OSError as err:
            print("getcwd", err.errno)
        os.chdir(M)
        with open(e + "/f", "w") as f:
            f.write("x")
        print("created")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(mounted.mnt)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    first, second = done.stdout.splitlines()
    assert first != f"{mounted.mnt}/e", "the removed cwd became the new directory"
    assert second == "created"
    assert (mounted.mnt / "e" / "f").read_text() == "x"
    assert mounted.decrypt("e/f") == b"x"


def test_descriptor_of_a_removed_directory_cannot_reach_the_next_one(
    ext4_image: Path, mount_factory: MountFactory
):
    # A small file system of its own: on a busy shared one, another process may take
    # the freed inode number first.
    mounted = mount_factory(source=ext4_image)
    d, e = mounted.mnt / "d", mounted.mnt / "e"
    d.mkdir(mode=0o755)
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        old_ino = os.lstat(mounted.source / "d").st_ino
        os.rmdir(d)
        e.mkdir(mode=0o755)
        reused = os.lstat(mounted.source / "e").st_ino == old_ino
        assert _try(os.fchmod, fd, 0o700) in (None, *DEAD)
        assert _mode(mounted.source / "e") == 0o755, "fchmod of a dead handle changed e"
        assert _try(os.fchown, fd, 1234, 1234) in (None, *DEAD)
        assert os.lstat(mounted.source / "e").st_uid != 1234
        assert _try(os.utime, fd, (1, 1)) in (None, *DEAD)
        assert os.lstat(mounted.source / "e").st_mtime != 1
        assert _try(os.setxattr, fd, "user.probe", b"1") in (None, *DEAD)
        assert "user.probe" not in os.listxattr(mounted.source / "e")
        (e / "f").write_bytes(b"data")
        assert os.listdir(e) == ["f"]
        try:
            assert os.listdir(fd) == [], "a dead handle lists the new directory"
        except OSError as err:
            assert err.errno in DEAD
        try:
            assert os.fstat(fd).st_ino != os.stat(e).st_ino
        except OSError as err:
            assert err.errno in DEAD
    finally:
        os.close(fd)
    # The case this test is about: ext4 gives the new directory the old number.
    assert reused, "the backing file system did not reuse the inode number"


def test_opath_reference_to_a_removed_file_cannot_reach_the_next_one(mounted: Mount):
    f, g = mounted.mnt / "f", mounted.mnt / "g"
    f.write_bytes(b"old")
    os.chmod(f, 0o644)
    ref = os.open(f, os.O_PATH)  # a kernel reference, no open file in the daemon
    try:
        view_ino = os.fstat(ref).st_ino
        os.unlink(f)
        g.write_bytes(b"new")
        os.chmod(g, 0o644)
        assert os.stat(g).st_ino != view_ino
        via = f"/proc/self/fd/{ref}"
        assert _try(os.chmod, via, 0o600) in (None, *DEAD)
        assert _mode(mounted.source / "g") == 0o644, "chmod of a dead reference changed g"
        assert _try(os.truncate, via, 0) in (None, *DEAD)
        assert g.read_bytes() == b"new"
        assert _try(os.setxattr, via, "user.probe", b"1") in (None, *DEAD)
        assert "user.probe" not in os.listxattr(mounted.source / "g")
    finally:
        os.close(ref)
    assert mounted.decrypt("g") == b"new"


def test_unlinked_open_file_and_its_successor_stay_apart(mounted: Mount):
    f, g = mounted.mnt / "f", mounted.mnt / "g"
    f.write_bytes(b"A" * 100)
    fd = os.open(f, os.O_RDWR)
    try:
        os.unlink(f)
        g.write_bytes(b"B" * 100)
        os.chmod(g, 0o644)
        os.pwrite(fd, b"a", 0)
        os.fchmod(fd, 0o600)
        assert os.pread(fd, 200, 0) == b"a" + b"A" * 99
        assert g.read_bytes() == b"B" * 100
        assert os.fstat(fd).st_ino != os.stat(g).st_ino
    finally:
        os.close(fd)
    assert g.read_bytes() == b"B" * 100
    assert _mode(mounted.source / "g") == 0o644
    assert mounted.decrypt("g") == b"B" * 100
    assert sorted(os.listdir(mounted.mnt)) == ["g"]


def test_rename_over_an_open_file_keeps_the_old_object_apart(mounted: Mount):
    x, y = mounted.mnt / "x", mounted.mnt / "y"
    x.write_bytes(b"X" * 10)
    y.write_bytes(b"Y" * 10)
    fd = os.open(y, os.O_RDWR)
    try:
        old = os.fstat(fd).st_ino
        os.rename(x, y)
        z = mounted.mnt / "z"
        z.write_bytes(b"Z" * 10)
        os.pwrite(fd, b"y", 0)
        os.fchmod(fd, 0o600)
        assert os.pread(fd, 20, 0) == b"y" + b"Y" * 9
        assert y.read_bytes() == b"X" * 10
        assert z.read_bytes() == b"Z" * 10
        assert old not in {os.stat(y).st_ino, os.stat(z).st_ino}
    finally:
        os.close(fd)
    assert y.read_bytes() == b"X" * 10
    assert mounted.decrypt("y") == b"X" * 10
    assert mounted.decrypt("z") == b"Z" * 10


@dataclass(eq=False)
class Thing:
    """One object of the model: a directory or a file, known by a token it carries."""

    token: bytes
    is_dir: bool
    ino: int  # its inode number in the view, for good
    mode: int
    names: set[str] = field(default_factory=set)


class Walk:
    """Random steps through a mount over an ext4 image, against a model of the objects.

    References the kernel holds on objects that may lose their names (directory
    and file descriptors, O_PATH descriptors) are kept across removals and
    creations that reuse backing inode numbers.  Through each reference, reads,
    stats and metadata changes must reach its own object or fail with
    ENOENT/ESTALE; every live name must show its own object, token and mode.
    """

    NAMES = ("a", "b", "c")

    def __init__(self, m: Mount, seed: int) -> None:
        self.m = m
        self.rng = random.Random(seed)
        self.by_name: dict[str, Thing] = {}
        self.refs: list[tuple[int, Thing]] = []
        self.tokens = iter(range(1_000_000))

    def path(self, name: str) -> str:
        return os.path.join(self.m.mnt, name)

    def dirs(self) -> list[str]:
        return ["", *(n for n, t in self.by_name.items() if t.is_dir)]

    def new_name(self) -> str | None:
        parent = self.rng.choice(self.dirs())
        name = os.path.join(parent, self.rng.choice(self.NAMES))
        if name in self.by_name or name.count("/") > 2:
            return None
        return name

    def make(self) -> None:
        name = self.new_name()
        if name is None:
            return
        token = b"t%d" % next(self.tokens)
        p = self.path(name)
        is_dir = self.rng.random() < 0.5
        if is_dir:
            os.mkdir(p, 0o755)
        else:
            with open(p, "wb") as f:
                f.write(token)
        os.setxattr(p, "user.token", token)
        os.chmod(p, 0o755 if is_dir else 0o644)
        st = os.stat(p)
        assert all(t.ino != st.st_ino for t in self.by_name.values()), "a live inode reused"
        for _, t in self.refs:
            assert t.ino != st.st_ino, "an inode number still referenced was handed out again"
        thing = Thing(token, is_dir, st.st_ino, 0o755 if is_dir else 0o644, {name})
        self.by_name[name] = thing

    def remove(self) -> None:
        if not self.by_name:
            return
        name = self.rng.choice(sorted(self.by_name))
        t = self.by_name[name]
        if t.is_dir:
            if any(n.startswith(name + "/") for n in self.by_name):
                return
            os.rmdir(self.path(name))
        else:
            os.unlink(self.path(name))
        del self.by_name[name]
        t.names.discard(name)

    def rename(self) -> None:
        if not self.by_name:
            return
        src = self.rng.choice(sorted(self.by_name))
        dst = self.new_name()
        if dst is None or dst.startswith(src + "/"):
            return
        os.rename(self.path(src), self.path(dst))
        for name in sorted(self.by_name):
            if name == src or name.startswith(src + "/"):
                t = self.by_name.pop(name)
                t.names.discard(name)
                moved = dst + name[len(src) :]
                t.names.add(moved)
                self.by_name[moved] = t

    def link(self) -> None:
        files = sorted(n for n, t in self.by_name.items() if not t.is_dir)
        dst = self.new_name()
        if not files or dst is None:
            return
        src = self.rng.choice(files)
        os.link(self.path(src), self.path(dst))
        t = self.by_name[src]
        t.names.add(dst)
        self.by_name[dst] = t

    def hold(self) -> None:
        if not self.by_name or len(self.refs) > 6:
            return
        name = self.rng.choice(sorted(self.by_name))
        t = self.by_name[name]
        if t.is_dir:
            flags = self.rng.choice((os.O_RDONLY | os.O_DIRECTORY, os.O_PATH))
        else:
            flags = self.rng.choice((os.O_RDWR, os.O_RDONLY, os.O_PATH))
        self.refs.append((os.open(self.path(name), flags), t))

    def drop(self) -> None:
        if self.refs:
            fd, _ = self.refs.pop(self.rng.randrange(len(self.refs)))
            os.close(fd)

    def chmod_through_ref(self) -> None:
        if not self.refs:
            return
        fd, t = self.rng.choice(self.refs)
        mode = self.rng.choice((0o700, 0o750, 0o755)) if t.is_dir else 0o600 | 0o40
        try:
            os.chmod(f"/proc/self/fd/{fd}", mode)
        except OSError as e:
            assert e.errno in DEAD, e
        else:
            t.mode = mode

    def check(self) -> None:
        for name, t in self.by_name.items():
            p = self.path(name)
            st = os.lstat(p)
            assert st.st_ino == t.ino, f"{name}: inode {st.st_ino}, was {t.ino}"
            assert stat.S_IMODE(st.st_mode) == t.mode, f"{name}: mode {st.st_mode:o}"
            assert os.getxattr(p, "user.token") == t.token, name
            if not t.is_dir:
                with open(p, "rb") as f:
                    assert f.read() == t.token, name
        for fd, t in self.refs:
            via = f"/proc/self/fd/{fd}"
            try:
                st = os.stat(via)
                assert st.st_ino == t.ino, f"a reference to {t.token!r} reaches inode {st.st_ino}"
                assert os.getxattr(via, "user.token") == t.token
            except OSError as e:
                assert e.errno in DEAD, e
                assert not t.names, f"{t.token!r} still has a name: {t.names}"
            if not t.is_dir and os.O_PATH & _flags(fd) == 0:
                assert os.pread(fd, 100, 0) == t.token

    def run(self, steps: int) -> None:
        ops = (self.make, self.make, self.remove, self.rename, self.link, self.hold)
        ops += (self.hold, self.drop, self.chmod_through_ref)
        try:
            for _ in range(steps):
                self.rng.choice(ops)()
                self.check()
        finally:
            for fd, _ in self.refs:
                os.close(fd)


def _flags(fd: int) -> int:
    return fcntl.fcntl(fd, fcntl.F_GETFL)


@pytest.mark.parametrize("seed", range(3))
def test_random_walk_over_reused_inode_numbers(ext4_image, mount_factory, seed: int):
    Walk(mount_factory(source=ext4_image), seed).run(1000)


@pytest.mark.stress
@pytest.mark.timeout(1800)
def test_random_walk_over_reused_inode_numbers_long(ext4_image, mount_factory):
    m = mount_factory(source=ext4_image)
    for seed in range(20):
        Walk(m, 100 + seed).run(2500)
        for name in os.listdir(m.mnt):
            subprocess.run(["rm", "-rf", os.path.join(m.mnt, name)], check=True)
