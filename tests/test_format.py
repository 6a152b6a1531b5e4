"""The v1 envelope as pure functions: known answers, interop with the plain
AESGCM recipe, and every edge case of classification and authentication."""

import contextlib
import io
import os

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given
from hypothesis import strategies as st

from stormfs import format as fmt

KEY = bytes(range(32))
NONCE = bytes(range(100, 112))


def test_known_answer():
    env = fmt.seal(KEY, b"hello storm", NONCE)
    assert env.hex() == (
        "01" + NONCE.hex() + AESGCM(KEY).encrypt(NONCE, b"hello storm", None).hex()
    )
    # A fixed vector, so no change of the format can slip through unnoticed.
    assert env.hex() == (
        "016465666768696a6b6c6d6e6f207eb20a16c925ea511032bda210d507b75629079ed4d60b3f91dd"
    )


def test_empty_file_is_29_bytes():
    env = fmt.seal(KEY, b"")
    assert len(env) == fmt.OVERHEAD == 29
    assert fmt.open_envelope(KEY, env) == b""


def test_interop_both_ways():
    data = os.urandom(5000)
    nonce = os.urandom(12)
    theirs = b"\x01" + nonce + AESGCM(KEY).encrypt(nonce, data, None)
    assert fmt.open_envelope(KEY, theirs) == data
    ours = fmt.seal(KEY, data)
    assert AESGCM(KEY).decrypt(ours[1:13], ours[13:], None) == data


def test_fresh_nonce_per_seal():
    assert fmt.seal(KEY, b"x")[1:13] != fmt.seal(KEY, b"x")[1:13]


@pytest.mark.parametrize(
    ("blob", "kind"),
    [
        (b"", fmt.Kind.PLAINTEXT),
        (b"\x01" * 28, fmt.Kind.PLAINTEXT),  # 28 bytes starting 0x01: too short
        (b"\x01" * 29, fmt.Kind.ENCRYPTED),
        (b"\x02" + bytes(40), fmt.Kind.PLAINTEXT),
        (b"plain text that is long enough to be an envelope", fmt.Kind.PLAINTEXT),
    ],
)
def test_classify(blob, kind):
    assert fmt.classify(len(blob), blob[:1]) is kind


def test_plaintext_size():
    assert fmt.plaintext_size(129, fmt.Kind.ENCRYPTED) == 100
    assert fmt.plaintext_size(129, fmt.Kind.PLAINTEXT) == 129


def test_wrong_key_fails():
    env = fmt.seal(KEY, b"secret")
    with pytest.raises(fmt.DecryptionFailed):
        fmt.open_envelope(bytes(32), env)


@pytest.mark.parametrize("pos", [0, 1, 12, 13, 20, -16, -1])
def test_flipped_bit_fails(pos):
    env = bytearray(fmt.seal(KEY, b"some content here"))
    env[pos] ^= 0x04
    with pytest.raises(fmt.DecryptionFailed):
        fmt.open_envelope(KEY, bytes(env))


def test_truncated_fails():
    env = fmt.seal(KEY, b"some content here")
    for cut in (1, 5, 16, len(env) - 29):
        with pytest.raises(fmt.DecryptionFailed):
            fmt.open_envelope(KEY, env[:-cut])


def test_0x01_prefixed_plaintext_is_decryption_failed():
    blob = b"\x01" + b"legacy plaintext that happens to start with one" * 2
    assert fmt.classify(len(blob), blob[:1]) is fmt.Kind.ENCRYPTED
    with pytest.raises(fmt.DecryptionFailed):
        fmt.open_envelope(KEY, blob)
    with pytest.raises(fmt.DecryptionFailed):
        fmt.verify_file(KEY, io.BytesIO(blob), len(blob))


def test_streaming_sealer_matches_seal():
    data = os.urandom(3 * fmt.STREAM_CHUNK + 777)
    s = fmt.Sealer(KEY, NONCE)
    body = b"".join(s.update(data[i : i + 65536]) for i in range(0, len(data), 65536))
    assert s.header + body + s.finalize() == fmt.seal(KEY, data, NONCE)


def test_verify_and_open_stream():
    data = os.urandom(2 * fmt.STREAM_CHUNK + 5)
    env = fmt.seal(KEY, data)
    assert fmt.verify_file(KEY, io.BytesIO(env), len(env)) == env[1:13]
    out = io.BytesIO()
    fmt.open_stream(KEY, io.BytesIO(env), out, len(env))
    assert out.getvalue() == data


def test_verify_stream_rejects_short_stream():
    env = fmt.seal(KEY, os.urandom(1000))
    with pytest.raises(fmt.DecryptionFailed):
        fmt.verify_file(KEY, io.BytesIO(env[:500]), len(env))


def test_open_stream_writes_nothing_when_tampered():
    env = bytearray(fmt.seal(KEY, os.urandom(100_000)))
    env[-1] ^= 1
    out = io.BytesIO()
    with pytest.raises(fmt.DecryptionFailed):
        fmt.open_stream(KEY, io.BytesIO(bytes(env)), out, len(env))
    assert out.getvalue() == b""


@pytest.mark.parametrize("offset", [0, 1, 15, 16, 17, 4095, 4096, 100_001])
def test_decrypt_range_at_any_offset(offset):
    data = os.urandom(150_000)
    env = fmt.seal(KEY, data, NONCE)
    body = env[fmt.HEADER_SIZE : -fmt.TAG_SIZE]
    for n in (1, 15, 16, 33, 5000):
        got = fmt.decrypt_range(KEY, NONCE, offset, body[offset : offset + n])
        assert got == data[offset : offset + n]


@given(st.binary(max_size=200))
def test_open_envelope_only_defined_errors(blob):
    with contextlib.suppress(fmt.DecryptionFailed):
        fmt.open_envelope(KEY, blob)


# ---- fuzzing: random, truncated and mutated inputs give only defined answers ----------
# `make stress` runs these with the "stress" hypothesis profile (many more examples).

_ENV_DATA = st.binary(max_size=3000)


@st.composite
def mutated_envelopes(draw):
    """A valid envelope and a damaged copy: flipped bits, cut, extended, spliced.

    Returns (data, envelope, damaged, the valid envelopes the damage may reproduce)."""
    data = draw(_ENV_DATA)
    env = fmt.seal(KEY, data, draw(st.binary(min_size=12, max_size=12)))
    valid = {env}
    how = draw(st.sampled_from(["flip", "cut", "extend", "splice", "overwrite"]))
    bad = bytearray(env)
    if how == "flip":
        for pos in draw(st.lists(st.integers(0, len(env) - 1), min_size=1, max_size=8)):
            bad[pos] ^= 1 << draw(st.integers(0, 7))
    elif how == "cut":
        del bad[draw(st.integers(0, len(env) - 1)) :]
    elif how == "extend":
        bad += draw(st.binary(min_size=1, max_size=64))
    elif how == "splice":
        other = fmt.seal(KEY, draw(_ENV_DATA))
        valid.add(other)
        cut = draw(st.integers(1, min(len(env), len(other)) - 1))
        bad = bytearray(env[:cut] + other[cut:])
    else:
        pos = draw(st.integers(0, len(env) - 1))
        chunk = draw(st.binary(min_size=1, max_size=32))
        bad[pos : pos + len(chunk)] = chunk
    return data, env, bytes(bad), valid


def _chunked_reader(blob: bytes, sizes: list[int]):
    """A read(n) that returns short chunks, as a pipe or a network file system may."""
    pos = [0]
    it = iter(sizes)

    def read(n: int) -> bytes:
        k = min(n, next(it, n))
        out = blob[pos[0] : pos[0] + k]
        pos[0] += len(out)
        return out

    return read


@given(st.binary(max_size=100))
def test_classify_follows_the_mixed_mode_rule(blob):
    kind = fmt.classify(len(blob), blob[:1])
    expected = len(blob) >= 29 and blob[:1] == b"\x01"
    assert kind is (fmt.Kind.ENCRYPTED if expected else fmt.Kind.PLAINTEXT)
    assert fmt.plaintext_size(len(blob), kind) == len(blob) - (29 if expected else 0)
    assert fmt.plaintext_size(len(blob), kind) >= 0


@given(mutated_envelopes())
def test_mutated_envelopes_fail_authentication(case):
    data, env, bad, valid = case
    assert fmt.open_envelope(KEY, env) == data
    if bad in valid:  # a splice that happens to rebuild one of the originals
        return
    with pytest.raises(fmt.DecryptionFailed):
        fmt.open_envelope(KEY, bad)
    with pytest.raises(fmt.DecryptionFailed):
        fmt.verify_file(KEY, io.BytesIO(bad), len(bad))
    out = io.BytesIO()
    with pytest.raises(fmt.DecryptionFailed):
        fmt.open_stream(KEY, io.BytesIO(bad), out, len(bad))
    assert out.getvalue() == b""


@given(
    st.one_of(st.binary(max_size=500), mutated_envelopes().map(lambda c: c[2])),
    st.integers(-40, 600),
    st.lists(st.integers(0, 70), max_size=40),
)
def test_verify_stream_any_input_any_declared_size(blob, declared, chunks):
    """Any bytes, a declared size that may be wrong, reads that come back short or empty:
    verify_stream answers a nonce or DecryptionFailed, nothing else."""
    size = max(0, declared)
    try:
        nonce = fmt.verify_stream(KEY, _chunked_reader(blob, chunks), size)
    except fmt.DecryptionFailed:
        return
    assert len(nonce) == 12 and size >= 29


@given(_ENV_DATA, st.lists(st.integers(1, 4000), max_size=30))
def test_verify_stream_accepts_valid_envelopes_read_in_any_chunks(data, chunks):
    env = fmt.seal(KEY, data)
    read = _chunked_reader(env, [c for c in chunks if c])
    assert fmt.verify_stream(KEY, read, len(env)) == env[1:13]


@given(_ENV_DATA, st.data())
def test_decrypt_range_matches_any_slice(data, draw):
    env = fmt.seal(KEY, data, NONCE)
    body = env[fmt.HEADER_SIZE : -fmt.TAG_SIZE]
    off = draw.draw(st.integers(0, len(data)))
    n = draw.draw(st.integers(0, len(data) - off))
    assert fmt.decrypt_range(KEY, NONCE, off, body[off : off + n]) == data[off : off + n]


@given(_ENV_DATA, st.lists(st.integers(0, 700), max_size=20))
def test_sealer_in_any_chunks_matches_seal(data, cuts):
    s = fmt.Sealer(KEY, NONCE)
    pieces, pos = [], 0
    for c in [*cuts, len(data)]:
        pieces.append(s.update(data[pos : pos + c]))
        pos += c
    assert s.header + b"".join(pieces) + s.finalize() == fmt.seal(KEY, data, NONCE)
