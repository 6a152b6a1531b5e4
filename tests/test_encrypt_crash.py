"""kill -9 `stormfs encrypt` again and again, then let it finish: nothing lost or torn."""

from __future__ import annotations

import os
import random
import sys
import time
from pathlib import Path

from stormfs.exitcodes import OK

from .crashes import kill_runs
from .helpers import scrubbed_env
from .trees import leftovers, plain_decrypt, random_legacy, run_json, write

KILLS = 12


def build(src: Path, rng: random.Random) -> tuple[dict[str, bytes], list[list[str]]]:
    expected: dict[str, bytes] = {}
    for i in range(120):
        rel = f"d{i % 7}/sub{i % 3}/f{i}"
        expected[rel] = random_legacy(rng)
        write(src / rel, expected[rel])
    groups = []
    for g in range(4):
        names = [f"links/g{g}-{n}" if n else f"d{g}/g{g}" for n in range(g % 3 + 2)]
        data = b"L" + random_legacy(rng)
        write(src / names[0], data)
        for n in names[1:]:
            (src / n).parent.mkdir(parents=True, exist_ok=True)
            os.link(src / names[0], src / n)
        for n in names:
            expected[n] = data
        groups.append(names)
    return expected, groups


def check_every_name(src: Path, key: str, expected: dict[str, bytes]) -> None:
    """Each name holds the original plaintext or one envelope of it: never torn, never twice."""
    for rel, data in expected.items():
        raw = (src / rel).read_bytes()
        if raw == data:
            continue
        assert raw[:1] == b"\x01" and len(raw) == len(data) + 29, f"{rel} is torn"
        assert plain_decrypt(key, raw) == data, f"{rel} does not decrypt to its original"


def test_kill_and_rerun(tmp_path: Path, key: str):
    seed = int(time.time())
    rng = random.Random(seed)
    src = tmp_path / "src"
    expected, groups = build(src, rng)
    env = scrubbed_env(key)
    cmd = [sys.executable, "-m", "stormfs", "encrypt", str(src), "--force", "--jobs", "2"]
    killed = kill_runs(cmd, env, src, rng, KILLS, lambda: check_every_name(src, key, expected))
    rc, report = run_json("encrypt", str(src), "--force", key=key)
    assert rc == OK, (seed, report)
    assert report["errors"] == 0
    for rel, data in expected.items():
        assert plain_decrypt(key, (src / rel).read_bytes()) == data, (seed, rel)
    for names in groups:
        assert len({(src / n).stat().st_ino for n in names}) == 1, (seed, names)
        assert (src / names[0]).stat().st_nlink == len(names)
    assert leftovers(src) == [], seed
    assert not list((src / ".stormfs/encrypt").glob("links-*")), seed
    rc, audit = run_json("audit", str(src), key=key)
    assert audit["needs_encryption"] == 0 and audit["issues"] == 0, seed
    assert killed >= KILLS // 2, "most runs finished: the tree is too small to test this"
