"""The v2 envelope as pure functions: the vectors of docs/FORMAT.md, the plain recipe,
size arithmetic, round trips, the tamper matrix and fuzzing of the parser."""

import contextlib
import hashlib
import os
import struct

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import hmac as crypto_hmac
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from hypothesis import given
from hypothesis import strategies as st

from stormfs import format_v2 as v2

# The inputs of the vectors in docs/FORMAT.md.
KEY = bytes(range(32))
FILE_ID = bytes(range(0xF0, 0x100))
NONCES = [bytes([0xA0 + i]) * 12 for i in range(8)]
SMALL = 4096  # the smallest chunk size: small vectors, many chunks


def vector(plaintext: bytes, chunk_size: int = v2.CHUNK_SIZE) -> bytes:
    return v2.seal(KEY, plaintext, chunk_size=chunk_size, file_id=FILE_ID, nonces=NONCES)


# ---- vectors ------------------------------------------------------------------------------


def test_vector_subkeys():
    chunk_key, mac_key = v2.derive_keys(KEY, FILE_ID)
    assert chunk_key.hex() == "32a8c0b7e051ae178474495e181742ea8eafd4543ab675072180e54a39b57e89"
    assert mac_key.hex() == "6d1ddbee8a77d75b72ca447d6910a3beae54c22bd5de71344af17e171740a5d0"


HEADER_16K = (
    "0273746f726d6673" "00004000" "f0f1f2f3f4f5f6f7f8f9fafbfcfdfeff"
    "ff6c4a8f6c4209266f81cfe3668c0c1496490fa2ae71df0f184fafe42021441b"
)  # fmt: skip


def test_vector_empty_file():
    env = vector(b"")
    assert len(env) == v2.EMPTY_FILE_SIZE == 88
    assert env.hex() == HEADER_16K + "a0a0a0a0a0a0a0a0a0a0a0a0" + "d41f9323dfc4177d4d507dc5a0688207"


def test_vector_one_short_chunk():
    env = vector(b"hello storm")
    assert env.hex() == (
        HEADER_16K + "a0a0a0a0a0a0a0a0a0a0a0a0" + "733728e3ffc658b01ebb27"
        "c7908cfa279e312eacd4c7a34cd65e76"
    )


def test_vector_three_chunks():
    plaintext = bytes(i % 251 for i in range(2 * SMALL + 1))
    env = vector(plaintext, SMALL)
    assert len(env) == 60 + 2 * (SMALL + 28) + 1 + 28 == 8337
    assert env[:60].hex() == (
        "0273746f726d6673" "00001000" "f0f1f2f3f4f5f6f7f8f9fafbfcfdfeff"
        "651100ae918cdd3d09c5965f847ef7a8c9473cc63c08443ecc9ac99e5e9fe542"
    )  # fmt: skip
    tags = [
        "ac2e531d4d333e767d341a0cf36a693a",
        "23843756b78f665808d77f583348a64b",
        "4c8adae537d2002f9e28b9303783f41a",
    ]
    for i, tag in enumerate(tags):
        start = v2.chunk_offset(i, SMALL)
        end = min(len(env), start + v2.slot_size(SMALL))
        assert env[start : start + 12] == NONCES[i]
        assert env[end - 16 : end].hex() == tag
    assert hashlib.sha256(env).hexdigest() == (
        "7d437d8aa5db7163d1c2acce41261c9a843b431b0ea38aed33aed3a54a2ce4d7"
    )


def test_the_plain_recipe_of_format_md_gives_the_same_bytes():
    """docs/FORMAT.md's recipe, written with nothing but the primitives, agrees both ways."""
    plaintext = os.urandom(2 * SMALL + 100)
    okm = HKDF(hashes.SHA256(), 64, salt=FILE_ID, info=b"stormfs v2 file keys").derive(KEY)
    body = b"\x02stormfs" + struct.pack(">I", SMALL) + FILE_ID
    mac = crypto_hmac.HMAC(okm[32:], hashes.SHA256())
    mac.update(body)
    theirs = body + mac.finalize()
    pieces = [plaintext[i : i + SMALL] for i in range(0, len(plaintext), SMALL)]
    for i, piece in enumerate(pieces):
        ad = FILE_ID + struct.pack(">Q", i) + bytes([i == len(pieces) - 1])
        theirs += NONCES[i] + AESGCM(okm[:32]).encrypt(NONCES[i], piece, ad)
    assert theirs == vector(plaintext, SMALL)
    assert v2.open_file(KEY, theirs) == plaintext


# ---- sizes and positions --------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [SMALL, v2.CHUNK_SIZE])
def test_sizes_round_trip_and_edges(chunk):
    edges = {0: 1, 1: 1, chunk - 1: 1, chunk: 1, chunk + 1: 2, 3 * chunk: 3, 3 * chunk + 7: 4}
    for plain, count in edges.items():
        assert v2.chunk_count(plain, chunk) == count
        disk = v2.ondisk_size(plain, chunk)
        assert disk == 60 + plain + 28 * count
        assert v2.plaintext_size(disk, chunk) == plain
        assert v2.size_is_valid(disk, chunk)


def test_every_disk_size_is_one_file_size_or_invalid():
    """Over the first few chunks, each on-disk size is the size of exactly one
    plaintext size or of none; the invalid ones are exactly those of a cut chunk."""
    sizes = {v2.ondisk_size(p, SMALL): p for p in range(4 * SMALL)}
    for disk in range(v2.ondisk_size(4 * SMALL - 1, SMALL)):
        plain = v2.plaintext_size(disk, SMALL)
        assert plain >= 0
        assert v2.size_is_valid(disk, SMALL) == (disk in sizes)
        if disk in sizes:
            assert plain == sizes[disk]


def test_a_file_cut_at_a_chunk_boundary_plus_an_empty_chunk_is_invalid():
    """Only an empty file has an empty chunk: one after a full chunk is damage."""
    assert not v2.size_is_valid(60 + (SMALL + 28) + 28, SMALL)


def test_chunk_arithmetic():
    assert v2.chunk_offset(0, SMALL) == 60
    assert v2.chunk_offset(2, SMALL) == 60 + 2 * (SMALL + 28)
    assert list(v2.chunks_covering(0, 1, SMALL)) == [0]
    assert list(v2.chunks_covering(SMALL - 1, 2, SMALL)) == [0, 1]
    assert list(v2.chunks_covering(SMALL, SMALL, SMALL)) == [1]
    assert list(v2.chunks_covering(5, 0, SMALL)) == []
    assert v2.chunk_span(SMALL + 1, 0, SMALL) == SMALL
    assert v2.chunk_span(SMALL + 1, 1, SMALL) == 1
    assert v2.chunk_span(SMALL + 1, 2, SMALL) == 0


def test_largest_file():
    largest = v2.MAX_CHUNKS * v2.CHUNK_SIZE
    assert v2.plaintext_size(v2.ondisk_size(largest, v2.CHUNK_SIZE), v2.CHUNK_SIZE) == largest
    with pytest.raises(OverflowError):
        v2.ondisk_size(largest + 1, v2.CHUNK_SIZE)


@pytest.mark.parametrize("size", [0, 1, 4095, 3000, 8192 + 4096, 1 << 17, 4096 * 3])
def test_chunk_sizes_outside_the_range_are_refused(size):
    valid = size in (4096, 8192, 16384, 32768, 65536)
    assert v2.valid_chunk_size(size) == valid
    with pytest.raises(ValueError):
        v2.FileCipher(KEY, FILE_ID, size)


# ---- round trips and nonces ---------------------------------------------------------------


@pytest.mark.parametrize("chunk", [SMALL, v2.CHUNK_SIZE, v2.MAX_CHUNK_SIZE])
def test_round_trip_at_the_edges(chunk):
    for n in (0, 1, chunk - 1, chunk, chunk + 1, 3 * chunk + 5):
        data = os.urandom(n)
        env = v2.seal(KEY, data, chunk_size=chunk)
        assert len(env) == v2.ondisk_size(n, chunk)
        assert v2.open_file(KEY, env) == data


def test_fresh_file_id_and_nonces_per_seal():
    a, b = v2.seal(KEY, bytes(3 * SMALL), chunk_size=SMALL), v2.seal(KEY, bytes(3 * SMALL))
    assert a[12:28] != b[12:28]
    nonces = {a[o : o + 12] for o in (v2.chunk_offset(i, SMALL) for i in range(3))}
    assert len(nonces) == 3


def test_rewriting_one_chunk_in_place_leaves_header_and_other_chunks_alone():
    """What the write stage does: re-seal one chunk under a fresh nonce, put it where
    the old one was.  The header never changes, and the file is valid."""
    data = bytearray(os.urandom(3 * SMALL + 10))
    env = bytearray(v2.seal(KEY, bytes(data), chunk_size=SMALL))
    cipher = v2.open_header(KEY, bytes(env[:60]))
    data[SMALL + 5 : SMALL + 9] = b"NEW!"
    start = v2.chunk_offset(1, SMALL)
    old = bytes(env[start : start + v2.slot_size(SMALL)])
    new = cipher.seal_chunk(1, bytes(data[SMALL : 2 * SMALL]), last=False)
    assert new[:12] != old[:12]
    env[start : start + len(new)] = new
    assert v2.open_file(KEY, bytes(env)) == bytes(data)


def test_appending_reseals_the_old_last_chunk():
    cipher = v2.FileCipher(KEY, FILE_ID, SMALL)
    env = cipher.header() + cipher.seal_chunk(0, b"abc", last=True)
    start = v2.chunk_offset(0, SMALL)
    tail = b"abc" + bytes(SMALL - 3)
    grown = env[:start] + cipher.seal_chunk(0, tail, last=False) + cipher.seal_chunk(1, b"z", True)
    assert v2.open_file(KEY, grown) == tail + b"z"


@pytest.mark.parametrize(
    ("index", "n", "last"),
    [(0, SMALL - 1, False), (0, SMALL + 1, True), (1, 0, True), (-1, 5, True), (2**32, 1, True)],
)
def test_seal_chunk_refuses_what_no_file_holds(index, n, last):
    cipher = v2.FileCipher(KEY, FILE_ID, SMALL)
    with pytest.raises((ValueError, OverflowError)):
        cipher.seal_chunk(index, bytes(n), last)


def test_bad_keys_and_file_ids_are_refused():
    with pytest.raises(ValueError):
        v2.derive_keys(bytes(31), FILE_ID)
    with pytest.raises(ValueError):
        v2.derive_keys(KEY, bytes(15))


def test_signature_and_chunk_size_of():
    env = vector(b"x")
    assert v2.is_v2(env) and v2.chunk_size_of(env[:12]) == v2.CHUNK_SIZE
    assert not v2.is_v2(b"\x02stormf") and not v2.is_v2(b"\x01stormfs")
    assert v2.chunk_size_of(b"\x02stormfs" + struct.pack(">I", 12345)) is None
    assert v2.chunk_size_of(b"\x02stormfs\x00") is None


# ---- the tamper matrix ----------------------------------------------------------------------

DATA = bytes(range(256)) * (3 * SMALL // 256) + b"tail"  # 3 full chunks and 4 bytes
OTHER_KEY = bytes(32)


def _slots(env: bytes) -> list[bytes]:
    size = v2.slot_size(SMALL)
    return [env[o : o + size] for o in range(60, len(env), size)]


def _join(header: bytes, slots: list[bytes]) -> bytes:
    return header + b"".join(slots)


def _readable_chunks(env: bytes) -> list[bool]:
    """For each chunk slot present: does it open as the chunk its position says
    (random access, as the mount reads)?"""
    cipher = v2.open_header(KEY, env[:60])
    slots = _slots(env)
    out = []
    for i, slot in enumerate(slots):
        try:
            cipher.open_chunk(i, slot, i == len(slots) - 1)
            out.append(True)
        except v2.DecryptionFailed:
            out.append(False)
    return out


def _env() -> bytes:
    return v2.seal(KEY, DATA, chunk_size=SMALL, file_id=FILE_ID)


@pytest.mark.parametrize("pos", range(60))
def test_any_flipped_header_bit_fails(pos):
    bad = bytearray(_env())
    bad[pos] ^= 1 << (pos % 8)
    with pytest.raises(v2.DecryptionFailed):
        v2.open_header(KEY, bytes(bad[:60]))
    with pytest.raises(v2.DecryptionFailed):
        v2.open_file(KEY, bytes(bad))


@pytest.mark.parametrize("where", ["nonce", "ciphertext", "tag"])
@pytest.mark.parametrize("chunk", [0, 1, 3])
def test_a_flipped_bit_in_a_chunk_fails_that_chunk_only(where, chunk):
    env = bytearray(_env())
    start = v2.chunk_offset(chunk, SMALL)
    end = min(len(env), start + v2.slot_size(SMALL))
    pos = {"nonce": start + 5, "ciphertext": start + 12 + 2, "tag": end - 3}[where]
    env[pos] ^= 0x10
    with pytest.raises(v2.DecryptionFailed):
        v2.open_file(KEY, bytes(env))
    assert _readable_chunks(bytes(env)) == [i != chunk for i in range(4)]


def test_swapped_chunks_fail():
    env = _env()
    s = _slots(env)
    bad = _join(env[:60], [s[1], s[0], s[2], s[3]])
    assert _readable_chunks(bad) == [False, False, True, True]
    with pytest.raises(v2.DecryptionFailed):
        v2.open_file(KEY, bad)


def test_a_chunk_moved_over_another_fails():
    env = _env()
    s = _slots(env)
    bad = _join(env[:60], [s[0], s[0], s[2], s[3]])
    assert _readable_chunks(bad) == [True, False, True, True]


def test_a_chunk_spliced_from_another_file_under_the_same_key_fails():
    """Same key, same position, same size, another file id: nothing opens."""
    env = _env()
    other = v2.seal(KEY, os.urandom(len(DATA)), chunk_size=SMALL)
    s, t = _slots(env), _slots(other)
    bad = _join(env[:60], [s[0], t[1], s[2], s[3]])
    assert _readable_chunks(bad) == [True, False, True, True]
    # Its header with our chunks: every chunk fails.
    assert _readable_chunks(_join(other[:60], s)) == [False] * 4


@pytest.mark.parametrize("keep", [1, 2, 3])
def test_truncation_at_a_chunk_boundary_fails_at_the_new_last_chunk(keep):
    env = _env()
    s = _slots(env)
    bad = _join(env[:60], s[:keep])
    assert v2.size_is_valid(len(bad), SMALL)  # the size alone cannot tell
    assert _readable_chunks(bad) == [True] * (keep - 1) + [False]
    with pytest.raises(v2.DecryptionFailed):
        v2.open_file(KEY, bad)


def test_removing_every_chunk_fails():
    with pytest.raises(v2.DecryptionFailed):
        v2.open_file(KEY, _env()[:60])


def test_extension_at_a_chunk_boundary_fails():
    env = _env()
    s = _slots(env)
    full = bytearray(_join(env[:60], s[:3]))
    # A full file of 3 chunks, then the last chunk of the original appended again:
    # the old last is no longer last, the new one is at the wrong index.
    three = v2.seal(KEY, DATA[: 3 * SMALL], chunk_size=SMALL, file_id=FILE_ID)
    appended = three + _slots(three)[2]
    assert _readable_chunks(appended) == [True, True, False, False]
    # A chunk of another file, sealed as its last chunk at index 3, appended.
    other = v2.seal(KEY, os.urandom(3 * SMALL + 4), chunk_size=SMALL)
    assert _readable_chunks(bytes(full) + _slots(other)[3])[3:] == [False]
    for bad in (appended, bytes(full) + _slots(other)[3]):
        with pytest.raises(v2.DecryptionFailed):
            v2.open_file(KEY, bad)


def test_extension_or_cut_inside_a_chunk_fails():
    env = _env()
    for bad in (env + b"\x00", env[:-1], env + bytes(28), env[:-5] + bytes(5)):
        with pytest.raises(v2.DecryptionFailed):
            v2.open_file(KEY, bad)


def test_wrong_key_fails():
    with pytest.raises(v2.DecryptionFailed):
        v2.open_file(OTHER_KEY, _env())
    with pytest.raises(v2.DecryptionFailed):
        v2.open_header(OTHER_KEY, _env()[:60])


def test_all_zero_chunk_slot_fails():
    """A hole in the backing file reads as zeros: no special case, it fails."""
    env = bytearray(_env())
    start = v2.chunk_offset(1, SMALL)
    env[start : start + v2.slot_size(SMALL)] = bytes(v2.slot_size(SMALL))
    assert _readable_chunks(bytes(env)) == [True, False, True, True]


def test_empty_file_damage_fails():
    env = vector(b"")
    for bad in (env[:-1], env[:60], env + bytes(28)):
        with pytest.raises(v2.DecryptionFailed):
            v2.open_file(KEY, bad)
    chunk_as_not_last = v2.open_header(KEY, env[:60])
    with pytest.raises(v2.DecryptionFailed):
        chunk_as_not_last.open_chunk(0, env[60:], last=False)


def test_an_older_version_of_a_chunk_is_accepted():
    """Not detected, by design (docs/FORMAT.md): a chunk rolled back to an earlier
    version of itself in the same file authenticates."""
    cipher = v2.FileCipher(KEY, FILE_ID, SMALL)
    old = cipher.seal_chunk(0, b"a" * SMALL, last=False)
    cipher.seal_chunk(0, b"b" * SMALL, last=False)
    assert cipher.open_chunk(0, old, last=False) == b"a" * SMALL


# ---- fuzzing: malformed input only ever raises DecryptionFailed ---------------------------
# `make stress` runs these with the "stress" hypothesis profile.


@st.composite
def damaged_files(draw):
    data = draw(st.binary(max_size=3 * SMALL))
    env = bytearray(v2.seal(KEY, data, chunk_size=SMALL))
    how = draw(st.sampled_from(["flip", "cut", "extend", "overwrite"]))
    if how == "flip":
        for pos in draw(st.lists(st.integers(0, len(env) - 1), min_size=1, max_size=6)):
            env[pos] ^= 1 << draw(st.integers(0, 7))
    elif how == "cut":
        del env[draw(st.integers(0, len(env) - 1)) :]
    elif how == "extend":
        env += draw(st.binary(min_size=1, max_size=200))
    else:
        pos = draw(st.integers(0, len(env) - 1))
        piece = draw(st.binary(min_size=1, max_size=40))
        env[pos : pos + len(piece)] = piece
    return data, bytes(env)


@given(damaged_files())
def test_damaged_files_fail_authentication(case):
    data, bad = case
    with contextlib.suppress(v2.DecryptionFailed):
        # Only an overwrite that wrote the bytes already there leaves a valid file.
        assert v2.open_file(KEY, bad) == data


@given(st.binary(max_size=300))
def test_parser_on_random_bytes(blob):
    with contextlib.suppress(v2.DecryptionFailed):
        v2.open_header(KEY, blob)
    with contextlib.suppress(v2.DecryptionFailed):
        v2.open_file(KEY, blob)
    size = v2.chunk_size_of(blob)
    assert size is None or v2.valid_chunk_size(size)


@given(
    st.binary(min_size=0, max_size=40).map(lambda tail: b"\x02stormfs" + tail),
    st.integers(0, 1 << 20),
)
def test_parser_on_random_headers_with_the_signature(blob, declared):
    with contextlib.suppress(v2.DecryptionFailed):
        v2.open_header(KEY, blob)
    with contextlib.suppress(v2.DecryptionFailed):
        v2.verify_stream(KEY, v2._bytes_reader(blob), declared)


@given(st.integers(-100, 1 << 40), st.sampled_from([SMALL, v2.CHUNK_SIZE, v2.MAX_CHUNK_SIZE]))
def test_size_functions_are_total(disk, chunk):
    plain = v2.plaintext_size(disk, chunk)
    assert plain >= 0
    if v2.size_is_valid(disk, chunk):
        assert v2.ondisk_size(plain, chunk) == disk


@given(st.binary(max_size=5 * SMALL), st.integers(0, 6 * SMALL), st.integers(0, 3 * SMALL))
def test_chunks_covering_reads_exactly_the_range(data, offset, n):
    env = v2.seal(KEY, data, chunk_size=SMALL)
    cipher = v2.open_header(KEY, env[:60])
    count = v2.chunk_count(len(data), SMALL)
    end = min(offset + n, len(data))
    covering = v2.chunks_covering(offset, max(0, end - offset), SMALL)
    pieces = []
    for i in covering:
        start = v2.chunk_offset(i, SMALL)
        slot = env[start : start + v2.slot_size(SMALL)]
        pieces.append(cipher.open_chunk(i, slot, i == count - 1))
    got = b"".join(pieces)
    skip = offset - covering.start * SMALL if len(covering) else 0
    assert got[skip : skip + max(0, end - offset)] == data[offset:end]


@pytest.mark.parametrize("size", [0, 1, SMALL - 1, SMALL, SMALL + 1, 3 * SMALL, 3 * SMALL + 5])
@pytest.mark.parametrize("piece", [1, 1000, SMALL, 3 * SMALL + 7])
def test_the_streaming_sealer_gives_the_file_seal_gives(size, piece):
    plaintext = os.urandom(size)
    sealer = v2.Sealer(KEY, SMALL)
    out = [sealer.header]
    for i in range(0, size, piece):
        out.append(bytes(sealer.update(plaintext[i : i + piece])))  # valid until the next call
        assert len(sealer.pending) <= SMALL
    out.append(sealer.finalize())
    env = b"".join(out)
    assert len(env) == v2.ondisk_size(size, SMALL)
    assert v2.open_file(KEY, env) == plaintext
