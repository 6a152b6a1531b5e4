"""Throughput of `stormfs encrypt` against `cp -a` of the same tree (`make bench-encrypt`).

Generates a tree of legacy files (many small ones and a few large ones), then,
several rounds in turn on the same filesystem:

* ``cp -a``          copies the tree (its data may still sit in the page cache);
* ``cp -a && sync``  the same, plus writing it out — what encrypt does per file;
* ``stormfs encrypt`` a fresh copy of the tree (every file read, sealed,
  verified, synced and swapped in).

Before each timed run everything is synced and, as root, the page cache is
dropped, so each run reads its input from disk (``--warm`` keeps the cache).

Medians are printed, and encrypt's throughput as a fraction of each copy's.
Usage: bench_encrypt.py [--dir DIR] [--rounds N] [--small N] [--large N] [--warm] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SMALL_SIZES = [200, 4_000, 30_000, 200_000, 1_000_000]


def make_tree(root: Path, small: int, large: int, large_mib: int) -> int:
    rng = random.Random(7)
    total = 0
    for i in range(small):
        d = root / f"d{i % 20}"
        d.mkdir(parents=True, exist_ok=True)
        data = b"L" + os.urandom(rng.choice(SMALL_SIZES) - 1)
        (d / f"f{i}").write_bytes(data)
        total += len(data)
    for i in range(large):
        with open(root / f"large{i}", "wb") as f:
            for _ in range(large_mib):
                f.write(b"L" + os.urandom((1 << 20) - 1))
        total += large_mib << 20
    return total


DROP_CACHES = Path("/proc/sys/vm/drop_caches")


def timed(cmd: list[str], env: dict[str, str], *, cold: bool) -> float:
    """Wall time of `cmd`, started with everything written out (and, if `cold`, no page cache)."""
    subprocess.run(["sync"], check=True)
    if cold:
        DROP_CACHES.write_text("3\n")
    t = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default="/var/tmp", help="where to build the trees (default /var/tmp)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--small", type=int, default=2000, help="number of small files")
    ap.add_argument("--large", type=int, default=3, help="number of large files")
    ap.add_argument("--large-mib", type=int, default=64, help="size of each large file")
    ap.add_argument(
        "--warm",
        action="store_true",
        help="keep the page cache between runs (default: drop it, so every run reads from disk)",
    )
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    cold = not args.warm and os.access(DROP_CACHES, os.W_OK)
    stormfs = shutil.which("stormfs", path=str(REPO / ".venv/bin")) or "stormfs"
    env = dict(os.environ)
    if not env.get("STORMCLOUD_ENCRYPTION_KEY"):
        env["STORMCLOUD_ENCRYPTION_KEY"] = subprocess.run(
            [stormfs, "keygen"], capture_output=True, text=True, check=True
        ).stdout.strip()
    base = Path(tempfile.mkdtemp(prefix="stormfs-bench-", dir=args.dir))
    try:
        tree = base / "tree"
        nbytes = make_tree(tree, args.small, args.large, args.large_mib)
        nfiles = args.small + args.large
        times: dict[str, list[float]] = {"cp -a": [], "cp -a && sync": [], "stormfs encrypt": []}
        for _ in range(args.rounds):
            for name in times:
                target = base / "target"
                shutil.rmtree(target, ignore_errors=True)
                if name == "stormfs encrypt":
                    subprocess.run(["cp", "-a", str(tree), str(target)], check=True)
                    cmd = [stormfs, "encrypt", str(target), "--force"]
                elif name == "cp -a":
                    cmd = ["cp", "-a", str(tree), str(target)]
                else:
                    cmd = ["sh", "-c", f"cp -a '{tree}' '{target}' && sync"]
                times[name].append(timed(cmd, env, cold=cold))
        med = {k: statistics.median(v) for k, v in times.items()}
        result = {
            "files": nfiles,
            "bytes": nbytes,
            "rounds": args.rounds,
            "page_cache": "dropped before each run" if cold else "kept",
            "median_seconds": med,
            "mib_per_s": {k: nbytes / v / (1 << 20) for k, v in med.items()},
            "encrypt_vs_cp": med["cp -a"] / med["stormfs encrypt"],
            "encrypt_vs_cp_sync": med["cp -a && sync"] / med["stormfs encrypt"],
        }
        if args.json:
            print(json.dumps(result, indent=2))
        else:
            print(
                f"{nfiles} files, {nbytes / (1 << 20):.0f} MiB, median of {args.rounds} rounds, "
                f"page cache {result['page_cache']}"
            )
            for k in times:
                print(f"  {k:<16} {med[k]:7.2f} s  {result['mib_per_s'][k]:7.1f} MiB/s")
            print(f"  encrypt / cp -a          = {result['encrypt_vs_cp']:.2f}x")
            print(f"  encrypt / (cp -a && sync) = {result['encrypt_vs_cp_sync']:.2f}x")
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
