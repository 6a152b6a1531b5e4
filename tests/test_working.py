"""Working copies and the store, without FUSE: random operations against an
in-memory model, atomic publish, hard links, and recovery after a crash."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

from stormfs import format as fmt
from stormfs import format_v2 as v2
from stormfs.keys import Key, Keyring
from stormfs.scan import LEGACY, V1, Layout
from stormfs.source import At
from stormfs.store import Store
from stormfs.working import BLOCK, WorkingCopy

KEY = Key("7", os.urandom(32))


_DIR_FDS: dict[Path, int] = {}


def at(path: Path) -> At:
    """The store's way to a file: its name in its directory, held by descriptor."""
    parent = path.parent
    if parent not in _DIR_FDS:
        _DIR_FDS[parent] = os.open(parent, os.O_PATH | os.O_DIRECTORY)
    return At(_DIR_FDS[parent], os.fsencode(path.name))


@pytest.fixture(autouse=True)
def _close_dirs():
    yield
    for fd in _DIR_FDS.values():
        os.close(fd)
    _DIR_FDS.clear()


@pytest.fixture
def store(tmp_path: Path):
    s = Store(tmp_path, Keyring(KEY))
    yield s
    s.close()


def plaintext(path: Path) -> bytes:
    blob = path.read_bytes()
    if fmt.classify(len(blob), blob[:1]) is fmt.Kind.ENCRYPTED:
        return fmt.open_envelope(KEY.material, blob)
    return blob


def commit(store: Store, w: WorkingCopy, path: Path):
    return w.commit(lambda temp, nonce: store.publish(temp, at(path), nonce, durable=True))


@pytest.mark.parametrize("seed", range(40))
def test_random_operations_match_model(store: Store, tmp_path: Path, seed: int):
    rng = random.Random(seed)
    path = tmp_path / "f"
    legacy = bytearray(rng.randbytes(rng.choice([0, 10, 5000, 300_000])))
    if legacy[:1] == b"\x01":
        legacy[0] = 0  # random plaintext starting 0x01 would be a DECRYPTION_FAILED file
    path.write_bytes(legacy)
    if rng.random() < 0.5:
        path.write_bytes(fmt.seal(KEY.material, path.read_bytes()))
    for _ in range(3):
        reader = store.open_reader(at(path))
        model = bytearray(plaintext(path))
        w = WorkingCopy(store, reader, reader.size)
        for _ in range(rng.randint(1, 40)):
            op = rng.random()
            if op < 0.5:
                off = rng.choice(
                    [len(model), rng.randrange(len(model) + 1), rng.randrange(400_000)]
                )
                data = os.urandom(rng.choice([1, 100, BLOCK, BLOCK + 1, 70_000]))
                w.write(off, data)
                model.extend(bytes(max(0, off - len(model))))
                model[off : off + len(data)] = data
            elif op < 0.65:
                size = rng.randrange(len(model) + 5000)
                w.truncate(size)
                del model[size:]
                model.extend(bytes(size - len(model)))
            else:
                off, n = rng.randrange(len(model) + 10), rng.randrange(100_000)
                assert w.read(off, n) == bytes(model[off : off + n])
            assert w.size == len(model)
        new = commit(store, w, path)
        reader.close()
        assert new.read(0, len(model) + 1) == bytes(model)
        new.close()
        assert plaintext(path) == bytes(model)
    assert sorted(os.listdir(store.instance)) == [b"lease", b"lock"]


def test_failed_commit_keeps_pending_writes(store: Store, tmp_path: Path):
    path = tmp_path / "f"
    path.write_bytes(b"base")
    reader = store.open_reader(at(path))
    w = WorkingCopy(store, reader, reader.size)
    w.write(4, b" and more")

    def failing(temp, nonce):
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        w.commit(failing)
    assert w.read(0, 100) == b"base and more"
    assert path.read_bytes() == b"base"  # previous version intact
    commit(store, w, path)
    assert plaintext(path) == b"base and more"


def test_publish_keeps_metadata(store: Store, tmp_path: Path):
    path = tmp_path / "f"
    path.write_bytes(b"x")
    os.chmod(path, 0o604)
    os.chown(path, 4321, 8765)
    os.setxattr(path, "user.tag", b"v")
    reader = store.open_reader(at(path))
    w = WorkingCopy(store, reader, 1)
    w.write(1, b"y")
    commit(store, w, path)
    st = path.stat()
    assert (st.st_mode & 0o7777, st.st_uid, st.st_gid) == (0o604, 4321, 8765)
    assert os.getxattr(path, "user.tag") == b"v"
    assert os.getxattr(path, "user.stormfs.key_id") == b"7"


def test_hard_links_rewritten_in_place(store: Store, tmp_path: Path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(b"shared")
    os.link(a, b)
    ino = a.stat().st_ino
    reader = store.open_reader(at(a))
    w = WorkingCopy(store, reader, reader.size)
    w.write(0, b"SHARED, rewritten")
    commit(store, w, a)
    assert a.stat().st_ino == ino and b.stat().st_nlink == 2
    assert plaintext(b) == b"SHARED, rewritten"


def test_interrupted_in_place_rewrite_is_finished_at_start(tmp_path: Path):
    """A daemon died between writing its redo record and finishing the copy."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(b"old content of a linked file")
    os.link(a, b)
    dead = tmp_path / ".stormfs" / "tmp" / "host.1.dead"
    dead.mkdir(parents=True)
    new = fmt.seal(KEY.material, b"new content")
    (dead / "t-1").write_bytes(new)
    st = a.stat()
    record = {"target": str(a), "temp": "t-1", "dev": st.st_dev, "ino": st.st_ino}
    (dead / "redo-t-1").write_text(json.dumps(record))
    with open(a, "r+b") as f:  # torn: the copy had begun
        f.write(new[:10])
    s = Store(tmp_path, Keyring(KEY))
    try:
        assert not dead.exists()
        assert plaintext(b) == b"new content"
        assert a.stat().st_ino == st.st_ino
    finally:
        s.close()


def test_live_instance_is_left_alone(tmp_path: Path):
    s1 = Store(tmp_path, Keyring(KEY))
    temp = s1.new_temp()
    s2 = Store(tmp_path, Keyring(KEY))
    try:
        assert (Path(os.fsdecode(s1.instance)) / os.fsdecode(temp.name)).exists()
    finally:
        temp.discard()
        s2.close()
        s1.close()


def test_scratch_never_holds_plaintext(store: Store, tmp_path: Path):
    path = tmp_path / "f"
    marker = b"PLAINTEXT-MARKER-" * 300
    path.write_bytes(fmt.seal(KEY.material, bytes(200_000)))
    reader = store.open_reader(at(path))
    w = WorkingCopy(store, reader, reader.size)
    w.write(150_000, marker)  # streams: the gap is filled from the base
    w.write(10, marker)  # a write behind the streamed end goes to scratch blocks
    assert w._scratch is not None
    scratch = os.pread(w._scratch.fd, 1 << 20, 0)
    assert b"PLAINTEXT-MARKER" not in scratch
    prefix = w._prefix
    assert prefix is not None
    assert b"PLAINTEXT-MARKER" not in os.pread(prefix.temp.fd, 1 << 20, 0)
    commit(store, w, path)
    reader.close()
    assert b"PLAINTEXT-MARKER" not in path.read_bytes()


def test_starting_instance_is_left_alone(tmp_path: Path):
    """A daemon between creating its instance directory and locking it is not cleaned up."""
    tmp = tmp_path / ".stormfs" / "tmp"
    fresh, stale = tmp / "host.1.aaaa.starting", tmp / "host.2.bbbb.starting"
    fresh.mkdir(parents=True)
    stale.mkdir()
    os.utime(stale, (0, 0))
    s = Store(tmp_path, Keyring(KEY))
    try:
        assert fresh.exists() and not stale.exists()
        assert not any(p.name.endswith(".starting") for p in tmp.iterdir() if p != fresh)
    finally:
        s.close()


def test_stat_classifies_a_rewritten_file_afresh(store: Store, tmp_path: Path):
    path = tmp_path / "f"
    path.write_bytes(fmt.seal(KEY.material, b"x" * 100))
    _, size, layout = store.stat(at(path))
    assert (layout, size) == (V1, 100)
    path.write_bytes(b"plain text now, and long enough to be an envelope")
    st2, size2, layout2 = store.stat(at(path))
    assert layout2 is LEGACY and size2 == st2.st_size
    path.write_bytes(v2.seal(KEY.material, b"y" * 100_000))
    _, size3, layout3 = store.stat(at(path))
    assert (layout3, size3) == (Layout(2, v2.CHUNK_SIZE), 100_000)
