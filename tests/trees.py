"""Storage trees for the audit and encrypt tests, and ways to look at them."""

from __future__ import annotations

import json
import os
import random
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

from stormfs import format as fmt
from stormfs import format_v2 as v2
from stormfs import keys

from .helpers import reference_decrypt, scrubbed_env
from .keyscan import new_key

RUN_TIMEOUT = 120


def stormfs(
    *args: str,
    key: str | None,
    env: dict[str, str] | None = None,
    prefix: tuple[str, ...] = (),
    **kw: Any,
) -> subprocess.CompletedProcess:
    full_env = scrubbed_env(key, **(env or {}))
    return subprocess.run(
        [*prefix, sys.executable, "-m", "stormfs", *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=RUN_TIMEOUT,
        **kw,
    )


def run_json(*args: str, key: str | None, **kw: Any) -> tuple[int, dict[str, Any]]:
    r = stormfs(*args, "--json", key=key, **kw)
    try:
        return r.returncode, json.loads(r.stdout)
    except json.JSONDecodeError:
        raise AssertionError(f"not JSON (rc {r.returncode}):\n{r.stdout}\n{r.stderr}") from None


def plain_decrypt(key: str, data: bytes) -> bytes:
    """DESIGN §1's recipe, nothing else, with the key as configured."""
    return reference_decrypt(keys.parse_key(key), data)


def legacy_bytes(n: int) -> bytes:
    """Random content of a legacy plaintext file: never starting 0x01, which would make
    a file of 29 bytes or more look like an envelope (DECRYPTION_FAILED)."""
    data = os.urandom(n)
    return b"\x00" + data[1:] if data[:1] == b"\x01" else data


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def make_mixed(root: Path, key: str) -> dict[str, Any]:
    """A tree with every class present.  Returns what each file is expected to be."""
    raw = keys.parse_key(key)
    other = keys.parse_key(keys.generate_key())
    legacy = {
        "notes.txt": b"hello world\n" * 50,
        "empty": b"",
        "tiny": b"x",
        "docs/report.pdf": legacy_bytes(200_000),
        "docs/deep/er/file.bin": legacy_bytes(70_000),
        "short-01": b"\x01" + b"a" * 27,  # 28 bytes: plaintext by the size rule
        "spaces and ünïcode.txt": "grüße\n".encode() * 10,
    }
    plain_encrypted = {"enc/a.bin": os.urandom(5000), "enc/empty": b""}
    for rel, data in legacy.items():
        write(root / rel, data)
    for rel, data in plain_encrypted.items():
        write(root / rel, fmt.seal(raw, data))
    good = fmt.seal(raw, b"some content here" * 10)
    flipped = bytearray(good)
    flipped[40] ^= 0x04
    broken = {
        "bad/bitflip": bytes(flipped),
        "bad/truncated": good[:-5],
        "bad/x01-plaintext": b"\x01" + b"legacy text that starts with 0x01" * 3,
        "bad/other-key": fmt.seal(other, b"written with another key"),
    }
    for rel, data in broken.items():
        write(root / rel, data)
    # stormfs' own names, skipped at every level
    write(root / ".stormfs/state-of-the-daemon", b"x" * 40)
    write(root / "docs/.stormfs-tmp-0123456789abcdef", fmt.seal(raw, b"daemon temp"))
    # not regular files: skipped
    os.symlink("notes.txt", root / "link-to-notes")
    os.mkfifo(root / "fifo")
    return {"legacy": legacy, "encrypted": plain_encrypted, "broken": broken}


def plaintext(key: str, raw: bytes) -> bytes:
    """A file's content whatever its format (legacy files are their content)."""
    if raw.startswith(v2.SIGNATURE):
        return v2.open_file(keys.parse_key(key), raw)
    if fmt.classify(len(raw), raw[:1]) is fmt.Kind.ENCRYPTED:
        return fmt.open_envelope(keys.parse_key(key), raw)
    return raw


def format_of(raw: bytes) -> int:
    if raw.startswith(v2.SIGNATURE):
        return 2
    return 1 if fmt.classify(len(raw), raw[:1]) is fmt.Kind.ENCRYPTED else 0


def snapshot(root: Path, *, atime: bool = True) -> dict[str, tuple]:
    """Everything observable about every entry under root (content, metadata, xattrs),
    except inside the state directory ``root/.stormfs``, which stormfs keeps for itself."""
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        if Path(dirpath) == root and ".stormfs" in dirnames:
            dirnames.remove(".stormfs")
        for name in sorted(dirnames + filenames):
            p = Path(dirpath, name)
            st = p.lstat()
            data = read_noatime(p) if stat.S_ISREG(st.st_mode) else None
            try:
                xattrs = {n: os.getxattr(p, n, follow_symlinks=False) for n in os.listxattr(p)}
            except OSError:
                xattrs = {}
            meta = (
                st.st_mode,
                st.st_ino,
                st.st_nlink,
                st.st_uid,
                st.st_gid,
                st.st_size,
                st.st_mtime_ns,
                st.st_ctime_ns,
                st.st_atime_ns if atime and stat.S_ISREG(st.st_mode) else None,
            )
            out[str(p.relative_to(root))] = (meta, data, tuple(sorted(xattrs.items())))
    return out


def read_noatime(path: Path) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_NOATIME | os.O_NOFOLLOW)
    with os.fdopen(fd, "rb") as f:
        return f.read()


def leftovers(root: Path) -> list[str]:
    """Temporary files of `stormfs encrypt` under root."""
    return [
        str(Path(d, n).relative_to(root))
        for d, _, files in os.walk(root)
        for n in files
        if n.startswith(".stormfs-tmp-enc-")
    ]


# Sizes around the envelope threshold (29) and the stream and block sizes.
LEGACY_SIZES = [0, 1, 28, 29, 100, 4096, 70_000, 300_000, 1_000_000, 2_000_000]


def random_legacy(rng: random.Random) -> bytes:
    """Random legacy content; a first byte of 0x01 would make it look like an envelope."""
    data = bytearray(rng.randbytes(rng.choice(LEGACY_SIZES)))
    if data[:1] == b"\x01":
        data[0] = 0
    return bytes(data)


def legacy(n: int) -> bytes:
    return b"L" + os.urandom(n - 1)


# A known fault of the mount, not of encrypt: when another program replaces a
# file in SOURCE (any temp + rename does, and so does encrypt), the old inode
# number is freed and the filesystem soon gives it to a new file; the mount's
# inode table still maps that number to the old file's node, so a lookup of
# the new file can be served the old file's content.  Reproduced without
# encrypt by a direct temp + rename writer and a reader through the mount.
DAEMON_INODE_REUSE = (
    "the mount served another file's content after a backing inode number was reused"
)


KEY_ID = "user.stormfs.key_id"


def write_keyring(path: Path, ring: dict[str, str]) -> str:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("# older keys\n" + "".join(f"{i} {k}\n" for i, k in ring.items()))
    return str(path)


def sealed(path: Path, key: str, data: bytes, recorded: str | None) -> Path:
    write(path, fmt.seal(keys.parse_key(key), data))
    if recorded is not None:
        os.setxattr(path, KEY_ID, recorded.encode())
    return path


def three_key_source(src: Path, k1: str, k2: str, k3: str) -> dict[str, tuple[str | None, bytes]]:
    """name -> (id of the key that opens it, or None for legacy / no key; its plaintext)."""
    files = {
        "k1/recorded": (k1, "1", os.urandom(70_000)),
        "k1/no-xattr": (k1, None, b"sealed by the Storm Cloud server\n" * 100),
        "k1/wrong-xattr": (k1, "3", os.urandom(5000)),
        "k2/recorded": (k2, "2", os.urandom(300_000)),
        "k2/unknown-id": (k2, "gone", b""),
        "k3/current": (k3, "3", os.urandom(1000)),
    }
    ids = {k1: "1", k2: "2", k3: "3"}
    expect: dict[str, tuple[str | None, bytes]] = {}
    for rel, (key, recorded, data) in files.items():
        sealed(src / rel, key, data, recorded)
        expect[rel] = (ids[key], data)
    write(src / "legacy.txt", b"legacy plaintext\n")
    expect["legacy.txt"] = (None, b"legacy plaintext\n")
    sealed(src / "foreign", new_key(), b"under a key nobody has", "1")
    return expect
