"""stormfs benchmark: the raw directory, a Python passthrough, gocryptfs and stormfs,
side by side in one run.

Every round mounts each target fresh over a fresh directory (targets interleaved,
order rotated per round) and runs every workload on it; the table shows the
median per target and workload, and how stormfs compares with gocryptfs and with
the passthrough measured in the same run. Needs root (mounts, drop_caches).

    .venv/bin/python bench/run.py [--quick] [--targets raw,passthrough,gocryptfs,stormfs,stormfs-v2]

`stormfs-v2` is stormfs mounted with -o format=v2 (chunked files); `stormfs-sole`
with -o writeback_cache,exclusive (a SOURCE it has to itself); `stormfs-batched`
with -o publish_delay=0.1 (group commit).

`--requests` adds, on stormfs mounts with each set of options of `--requests-with`,
the kernel requests per file (by kind, from the daemon's own counters) that
`tar -x`, `cp -r`, `git clone` and `rsync -a` cost.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import targets as tg
import workloads as wl

REPO = Path(__file__).resolve().parent.parent
ALL_TARGETS = (
    "raw",
    "passthrough",
    "gocryptfs",
    "stormfs",
    "stormfs-v2",
    "stormfs-sole",
    "stormfs-batched",
)
# stormfs-sole: a mount that has SOURCE to itself (README: writeback_cache, exclusive).
SOLE_OPTIONS = "writeback_cache,exclusive"
# stormfs-batched: group commit (off by default), with a 0.1 s publish delay.
BATCHED_OPTIONS = "publish_delay=0.1"
DEFAULT_TARGETS = ("raw", "passthrough", "gocryptfs", "stormfs")
# The ratios the table shows: (target, baseline).
RATIOS = (
    ("stormfs", "gocryptfs"),
    ("stormfs", "passthrough"),
    ("stormfs-v2", "gocryptfs"),
    ("stormfs-v2", "stormfs"),
    ("stormfs-sole", "gocryptfs"),
    ("stormfs-sole", "passthrough"),
    ("stormfs-batched", "gocryptfs"),
    ("stormfs-batched", "stormfs"),
)
FULL = {
    "rounds": 3,
    "seq_size": "512M",
    "big_size": "4G",
    "random_reads": 2000,
    "files": 2500,
    "repo_files": 3000,
    "overwrites": 200,
    "synced_size": "128M",
    "synced_ops": 20,
    "migrate_size": "1G",
}
QUICK = {
    "rounds": 1,
    "seq_size": "64M",
    "big_size": "256M",
    "random_reads": 500,
    "files": 500,
    "repo_files": 600,
    "overwrites": 50,
    "synced_size": "16M",
    "synced_ops": 5,
    "migrate_size": "64M",
}


Step = tuple[tuple[str, ...], Callable[[], dict[str, float]]]
# The mount options --requests compares when --requests-with names none: "-" is the defaults.
REQUEST_OPTIONS = ("-", "writeback_cache", "exclusive", "writeback_cache,exclusive")


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    unit: str  # "MB/s" is higher-is-better; "s", "ms" and "MiB" are lower-is-better

    @property
    def higher_is_better(self) -> bool:
        return self.unit == "MB/s"


def parse_size(text: str) -> int:
    units = {"K": wl.KiB, "M": wl.MiB, "G": 1 << 30}
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    return int(text[:-1]) * units[text[-1]] if text[-1:] in units else int(text)


def human(n: int) -> str:
    return f"{n >> 30} GiB" if n >= 1 << 30 and not n % (1 << 30) else f"{n >> 20} MiB"


def metrics(args: argparse.Namespace, nfiles: int) -> list[Metric]:
    seq, big = human(args.seq_size), human(args.synced_size)
    return [
        Metric("seq_write", f"sequential write {seq} (1 MiB writes + fsync)", "MB/s"),
        Metric("seq_read_cold", f"sequential read {seq}, cold", "MB/s"),
        Metric("seq_read_warm", f"sequential read {seq}, warm", "MB/s"),
        Metric("rand_read_cold", f"{args.random_reads} random 4 KiB reads, cold", "s"),
        Metric("rand_read_warm", f"{args.random_reads} random 4 KiB reads, warm", "s"),
        Metric("tar_extract", f"tar -x of {nfiles} stdlib files", "s"),
        Metric("stat_walk_cold", "ls -lR of the tree, cold", "s"),
        Metric("stat_walk_warm", "ls -lR of the tree, warm", "s"),
        Metric("read_all", "read every file back + sha256, cold", "s"),
        Metric("rm_rf", "rm -rf of the tree", "s"),
        Metric("cp_r", f"cp -r of the stdlib tree ({nfiles} files)", "s"),
        Metric("git_clone", f"git clone of a local repository of {args.repo_files} files", "s"),
        Metric("overwrite", f"{args.overwrites}x open/write 4 KiB/close in a 1 MiB file", "s"),
        Metric("pwrite_fsync_small", "pwrite 4 KiB + fsync, 1 MiB file (per op)", "ms"),
        Metric("pwrite_fsync_big", f"pwrite 4 KiB + fsync, {big} file (per op)", "ms"),
        Metric("append_fsync_small", "append 4 KiB + fsync, 1 MiB file (per op)", "ms"),
        Metric("append_fsync_big", f"append 4 KiB + fsync, {big} file (per op)", "ms"),
        Metric("sqlite_update", f"SQLite UPDATE transaction, {big} db, synchronous=FULL", "ms"),
        Metric("peak_rss", f"peak daemon RSS, {human(args.big_size)} write then cold read", "MiB"),
    ]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--targets",
        default=",".join(DEFAULT_TARGETS),
        help=f"comma-separated, of {', '.join(ALL_TARGETS)} (default: %(default)s)",
    )
    p.add_argument("--quick", action="store_true", help="small sizes and one round: a smoke run")
    p.add_argument(
        "--rounds", type=int, metavar="N", help="rounds (3, quick 1; 0: only --migrate, --requests)"
    )
    p.add_argument(
        "--seq-size", type=parse_size, metavar="SIZE", help="sequential file (512M, quick 64M)"
    )
    p.add_argument("--big-size", type=parse_size, metavar="SIZE", help="RSS file (4G, quick 256M)")
    p.add_argument("--random-reads", type=int, metavar="N", help="random reads (2000, quick 500)")
    p.add_argument("--files", type=int, metavar="N", help="files in the tar (2500, quick 500)")
    p.add_argument(
        "--repo-files", type=int, metavar="N", help="files in the git repository (3000, quick 600)"
    )
    p.add_argument("--overwrites", type=int, metavar="N", help="overwrites (200, quick 50)")
    p.add_argument(
        "--synced-size",
        type=parse_size,
        metavar="SIZE",
        help="file and database of the synced-write rows (128M, quick 16M)",
    )
    p.add_argument(
        "--synced-ops", type=int, metavar="N", help="operations per synced-write row (20, quick 5)"
    )
    p.add_argument(
        "--migrate", action="store_true", help="also time stormfs encrypt and rotate vs cp -a"
    )
    p.add_argument(
        "--requests",
        action="store_true",
        help="also count the requests per file of tar -x, cp -r, git clone, rsync -a on stormfs",
    )
    p.add_argument(
        "--requests-with",
        action="append",
        metavar="OPTS",
        help="stormfs mount options for --requests, repeatable, '-' for the defaults "
        f"(default: {' '.join(REQUEST_OPTIONS)})",
    )
    p.add_argument(
        "--only",
        metavar="KEYS",
        help="run only the workloads giving these metrics (comma-separated keys of the JSON, "
        "e.g. tar_extract,cp_r,git_clone)",
    )
    p.add_argument(
        "--best",
        action="store_true",
        help="report the best round instead of the median (for a machine others share)",
    )
    p.add_argument(
        "--migrate-size", type=parse_size, metavar="SIZE", help="legacy tree (1G, quick 64M)"
    )
    p.add_argument(
        "--scratch",
        type=Path,
        default=Path("/var/tmp/stormfs-bench"),
        metavar="DIR",
        help="work directories and logs (%(default)s)",
    )
    p.add_argument(
        "--output",
        type=Path,
        default=Path("bench-results/latest.json"),
        metavar="FILE",
        help="JSON with every number (%(default)s)",
    )
    p.add_argument(
        "--stormfs",
        default=str(REPO / ".venv/bin/stormfs"),
        metavar="CMD",
        help="the stormfs command (%(default)s)",
    )
    args = p.parse_args(argv)
    for name, value in (QUICK if args.quick else FULL).items():
        if getattr(args, name) is None:
            setattr(args, name, parse_size(value) if isinstance(value, str) else value)
    if args.rounds < 0:
        p.error("--rounds: 0 or more")
    args.requests_with = args.requests_with or list(REQUEST_OPTIONS)
    args.only = set(filter(None, (args.only or "").split(",")))
    args.targets = [t for t in args.targets.split(",") if t]
    if not args.targets:
        p.error("--targets: name at least one target")
    if unknown := set(args.targets) - set(ALL_TARGETS):
        p.error(f"unknown targets: {', '.join(sorted(unknown))}")
    for name in ("seq_size", "big_size", "synced_size"):
        if getattr(args, name) < wl.MiB or getattr(args, name) % wl.MiB:
            p.error(f"--{name.replace('_', '-')} must be a positive multiple of 1 MiB")
    return args


def make_targets(args: argparse.Namespace, key: str) -> list[tg.Target]:
    venv_python = REPO / ".venv/bin/python"
    python = str(venv_python) if venv_python.exists() else sys.executable
    factories: dict[str, Callable[[], tg.Target]] = {
        "raw": tg.Target,
        "passthrough": lambda: tg.Passthrough(python),
        "gocryptfs": tg.Gocryptfs,
        "stormfs": lambda: tg.Stormfs(args.stormfs, key),
        "stormfs-v2": lambda: tg.Stormfs(
            args.stormfs, key, name="stormfs-v2", options=("-o", "format=v2")
        ),
        "stormfs-sole": lambda: tg.Stormfs(
            args.stormfs, key, name="stormfs-sole", options=("-o", SOLE_OPTIONS)
        ),
        "stormfs-batched": lambda: tg.Stormfs(
            args.stormfs, key, name="stormfs-batched", options=("-o", BATCHED_OPTIONS)
        ),
    }
    return [factories[name]() for name in args.targets]


def clean(path: Path) -> None:
    """Remove a work directory, never through a mount point."""
    for point in tg.mounts_under(path):
        tg.unmount(point)
    if tg.mounts_under(path):
        raise RuntimeError(f"{path} is still mounted; not removing it")
    shutil.rmtree(path, ignore_errors=True)


class Bench:
    def __init__(self, args: argparse.Namespace, key: str) -> None:
        self.args = args
        self.key = key
        self.scratch: Path = args.scratch.resolve()
        self.logs = self.scratch / "logs"
        self.tree = wl.StdlibTree.build(self.scratch / "stdlib.tar", args.files)
        self.lib = wl.extract(self.tree, self.scratch / "stdlib")
        self.repo = self.scratch / "repo"
        self.repo_manifest = wl.git_repo(self.lib, self.repo, args.repo_files)
        self.seq = wl.data(0, args.seq_size)
        self.buffer = bytearray(b"\xff") * len(self.seq)  # touched now: no read pays for faults

    def steps(self, m: tg.Mounted) -> list[Step]:
        """Workloads in order, each with the metric keys it produces."""
        a, p = self.args, m.path
        steps: list[Step] = [
            (("seq_write",), lambda: wl.seq_write(p, self.seq)),
            (("seq_read_cold", "seq_read_warm"), lambda: wl.seq_read(p, self.seq, self.buffer)),
            (
                ("rand_read_cold", "rand_read_warm"),
                lambda: wl.random_reads(p, self.seq, a.random_reads),
            ),
            (
                ("tar_extract", "stat_walk_cold", "stat_walk_warm", "read_all", "rm_rf"),
                lambda: wl.small_files(p, self.tree),
            ),
            (("cp_r",), lambda: {"cp_r": self.copy(p)}),
            (("git_clone",), lambda: {"git_clone": self.clone(p)}),
            (("overwrite",), lambda: wl.overwrite(p, a.overwrites)),
            (
                (
                    "pwrite_fsync_small",
                    "pwrite_fsync_big",
                    "append_fsync_small",
                    "append_fsync_big",
                ),
                lambda: wl.synced_writes(p, a.synced_size, a.synced_ops),
            ),
            (
                ("sqlite_update",),
                lambda: wl.sqlite_updates(p, self.scratch, a.synced_size, a.synced_ops),
            ),
        ]
        if m.pid is not None:
            pid = m.pid
            steps.append((("rss_write", "peak_rss"), lambda: wl.big_file_rss(p, pid, a.big_size)))
        return [s for s in steps if not a.only or a.only & set(s[0])]

    def copy(self, mnt: Path, mark: Callable[[], None] = lambda: None) -> float:
        return wl.tree_op(mnt, ("cp", "-r", self.lib, mnt), self.tree.manifest, mark)

    def clone(self, mnt: Path, mark: Callable[[], None] = lambda: None) -> float:
        argv = ("git", "clone", "-q", self.repo, mnt / self.repo.name)
        return wl.tree_op(mnt, argv, self.repo_manifest, mark)

    def request_workloads(self, mnt: Path) -> list[tuple[str, Callable[..., float], int]]:
        """(name, workload taking a mark, files it makes) for --requests."""
        tar = ("tar", "-xf", self.tree.tar, "-C", mnt)
        rsync = ("rsync", "-a", self.lib, mnt)
        return [
            (
                "tar -x",
                lambda mark: wl.tree_op(mnt, tar, self.tree.manifest, mark),
                len(self.tree.manifest),
            ),
            ("cp -r", lambda mark: self.copy(mnt, mark), len(self.tree.manifest)),
            ("git clone", lambda mark: self.clone(mnt, mark), len(self.repo_manifest)),
            (
                "rsync -a",
                lambda mark: wl.tree_op(mnt, rsync, self.tree.manifest, mark),
                len(self.tree.manifest),
            ),
        ]

    def run_requests(self, options: str, n: int) -> dict[str, Any]:
        """Requests per file by kind of each request workload, on a fresh stormfs mount."""
        opts = "" if options == "-" else options
        label = opts or "defaults"
        workdir = self.scratch / f"requests{n}"
        log = self.logs / f"requests{n}.log"
        record: dict[str, Any] = {"options": label, "status": "ok", "workloads": {}}
        clean(workdir)
        try:
            target = tg.Stormfs(self.args.stormfs, self.key, options=("-o", opts) if opts else ())
            with target.mounted(workdir, log) as m:
                for name, work, files in self.request_workloads(m.path):
                    print(f"  requests ({label}): {name}", flush=True)
                    first, base = tg.requests(m.path), tg.requests(m.path)
                    after: dict[str, dict[str, float]] = {}
                    seconds = work(lambda got=after: got.update(tg.requests(m.path)))
                    # minus what reading the counters costs (a status read between first and base)
                    counts = {
                        kind: after[kind]["count"]
                        - 2 * base.get(kind, {}).get("count", 0)
                        + first.get(kind, {}).get("count", 0)
                        for kind in after
                    }
                    spent = {
                        k: after[k]["seconds"] - base.get(k, {}).get("seconds", 0) for k in after
                    }
                    record["workloads"][name] = {
                        "files": files,
                        "seconds": seconds,
                        "handler_seconds": sum(spent.values()),
                        "requests": {k: v for k, v in counts.items() if v > 0},
                        "handler_seconds_by_kind": {k: spent[k] for k, v in counts.items() if v},
                    }
        except (tg.Unavailable, wl.CheckFailed) as e:
            record.update(status="FAIL", reason=str(e))
        finally:
            clean(workdir)
        return record

    def run_target(self, target: tg.Target, rnd: int) -> dict[str, Any]:
        workdir = self.scratch / f"r{rnd}-{target.name}"
        log = self.logs / f"r{rnd}-{target.name}.log"
        record: dict[str, Any] = {
            "round": rnd,
            "target": target.name,
            "status": "ok",
            "metrics": {},
            "errors": {},
        }
        clean(workdir)
        try:
            with target.mounted(workdir, log) as m:
                for keys, step in self.steps(m):
                    if not m.alive():
                        record["errors"].update(dict.fromkeys(keys, f"daemon died, see {log}"))
                        continue
                    print(f"  round {rnd + 1} {target.name}: {', '.join(keys)}", flush=True)
                    try:
                        record["metrics"].update(step())
                    except Exception as e:
                        record["errors"].update(dict.fromkeys(keys, f"{type(e).__name__}: {e}"))
        except tg.Unavailable as e:
            record.update(status="n/a", reason=str(e))
            print(f"  round {rnd + 1} {target.name}: n/a ({e})", flush=True)
        finally:
            clean(workdir)
        return record

    def run_migrate(self, rnd: int) -> dict[str, Any]:
        program = self.args.stormfs
        for command in ("encrypt", "rotate"):
            probe = subprocess.run([program, command, "--help"], capture_output=True, check=False)
            if probe.returncode:
                reason = f"stormfs {command} is not available"
                return {"round": rnd, "status": "n/a", "reason": reason}
        print(f"  round {rnd + 1} migrate: cp -a vs stormfs encrypt and rotate", flush=True)
        workdir = self.scratch / f"r{rnd}-migrate"
        clean(workdir)
        try:
            log = self.logs / f"r{rnd}-migrate.log"
            keys = (self.key, secrets.token_urlsafe(32))
            result = wl.migrate(
                workdir, self.args.migrate_size, program, dict(os.environ), keys, log
            )
            return {"round": rnd, "status": "ok", **result}
        except Exception as e:
            return {"round": rnd, "status": "FAIL", "reason": f"{type(e).__name__}: {e}"}
        finally:
            clean(workdir)


def _median(runs: list[dict[str, Any]], target: str, m: Metric, best: bool = False) -> float | None:
    """The median of the rounds, or with `best` the best of them."""
    values = [r["metrics"][m.key] for r in runs if r["target"] == target and m.key in r["metrics"]]
    if not values:
        return None
    if best:
        return max(values) if m.higher_is_better else min(values)
    return statistics.median(values)


def summarize(
    runs: list[dict[str, Any]], names: list[str], table: list[Metric], best: bool = False
) -> tuple[dict[str, dict[str, float | None]], dict[str, dict[str, float | None]]]:
    medians = {t: {m.key: _median(runs, t, m, best) for m in table} for t in names}
    ratios: dict[str, dict[str, float | None]] = {}
    for target, other in RATIOS:
        if target not in names or other not in names:
            continue
        ratios[f"{target}/{other}"] = {}
        for m in table:
            s, o = medians[target][m.key], medians[other][m.key]
            ratio = None
            if s and o:
                ratio = s / o if m.higher_is_better else o / s
            ratios[f"{target}/{other}"][m.key] = ratio
    return medians, ratios


def cell(runs: list[dict[str, Any]], target: str, key: str, value: float | None) -> str:
    mine = [r for r in runs if r["target"] == target]
    if any(key in r["errors"] for r in mine):
        return "FAIL"
    if not any(r["status"] == "ok" for r in mine):
        return "n/a"
    if value is None:
        return "-"
    return f"{value:.0f}" if value >= 100 else f"{value:.3g}"


def render(
    runs: list[dict[str, Any]],
    names: list[str],
    table: list[Metric],
    medians: dict[str, dict[str, float | None]],
    ratios: dict[str, dict[str, float | None]],
    rounds: int,
    best: bool = False,
) -> str:
    head = ["workload", "unit", *names, *ratios]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in table:
        row = [m.label, m.unit, *(cell(runs, t, m.key, medians[t][m.key]) for t in names)]
        row += [f"{r[m.key]:.2f}x" if r[m.key] is not None else "n/a" for r in ratios.values()]
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    legend = (
        f"{'Best' if best else 'Median'} of {rounds} round(s). MB/s = 10^6 bytes/s, higher is "
        "better; s and MiB, lower is better. `-`: not applicable (no daemon)."
    )
    if ratios:
        legend += " Ratios > 1 mean the first is better (first/second for MB/s, second/first else)."
    lines.append(legend)
    notes = {f"{r['target']}: n/a ({r['reason']})" for r in runs if r["status"] == "n/a"}
    for r in runs:
        failed: dict[str, list[str]] = {}
        for key, error in r["errors"].items():
            failed.setdefault(error, []).append(key)
        notes |= {
            f"{r['target']} round {r['round'] + 1}, {', '.join(k)}: {e}" for e, k in failed.items()
        }
    lines += [f"- {n}" for n in sorted(notes)]
    return "\n".join(lines)


def render_migrate(results: list[dict[str, Any]], size: int) -> str:
    head = (
        f"| migrate {human(size)} legacy tree | cp -a + sync | stormfs encrypt "
        "| stormfs rotate (key 1 to 2) | encrypt / cp | rotate / cp |"
    )
    rule = "|---|---|---|---|---|---|"
    ok = [r for r in results if r["status"] == "ok"]
    if not ok:
        reasons = sorted({r["reason"] for r in results})
        return f"{head}\n{rule}\n| MB/s | n/a | n/a | n/a | n/a | n/a |\n\n- " + "\n- ".join(
            reasons
        )
    cp, enc, rot = (statistics.median(r[k] for r in ok) for k in ("cp_a", "encrypt", "rotate"))
    files = ok[0]["files"]
    return (
        f"{head}\n{rule}\n| MB/s ({files} files, median of {len(ok)}) | {cp:.0f} | {enc:.0f} "
        f"| {rot:.0f} | {enc / cp:.2f}x | {rot / cp:.2f}x |"
    )


def render_requests(record: dict[str, Any]) -> str:
    """One table: request kinds down, workloads across, requests per file in the cells."""
    title = f"requests per file, stormfs with {record['options']}"
    if record["status"] != "ok":
        return f"{title}: FAIL ({record['reason']})"
    works = record["workloads"]
    names = list(works)
    totals: dict[str, float] = {}
    for w in works.values():
        for kind, n in w["requests"].items():
            totals[kind] = totals.get(kind, 0) + n / w["files"]
    kinds = sorted(totals, key=lambda k: -totals[k])
    head = [title, *(f"{n} ({works[n]['files']} files)" for n in names)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def per_file(w: dict[str, Any], kind: str | None) -> str:
        n = sum(w["requests"].values()) if kind is None else w["requests"].get(kind, 0)
        return f"{n / w['files']:.2f}" if n else "-"

    lines.append(
        "| **all** | " + " | ".join(f"**{per_file(works[n], None)}**" for n in names) + " |"
    )
    lines += ["| " + " | ".join([k, *(per_file(works[n], k) for n in names)]) + " |" for k in kinds]
    lines.append("| time (s) | " + " | ".join(f"{works[n]['seconds']:.3g}" for n in names) + " |")
    lines.append(
        "| in handlers (s) | "
        + " | ".join(f"{works[n]['handler_seconds']:.3g}" for n in names)
        + " |"
    )
    return "\n".join(lines)


def meta(args: argparse.Namespace, bench: Bench) -> dict[str, Any]:
    def version(*cmd: str) -> str | None:
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, check=False)
        except OSError:
            return None
        return (out.stdout or out.stderr).strip().splitlines()[0] if out.returncode == 0 else None

    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.machine(),
    )
    return {
        "kernel": platform.release(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "gocryptfs": version("gocryptfs", "-version"),
        "stormfs": version(args.stormfs, "--version"),
        "scratch": str(bench.scratch),
        "tar_files": len(bench.tree.manifest),
        "repo_files": len(bench.repo_manifest),
        "args": {
            k: str(v) if isinstance(v, Path) else sorted(v) if isinstance(v, set) else v
            for k, v in vars(args).items()
        },
    }


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("bench: run as root (it mounts filesystems and drops caches)", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _interrupt)
    args.scratch.mkdir(parents=True, exist_ok=True)
    for point in tg.mounts_under(args.scratch):  # left by an interrupted run
        tg.unmount(point)
    for old in [*args.scratch.glob("r[0-9]*-*"), args.scratch / "logs"]:
        clean(old)
    (args.scratch / "logs").mkdir()
    started, load = time.strftime("%Y-%m-%dT%H:%M:%S%z"), os.getloadavg()[0]
    if load > 0.5:
        print(f"bench: load average {load:.1f}: other work is running, numbers will be noisy")
    key = secrets.token_urlsafe(32)
    bench = Bench(args, key)
    names = args.targets
    order = make_targets(args, key)
    runs: list[dict[str, Any]] = []
    migrate: list[dict[str, Any]] = []
    requests: list[dict[str, Any]] = []
    status = 0
    try:
        for rnd in range(args.rounds):
            shift = rnd % len(order)
            for target in order[shift:] + order[:shift]:
                runs.append(bench.run_target(target, rnd))
            if args.migrate:
                migrate.append(bench.run_migrate(rnd))
        if args.requests:
            for n, options in enumerate(args.requests_with):
                requests.append(bench.run_requests(options, n))
    except KeyboardInterrupt:
        print("bench: interrupted; reporting what was measured", file=sys.stderr)
        status = 130
    finally:
        for point in tg.mounts_under(args.scratch):
            tg.unmount(point)
    table = metrics(args, len(bench.tree.manifest))
    if args.only:
        table = [
            m for m in table if any(m.key in r["metrics"] or m.key in r["errors"] for r in runs)
        ]
    medians, ratios = summarize(runs, names, table, args.best)
    text = (
        render(runs, names, table, medians, ratios, args.rounds, args.best) if args.rounds else ""
    )
    if args.migrate:
        text += "\n\n" + render_migrate(migrate, args.migrate_size)
    for record in requests:
        text += "\n\n" + render_requests(record)
    text = text.strip()
    report = {
        "meta": {
            **meta(args, bench),
            "started": started,
            "loadavg_1min": {"start": load, "end": os.getloadavg()[0]},
        },
        "workloads": {m.key: {"label": m.label, "unit": m.unit} for m in table},
        "runs": runs,
        "median": medians,
        "ratios": ratios,
        "migrate": migrate,
        "requests": requests,
        "table": text,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\n{text}\n\nraw numbers: {args.output}")
    failed = any(r["errors"] for r in runs) or any(
        r["status"] == "FAIL" for r in migrate + requests
    )
    return status or (1 if failed else 0)


if __name__ == "__main__":
    sys.exit(main())
