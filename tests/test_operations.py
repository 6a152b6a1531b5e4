"""The pyfuse3 operations driven in-process (pytest-trio), without a mount.

These reach the handlers' edge cases directly: lookup and forget counts, inode
numbers after a removal, operations through a node that lost its name, rename
over and unlink of open files, hidden names, the error boundary.  The kernel
is not in the loop, so each test states the calls the kernel would make.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pyfuse3
import pytest

from stormfs import keys
from stormfs.fs import Operations
from stormfs.store import Store

from .helpers import reference_decrypt

ROOT = pyfuse3.ROOT_INODE
CTX = pyfuse3.RequestContext()
RDWR = os.O_RDWR


@pytest.fixture
def source(tmp_path: Path) -> Path:
    path = tmp_path / "source"
    path.mkdir()
    return path


@pytest.fixture
def material() -> bytes:
    return os.urandom(32)


@pytest.fixture
def ops(source: Path, material: bytes) -> Iterator[Operations]:
    store = Store(str(source), keys.Keyring(keys.Key("1", material)))
    ops = Operations(store)
    try:
        yield ops
    finally:
        ops.close()
        store.close()


def fields(**set_: bool) -> SimpleNamespace:
    names = ("mode", "uid", "gid", "size", "atime", "mtime", "ctime")
    return SimpleNamespace(**{f"update_{n}": set_.get(n, False) for n in names})


async def errno_of(call) -> int:
    with pytest.raises(pyfuse3.FUSEError) as e:
        await call
    return e.value.errno


async def write_file(ops: Operations, name: bytes, data: bytes) -> int:
    """create, write, flush, release: what `open(O_CREAT)`, `write` and `close` send."""
    info, entry = await ops.create(ROOT, name, 0o644, RDWR | os.O_CREAT, CTX)
    await ops.write(info.fh, 0, data)
    await ops.flush(info.fh)
    await ops.release(info.fh)
    return entry.st_ino


async def test_lookup_counts_and_forget(ops: Operations, source: Path):
    ino = await write_file(ops, b"f", b"data")  # create counts one lookup
    assert (await ops.lookup(ROOT, b"f", CTX)).st_ino == ino
    assert (await ops.lookup(ROOT, b"f", CTX)).st_ino == ino
    assert ops.table.get(ino).lookups == 3
    await ops.forget([(ino, 2)])
    assert (await ops.getattr(ino, CTX)).st_size == 4
    await ops.forget([(ino, 1)])
    assert await errno_of(ops.getattr(ino, CTX)) == errno.ESTALE
    # A later lookup of the same file: a new number (the old one is never reused).
    assert (await ops.lookup(ROOT, b"f", CTX)).st_ino > ino


async def test_directory_removed_while_referenced_is_never_the_next_one(
    ops: Operations, source: Path
):
    d = await ops.mkdir(ROOT, b"d", 0o755, CTX)
    backing = os.lstat(source / "d").st_ino
    await ops.rmdir(ROOT, b"d", CTX)  # the kernel still holds its lookup (a cwd)
    e = await ops.mkdir(ROOT, b"e", 0o755, CTX)
    assert os.lstat(source / "e").st_ino == backing  # the backing number was reused
    assert e.st_ino != d.st_ino
    for call in (
        lambda: ops.getattr(d.st_ino, CTX),
        lambda: ops.setattr(d.st_ino, SimpleNamespace(st_mode=0o700), fields(mode=True), None, CTX),
        lambda: ops.setxattr(d.st_ino, b"user.x", b"1", CTX),
        lambda: ops.mkdir(d.st_ino, b"inside", 0o755, CTX),
        lambda: ops.lookup(d.st_ino, b"inside", CTX),
    ):
        assert await errno_of(call()) in (errno.ENOENT, errno.ESTALE)
    assert os.lstat(source / "e").st_mode & 0o777 == 0o755
    assert os.listdir(source / "e") == []
    await ops.mkdir(e.st_ino, b"inside", 0o755, CTX)
    assert os.listdir(source / "e") == ["inside"]


async def test_unlinked_open_file_keeps_its_data_and_never_returns(
    ops: Operations, source: Path, material: bytes
):
    await write_file(ops, b"f", b"first")
    entry = await ops.lookup(ROOT, b"f", CTX)
    info = await ops.open(entry.st_ino, RDWR, CTX)
    await ops.unlink(ROOT, b"f", CTX)
    g = await write_file(ops, b"g", b"other")
    assert g != entry.st_ino
    await ops.write(info.fh, 0, b"F")
    assert await ops.read(info.fh, 0, 100) == b"First"
    await ops.setattr(entry.st_ino, SimpleNamespace(st_mode=0o600), fields(mode=True), None, CTX)
    await ops.flush(info.fh)
    await ops.release(info.fh)
    assert sorted(os.listdir(source)) == [".stormfs", "g"]
    blob = (source / "g").read_bytes()
    assert reference_decrypt(material, blob) == b"other"
    assert os.lstat(source / "g").st_mode & 0o777 == 0o644


async def test_rename_over_an_open_file(ops: Operations, source: Path, material: bytes):
    await write_file(ops, b"x", b"new")
    y = await write_file(ops, b"y", b"old")
    info = await ops.open(y, RDWR, CTX)
    await ops.rename(ROOT, b"x", ROOT, b"y", 0, CTX)
    assert (await ops.lookup(ROOT, b"y", CTX)).st_ino != y
    await ops.write(info.fh, 0, b"O")
    await ops.flush(info.fh)
    assert await ops.read(info.fh, 0, 10) == b"Old"
    await ops.release(info.fh)
    blob = (source / "y").read_bytes()
    assert reference_decrypt(material, blob) == b"new"


async def test_rename_noreplace_and_exchange(ops: Operations, source: Path):
    a = await write_file(ops, b"a", b"A")
    b = await write_file(ops, b"b", b"B")
    noreplace, exchange = pyfuse3.RENAME_NOREPLACE, pyfuse3.RENAME_EXCHANGE
    assert await errno_of(ops.rename(ROOT, b"a", ROOT, b"b", noreplace, CTX)) == errno.EEXIST
    await ops.rename(ROOT, b"a", ROOT, b"b", exchange, CTX)
    assert (await ops.lookup(ROOT, b"a", CTX)).st_ino == b
    assert (await ops.lookup(ROOT, b"b", CTX)).st_ino == a
    assert await errno_of(ops.rename(ROOT, b"a", ROOT, b"b", 4, CTX)) == errno.EINVAL


async def test_hidden_names_cannot_be_seen_or_made(ops: Operations, source: Path):
    assert await errno_of(ops.lookup(ROOT, b".stormfs", CTX)) == errno.ENOENT
    assert await errno_of(ops.lookup(ROOT, b".stormfs-tmp-x", CTX)) == errno.ENOENT
    for call in (
        lambda: ops.create(ROOT, b".stormfs-x", 0o644, RDWR, CTX),
        lambda: ops.mkdir(ROOT, b".stormfsdir", 0o755, CTX),
        lambda: ops.symlink(ROOT, b".stormfs", b"target", CTX),
    ):
        assert await errno_of(call()) == errno.EPERM
    await write_file(ops, b"f", b"1")
    assert await errno_of(ops.rename(ROOT, b"f", ROOT, b".stormfs", 0, CTX)) == errno.EPERM
    assert sorted(os.listdir(source)) == [".stormfs", "f"]


async def test_damaged_envelope_answers_eio_and_is_left_alone(ops: Operations, source: Path):
    blob = b"\x01" + os.urandom(12) + b"not sealed under this key"
    (source / "bad").write_bytes(blob)
    entry = await ops.lookup(ROOT, b"bad", CTX)
    assert entry.st_size == len(blob) - 29
    assert await errno_of(ops.open(entry.st_ino, os.O_RDONLY, CTX)) == errno.EIO
    assert (source / "bad").read_bytes() == blob


async def test_unknown_handles_and_inodes(ops: Operations):
    assert await errno_of(ops.read(999, 0, 10)) == errno.EBADF
    assert await errno_of(ops.getattr(999, CTX)) == errno.ESTALE
    assert await errno_of(ops.lookup(999, b"x", CTX)) == errno.ESTALE
    assert await errno_of(ops.lookup(ROOT, b"missing", CTX)) == errno.ENOENT


async def test_opening_a_node_whose_name_now_leads_elsewhere_answers_estale(
    ops: Operations, source: Path
):
    """A file replaced behind the mount (`stormfs encrypt` exchanges names), and its
    name looked up again meanwhile, by another reader: an open of the old node
    answers ESTALE, so the kernel looks the name up again, never ENOENT for a name
    that exists."""
    (source / "f").write_bytes(b"legacy")
    old = (await ops.lookup(ROOT, b"f", CTX)).st_ino
    (source / "f.new").write_bytes(b"replacement")
    os.rename(source / "f.new", source / "f")
    new = (await ops.lookup(ROOT, b"f", CTX)).st_ino
    assert new != old
    assert await errno_of(ops.open(old, os.O_RDONLY, CTX)) == errno.ESTALE
    info = await ops.open(new, os.O_RDONLY, CTX)
    assert await ops.read(info.fh, 0, 100) == b"replacement"
    await ops.release(info.fh)
    os.unlink(source / "f")
    assert await errno_of(ops.open(new, os.O_RDONLY, CTX)) == errno.ESTALE
