"""Progress of a long run: a tqdm bar on a terminal, plain periodic lines otherwise."""

from __future__ import annotations

import os
import threading
import time
from typing import TextIO

from tqdm import tqdm

# How often a plain progress line is printed when the output is not a terminal.
PLAIN_INTERVAL = 10.0


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def human_duration(seconds: float) -> str:
    s = int(seconds + 0.5)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def _terminal_width(stream: TextIO) -> int:
    """Columns of the terminal `stream` writes to; 0 when it is no (sized) terminal."""
    try:
        return os.get_terminal_size(stream.fileno()).columns if stream.isatty() else 0
    except (OSError, ValueError):
        return 0


class Progress:
    """Files and bytes done out of a known total; safe to call from worker threads."""

    def __init__(self, files: int, total_bytes: int, stream: TextIO, *, label: str) -> None:
        self.files = files
        self.total = total_bytes
        self.stream = stream
        self.label = label
        self.done_files = 0
        self.done_bytes = 0
        self.start = time.monotonic()
        self._lock = threading.Lock()
        self._next_line = self.start + PLAIN_INTERVAL
        self._bar: tqdm | None = None
        if _terminal_width(stream) > 0:
            self._bar = tqdm(
                total=total_bytes,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                file=stream,
                desc=label,
                dynamic_ncols=True,
                postfix=self._files_text(),
            )

    def _files_text(self) -> str:
        return f"files {self.done_files}/{self.files}"

    def advance(self, nbytes: int) -> None:
        with self._lock:
            self.done_bytes += nbytes
            if self._bar is not None:
                self._bar.update(nbytes)
            elif time.monotonic() >= self._next_line:
                self._plain_line()

    def file_done(self) -> None:
        with self._lock:
            self.done_files += 1
            if self._bar is not None:
                self._bar.set_postfix_str(self._files_text(), refresh=False)

    def note(self, line: str) -> None:
        """A message line that does not garble the bar."""
        with self._lock:
            if self._bar is not None:
                self._bar.write(line, file=self.stream)
            else:
                print(line, file=self.stream, flush=True)

    def _plain_line(self) -> None:
        elapsed = time.monotonic() - self.start
        rate = self.done_bytes / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done_bytes) / rate if rate > 0 else None
        print(
            f"{self.label}: {self._files_text()}, {human_bytes(self.done_bytes)} of "
            f"{human_bytes(self.total)}, {human_bytes(rate)}/s, "
            f"ETA {human_duration(eta) if eta is not None else '?'}",
            file=self.stream,
            flush=True,
        )
        self._next_line = time.monotonic() + PLAIN_INTERVAL

    def close(self) -> None:
        with self._lock:
            if self._bar is not None:
                self._bar.set_postfix_str(self._files_text(), refresh=False)
                self._bar.close()
            elif self.files:
                self._plain_line()
