"""Reading v2 files on a real mount: sizes, random reads, the tamper matrix, the format xattr.

The files are made with `format_v2` and planted in SOURCE behind the mount, as
another daemon writing v2 would leave them.
"""

from __future__ import annotations

import errno
import os
import random
from pathlib import Path

import pytest

from stormfs import format_v2 as v2
from stormfs import keys

from .helpers import Mount, MountFactory

C = v2.CHUNK_SIZE


def plant(m: Mount, name: str, data: bytes) -> Path:
    path = m.source / name
    path.write_bytes(data)
    return path


def pread_cold(path: Path, offset: int, n: int) -> bytes:
    """A read the daemon answers: the file's page cache is dropped first."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return os.pread(fd, n, offset)
    finally:
        os.close(fd)


def failures(m: Mount, name: str) -> int:
    return sum(
        line.rstrip().endswith(f"DECRYPTION_FAILED: {name}") for line in m.logtext().splitlines()
    )


@pytest.mark.parametrize(
    ("size", "chunk"),
    [(0, C), (1, C), (C - 1, C), (C, C), (C + 1, C), (7 * C + 333, C), (40 * 4096 + 17, 4096)],
)
def test_reads_at_random_offsets_equal_the_plaintext(mounted: Mount, size: int, chunk: int):
    data = os.urandom(size)
    backing = plant(mounted, "f", v2.seal(mounted.raw_key, data, chunk_size=chunk))
    view = mounted.mnt / "f"
    assert view.stat().st_size == size
    assert os.stat(backing).st_size == v2.ondisk_size(size, chunk)
    rng = random.Random(size)
    for _ in range(25):
        offset = rng.randrange(0, size + 10)
        n = rng.randrange(1, 3 * chunk)
        assert pread_cold(view, offset, n) == data[offset : offset + n]
    assert view.read_bytes() == data


def test_format_xattr_and_sizes_for_each_format(mounted: Mount):
    data = os.urandom(3 * C + 5)
    backing = plant(mounted, "chunked", v2.seal(mounted.raw_key, data))
    (mounted.mnt / "whole").write_bytes(b"written through the mount: v1")
    plant(mounted, "legacy", b"\x02 legacy plaintext that starts with 0x02, served as-is")
    view = mounted.mnt
    assert os.getxattr(view / "chunked", "user.stormfs.format") == b"v2"
    assert os.getxattr(view / "whole", "user.stormfs.format") == b"v1"
    assert os.getxattr(view / "chunked", "user.stormfs.encryption_method") == b"server"
    assert os.getxattr(view / "chunked", "user.stormfs.encrypted_size") == (
        str(backing.stat().st_size).encode()
    )
    assert "user.stormfs.format" in os.listxattr(view / "chunked")
    assert "user.stormfs.format" not in os.listxattr(view / "legacy")
    with pytest.raises(OSError) as e:
        os.getxattr(view / "legacy", "user.stormfs.format")
    assert e.value.errno == errno.ENODATA
    assert os.getxattr(view / "legacy", "user.stormfs.encryption_method") == b"none"
    assert (view / "legacy").read_bytes().startswith(b"\x02 legacy")
    os.setxattr(view / "chunked", "user.stormfs.format", b"v1")  # read-only: ignored
    assert os.getxattr(view / "chunked", "user.stormfs.format") == b"v2"
    assert [p.name for p in sorted(view.iterdir())] == ["chunked", "legacy", "whole"]
    assert {p.name: p.stat().st_size for p in view.iterdir()}["chunked"] == len(data)


def test_a_write_through_a_v1_mount_makes_a_v2_file_v1(mounted: Mount):
    data = bytearray(os.urandom(2 * C + 9))
    plant(mounted, "f", v2.seal(mounted.raw_key, bytes(data)))
    with open(mounted.mnt / "f", "r+b") as f:
        f.seek(C + 3)
        f.write(b"changed")
    data[C + 3 : C + 10] = b"changed"
    assert mounted.decrypt("f") == bytes(data)
    assert os.getxattr(mounted.mnt / "f", "user.stormfs.format") == b"v1"
    assert (mounted.mnt / "f").read_bytes() == bytes(data)


def test_a_damaged_chunk_fails_only_the_reads_that_cover_it(mounted: Mount):
    """Far from the damage (beyond the kernel's readahead) the file stays readable."""
    data = os.urandom(2 << 20)
    env = bytearray(v2.seal(mounted.raw_key, data))
    bad = 120  # at 1.875 MiB
    env[v2.chunk_offset(bad, C) + 40] ^= 1
    plant(mounted, "big", bytes(env))
    view = mounted.mnt / "big"
    assert pread_cold(view, 0, 4096) == data[:4096]
    with pytest.raises(OSError) as e:
        pread_cold(view, bad * C + 100, 10)
    assert e.value.errno == errno.EIO
    assert pread_cold(view, 0, 4096) == data[:4096]
    assert failures(mounted, "big") == 1


# ---- the tamper matrix on the mount ----------------------------------------------------

DATA = bytes(range(256)) * (3 * C // 256) + b"the last, short chunk"  # 4 chunks


def _slots(env: bytes) -> list[bytes]:
    return [env[o : o + v2.slot_size(C)] for o in range(v2.HEADER_SIZE, len(env), v2.slot_size(C))]


def _flip(env: bytes, pos: int) -> bytes:
    out = bytearray(env)
    out[pos] ^= 0x08
    return bytes(out)


def tamper_cases(key: bytes) -> dict[str, tuple[bytes, int]]:
    """name -> (damaged file, a plaintext offset whose read must fail)."""
    env = v2.seal(key, DATA)
    head, s = env[: v2.HEADER_SIZE], _slots(env)
    other = _slots(v2.seal(key, os.urandom(len(DATA))))
    three = v2.seal(key, DATA[: 3 * C])
    return {
        "header-bit": (_flip(env, 20), 0),
        "header-mac-bit": (_flip(env, 59), 0),
        "nonce-bit": (_flip(env, v2.chunk_offset(1, C) + 3), C + 5),
        "ciphertext-bit": (_flip(env, v2.chunk_offset(2, C) + 500), 2 * C + 400),
        "tag-bit": (_flip(env, len(env) - 1), 3 * C),
        "chunks-swapped": (head + s[1] + s[0] + s[2] + s[3], 0),
        "chunk-moved": (head + s[0] + s[1] + s[0] + s[3], 2 * C),
        "chunk-spliced": (head + s[0] + other[1] + s[2] + s[3], C),
        "cut-at-boundary": (head + s[0] + s[1], C),
        "last-chunk-removed": (head + s[0] + s[1] + s[2], 2 * C),
        "extended-at-boundary": (three + _slots(three)[2], 2 * C),
        "cut-inside-chunk": (env[:-5], 3 * C),
        "cut-to-impossible-size": (env[: v2.chunk_offset(3, C) + 10], 0),
        "other-key": (v2.seal(bytes(32), DATA), 0),
        "signature-and-garbage": (b"\x02stormfs" + os.urandom(5000), 0),
    }


def test_each_tamper_case_is_eio_logged_once_and_left_alone(mounted: Mount):
    cases = tamper_cases(mounted.raw_key)
    before = {}
    for name, (blob, _) in cases.items():
        path = plant(mounted, name, blob)
        before[name] = path.stat().st_mtime_ns
    for name, (_, offset) in cases.items():
        view = mounted.mnt / name
        assert os.getxattr(view, "user.stormfs.format") == b"v2", name
        for _ in range(2):  # again, and through a new open: still EIO, one log line
            with pytest.raises(OSError) as e:
                pread_cold(view, offset, 100)
                pytest.fail(f"{name}: read at {offset} did not fail")
            assert e.value.errno == errno.EIO, name
        with pytest.raises(OSError) as e:
            view.read_bytes()
        assert e.value.errno == errno.EIO, name
    for name in ("nonce-bit", "ciphertext-bit", "tag-bit", "cut-at-boundary"):
        # Chunk 0 is intact in these: it reads.
        assert pread_cold(mounted.mnt / name, 0, 100) == DATA[:100], name
    # Writing where the damage is refuses too: nothing is built on unverified data.
    with pytest.raises(OSError) as e, open(mounted.mnt / "ciphertext-bit", "r+b") as f:
        f.seek(2 * C + 10)
        f.write(b"zz")
    assert e.value.errno == errno.EIO
    mounted.stop()
    for name, (blob, _) in cases.items():
        assert failures(mounted, name) == 1, name
        assert (mounted.source / name).read_bytes() == blob, name
        assert (mounted.source / name).stat().st_mtime_ns == before[name], name
    assert mounted.key is not None and mounted.key not in mounted.logtext()


def test_a_damaged_empty_file_fails_at_open(mounted: Mount):
    """A read of an empty file looks at no chunk: the open checks the header, and the
    empty chunk of an empty file."""
    empty = v2.seal(mounted.raw_key, b"")
    cases = {
        "empty-chunk-bit": _flip(empty, len(empty) - 1),
        "empty-header-bit": _flip(empty, 30),
        "signature-of-other-key": v2.seal(bytes(32), b""),
    }
    for name, blob in cases.items():
        plant(mounted, name, blob)
    plant(mounted, "empty", empty)
    assert (mounted.mnt / "empty").read_bytes() == b""
    for name in cases:
        for _ in range(2):
            with pytest.raises(OSError) as e:
                open(mounted.mnt / name, "rb").close()
            assert e.value.errno == errno.EIO, name
    mounted.stop()
    for name, blob in cases.items():
        assert failures(mounted, name) == 1, name
        assert (mounted.source / name).read_bytes() == blob, name


def test_sizes_of_damaged_files_are_numbers(mounted: Mount):
    cases = tamper_cases(mounted.raw_key)
    for name in ("cut-at-boundary", "cut-inside-chunk", "signature-and-garbage"):
        plant(mounted, name, cases[name][0])
    assert (mounted.mnt / "cut-at-boundary").stat().st_size == 2 * C
    assert (mounted.mnt / "cut-inside-chunk").stat().st_size == len(DATA) - 5
    assert (mounted.mnt / "signature-and-garbage").stat().st_size >= 0


def test_a_source_of_v2_files_mounts_with_its_key(mount_factory: MountFactory, tmp_path, key):
    """The key checks at mount sample v2 files as they do v1 envelopes."""
    src = tmp_path / "v2only"
    src.mkdir()
    data = os.urandom(5 * C)
    (src / "data.bin").write_bytes(v2.seal(keys.parse_key(key), data))
    m = mount_factory(src)
    assert (m.mnt / "data.bin").read_bytes() == data
