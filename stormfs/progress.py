"""Progress of a long run: a tqdm bar on a terminal, plain periodic lines otherwise."""

from __future__ import annotations

import os
import threading
import time
from typing import TextIO

from tqdm import tqdm

from .units import human_bytes, human_duration

# How often a plain progress line is printed when the output is not a terminal.
PLAIN_INTERVAL = 10.0


def _terminal_width(stream: TextIO) -> int:
    """Columns of the terminal `stream` writes to; 0 when it is no (sized) terminal."""
    try:
        return os.get_terminal_size(stream.fileno()).columns if stream.isatty() else 0
    except (OSError, ValueError):
        return 0


class Progress:
    """Files and bytes done out of a total known at `start`; safe to call from worker threads."""

    def __init__(self, stream: TextIO, *, label: str) -> None:
        self.stream = stream
        self.label = label
        self.files = 0
        self.total = 0
        self.done_files = 0
        self.done_bytes = 0
        self.started = time.monotonic()
        self._lock = threading.Lock()
        self._next_line = self.started + PLAIN_INTERVAL
        self._bar: tqdm | None = None

    def start(self, files: int, total_bytes: int) -> None:
        self.files = files
        self.total = total_bytes
        self.started = time.monotonic()
        self._next_line = self.started + PLAIN_INTERVAL
        if _terminal_width(self.stream) > 0:
            self._bar = tqdm(
                total=total_bytes,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                file=self.stream,
                desc=self.label,
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
        elapsed = time.monotonic() - self.started
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
