"""Programs that use a storage tree while `stormfs encrypt` migrates it (test_encrypt_live).

    live_worker.py read MANIFEST MNT STOP OUT      read the "static" and "append" files
                                                   through the mount until STOP exists; each
                                                   read must be a version the file really had
    live_worker.py append MANIFEST MNT OUT         append one record to every "append" file,
                                                   through the mount, in random order
    live_worker.py versions MANIFEST SRC STOP OUT  replace "versions" files in SOURCE by
                                                   temp + rename, version after version

OUT receives a JSON summary.  Only the standard library: a plain program.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sys
import time


def version_bytes(rel: str, v: int) -> bytes:
    return f"{rel} v{v}\n".encode() * 4000


def acceptable(rel: str, info: dict, data: bytes) -> str | None:
    """None if `data` is a version the file had; otherwise what is wrong."""
    kind = info["kind"]
    if kind in ("static", "append"):
        n = info["size"]
        if hashlib.sha256(data[:n]).hexdigest() != info["sha256"] or len(data) < n:
            return f"original bytes differ ({len(data)} bytes read)"
        if kind == "static" and len(data) != n:
            return f"{len(data)} bytes, expected {n}"
        rest = data[n:]
        if rest and rest != info["record"].encode():
            return f"unexpected tail {rest[:40]!r}"
        return None
    first = data.split(b"\n", 1)[0].decode(errors="replace")
    try:
        v = int(first.rsplit(" v", 1)[1])
    except (IndexError, ValueError):
        return f"not a version: {data[:40]!r}"
    return None if data == version_bytes(rel, v) else f"torn version {v}"


def whose(manifest: dict, data: bytes, own: str) -> str | None:
    """The other file whose content `data` (or its beginning) really is, if any."""
    for rel, info in manifest.items():
        if rel == own:
            continue
        if "head" in info and data[:64] == bytes.fromhex(info["head"]):
            return rel
        if info["kind"] == "versions" and data.startswith(f"{rel} v".encode()):
            return rel
    return None


def sharing(manifest: dict, mnt: str, rel: str, ino: int) -> str | None:
    """Another file that the mount shows under the same inode number (none is a hard link)."""
    for other in manifest:
        try:
            if other != rel and os.stat(os.path.join(mnt, other)).st_ino == ino:
                return other
        except OSError:
            continue
    return None


def read(manifest: dict, mnt: str, stop: str) -> dict:
    failures: list[dict] = []
    reads = 0
    while not os.path.exists(stop):
        for rel, info in manifest.items():
            if info["kind"] == "versions":
                continue  # replaced behind the mount's back: its caches may lag (attr_timeout)
            try:
                with open(os.path.join(mnt, rel), "rb") as f:
                    data = f.read()
                    ino = os.fstat(f.fileno()).st_ino
            except OSError as e:
                failures.append({"path": rel, "problem": str(e), "other": None})
                continue
            reads += 1
            problem = acceptable(rel, info, data)
            if problem:
                other = whose(manifest, data, rel) or sharing(manifest, mnt, rel, ino)
                failures.append({"path": rel, "problem": problem, "other": other})
    return {"reads": reads, "failures": failures[:50]}


def append(manifest: dict, mnt: str) -> dict:
    names = [rel for rel, info in manifest.items() if info["kind"] == "append"]
    random.shuffle(names)
    done = []
    for rel in names:
        with open(os.path.join(mnt, rel), "ab") as f:
            f.write(manifest[rel]["record"].encode())
        done.append(rel)
        time.sleep(random.uniform(0, 0.03))
    return {"appended": done}


def versions(manifest: dict, src: str, stop: str) -> dict:
    names = [rel for rel, info in manifest.items() if info["kind"] == "versions"]
    last = dict.fromkeys(names, 0)
    while not os.path.exists(stop):
        for rel in names:
            v = last[rel] + 1
            path = os.path.join(src, rel)
            tmp = os.path.join(os.path.dirname(path), ".tmp-" + os.path.basename(path))
            with open(tmp, "wb") as f:
                f.write(version_bytes(rel, v))
            os.rename(tmp, path)
            last[rel] = v
        time.sleep(0.005)
    return {"last": last}


def main() -> None:
    role, manifest_path, *rest = sys.argv[1:]
    with open(manifest_path) as f:
        manifest = json.load(f)
    if role == "read":
        mnt, stop, out = rest
        result = read(manifest, mnt, stop)
    elif role == "append":
        mnt, out = rest
        result = append(manifest, mnt)
    else:
        src, stop, out = rest
        result = versions(manifest, src, stop)
    with open(out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
