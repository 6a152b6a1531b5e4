"""The mounted view (DESIGN §2) over SOURCE as the Storm Cloud server writes it."""

from __future__ import annotations

import errno
import os
import subprocess

import pytest

from stormfs import format as fmt
from stormfs import keys

from .helpers import Mount, storm_cloud_envelope


def test_written_file_is_an_envelope(mounted: Mount):
    data = os.urandom(100_000)
    (mounted.mnt / "f.bin").write_bytes(data)
    assert (mounted.mnt / "f.bin").read_bytes() == data
    assert (mounted.source / "f.bin").stat().st_size == len(data) + 29
    assert mounted.decrypt("f.bin") == data
    assert (mounted.mnt / "f.bin").stat().st_size == len(data)


def test_empty_file_is_29_bytes(mounted: Mount):
    (mounted.mnt / "empty").touch()
    assert (mounted.source / "empty").stat().st_size == 29
    assert mounted.decrypt("empty") == b""
    assert (mounted.mnt / "empty").stat().st_size == 0


def test_storm_cloud_source_mounts_and_reads(mount_factory, tmp_path, key):
    src = tmp_path / "server"
    (src / "documents").mkdir(parents=True)
    report = os.urandom(300_000)
    (src / "documents" / "report.pdf").write_bytes(storm_cloud_envelope(key, report))
    (src / "legacy.txt").write_bytes(b"written before encryption was enabled\n")
    (src / "short01").write_bytes(b"\x01" * 28)  # 28 bytes starting 0x01: plaintext
    (src / "empty-envelope").write_bytes(storm_cloud_envelope(key, b""))
    m = mount_factory(src)
    assert (m.mnt / "documents" / "report.pdf").read_bytes() == report
    assert (m.mnt / "documents" / "report.pdf").stat().st_size == len(report)
    assert (m.mnt / "legacy.txt").read_bytes() == b"written before encryption was enabled\n"
    assert (m.mnt / "short01").read_bytes() == b"\x01" * 28
    assert (m.mnt / "empty-envelope").read_bytes() == b""


def test_xattrs(mounted: Mount):
    (mounted.source / "legacy").write_bytes(b"plain")
    (mounted.mnt / "new").write_bytes(b"x" * 10)
    new, legacy = os.fsencode(mounted.mnt / "new"), os.fsencode(mounted.mnt / "legacy")
    assert os.getxattr(new, "user.stormfs.encryption_method") == b"server"
    assert os.getxattr(new, "user.stormfs.encrypted_size") == b"39"
    assert os.getxattr(new, "user.stormfs.key_id") == b"1"
    assert os.getxattr(legacy, "user.stormfs.encryption_method") == b"none"
    with pytest.raises(OSError) as e:
        os.getxattr(legacy, "user.stormfs.encrypted_size")
    assert e.value.errno == errno.ENODATA
    assert set(os.listxattr(new)) >= {
        "user.stormfs.encryption_method",
        "user.stormfs.encrypted_size",
        "user.stormfs.key_id",
    }
    # read-only: a write is accepted (so copies between mounts work) and changes nothing
    os.setxattr(new, "user.stormfs.encryption_method", b"none")
    assert os.getxattr(new, "user.stormfs.encryption_method") == b"server"


def test_key_id_from_environment(mount_factory):
    m = mount_factory(env={keys.ENV_KEY_ID: "prod-7"})
    (m.mnt / "f").write_bytes(b"data")
    assert os.getxattr(m.mnt / "f", "user.stormfs.key_id") == b"prod-7"


def test_user_xattrs_pass_through_and_survive_rewrites(mounted: Mount):
    f = mounted.mnt / "f"
    f.write_bytes(b"one")
    os.setxattr(f, "user.comment", b"keep me")
    assert os.getxattr(mounted.source / "f", "user.comment") == b"keep me"
    f.write_bytes(b"two, longer")
    assert os.getxattr(f, "user.comment") == b"keep me"
    assert "user.comment" in os.listxattr(f)
    os.removexattr(f, "user.comment")
    assert "user.comment" not in os.listxattr(f)


def test_hidden_names(mounted: Mount):
    (mounted.mnt / "visible").write_bytes(b"x")
    assert (mounted.source / ".stormfs").is_dir()
    assert sorted(os.listdir(mounted.mnt)) == ["visible"]
    assert not (mounted.mnt / ".stormfs").exists()
    for name in (".stormfs", ".stormfs-tmp-123", ".stormfsx"):
        with pytest.raises(PermissionError):
            (mounted.mnt / name).write_bytes(b"x")
        with pytest.raises(PermissionError):
            (mounted.mnt / name).mkdir()
        with pytest.raises(PermissionError):
            os.rename(mounted.mnt / "visible", mounted.mnt / name)


def test_decryption_failed_answers_eio_and_never_touches_file(mount_factory, tmp_path, key):
    src = tmp_path / "src"
    src.mkdir()
    good = storm_cloud_envelope(key, b"fine")
    flipped = bytearray(storm_cloud_envelope(key, os.urandom(5000)))
    flipped[100] ^= 1
    damaged = {
        "flipped": bytes(flipped),
        "truncated": storm_cloud_envelope(key, os.urandom(5000))[:-7],
        "other-key": storm_cloud_envelope(keys.generate_key(), b"secret"),
        "header-only": b"\x01" + os.urandom(28),
        "0x01-plaintext": b"\x01legacy text that happens to start with one, long enough",
    }
    for name, blob in {**damaged, "good": good}.items():
        (src / name).write_bytes(blob)
    before = {n: (src / n).stat() for n in damaged}
    m = mount_factory(src)
    assert (m.mnt / "good").read_bytes() == b"fine"
    for name in damaged:
        with pytest.raises(OSError) as e:
            (m.mnt / name).read_bytes()
        assert e.value.errno == errno.EIO, name
        # writing into it (without truncation) also refuses: nothing is built on unverified data
        with pytest.raises(OSError) as e, open(m.mnt / name, "r+b") as f:
            f.seek(3)
            f.write(b"zz")
        assert e.value.errno == errno.EIO
    m.stop()
    log = m.logtext()
    for name, blob in damaged.items():
        assert f"DECRYPTION_FAILED: {name}" in log
        assert (src / name).read_bytes() == blob
        assert (src / name).stat().st_mtime_ns == before[name].st_mtime_ns
    assert key not in log


def test_statfs(mounted: Mount):
    ours, theirs = os.statvfs(mounted.mnt), os.statvfs(mounted.source)
    assert ours.f_bsize == theirs.f_bsize
    assert abs(ours.f_blocks - theirs.f_blocks) <= 1


def test_tamper_while_open_is_detected(mounted: Mount):
    data = os.urandom(200_000)
    (mounted.mnt / "f").write_bytes(data)
    with open(mounted.mnt / "f", "rb", buffering=0) as f:
        assert f.read(10) == data[:10]
        with open(mounted.source / "f", "r+b") as raw:
            raw.seek(50_000)
            raw.write(bytes([raw.read(1)[0] ^ 1]))
        f.seek(150_000)
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        with pytest.raises(OSError) as e:
            f.read(1000)
        assert e.value.errno == errno.EIO


def test_plaintext_size_of_envelope_matches(mounted: Mount):
    for n in (0, 1, 15, 16, 17, 4095, 4096, 4097, 1 << 20):
        (mounted.mnt / f"f{n}").write_bytes(os.urandom(n))
        assert (mounted.mnt / f"f{n}").stat().st_size == n
        assert (mounted.source / f"f{n}").stat().st_size == n + fmt.OVERHEAD


def test_file_replaced_behind_the_mount_is_served_fresh(mount_factory, key):
    m = mount_factory(args=("-o", "entry_timeout=0,attr_timeout=0"))
    (m.mnt / "f").write_bytes(b"first version")
    assert (m.mnt / "f").read_bytes() == b"first version"
    staged = m.source / "staged"
    staged.write_bytes(storm_cloud_envelope(key, b"written by the server"))
    os.rename(staged, m.source / "f")
    assert (m.mnt / "f").read_bytes() == b"written by the server"
    assert (m.mnt / "f").stat().st_size == len(b"written by the server")


def test_pending_writes_win_over_a_replacement_behind_the_mount(mount_factory, key):
    """Last writer wins: a commit is never dropped because the name changed underneath."""
    m = mount_factory(args=("-o", "entry_timeout=0,attr_timeout=0"))
    (m.mnt / "f").write_bytes(b"v1")
    with open(m.mnt / "f", "r+b") as f:
        f.write(b"ours")
        staged = m.source / "staged"
        staged.write_bytes(storm_cloud_envelope(key, b"theirs"))
        os.rename(staged, m.source / "f")
        assert (m.mnt / "f").stat().st_size == len(b"theirs")  # the name was looked up anew
    assert m.decrypt("f") == b"ours"
    os.unlink(m.mnt / "f")
    assert not (m.source / "f").exists()


def test_only_user_xattrs_in_the_view(mounted: Mount):
    f = mounted.mnt / "f"
    f.write_bytes(b"x")
    os.setxattr(mounted.source / "f", "trusted.backing-only", b"1")
    assert all(n.startswith("user.") for n in os.listxattr(f))
    for name in ("trusted.x", "security.capability", "system.posix_acl_access"):
        with pytest.raises(OSError) as e:
            os.getxattr(f, name)
        assert e.value.errno == errno.ENODATA
    with pytest.raises(OSError) as e:
        os.setxattr(f, "trusted.x", b"1")
    assert e.value.errno == errno.EOPNOTSUPP
    # backing attributes outside user.* survive rewrites all the same
    f.write_bytes(b"rewritten")
    assert os.getxattr(mounted.source / "f", "trusted.backing-only") == b"1"


def test_xattrs_over_a_source_without_xattr_support(silly_source, mount_factory):
    """SOURCE answers ENOTSUP to every xattr call: the view still lists and answers its
    own attributes (getfattr -d works), other user.* attributes are ENOTSUP, no traceback,
    and `cp -a` off the mount works."""
    m = mount_factory(silly_source(xattrs=False))
    (m.mnt / "f").write_bytes(b"secret")
    with pytest.raises(OSError) as e:
        os.getxattr(m.source / "f", "user.x")
    assert e.value.errno == errno.ENOTSUP
    names = sorted(os.listxattr(m.mnt / "f"))
    ours = ("encryption_method", "encrypted_size", "key_id", "format")
    assert names == sorted(f"user.stormfs.{n}" for n in ours)
    dump = subprocess.run(
        ["getfattr", "-d", "-m", "-", str(m.mnt / "f")], capture_output=True, text=True
    )
    assert dump.returncode == 0, dump.stderr
    assert 'user.stormfs.encryption_method="server"' in dump.stdout
    assert 'user.stormfs.encrypted_size="35"' in dump.stdout
    for call in (
        lambda: os.setxattr(m.mnt / "f", "user.mine", b"v"),
        lambda: os.getxattr(m.mnt / "f", "user.mine"),
        lambda: os.removexattr(m.mnt / "f", "user.mine"),
    ):
        with pytest.raises(OSError) as e:
            call()
        assert e.value.errno == errno.ENOTSUP
    os.setxattr(m.mnt / "f", "user.stormfs.key_id", b"ignored")  # read-only: accepted, ignored
    assert os.listxattr(m.mnt) == []  # a directory has none of ours
    copy = subprocess.run(
        ["cp", "-a", str(m.mnt / "f"), str(m.mnt / "g")], capture_output=True, text=True
    )
    assert copy.returncode == 0, copy.stderr
    assert (m.mnt / "g").read_bytes() == b"secret"
    assert "Traceback" not in m.logtext()
