"""`make demo`: stormfs end to end on a throw-away storage directory.

Creates ./demo/storage holding a legacy plaintext file, generates a key, mounts
./demo/mnt, writes and reads a file through the mount, shows the envelope that
landed on disk (29 bytes of overhead) and the user.stormfs.* attributes, then
unmounts.  Exits 0 when every step did what it should.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "demo"
STORAGE, MNT = ROOT / "storage", ROOT / "mnt"
STORMFS = [sys.executable, "-m", "stormfs"]


def step(text: str) -> None:
    print(f"\n== {text}")


def show(cmd: list[str], env: dict[str, str] | None = None) -> str:
    print("$ " + " ".join(cmd[2:] if cmd[:2] == STORMFS[:2] else cmd).replace(sys.executable, ""))
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    print(out, end="" if out.endswith("\n") or not out else "\n")
    return out


def main() -> int:
    if os.path.ismount(MNT):
        subprocess.run(["fusermount3", "-u", "-z", str(MNT)], check=False)
    shutil.rmtree(ROOT, ignore_errors=True)
    STORAGE.mkdir(parents=True)
    MNT.mkdir()

    step("A storage directory with a file written before encryption was enabled")
    (STORAGE / "legacy.txt").write_text("written before encryption was switched on\n")
    print(f"{STORAGE}/legacy.txt: {(STORAGE / 'legacy.txt').stat().st_size} bytes, plaintext")

    step("A new key (keep it safe: losing it means losing the files)")
    key = show([*STORMFS, "keygen"]).strip()
    env = {**os.environ, "STORMCLOUD_ENCRYPTION_KEY": key}

    step("Mount: returns once the mount answers")
    log = ROOT / "stormfs.log"
    show([*STORMFS, "mount", "--log-file", str(log), str(STORAGE), str(MNT)], env=env)
    try:
        step("Write and read a file through the mount")
        message = "hello from stormfs: this text is encrypted at rest\n"
        (MNT / "hello.txt").write_text(message)
        assert (MNT / "hello.txt").read_text() == message
        assert (MNT / "legacy.txt").read_text().startswith("written before")
        print(f"wrote and read back {len(message)} bytes; legacy.txt still reads as before")

        step("What landed on disk: 0x01 | nonce (12) | ciphertext | tag (16)")
        blob = (STORAGE / "hello.txt").read_bytes()
        print(f"{STORAGE}/hello.txt: {len(blob)} bytes = {len(message)} + 29")
        print(f"  version {blob[0]:#04x}, nonce {blob[1:13].hex()}")
        print(f"  ciphertext {blob[13:-16].hex()[:48]}...")
        print(f"  tag {blob[-16:].hex()}")
        assert len(blob) == len(message) + 29 and blob[0] == 1
        assert message.encode() not in blob

        step("Encryption status as extended attributes")
        show(
            [
                "getfattr",
                "-d",
                "-m",
                "user.stormfs",
                str(MNT / "hello.txt"),
                str(MNT / "legacy.txt"),
            ]
        )
    finally:
        step("Unmount")
        show(["fusermount3", "-u", str(MNT)])
        deadline = time.monotonic() + 10
        while os.path.ismount(MNT) and time.monotonic() < deadline:
            time.sleep(0.05)
    print(f"\nDone. Storage directory left in {STORAGE} (daemon log: {log}).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
