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
from stormfs import redo
from stormfs.keys import Key, Keyring
from stormfs.scan import LEGACY, V1, Layout
from stormfs.source import At
from stormfs.store import Store
from stormfs.working import BLOCK, WorkingCopy

from .helpers import changed_chunks

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
    if v2.is_v2(blob):
        return v2.open_file(KEY.material, blob)
    if fmt.classify(len(blob), blob[:1]) is fmt.Kind.ENCRYPTED:
        return fmt.open_envelope(KEY.material, blob)
    return blob


def commit(store: Store, w: WorkingCopy, path: Path):
    return w.commit(store.committer(at(path), durable=True))


def working(store: Store, reader, size: int | None = None) -> WorkingCopy:
    return WorkingCopy(store, reader, reader.size if size is None else size, store.key)


def idle(store: Store) -> bool:
    """Nothing left in the instance directory but its marks and cleared chunk records."""
    names = os.listdir(store.instance)
    records = [n for n in names if n.startswith(b"chunks-")]
    for name in records:
        fd = os.open(os.path.join(store.instance, name), os.O_RDONLY)
        try:
            assert redo.load(fd) is None
        finally:
            os.close(fd)
    return sorted(set(names) - set(records)) == [b"lease", b"lock"]


@pytest.mark.parametrize("write_v2", [False, True], ids=["writes-v1", "writes-v2"])
@pytest.mark.parametrize("seed", range(40))
def test_random_operations_match_model(tmp_path: Path, seed: int, write_v2: bool):
    """Over legacy, v1 and v2 bases; a v2 mount rewrites v2 files in place."""
    store = Store(tmp_path, Keyring(KEY), write_v2=write_v2)
    rng = random.Random(seed)
    path = tmp_path / "f"
    legacy = bytearray(rng.randbytes(rng.choice([0, 10, 5000, 300_000])))
    if legacy[:1] in (b"\x01", b"\x02"):
        legacy[0] = 0  # a random start that looks like an envelope would be damage
    path.write_bytes(legacy)
    base = rng.choice(["legacy", "v1", "v2"])
    if base == "v1":
        path.write_bytes(fmt.seal(KEY.material, path.read_bytes()))
    elif base == "v2":
        path.write_bytes(
            v2.seal(KEY.material, path.read_bytes(), chunk_size=rng.choice([4096, 16384]))
        )
    try:
        _model_rounds(store, rng, path)
    finally:
        store.close()


def _model_rounds(store: Store, rng: random.Random, path: Path) -> None:
    for _ in range(3):
        reader = store.open_reader(at(path))
        model = bytearray(plaintext(path))
        w = working(store, reader)
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
        if new is not reader:
            reader.close()
        assert new.read(0, len(model) + 1) == bytes(model)
        new.close()
        assert plaintext(path) == bytes(model)
        assert v2.is_v2(path.read_bytes()) == store.write_v2
    assert idle(store)


def test_failed_commit_keeps_pending_writes(store: Store, tmp_path: Path):
    path = tmp_path / "f"
    path.write_bytes(b"base")
    reader = store.open_reader(at(path))
    w = working(store, reader)
    w.write(4, b" and more")

    class Failing:
        def publish(self, temp, sealer, key):
            raise OSError(28, "No space left on device")

        rewrite = publish

    with pytest.raises(OSError):
        w.commit(Failing())
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
    w = working(store, reader, 1)
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
    w = working(store, reader)
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
    w = working(store, reader)
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


def v2_store(tmp_path: Path) -> Store:
    return Store(tmp_path, Keyring(KEY), write_v2=True)


C = v2.CHUNK_SIZE


def test_a_v2_file_is_rewritten_in_place_at_the_cost_of_the_chunks_touched(tmp_path: Path):
    store = v2_store(tmp_path)
    path = tmp_path / "f"
    plain = bytearray(os.urandom(40 * C + 100))
    path.write_bytes(v2.seal(KEY.material, bytes(plain)))
    before = path.read_bytes()
    ino = path.stat().st_ino
    reader = store.open_reader(at(path))
    w = working(store, reader)
    w.write(5 * C + 10, b"xyz")
    plain[5 * C + 10 : 5 * C + 13] = b"xyz"
    assert commit(store, w, path) is reader  # the same file: no rename
    after = path.read_bytes()
    assert path.stat().st_ino == ino and len(after) == len(before)
    assert changed_chunks(before, after) == [5]
    assert reader.read(0, len(plain)) == bytes(plain) == v2.open_file(KEY.material, after)
    reader.close()
    assert idle(store)
    store.close()


def test_appending_to_a_v2_file_rewrites_only_its_old_last_chunk(tmp_path: Path):
    store = v2_store(tmp_path)
    path = tmp_path / "f"
    plain = os.urandom(10 * C + 7)
    path.write_bytes(v2.seal(KEY.material, plain))
    before = path.read_bytes()
    reader = store.open_reader(at(path))
    w = working(store, reader)
    w.write(len(plain), b"appended")
    commit(store, w, path)
    after = path.read_bytes()
    assert changed_chunks(before, after) == [10]
    assert v2.open_file(KEY.material, after) == plain + b"appended"
    reader.close()
    store.close()


@pytest.mark.parametrize("size", [0, 1, C - 1, C, C + 1, 3 * C])
def test_truncating_a_v2_file_in_place(tmp_path: Path, size: int):
    store = v2_store(tmp_path)
    path = tmp_path / "f"
    plain = os.urandom(8 * C + 5)
    path.write_bytes(v2.seal(KEY.material, plain))
    reader = store.open_reader(at(path))
    w = working(store, reader)
    w.truncate(size)
    w.write(0, b"a")  # keeps it from being rewritten from empty
    commit(store, w, path)
    expect = (b"a" + plain[1:size]) if size else b"a"
    assert v2.open_file(KEY.material, path.read_bytes()) == expect
    reader.close()
    store.close()


def test_a_v2_file_under_another_key_is_rewritten_whole_under_the_current_one(tmp_path: Path):
    old = Key("old", os.urandom(32))
    store = Store(tmp_path, Keyring(KEY, [old]), write_v2=True)
    path = tmp_path / "f"
    path.write_bytes(v2.seal(old.material, b"under the old key" * 1000))
    ino = path.stat().st_ino
    reader = store.open_reader(at(path))
    w = working(store, reader)
    w.write(0, b"U")
    commit(store, w, path)
    assert path.stat().st_ino != ino
    assert (
        v2.open_file(KEY.material, path.read_bytes())
        == b"Under the old key" + b"under the old key" * 999
    )
    assert os.getxattr(path, "user.stormfs.key_id") == b"7"
    reader.close()
    store.close()


def _v2_file(path: Path, plain: bytes) -> tuple[bytes, os.stat_result, v2.FileCipher]:
    """A v2 file at `path`: its bytes, its stat, its keys."""
    path.write_bytes(v2.seal(KEY.material, plain))
    before = path.read_bytes()
    return before, path.stat(), v2.open_header(KEY.material, before[: v2.HEADER_SIZE])


def _dead_slot(tmp_path: Path) -> tuple[Path, redo.Slot]:
    """A chunk record in the instance directory of a daemon that is gone."""
    dead = tmp_path / ".stormfs" / "tmp" / "host.1.dead"
    dead.mkdir(parents=True)
    dir_fd = os.open(dead, os.O_PATH)
    try:
        return dead, redo.Slot(dir_fd, b"chunks-1")
    finally:
        os.close(dir_fd)


def test_an_interrupted_chunk_rewrite_is_finished_by_the_next_start(tmp_path: Path):
    path = tmp_path / "f"
    plain = os.urandom(20 * C)
    before, st, cipher = _v2_file(path, plain)
    new3 = cipher.seal_chunk(3, b"n" * C, False)
    new19 = cipher.seal_chunk(19, b"e" * 10, True)
    dead, slot = _dead_slot(tmp_path)
    chunks = [
        (v2.chunk_offset(3, C), new3, before[v2.chunk_offset(3, C) :][:12]),
        (v2.chunk_offset(19, C), new19, before[v2.chunk_offset(19, C) :][:12]),
    ]
    slot.write(os.fsencode(path), st, v2.ondisk_size(19 * C + 10, C), chunks)
    slot.close()
    with open(path, "r+b") as f:  # torn: half of chunk 3 written when the daemon died
        f.seek(v2.chunk_offset(3, C))
        f.write(new3[: C // 2])
    s = Store(tmp_path, Keyring(KEY))
    try:
        assert not dead.exists()
        want = plain[: 3 * C] + b"n" * C + plain[4 * C : 19 * C] + b"e" * 10
        assert v2.open_file(KEY.material, path.read_bytes()) == want
        assert path.stat().st_ino == st.st_ino
    finally:
        s.close()


@pytest.mark.parametrize("state", ["applied", "cleared", "torn-record", "written-since"])
def test_a_chunk_record_is_replayed_only_where_that_is_right(tmp_path: Path, state: str):
    """Applied already (its clearing was lost to a power cut), cleared, torn while it
    was written (the file untouched), or the chunk written by another daemon since:
    each leaves the file as it is."""
    path = tmp_path / "f"
    before, st, cipher = _v2_file(path, os.urandom(4 * C))
    off = v2.chunk_offset(1, C)
    new1 = cipher.seal_chunk(1, b"N" * C, False)
    _, slot = _dead_slot(tmp_path)
    slot.write(os.fsencode(path), st, len(before), [(off, new1, before[off : off + 12])])
    if state == "cleared":
        slot.clear()
    elif state == "torn-record":
        os.ftruncate(slot.fd, os.fstat(slot.fd).st_size - 5)
    slot.close()
    with open(path, "r+b") as f:
        f.seek(off)
        if state == "applied":
            f.write(new1)
        elif state == "written-since":
            f.write(cipher.seal_chunk(1, b"L" * C, False))
    expect = path.read_bytes()
    Store(tmp_path, Keyring(KEY)).close()
    assert path.read_bytes() == expect
