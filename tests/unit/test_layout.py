"""The import rules of DESIGN.md, enforced: ``services`` is shared and framework-free,
``web`` and ``worker`` never import each other except in the composition root
(``services.cli``), and every Redis key is built in ``services/keys.py``."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("services", "web", "worker")
COMPOSITION_ROOT = "services.cli"  # the one module that composes web and worker
KEYS_MODULE = "services.keys"

# What the modules under each prefix may import, besides the standard library.
# A module may import what every prefix of its dotted name allows; a name is
# allowed when it is an entry or under one (``quart`` allows ``quart.json``,
# not ``quart_schema``).
ALLOWED: dict[str, set[str]] = {
    "services": {"services", "redis", "prometheus_client", "itsdangerous"},
    "services.redisconn": {"fakeredis"},  # the embedded broker of `tokencast dev`
    "services.client": {"httpx", "httpx_sse"},  # the terminal client
    "services.producer_client": {"httpx"},  # tokencast publish
    COMPOSITION_ROOT: {"web.app", "web.server", "worker.main", "uvloop"},
    "web": {
        "services",
        "web",
        "quart",
        "quart_cors",
        "quart_schema",
        "hypercorn",
        "pydantic",
        "werkzeug",
    },
    "worker": {"services", "worker", "prometheus_client"},
    "worker.backends.openai": {"openai"},
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(source: str, module: str, is_package: bool = False) -> list[tuple[str, set[str]]]:
    """Every import in ``source``: the module it names (relative imports
    resolved against ``module``) and the dotted names that would allow it
    (``from a import b`` may import the module ``a.b``)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(alias.name, {alias.name}) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module.split(".") if is_package else module.split(".")[:-1]
                kept = package[: len(package) - (node.level - 1)]
                base = ".".join([*kept, *([node.module] if node.module else [])])
            for alias in node.names:
                full = f"{base}.{alias.name}" if base else alias.name
                found.append((base or full, {base, full} - {""}))
    return found


def allowed_for(module: str) -> set[str]:
    parts = module.split(".")
    prefixes = {".".join(parts[:n]) for n in range(1, len(parts) + 1)}
    return set().union(*(ALLOWED.get(prefix, set()) for prefix in prefixes))


def matches(name: str, entries: set[str]) -> bool:
    return any(name == entry or name.startswith(f"{entry}.") for entry in entries)


def forbidden_imports(source: str, module: str, is_package: bool = False) -> list[str]:
    """What ``source``, as ``module``, imports outside ``ALLOWED`` and the standard library."""
    allowed = allowed_for(module)
    return sorted(
        {
            name
            for name, alternatives in imports(source, module, is_package)
            if name.split(".")[0] not in sys.stdlib_module_names
            and not any(matches(alternative, allowed) for alternative in alternatives)
        }
    )


def sources() -> list[tuple[Path, str]]:
    return [
        (path, module_name(path))
        for package in PACKAGES
        for path in sorted((ROOT / package).rglob("*.py"))
    ]


@pytest.mark.parametrize(("path", "module"), sources(), ids=lambda value: str(value))
def test_module_imports_only_what_its_package_allows(path, module):
    bad = forbidden_imports(path.read_text(), module, path.name == "__init__.py")
    assert not bad, f"{path.relative_to(ROOT)} imports {bad}, outside ALLOWED[{module!r}...]"


def test_nothing_imports_the_composition_root():
    for path, module in sources():
        if module != COMPOSITION_ROOT:
            found = imports(path.read_text(), module, path.name == "__init__.py")
            assert not any(COMPOSITION_ROOT in names for _, names in found), path


@pytest.mark.parametrize(
    ("source", "module", "bad"),
    [
        ("import quart_schema", "services.jobs", ["quart_schema"]),  # not `quart`
        ("from quart_schema import validate", "worker.runner", ["quart_schema"]),
        ("from .. import web", "services.jobs", ["web"]),  # relative, resolved
        ("from ..web.app import create_app", "services.jobs", ["web.app"]),
        ("from .generate import run", "worker.runner", []),
        ("from . import runner", "worker", []),
        ("from web.app import create_app", COMPOSITION_ROOT, []),
        ("from web.app import create_app", "services.client", ["web.app"]),
        ("from web import stream", COMPOSITION_ROOT, ["web"]),
        ("from web import app", COMPOSITION_ROOT, []),
        ("import openai", "worker.runner", ["openai"]),
        ("import openai.types", "worker.backends.openai", []),
        ("import asyncio, json", "services.hub", []),
    ],
)
def test_import_rules_catch_what_they_should(source, module, bad):
    assert forbidden_imports(source, module, is_package="." not in module) == bad


# What a Redis key looks like here: a hash tag, the queue's tag, the default
# prefix, or a `}:<kind>` joint.
KEY_TEXT = re.compile(r":\{|\{queue\}|\btokencast:(?!\s)|\}:(job|log|text|viewers|events)\b")
KEY_SUFFIX = re.compile(r":(job|log|text|viewers|events|stream|waiting|leases|rate)\b")


def key_violations(source: str) -> list[str]:
    """Strings in ``source`` that build or spell a Redis key (docstrings aside):
    ``line: text`` for each."""
    tree = ast.parse(source)
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            if id(node) not in docstrings and KEY_TEXT.search(node.value):
                found.append(f"{node.lineno}: {node.value!r}")
        elif isinstance(node, ast.JoinedStr) and joins_a_key(node):
            found.append(f"{node.lineno}: {ast.unparse(node)}")
    return found


def joins_a_key(node: ast.JoinedStr) -> bool:
    """An f-string with ``{<a prefix>}:`` or ``{...}:<key kind>`` in it."""
    for value, after in zip(node.values, node.values[1:], strict=False):
        if not (isinstance(value, ast.FormattedValue) and isinstance(after, ast.Constant)):
            continue
        text = str(after.value)
        if text.startswith(":") and (
            "prefix" in ast.unparse(value.value).lower() or KEY_SUFFIX.match(text)
        ):
            return True
    return False


@pytest.mark.parametrize(("path", "module"), sources(), ids=lambda value: str(value))
def test_redis_keys_are_built_only_in_the_keys_module(path, module):
    if module == KEYS_MODULE:
        return
    bad = key_violations(path.read_text())
    assert not bad, f"{path.relative_to(ROOT)} builds Redis keys (use services/keys.py): {bad}"


@pytest.mark.parametrize(
    "source",
    [
        'key = f"{self.prefix}:{{{job_id}}}:job"',
        'key = f"{keys.prefix}:rate:{subject}"',
        'key = f"{settings.key_prefix}:anything"',
        'key = f"{base}:log"',
        'key = "tokencast:{queue}:stream"',
        'key = "tokencast:" + job_id',
        'key = prefix + ":{" + job_id + "}:log"',
        "LUA = \"local k = ARGV[1] .. ':{' .. ARGV[2] .. '}:text'\"",
    ],
)
def test_key_check_catches_a_key_built_elsewhere(source):
    assert key_violations(source), source


@pytest.mark.parametrize(
    "source",
    [
        'bind = f"{host}:{port}"',
        'print(f"tokencast: bad setting: {exc}")',
        'message = f"{name}={raw!r} must be 1 or 0"',
        'def f():\n    """Keys look like ``tokencast:{<job id>}:log``."""',
        "counts = {'a': 1}",
    ],
)
def test_key_check_leaves_other_strings_alone(source):
    assert key_violations(source) == []
