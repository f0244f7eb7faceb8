"""The layout holds: tests use only the public names of the d3k2 modules they import, and no module under
service/d3k2 grows past MAX_LINES. (The import layers themselves are checked by `lint-imports`, see
pyproject.toml.)"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

from builders import REPO

SERVICE = REPO / "service"
PACKAGE = SERVICE / "d3k2"
TESTS = REPO / "tests"
MAX_LINES = 520

# Test files that still reach into private names, each rewritten or split on another branch right now. The
# check fails when one of them no longer does (or is gone): then its line here goes too.
PRIVATE_ACCESS_KNOWN: set[str] = set()

# Modules over MAX_LINES, each being split on another branch right now; emptied as those splits are merged.
OVERSIZED_KNOWN: set[str] = set()


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _is_module(dotted: str) -> bool:
    path = SERVICE.joinpath(*dotted.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _dotted(node: ast.expr) -> str | None:
    """``a.b.c`` for a chain of attribute accesses on a name, else None."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base else None
    return None


def private_uses(source: str) -> Iterator[tuple[int, str]]:
    """(line, what) for every private name of a d3k2 module that ``source`` uses: imported by name, read as
    an attribute of the module, or named as a string to (monkeypatch.)setattr, getattr and the like."""
    tree = ast.parse(source)
    modules: dict[str, str] = {}  # local name → the d3k2 module it is bound to
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "d3k2":
                    if alias.asname:
                        modules[alias.asname] = alias.name
                    else:
                        modules["d3k2"] = "d3k2"
        elif (
            isinstance(node, ast.ImportFrom)
            and node.level == 0
            and (node.module or "").split(".")[0] == "d3k2"
        ):
            for alias in node.names:
                if _private(alias.name):
                    yield node.lineno, f"from {node.module} import {alias.name}"
                elif _is_module(f"{node.module}.{alias.name}"):
                    modules[alias.asname or alias.name] = f"{node.module}.{alias.name}"

    def module_of(node: ast.expr) -> str | None:
        dotted = _dotted(node)
        if dotted is None:
            return None
        head, _, rest = dotted.partition(".")
        if head not in modules:
            return None
        full = f"{modules[head]}.{rest}" if rest else modules[head]
        return full if _is_module(full) else None

    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            module = module_of(node.value)
            if module:
                yield node.lineno, f"{module}.{node.attr}"
        elif isinstance(node, ast.Call) and node.args:
            first = node.args[0]
            named = node.args[1] if len(node.args) > 1 else None
            if isinstance(first, ast.Constant) and isinstance(first.value, str):
                module, _, attr = first.value.rpartition(".")
                if module.split(".")[0] == "d3k2" and _private(attr) and _is_module(module):
                    yield node.lineno, first.value
            elif isinstance(named, ast.Constant) and isinstance(named.value, str) and _private(named.value):
                module = module_of(first)
                if module:
                    yield node.lineno, f"{module}.{named.value}"


def _test_files() -> list[Path]:
    return sorted(TESTS.rglob("*.py"))


def _rel(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


def test_no_test_uses_a_private_name_of_a_d3k2_module() -> None:
    found = {
        _rel(path): sorted(set(private_uses(path.read_text(encoding="utf-8")))) for path in _test_files()
    }
    offenders = {path: uses for path, uses in found.items() if uses}
    new = {path: uses for path, uses in offenders.items() if path not in PRIVATE_ACCESS_KNOWN}
    assert not new, (
        "tests use private names of d3k2 modules (make them public or test through the API):\n"
        + ("\n".join(f"  {path}:{line}: {what}" for path, uses in new.items() for line, what in uses))
    )
    fixed = sorted(PRIVATE_ACCESS_KNOWN - set(offenders))
    assert not fixed, f"no longer use private names: remove from PRIVATE_ACCESS_KNOWN: {fixed}"


def test_no_module_is_longer_than_the_limit() -> None:
    lengths = {
        _rel(path): len(path.read_text(encoding="utf-8").splitlines()) for path in PACKAGE.rglob("*.py")
    }
    oversized = {path for path, lines in lengths.items() if lines > MAX_LINES}
    new = sorted(f"{path} ({lengths[path]} lines)" for path in oversized - OVERSIZED_KNOWN)
    assert not new, f"modules over {MAX_LINES} lines: split them by responsibility: {new}"
    done = sorted(OVERSIZED_KNOWN - oversized)
    assert not done, f"no longer over {MAX_LINES} lines (or gone): remove from OVERSIZED_KNOWN: {done}"


# ---------------------------------------------------------------- the checker itself


@pytest.mark.parametrize(
    ("source", "found"),
    [
        ("from d3k2.http.logs import _only_handler", [(1, "from d3k2.http.logs import _only_handler")]),
        ("from d3k2.http import logs\nlogs._only_handler()", [(2, "d3k2.http.logs._only_handler")]),
        (
            "import d3k2.store.feedback as fb\nfb._describe(e)",
            [(2, "d3k2.store.feedback._describe")],
        ),
        ("import d3k2.http.api\nd3k2.http.api._x", [(2, "d3k2.http.api._x")]),
        ("from d3k2 import core\ncore.facts._LOOKUPS", [(2, "d3k2.core.facts._LOOKUPS")]),
        (
            "import d3k2.core.facts as f\nmonkeypatch.setattr(f, '_MAX_ROLES', 1)",
            [(2, "d3k2.core.facts._MAX_ROLES")],
        ),
        ("monkeypatch.setattr('d3k2.core.facts._MAX_ROLES', 1)", [(1, "d3k2.core.facts._MAX_ROLES")]),
    ],
    ids=["from-import", "module-attribute", "import-as", "dotted", "submodule", "setattr", "setattr-path"],
)
def test_private_uses_are_found(source: str, found: list[tuple[int, str]]) -> None:
    assert sorted(private_uses(source)) == found


@pytest.mark.parametrize(
    "source",
    [
        "from d3k2 import __version__",
        "from d3k2.http import logs\nlogs.configure_logging",
        "from d3k2.store.feedback import FeedbackStore\nFeedbackStore._x",  # a class's, not a module's
        "writer._thread = None",
        "from d3k2.http.api import TODAY_HEADER\nmonkeypatch.setattr(obj, '_x', 1)",
        "import json\njson._default_encoder",
        "monkeypatch.setattr('logging._lock', None)",
    ],
)
def test_public_and_non_d3k2_uses_pass(source: str) -> None:
    assert list(private_uses(source)) == []
