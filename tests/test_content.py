"""Readers and the open-file table, without a mount: a reader's retry when the backing
file changes under it, the verdict cache, and handle numbers."""

from __future__ import annotations

import errno
import logging
import os
import time
from pathlib import Path

import pytest

from stormfs import format as fmt
from stormfs.content import EnvelopeReader, Opened, Verdicts
from stormfs.inodes import Node
from stormfs.keys import Key, Keyring
from stormfs.openfiles import DirHandle, Handle, Handles
from stormfs.scan import authenticate

KEY = os.urandom(32)
KEYRING = Keyring(Key("1", KEY))


def _open(fd: int, size: int) -> Opened | None:
    return authenticate(fd, size, KEYRING, None)


def _reader(path: Path, verdicts: Verdicts) -> EnvelopeReader:
    return EnvelopeReader(os.open(path, os.O_RDONLY), _open, verdicts, path.name)


def _rewrite_in_place(path: Path, blob: bytes) -> None:
    """New bytes in the same inode (as an in-place rewrite does), and a new mtime."""
    with open(path, "r+b") as f:
        f.write(blob)
        f.truncate()
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))


def test_a_file_rewritten_under_an_open_reader_is_verified_again(tmp_path: Path):
    path = tmp_path / "f"
    path.write_bytes(fmt.seal(KEY, b"first version"))
    reader = _reader(path, Verdicts())
    try:
        assert reader.read(0, 100) == b"first version"
        _rewrite_in_place(path, fmt.seal(KEY, b"second, longer version"))
        assert reader.read(0, 100) == b"second, longer version"
        assert reader.size == len(b"second, longer version")
    finally:
        reader.close()


def test_a_file_damaged_under_an_open_reader_fails_and_is_logged(tmp_path: Path, caplog):
    path = tmp_path / "f"
    blob = fmt.seal(KEY, b"x" * 5000)
    path.write_bytes(blob)
    reader = _reader(path, Verdicts())
    try:
        assert reader.read(0, 10) == b"x" * 10
        damaged = bytearray(blob)
        damaged[2000] ^= 1
        _rewrite_in_place(path, bytes(damaged))
        with caplog.at_level(logging.ERROR), pytest.raises(fmt.DecryptionFailed):
            reader.read(0, 10)
        assert "DECRYPTION_FAILED: f" in caplog.text
        with pytest.raises(fmt.DecryptionFailed):  # the verdict is remembered
            reader.read(4000, 10)
    finally:
        reader.close()
    assert path.read_bytes() == bytes(damaged)


def test_a_verdict_serves_the_next_open_of_the_same_version_only(tmp_path: Path):
    path = tmp_path / "f"
    path.write_bytes(fmt.seal(KEY, b"v1"))
    verdicts = Verdicts()
    first = _reader(path, verdicts)
    nonce, key = first.verify()
    first.close()
    again = _reader(path, verdicts)
    assert verdicts.get(again.ident) == Opened(nonce, key)  # no second read of the file
    again.close()
    time.sleep(0.01)
    path.write_bytes(fmt.seal(KEY, b"v2"))
    third = _reader(path, verdicts)
    try:
        assert verdicts.get(third.ident) is None
        assert third.read(0, 10) == b"v2"
    finally:
        third.close()


def test_handles_are_numbered_apart_and_typed():
    handles = Handles()
    node = Node(5, (1, 2), 0o100644)
    fh, dh = handles.add(Handle(node, writable=True)), handles.add(DirHandle(node))
    assert fh != dh
    assert handles.file(fh).node is node
    assert handles.directory(dh).node is node
    for wrong in (lambda: handles.file(dh), lambda: handles.directory(fh)):
        with pytest.raises(OSError) as e:
            wrong()
        assert e.value.errno == errno.EBADF
    assert isinstance(handles.pop(fh), Handle)
    assert handles.pop(fh) is None
    with pytest.raises(OSError):
        handles.file(fh)
    assert handles.add(Handle(node, writable=False)) not in (fh, dh)  # never reused


def test_a_verdict_for_another_envelope_under_the_same_identity_is_not_trusted(tmp_path: Path):
    """An identity (dev, ino, size, mtime, ctime) can recur: a file replaced within one
    timestamp tick by one of the same size that got the freed inode number.  The cached
    nonce must match the envelope's own before the verdict is used."""
    path = tmp_path / "f"
    path.write_bytes(fmt.seal(KEY, b"the real content"))
    verdicts = Verdicts()
    reader = _reader(path, verdicts)
    try:
        verdicts.put(reader.ident, bytes(12), KEYRING.current)  # what the earlier file had
        assert reader.read(0, 100) == b"the real content"
        assert reader.nonce == path.read_bytes()[1:13]
    finally:
        reader.close()
