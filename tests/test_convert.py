"""`stormfs encrypt --format v1|v2`: converting a SOURCE between the formats in place,
also when killed at random points and run again."""

from __future__ import annotations

import os
import random
import sys
import time
from pathlib import Path

import pytest

from stormfs import format as fmt
from stormfs import format_v2 as v2
from stormfs import keys
from stormfs.exitcodes import ISSUES_FOUND, OK, WORK_TO_DO

from .crashes import kill_runs
from .helpers import scrubbed_env
from .keyscan import new_key
from .trees import (
    KEY_ID,
    format_of,
    leftovers,
    legacy_bytes,
    plaintext,
    random_legacy,
    run_json,
    snapshot,
    write,
    write_keyring,
)


def mixed(src: Path, key: str) -> tuple[dict[str, bytes], list[list[str]]]:
    """Legacy, v1 and v2 files (empty, one chunk, one byte more, several MiB), a sparse
    file, and hard-link groups of each format.  Returns each name's plaintext, the groups."""
    raw = keys.parse_key(key)
    expected: dict[str, bytes] = {}
    sizes = (0, 1, v2.CHUNK_SIZE, v2.CHUNK_SIZE + 1, 300_000, 3 << 20)
    for n in sizes:
        data = legacy_bytes(n)
        expected[f"legacy/{n}"] = data
        write(src / f"legacy/{n}", data)
        expected[f"v1/{n}"] = data
        write(src / f"v1/{n}", fmt.seal(raw, data))
        expected[f"v2/{n}"] = data
        write(src / f"v2/{n}", v2.seal(raw, data))
    with open(src / "legacy/sparse", "wb") as f:
        f.truncate(4 << 20)
        f.seek(1 << 20)
        f.write(b"island")
    expected["legacy/sparse"] = (src / "legacy/sparse").read_bytes()
    groups = []
    for version, blob in ((0, b"L" + os.urandom(90_000)), (1, None), (2, None)):
        data = blob if blob is not None else os.urandom(200_000)
        sealed = {0: data, 1: fmt.seal(raw, data), 2: v2.seal(raw, data)}[version]
        names = [f"links/{version}-a", f"links/sub/{version}-b", f"{version}-c"]
        write(src / names[0], sealed)
        (src / "links/sub").mkdir(exist_ok=True)
        for n in names[1:]:
            os.link(src / names[0], src / n)
        expected.update(dict.fromkeys(names, data))
        groups.append(names)
    return expected, groups


def check_converted(
    src: Path, key: str, expected: dict[str, bytes], target: int, sealed: set[str]
) -> None:
    """Every name in format `target` with its plaintext; those in `sealed` sealed by a
    run (the others were in that format already, and untouched)."""
    for rel, data in expected.items():
        raw = (src / rel).read_bytes()
        assert format_of(raw) == target, rel
        assert plaintext(key, raw) == data, rel
        if rel in sealed:
            assert os.getxattr(src / rel, KEY_ID) == b"1", rel


@pytest.mark.parametrize("first", [2, 1])
def test_conversion_both_ways_on_a_mixed_tree(tmp_path: Path, key: str, first: int):
    src = tmp_path / "src"
    expected, groups = mixed(src, key)
    broken = fmt.seal(keys.parse_key(keys.generate_key()), b"under a key nobody has")
    write(src / "bad/other-key", broken)
    before = snapshot(src)
    rc, dry = run_json("encrypt", str(src), "--dry-run", "--format", f"v{first}", key=key)
    # A v1 envelope no key opens cannot become v2: an issue; as v1 it is left as it is.
    assert rc == (ISSUES_FOUND if first == 2 else WORK_TO_DO), dry
    assert snapshot(src) == before
    other = 3 - first
    would = {f["path"] for f in dry["files"] if f["status"] == "needs_conversion"}
    assert would == {rel for rel in expected if rel.startswith((f"v{other}/", f"{other}-"))} | {
        f"links/{other}-a",
        f"links/sub/{other}-b",
    }
    original = {rel: format_of((src / rel).read_bytes()) for rel in expected}
    for target in (first, 3 - first):
        rc, report = run_json("encrypt", str(src), "--force", "--format", f"v{target}", key=key)
        assert rc == (ISSUES_FOUND if target == 2 else OK), report
        assert report["format"] == f"v{target}"
        problems = [f["status"] for f in report["files"] if f["path"] == "bad/other-key"]
        assert problems == (["decryption_failed"] if target == 2 else [])
        sealed = {rel for rel in expected if target != first or original[rel] != first}
        check_converted(src, key, expected, target, sealed)
        for names in groups:
            assert len({(src / n).stat().st_ino for n in names}) == 1, names
            assert (src / names[0]).stat().st_nlink == len(names)
        assert (src / "bad/other-key").read_bytes() == broken
        assert leftovers(src) == []
        assert not list((src / ".stormfs/encrypt").glob("links-*"))
        rc, audit = run_json("audit", str(src), key=key)
        assert audit["formats"] == {f"v{target}": len(expected), f"v{3 - target}": 0}
        assert audit["needs_encryption"] == 0 and audit["decryption_failed"] == 1
        # Nothing left to do in that format: a second run changes nothing.
        again = snapshot(src)
        rc, report = run_json("encrypt", str(src), "--force", "--format", f"v{target}", key=key)
        assert report["encrypted_now"] == 0 and snapshot(src) == again
    # The default run never converts: legacy to v1, nothing else touched.
    write(src / "new-legacy", b"written after the conversion")
    rc, report = run_json("encrypt", str(src), "--force", key=key)
    assert rc == OK, report
    assert report["encrypted_now"] == 1
    rc, audit = run_json("audit", str(src), key=key)
    want = {"v1": 1, "v2": 0}
    want[f"v{3 - first}"] += len(expected)
    assert audit["formats"] == want
    assert format_of((src / "new-legacy").read_bytes()) == 1


def test_conversion_dry_run_and_exit_codes(tmp_path: Path, key: str):
    src = tmp_path / "src"
    write(src / "a", v2.seal(keys.parse_key(key), b"chunked"))
    rc, report = run_json("encrypt", str(src), "--dry-run", "--format", "v1", key=key)
    assert rc == WORK_TO_DO and report["would_encrypt"] == 1
    rc, report = run_json("encrypt", str(src), "--dry-run", key=key)
    assert rc == OK and report["would_encrypt"] == 0  # the default leaves v2 alone


KILLS = 6


@pytest.mark.parametrize("target", [2, 1])
def test_conversion_killed_and_resumed(tmp_path: Path, key: str, target: int):
    """kill -9 at random points of the conversion: every name holds its original or the
    converted file, never torn; the run finishes what the killed ones left."""
    seed = int(time.time())
    rng = random.Random(seed)
    src = tmp_path / "src"
    raw = keys.parse_key(key)
    expected: dict[str, bytes] = {}
    for i in range(60):
        rel = f"d{i % 5}/f{i}"
        expected[rel] = random_legacy(rng)
        sealed = (expected[rel], fmt.seal(raw, expected[rel]), v2.seal(raw, expected[rel]))
        write(src / rel, sealed[i % 3])
    groups = []
    for g in range(3):
        names = [f"links/g{g}-{n}" if n else f"d{g}/g{g}" for n in range(3)]
        data = b"L" + rng.randbytes(400_000)
        write(src / names[0], (data, fmt.seal(raw, data), v2.seal(raw, data))[g])
        for n in names[1:]:
            (src / n).parent.mkdir(parents=True, exist_ok=True)
            os.link(src / names[0], src / n)
        expected.update(dict.fromkeys(names, data))
        groups.append(names)

    original = {rel: format_of((src / rel).read_bytes()) for rel in expected}

    def every_name_whole() -> None:
        for rel, data in expected.items():
            assert plaintext(key, (src / rel).read_bytes()) == data, (seed, rel)

    cmd = [sys.executable, "-m", "stormfs", "encrypt", str(src), "--force", "--format"]
    cmd += [f"v{target}", "--jobs", "2"]
    killed = kill_runs(cmd, scrubbed_env(key), src, rng, KILLS, every_name_whole)
    rc, report = run_json("encrypt", str(src), "--force", "--format", f"v{target}", key=key)
    assert rc == OK, (seed, report)
    check_converted(src, key, expected, target, {r for r in expected if original[r] != target})
    for names in groups:
        assert len({(src / n).stat().st_ino for n in names}) == 1, (seed, names)
    assert leftovers(src) == [], seed
    assert not list((src / ".stormfs/encrypt").glob("links-*")), seed
    rc, audit = run_json("audit", str(src), key=key)
    assert audit["formats"][f"v{target}"] == len(expected) and audit["issues"] == 0, seed
    assert killed >= KILLS // 2, "most runs finished: the tree is too small to test this"


def test_rotation_keeps_each_files_format(tmp_path: Path):
    """rotate re-seals a v2 file as v2 and a v1 file as v1, under the current key."""
    k1, k2 = new_key(), new_key()
    src = tmp_path / "src"
    data = {"a-v1": os.urandom(70_000), "b-v2": os.urandom(3 * v2.CHUNK_SIZE + 5), "c-v2": b""}
    write(src / "a-v1", fmt.seal(keys.parse_key(k1), data["a-v1"]))
    for rel in ("b-v2", "c-v2"):
        write(src / rel, v2.seal(keys.parse_key(k1), data[rel]))
    ring = write_keyring(tmp_path / "ring", {"1": k1})
    env = {"STORMCLOUD_ENCRYPTION_KEY_ID": "2"}
    rc, report = run_json("rotate", str(src), "--force", "--keyring", ring, key=k2, env=env)
    assert rc == OK and report["encrypted_now"] == 3, report
    for rel, content in data.items():
        raw = (src / rel).read_bytes()
        assert format_of(raw) == (2 if rel.endswith("v2") else 1), rel
        assert plaintext(k2, raw) == content, rel
        assert os.getxattr(src / rel, KEY_ID) == b"2", rel
