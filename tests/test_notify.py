"""sd_notify over a real AF_UNIX datagram socket, path and abstract."""

from __future__ import annotations

import os
import socket

import pytest

from stormfs import notify


@pytest.fixture
def receiver(tmp_path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(tmp_path / "notify.sock")
    sock.bind(path)
    sock.settimeout(5)
    yield path, sock
    sock.close()


def test_messages_arrive_one_datagram_each(receiver):
    path, sock = receiver
    env = {"NOTIFY_SOCKET": path}
    assert notify.ready("mounted /mnt/x", env)
    assert notify.stopping(env)
    assert sock.recv(4096) == b"READY=1\nSTATUS=mounted /mnt/x"
    assert sock.recv(4096) == b"STOPPING=1"


def test_abstract_socket(receiver):
    name = f"stormfs-test-{os.getpid()}-{os.urandom(4).hex()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        assert notify.ready(environ={"NOTIFY_SOCKET": "@" + name})
        assert sock.recv(4096) == b"READY=1"


def test_no_socket_is_a_no_op():
    assert notify.ready(environ={}) is False
    assert notify.notify("READY=1", {"NOTIFY_SOCKET": ""}) is False


def test_a_socket_that_is_gone_raises(tmp_path):
    with pytest.raises(OSError):
        notify.ready(environ={"NOTIFY_SOCKET": str(tmp_path / "nobody")})
