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
