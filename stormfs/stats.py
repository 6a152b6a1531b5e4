"""What a running daemon has done, for `stormfs status` (DESIGN §5).

The counters are bumped by the operations (`fs`), requests by kind among them;
DECRYPTION_FAILED files and the
last error are taken from the daemon's own log records, so every place that logs
one counts without a hook of its own.  `report` is what the read-only attribute
``user.stormfs.status`` on the mount's root answers, as JSON.  Never a key.
"""

from __future__ import annotations

import collections
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

STATUS_XATTR = "user.stormfs.status"
# How often `-o metrics_file=` is rewritten.
METRICS_INTERVAL = 15.0
# The last DECRYPTION_FAILED paths kept.
RECENT = 5
FAILED_PREFIX = "DECRYPTION_FAILED: "


@dataclass
class Stats:
    source: str = ""
    mountpoint: str = ""
    options: list[str] = field(default_factory=list)
    key_ids: list[str] = field(default_factory=list)
    current_key_id: str | None = None
    format: str = "v1"
    started: float = field(default_factory=time.time)
    commits: int = 0
    commits_failed: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    decryption_failed: int = 0
    recent_failed: collections.deque[str] = field(
        default_factory=lambda: collections.deque(maxlen=RECENT)
    )
    last_error: str | None = None
    last_error_at: float | None = None
    # Kernel requests answered, by kind, and the time spent in their handlers.
    requests: collections.Counter[str] = field(default_factory=collections.Counter)
    request_ns: collections.Counter[str] = field(default_factory=collections.Counter)

    def request(self, kind: str, ns: int) -> None:
        self.requests[kind] += 1
        self.request_ns[kind] += ns

    def committed(self, error: BaseException | None = None) -> None:
        if error is None:
            self.commits += 1
        elif isinstance(error, Exception):  # not a cancellation at shutdown
            self.commits_failed += 1
            self.error(f"commit failed: {error}")

    def error(self, message: str) -> None:
        if message.startswith(FAILED_PREFIX):
            self.decryption_failed += 1
            self.recent_failed.append(message.removeprefix(FAILED_PREFIX).split(" (")[0])
        self.last_error, self.last_error_at = message, time.time()

    def listen(self, logger: logging.Logger) -> logging.Handler:
        """Count the errors `logger` (and its children) log from now on."""
        handler = _Errors(self)
        logger.addHandler(handler)
        return handler

    def report(
        self, open_files: int, pending: dict[str, int], publishing: int = 0
    ) -> dict[str, Any]:
        """The status: `pending` maps each file with unpublished writes to its size;
        `publishing` counts closed versions waiting for their batch (group commit)."""
        return {
            "pid": os.getpid(),
            "source": self.source,
            "mountpoint": self.mountpoint,
            "options": self.options,
            "format": self.format,
            "current_key_id": self.current_key_id,
            "key_ids": self.key_ids,
            "started": round(self.started, 3),
            "uptime_seconds": round(time.time() - self.started, 3),
            "open_files": open_files,
            "unpublished_files": len(pending),
            "unpublished_bytes": sum(pending.values()),
            "unpublished": [{"path": p, "bytes": n} for p, n in sorted(pending.items())],
            "publishing": publishing,
            "commits": self.commits,
            "commits_failed": self.commits_failed,
            "bytes_read": self.bytes_read,
            "bytes_written": self.bytes_written,
            "decryption_failed": self.decryption_failed,
            "decryption_failed_recent": list(self.recent_failed),
            "last_error": self.last_error,
            "last_error_at": None if self.last_error_at is None else round(self.last_error_at, 3),
            "requests": {
                kind: {"count": n, "seconds": round(self.request_ns[kind] / 1e9, 6)}
                for kind, n in sorted(self.requests.items())
            },
        }


# Prometheus metrics from a report: (name, type, help, report field).
METRICS = (
    ("stormfs_uptime_seconds", "gauge", "Seconds since the daemon started.", "uptime_seconds"),
    ("stormfs_open_files", "gauge", "Files open through the mount.", "open_files"),
    ("stormfs_unpublished_files", "gauge", "Files with writes not yet committed.",
     "unpublished_files"),
    ("stormfs_unpublished_bytes", "gauge", "Size of the files with writes not yet committed.",
     "unpublished_bytes"),
    ("stormfs_publishing_files", "gauge",
     "Closed files whose new version waits for its batch to be published.", "publishing"),
    ("stormfs_commits_total", "counter", "New versions committed to SOURCE.", "commits"),
    ("stormfs_commits_failed_total", "counter", "Commits that failed.", "commits_failed"),
    ("stormfs_read_bytes_total", "counter", "Plaintext bytes served.", "bytes_read"),
    ("stormfs_written_bytes_total", "counter", "Plaintext bytes received.", "bytes_written"),
    ("stormfs_decryption_failed_total", "counter", "DECRYPTION_FAILED files met.",
     "decryption_failed"),
    ("stormfs_last_error_timestamp_seconds", "gauge",
     "When the daemon last logged an error (0: never).", "last_error_at"),
)  # fmt: skip


# Per request kind: (name, help, field of report["requests"][kind]).
REQUEST_METRICS = (
    ("stormfs_requests_total", "Kernel requests answered, by kind.", "count"),
    ("stormfs_request_seconds_total", "Time spent in the handlers, by request kind.", "seconds"),
)


def prometheus(report: dict[str, Any]) -> str:
    """A report in Prometheus' text format (for node_exporter's textfile collector)."""
    labels = f'mountpoint="{_label(report["mountpoint"])}"'
    info = ",".join(
        f'{k}="{_label(str(report[k] or ""))}"'
        for k in ("source", "format", "current_key_id", "pid")
    )
    lines = [
        "# HELP stormfs_info The daemon serving the mount.",
        "# TYPE stormfs_info gauge",
        f"stormfs_info{{{labels},{info}}} 1",
    ]
    for name, kind, text, key in METRICS:
        lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
        lines.append(f"{name}{{{labels}}} {report[key] or 0}")
    for name, text, field_ in REQUEST_METRICS:
        lines += [f"# HELP {name} {text}", f"# TYPE {name} counter"]
        lines += [
            f'{name}{{{labels},kind="{kind}"}} {counts[field_]}'
            for kind, counts in report["requests"].items()
        ]
    return "\n".join(lines) + "\n"


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class _Errors(logging.Handler):
    def __init__(self, stats: Stats) -> None:
        super().__init__(logging.ERROR)
        self._stats = stats

    def emit(self, record: logging.LogRecord) -> None:
        self._stats.error(record.getMessage())
