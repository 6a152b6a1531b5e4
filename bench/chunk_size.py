"""AES-256-GCM seal/open cost per chunk size, for choosing the v2 chunk size.

    .venv/bin/python bench/chunk_size.py

For each size: microseconds to seal and to open one chunk (best of several
rounds), the throughput that gives, what a 4 KiB write inside a chunk costs
(open and seal the whole chunk), what sealing 1 MiB costs in chunks of that
size, and the on-disk overhead of the 28 bytes per chunk.
"""

from __future__ import annotations

import os
import time

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

SIZES = [4 << 10, 8 << 10, 16 << 10, 32 << 10, 64 << 10]
PER_CHUNK = 12 + 16


def best_us(fn, reps: int) -> float:
    best = float("inf")
    for _ in range(7):
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        best = min(best, (time.perf_counter() - t) / reps)
    return best * 1e6


def main() -> None:
    aead = AESGCM(os.urandom(32))
    ad = os.urandom(25)
    print("chunk   seal_us  open_us  seal_MB/s  open_MB/s  4K-rewrite_us  1MiB-seal_us  overhead")
    for size in SIZES:
        data = os.urandom(size)
        nonce = os.urandom(12)
        sealed = aead.encrypt(nonce, data, ad)
        reps = max(50, (4 << 20) // size)
        seal = best_us(lambda d=data: aead.encrypt(os.urandom(12), d, ad), reps)
        opn = best_us(lambda n=nonce, s=sealed: aead.decrypt(n, s, ad), reps)
        print(
            f"{size >> 10:>3} KiB {seal:8.1f} {opn:8.1f} {size / seal:10.0f} {size / opn:10.0f}"
            f" {seal + opn:14.1f} {seal * (1 << 20) / size:13.0f}  {100 * PER_CHUNK / size:7.3f}%"
        )


if __name__ == "__main__":
    main()
