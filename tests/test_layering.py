"""The layers of DESIGN §6, read from the source: who may import what, and who may print.

Imports are followed through the package, so an engine that imports a module
that imports pyfuse3 fails as if it imported pyfuse3 itself.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "stormfs"
ENGINES = (
    "audit",
    "encrypt",
    "pipeline",
    "sealing",
    "plan",
    "swap",
    "journal",
    "scan",
    "keycheck",
    "keyuse",
    "keys",
)
# What only the command line may use: parsers, the progress bar, the command itself.
CLI_ONLY = {"argparse", "tqdm", "stormfs.cli", "stormfs.progress"}


def _file(module: str) -> Path:
    """``stormfs/<module>.py``, where `module` may name a subpackage's module ("ops.base")."""
    return PACKAGE.joinpath(*module.split(".")).with_suffix(".py")


def _tree(module: str) -> ast.Module:
    return ast.parse(_file(module).read_text(), filename=str(_file(module)))


@cache
def direct_imports(module: str) -> frozenset[str]:
    """Absolute names imported by ``stormfs/<module>.py`` (relative imports resolved)."""
    names: set[str] = set()
    for node in ast.walk(_tree(module)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            package = ["stormfs", *module.split(".")[:-1]]
            base = ".".join(package[: len(package) - node.level + 1]) if node.level else ""
            if node.module:
                base = f"{base}.{node.module}" if base else node.module
            names.add(base)
            if node.level and not node.module:
                names.update(f"{base}.{alias.name}" for alias in node.names)
    return frozenset(name for name in names if name != "__future__")


def imports(module: str) -> set[str]:
    """Everything `module` imports, directly or through other stormfs modules."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        for name in direct_imports(todo.pop()):
            if name in seen:
                continue
            seen.add(name)
            inner = name.removeprefix("stormfs.")
            if name.startswith("stormfs.") and _file(inner).exists():
                todo.append(inner)
    return seen


def top_level(names: set[str]) -> set[str]:
    return {name.split(".")[0] for name in names}


def test_the_engines_are_all_there():
    for module in (*ENGINES, "format", "format_v2", "fs", "cli"):
        assert (PACKAGE / f"{module}.py").exists(), module


def test_imports_are_followed_through_the_package():
    """The checks below would see a forbidden import made one module away."""
    assert "stormfs.source" in imports("scan")
    assert "stormfs.working" in imports("daemon")  # through fs
    assert "stormfs.working" not in direct_imports("daemon")
    assert "pyfuse3" in top_level(imports("daemon"))


def test_format_imports_nothing_of_stormfs():
    assert not top_level(set(direct_imports("format"))) & {"stormfs"}


def test_format_v2_imports_only_format_of_stormfs():
    """Pure functions over bytes: v1's shared constants and error, nothing with OS state."""
    assert {n for n in imports("format_v2") if n.startswith("stormfs")} == {"stormfs.format"}
    assert not top_level(imports("format_v2")) & {"pyfuse3", "trio", "socket", "subprocess"}


def test_fs_operations_parse_no_arguments():
    assert "argparse" not in top_level(imports("fs"))


@pytest.mark.parametrize("module", ENGINES)
def test_engines_need_no_fuse_and_no_command_line(module: str):
    reached = imports(module)
    assert "pyfuse3" not in top_level(reached)
    assert not reached & CLI_ONLY
    assert "argparse" not in top_level(reached)


def _prints(module: str) -> list[str]:
    """Lines where `module` calls print() or touches sys.stdout / sys.stderr."""
    found = []
    for node in ast.walk(_tree(module)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            if node.func.id == "print":
                found.append(f"{module}.py:{node.lineno}: print(")
        elif (
            isinstance(node, ast.Attribute)
            and node.attr in ("stdout", "stderr")
            and isinstance(node.value, ast.Name)
            and node.value.id == "sys"
        ):
            found.append(f"{module}.py:{node.lineno}: sys.{node.attr}")
    return found


@pytest.mark.parametrize("module", ENGINES)
def test_engines_print_nothing(module: str):
    assert _prints(module) == []


def test_the_command_does_print():
    """The check above would find a print if there were one."""
    assert _prints("cli")
