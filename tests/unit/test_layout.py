"""The import rules of DESIGN.md: services is shared and framework-free; web and worker
never import each other (the CLI's dev mode is the one place that composes them)."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
COMPOSER = ROOT / "services" / "cli.py"


def imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [
        ("services", {"quart", "hypercorn", "werkzeug", "openai", "web", "worker"}),
        ("web", {"worker", "openai"}),
        ("worker", {"web", "quart", "hypercorn"}),
    ],
)
def test_package_does_not_import(package, forbidden):
    for path in (ROOT / package).rglob("*.py"):
        if path == COMPOSER:
            continue
        bad = imports(path) & forbidden
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_key_names_only_in_keys_module():
    for package in ("services", "web", "worker"):
        for path in (ROOT / package).rglob("*.py"):
            if path.name == "keys.py":
                continue
            text = path.read_text()
            assert ":{queue}" not in text and '}:log"' not in text, path
