"""fsx: random file operations checked against an in-memory model of the file.

    python -m tests.fsx FILE [--ops N] [--seed S] [--max-size BYTES]

Each operation (write, truncate, read, mmap read, mmap write, reopen, fsync, a read
through a second descriptor) is drawn from a random generator seeded with S, so a
run is reproducible: the same seed gives the same operations and the same bytes.  After
every operation the size is checked; every read is compared with the model.  On the
first mismatch the seed, the mismatch and the last operations are printed.
"""

from __future__ import annotations

import argparse
import mmap
import os
import random
import sys
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

OPS = {
    "write": 30,
    "read": 20,
    "truncate": 8,
    "mapread": 6,
    "mapwrite": 6,
    "reopen": 6,
    "fsync": 3,
    "read2": 6,
    "append": 5,
}


class Mismatch(AssertionError):
    pass


@dataclass
class Fsx:
    path: Path
    seed: int
    max_size: int = 1 << 20
    log_size: int = 60
    model: bytearray = field(default_factory=bytearray)
    ops_done: int = 0
    counts: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self.log: deque[str] = deque(maxlen=self.log_size)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        self.fd2 = os.open(self.path, os.O_RDONLY)
        names = list(OPS)
        self._names = names
        self._weights = [OPS[n] for n in names]

    def close(self) -> None:
        for fd in (self.fd, self.fd2):
            if fd >= 0:
                os.close(fd)
        self.fd = self.fd2 = -1

    # ---- helpers ---------------------------------------------------------------

    def _range(self, within: int) -> tuple[int, int]:
        """An offset and length, biased towards block edges and small sizes."""
        if within <= 0:
            return 0, 0
        off = self.rng.randrange(within)
        if self.rng.random() < 0.3:
            off -= off % self.rng.choice((16, 512, 4096))
        n = self.rng.choice((1, 15, 16, 17, 511, 4095, 4096, 4097, 65_537))
        n = min(self.rng.randint(1, n), within - off)
        return off, max(n, 0)

    def _expect(self, what: str, got: bytes, off: int) -> None:
        want = bytes(self.model[off : off + len(got)])
        if got != want:
            first = next((i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), 0)
            raise Mismatch(
                f"{what} at {off}: {len(got)} bytes differ from the model "
                f"(first at file offset {off + first})"
            )

    def _check_size(self) -> None:
        size = os.fstat(self.fd).st_size
        if size != len(self.model):
            raise Mismatch(f"size is {size}, the model has {len(self.model)}")

    # ---- operations --------------------------------------------------------------

    def op_write(self) -> str:
        off, n = self._range(self.max_size)
        data = self.rng.randbytes(n)
        os.pwrite(self.fd, data, off)
        if off > len(self.model):
            self.model.extend(bytes(off - len(self.model)))
        self.model[off : off + n] = data
        return f"write {off} {n}"

    def op_append(self) -> str:
        n = self.rng.randint(1, 9000)
        if len(self.model) + n > self.max_size:
            return "append skipped"
        data = self.rng.randbytes(n)
        os.pwrite(self.fd, data, len(self.model))
        self.model += data
        return f"append {n}"

    def op_read(self, fd: int | None = None, name: str = "read") -> str:
        off, n = self._range(len(self.model) + 100)
        got = os.pread(self.fd if fd is None else fd, n, off)
        expect_len = max(0, min(n, len(self.model) - off))
        if len(got) != expect_len:
            raise Mismatch(f"{name} at {off} of {n}: got {len(got)} bytes, expected {expect_len}")
        self._expect(name, got, off)
        return f"{name} {off} {n}"

    def op_read2(self) -> str:
        return self.op_read(self.fd2, "read2")

    def op_truncate(self) -> str:
        size = self.rng.choice(
            (0, self.rng.randrange(self.max_size), len(self.model) // 2, len(self.model) + 5000)
        )
        size = min(size, self.max_size)
        os.ftruncate(self.fd, size)
        if size < len(self.model):
            del self.model[size:]
        else:
            self.model.extend(bytes(size - len(self.model)))
        return f"truncate {size}"

    def op_mapread(self) -> str:
        if not self.model:
            return "mapread skipped"
        with mmap.mmap(self.fd, len(self.model), prot=mmap.PROT_READ) as m:
            off, n = self._range(len(self.model))
            self._expect("mapread", m[off : off + n], off)
        return f"mapread {off} {n}"

    def op_mapwrite(self) -> str:
        if not self.model:
            return "mapwrite skipped"
        off, n = self._range(len(self.model))
        data = self.rng.randbytes(n)
        with mmap.mmap(self.fd, len(self.model)) as m:
            m[off : off + n] = data
            m.flush()
        self.model[off : off + n] = data
        return f"mapwrite {off} {n}"

    def op_reopen(self) -> str:
        os.close(self.fd)
        self.fd = -1  # if the open fails, close() must not close another file's descriptor
        flags = os.O_RDWR
        if self.rng.random() < 0.1:
            flags |= os.O_TRUNC
            self.model.clear()
        self.fd = os.open(self.path, flags)
        return "reopen" + (" O_TRUNC" if flags & os.O_TRUNC else "")

    def op_fsync(self) -> str:
        os.fsync(self.fd)
        return "fsync"

    # ---- running -------------------------------------------------------------------

    def step(self) -> None:
        name = self.rng.choices(self._names, self._weights)[0]
        self.log.append(f"#{self.ops_done} {name} ...")
        done = getattr(self, f"op_{name}")()
        self.log[-1] = f"#{self.ops_done} {done}"
        self.counts[name] = self.counts.get(name, 0) + 1
        self._check_size()
        self.ops_done += 1

    def final_check(self) -> None:
        """Close everything (the daemon commits) and compare the whole file."""
        self.close()
        data = self.path.read_bytes()
        if data != self.model:
            first = next(
                (i for i, (a, b) in enumerate(zip(data, self.model, strict=False)) if a != b),
                min(len(data), len(self.model)),
            )
            raise Mismatch(
                f"after close: {len(data)} bytes on file, {len(self.model)} in the model, "
                f"first difference at {first}"
            )

    def report(self, error: BaseException) -> str:
        lines = [
            f"fsx FAILED on {self.path} after {self.ops_done} operations: {error!r}",
            f"reproduce with: python -m tests.fsx {self.path} --seed {self.seed} "
            f"--ops {self.ops_done + 1} --max-size {self.max_size}",
            f"last {len(self.log)} operations:",
            *self.log,
        ]
        return "\n".join(lines)


def run(path: Path, ops: int, seed: int, max_size: int = 1 << 20) -> Fsx:
    """Run `ops` operations on `path`; raise AssertionError with the seed and op log."""
    fsx = Fsx(path, seed, max_size)
    try:
        for _ in range(ops):
            fsx.step()
        fsx.final_check()
    except (Mismatch, OSError) as e:
        fsx.close()
        raise AssertionError(fsx.report(e)) from e
    return fsx


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fsx", description=__doc__.split("\n\n")[0])
    parser.add_argument("file", type=Path)
    parser.add_argument("--ops", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--max-size", type=int, default=1 << 20)
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.randrange(1 << 32)
    print(f"fsx: {args.file} seed {seed}, {args.ops} operations", flush=True)
    try:
        fsx = run(args.file, args.ops, seed, args.max_size)
    except AssertionError as e:
        print(e, file=sys.stderr)
        return 1
    print(f"fsx: {fsx.ops_done} operations, no mismatch: {fsx.counts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
