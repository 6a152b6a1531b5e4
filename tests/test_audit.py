"""`stormfs audit`: one class per file, the JSON of DESIGN §5, exit codes, changes nothing."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from stormfs import format as fmt
from stormfs import format_v2 as v2
from stormfs import keys
from stormfs.exitcodes import ISSUES_FOUND, OK, USAGE, WORK_TO_DO
from stormfs.scan import LEGACY, V1, Layout, Status, classify_path, layout_from

from .trees import make_mixed, run_json, snapshot, stormfs, write

STATUSES = {"needs_encryption", "decryption_failed", "unreadable"}


def test_every_class_json_schema_and_exit_code(tmp_path: Path, key: str):
    src = tmp_path / "src"
    tree = make_mixed(src, key)
    rc, report = run_json("audit", str(src), key=key)
    assert rc == ISSUES_FOUND
    for field in ("encrypted", "needs_encryption", "issues"):
        assert type(report[field]) is int
    assert report["encrypted"] == len(tree["encrypted"])
    assert report["needs_encryption"] == len(tree["legacy"])
    assert report["issues"] == len(tree["broken"])
    assert report["scanned"] == len(tree["legacy"]) + len(tree["encrypted"]) + len(tree["broken"])
    by_path = {f["path"]: f for f in report["files"]}
    assert len(by_path) == len(report["files"])  # each file in one class only
    for f in report["files"]:
        assert set(f) >= {"path", "status", "detail"}
        assert f["status"] in STATUSES
        assert isinstance(f["detail"], str) and f["detail"] and "\n" not in f["detail"]
        assert not f["path"].startswith("/")
    assert {p for p, f in by_path.items() if f["status"] == "needs_encryption"} == set(
        tree["legacy"]
    )
    assert {p for p, f in by_path.items() if f["status"] == "decryption_failed"} == set(
        tree["broken"]
    )
    assert not any(".stormfs" in p for p in by_path)  # stormfs' own names are skipped


def test_exit_codes(tmp_path: Path, key: str):
    src = tmp_path / "src"
    raw = keys.parse_key(key)
    write(src / "a", fmt.seal(raw, b"fine"))
    assert stormfs("audit", str(src), key=key).returncode == OK
    write(src / "b", b"legacy")
    r = stormfs("audit", str(src), key=key)
    assert r.returncode == WORK_TO_DO, r.stdout + r.stderr
    assert "Files needing encryption: 1" in r.stdout
    assert "needs_encryption" in r.stdout and "b: legacy plaintext" in r.stdout
    write(src / "c", fmt.seal(raw, b"x")[:-1])
    assert stormfs("audit", str(src), key=key).returncode == ISSUES_FOUND
    # usage and key errors
    assert stormfs("audit", str(src), key=None).returncode == USAGE
    assert stormfs("audit", str(src), key="not-a-key").returncode == USAGE
    assert stormfs("audit", str(tmp_path / "missing"), key=key).returncode == USAGE
    assert stormfs("audit", key=key).returncode == USAGE


def test_key_file_as_for_the_mount(tmp_path: Path, key: str):
    src = tmp_path / "src"
    write(src / "a", fmt.seal(keys.parse_key(key), b"fine"))
    key_file = tmp_path / "key"
    key_file.write_text(key + "\n")
    key_file.chmod(0o600)
    assert stormfs("audit", str(src), "--key-file", str(key_file), key=None).returncode == OK


def test_quick_reads_headers_only(tmp_path: Path, key: str):
    src = tmp_path / "src"
    tree = make_mixed(src, key)
    rc, report = run_json("audit", str(src), "--quick", key=None)
    assert rc == WORK_TO_DO  # damaged envelopes look like envelopes from their header
    assert report["quick"] is True
    assert report["encrypted"] == len(tree["encrypted"]) + len(tree["broken"])
    assert report["needs_encryption"] == len(tree["legacy"])


def test_audit_changes_nothing(tmp_path: Path, key: str):
    src = tmp_path / "src"
    make_mixed(src, key)
    before = snapshot(src)
    stormfs("audit", str(src), key=key)
    stormfs("audit", str(src), "--json", key=key)
    assert snapshot(src) == before
    assert sorted(os.listdir(src / ".stormfs")) == ["state-of-the-daemon"]


def test_human_output_names_each_file_needing_attention(tmp_path: Path, key: str):
    src = tmp_path / "src"
    tree = make_mixed(src, key)
    out = stormfs("audit", str(src), key=key).stdout
    assert "Files already encrypted:  2" in out
    assert f"Files needing encryption: {len(tree['legacy'])}" in out
    assert f"Files with issues:        {len(tree['broken'])}" in out
    lines = out.splitlines()
    for rel in tree["broken"]:
        (line,) = [ln for ln in lines if f"  {rel}: " in ln]
        assert line.startswith("decryption_failed") and "DECRYPTION_FAILED" in line
    for rel in tree["legacy"]:
        (line,) = [ln for ln in lines if f"  {rel}: " in ln]
        assert line.startswith("needs_encryption")


# Root reads everything; without these capabilities it meets real EACCES.
NO_DAC = (
    "setpriv",
    "--bounding-set=-dac_override,-dac_read_search",
    "--inh-caps=-dac_override,-dac_read_search",
)


def test_unreadable_file_and_directory(tmp_path: Path, key: str):
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is needed to drop root's file-access override")
    src = tmp_path / "src"
    write(src / "ok.txt", b"legacy")
    write(src / "secret", b"no access").chmod(0)
    write(src / "closed/inner", b"x")
    (src / "closed").chmod(0)
    rc, report = run_json("audit", str(src), key=key, prefix=NO_DAC)
    assert rc == ISSUES_FOUND
    by_path = {f["path"]: f for f in report["files"]}
    assert by_path["secret"]["status"] == "unreadable"
    assert "Permission denied" in by_path["secret"]["detail"]
    assert by_path["closed"]["status"] == "unreadable"
    assert by_path["ok.txt"]["status"] == "needs_encryption"
    assert report["issues"] == 2
    (src / "closed").chmod(0o755)


def test_io_error_is_unreadable(tmp_path: Path, key: str, mount_factory):
    """A file whose reads fail with EIO: a damaged envelope seen through a stormfs mount."""
    inner = tmp_path / "inner"
    write(inner / "damaged", b"\x01" + bytes(40))
    write(inner / "good", fmt.seal(keys.parse_key(key), b"lets the mount's key check pass"))
    src = tmp_path / "src"
    write(src / "plain", b"legacy")
    mount_factory(inner, src / "mnt")
    rc, report = run_json("audit", str(src), key=key)
    by_path = {f["path"]: f for f in report["files"]}
    assert by_path["mnt/damaged"]["status"] == "unreadable"
    assert "Input/output error" in by_path["mnt/damaged"]["detail"]
    assert rc == ISSUES_FOUND


def test_vanished_file_is_unreadable(tmp_path: Path, key: str):
    """The spec's "File Not Found": listed, then gone before it was read."""
    verdict = classify_path(os.fsencode(tmp_path / "gone"), None, quick=False)
    assert verdict.status is Status.UNREADABLE
    assert "not found" in verdict.detail


def test_verdict_names_the_key_that_opens_the_file(tmp_path: Path, key: str):
    """With several keys, the classifier says which one opens an envelope."""
    old = keys.Key("old", keys.parse_key(keys.generate_key()))
    ring = keys.Keyring(keys.Key("new", keys.parse_key(key)), (old,))
    path = write(tmp_path / "sealed-by-old", fmt.seal(old.material, b"written before rotation"))
    verdict = classify_path(os.fsencode(path), ring, quick=False)
    assert verdict.status is Status.ENCRYPTED
    assert verdict.key == old
    assert verdict.detail == "authenticated under key id old"
    other = write(tmp_path / "foreign", fmt.seal(keys.parse_key(keys.generate_key()), b"x"))
    verdict = classify_path(os.fsencode(other), ring, quick=False)
    assert (verdict.status, verdict.key) == (Status.DECRYPTION_FAILED, None)


# ---- v2 files: the same classes, told by their signature --------------------------------


def _v2_files(root: Path, raw: bytes) -> dict[str, str]:
    """v2 files of every class, and legacy files that merely look a little like them."""
    good = v2.seal(raw, os.urandom(3 * 4096 + 5), chunk_size=4096)
    damaged = bytearray(good)
    damaged[v2.chunk_offset(2, 4096) + 20] ^= 1
    truncated = good[: v2.chunk_offset(3, 4096)]
    files = {
        "v2/good": (good, "encrypted"),
        "v2/empty": (v2.seal(raw, b""), "encrypted"),
        "v2/damaged-chunk": (bytes(damaged), "decryption_failed"),
        "v2/cut-at-boundary": (truncated, "decryption_failed"),
        "v2/damaged-header": (good[:30] + bytes([good[30] ^ 1]) + good[31:], "decryption_failed"),
        "v2/other-key": (v2.seal(bytes(32), b"not ours"), "decryption_failed"),
        "v2/signature-only": (b"\x02stormfs" + bytes(100), "decryption_failed"),
        "legacy/starts-0x02": (
            b"\x02" + b"legacy bytes that start with two" * 3,
            "needs_encryption",
        ),
        "legacy/short-signature": (b"\x02stormfs and less than 29", "needs_encryption"),
    }
    for rel, (data, _) in files.items():
        write(root / rel, data)
    return {rel: status for rel, (_, status) in files.items()}


def test_v2_files_are_classified_by_signature_then_authenticated(tmp_path: Path, key: str):
    raw = keys.parse_key(key)
    expected = _v2_files(tmp_path, raw)
    ring = keys.Keyring(keys.Key("1", raw))
    for rel, status in expected.items():
        verdict = classify_path(os.fsencode(tmp_path / rel), ring, quick=False)
        assert verdict.status.value == status, (rel, verdict)
        if status == "decryption_failed":
            assert verdict.detail.startswith("DECRYPTION_FAILED: v2 file")
    quick = classify_path(os.fsencode(tmp_path / "v2/damaged-chunk"), ring, quick=True)
    assert (quick.status, quick.detail) == (Status.ENCRYPTED, "v2 header (not verified)")


def test_v2_verdict_names_the_key_that_opens_the_file(tmp_path: Path, key: str):
    old = keys.Key("old", keys.parse_key(keys.generate_key()))
    ring = keys.Keyring(keys.Key("new", keys.parse_key(key)), (old,))
    path = write(tmp_path / "sealed-by-old", v2.seal(old.material, b"before rotation"))
    verdict = classify_path(os.fsencode(path), ring, quick=False)
    assert (verdict.status, verdict.key) == (Status.ENCRYPTED, old)
    assert verdict.detail == "v2 file authenticated under key id old"


def test_audit_counts_v2_files_and_lists_the_damaged_ones(tmp_path: Path, key: str):
    src = tmp_path / "src"
    expected = _v2_files(src, keys.parse_key(key))
    before = snapshot(src)
    rc, report = run_json("audit", str(src), key=key)
    assert rc == ISSUES_FOUND
    assert report["encrypted"] == 2
    listed = {f["path"]: f["status"] for f in report["files"]}
    assert listed == {rel: s for rel, s in expected.items() if s != "encrypted"}
    assert snapshot(src) == before


def test_layout_from_follows_the_rule_of_format_md():
    env = v2.seal(bytes(32), b"x")
    assert layout_from(len(env), env[:12]) == Layout(2, v2.CHUNK_SIZE)
    assert layout_from(100, b"\x02stormfs\x00\x00\x00\x07") == Layout(2, None)
    assert layout_from(28, b"\x02stormfs\x00\x00\x40\x00") is LEGACY  # too short, as in v1
    assert layout_from(100, b"\x02stormfx\x00\x00\x40\x00") is LEGACY
    assert layout_from(29, b"\x01" * 12) is V1
    assert layout_from(1000, b"plain text..") is LEGACY
    assert Layout(2, None).plaintext_size(1000) == 1000 - 88
    assert Layout(2, 4096).plaintext_size(v2.ondisk_size(5000, 4096)) == 5000
    assert V1.plaintext_size(129) == 100 and LEGACY.plaintext_size(129) == 129
    assert (LEGACY.name, V1.name, Layout(2, 4096).name) == ("legacy", "v1", "v2")
