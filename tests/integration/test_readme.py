"""Every Python and JavaScript snippet of the README, run as it is written
against real ``tokencast serve`` and ``worker`` processes (its
``http://127.0.0.1:8000`` pointed at them): a snippet users copy must work."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from tests.support import ROOT, Cluster

README = (ROOT / "README.md").read_text()
CLIENTS = ROOT / "tests" / "clients" / "node"  # where the JavaScript packages are
NODE = shutil.which("node")


def snippets(markdown: str) -> list[tuple[str, str, str]]:
    """(the heading above it, its language, its code) for each Python or JS block."""
    found, heading, fence, lines = [], "", None, []
    for line in markdown.splitlines(keepends=True):
        if fence is None and line.startswith("#"):
            heading = line.lstrip("#").strip()
        elif fence is None and line.startswith("```"):
            fence, lines = line[3:].strip(), []
        elif fence is not None and line.startswith("```"):
            # The backend example is a module, not a client: its own test
            # checks it equals tests/plugins/example_backend.py.
            if fence in ("python", "js") and heading != "Writing a backend":
                found.append((heading, fence, "".join(lines)))
            fence = None
        elif fence is not None:
            lines.append(line)
    return found


SNIPPETS = snippets(README)

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def url(node: Cluster) -> str:
    return node.procs[0].url


def command(language: str, code: str, url: str) -> list[str] | None:
    """How to run a snippet; ``None`` for JavaScript without node or its packages."""
    code = code.replace("http://127.0.0.1:8000", url)
    if language == "python":
        return [sys.executable, "-c", code]
    if NODE is None or not (CLIENTS / "node_modules").is_dir():
        return None
    return [NODE, "--input-type=module", "--eval", code]


@pytest.fixture(scope="module")
def outcomes(url: str) -> dict[str, tuple[int, str, str] | None]:
    """Every snippet run at once (each waits on its demo job's pace): exit code, stdout, stderr."""
    running = {}
    for _heading, language, code in SNIPPETS:
        argv = command(language, code, url)
        running[code] = argv and subprocess.Popen(
            argv, cwd=CLIENTS, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
    outcomes: dict[str, tuple[int, str, str] | None] = {}
    for code, process in running.items():
        if process is None:
            outcomes[code] = None
            continue
        try:
            stdout, stderr = process.communicate(timeout=90)
        finally:
            process.kill()
        outcomes[code] = (process.returncode, stdout, stderr)
    return outcomes


def test_the_readme_has_its_client_snippets():
    headings = [heading for heading, _language, _code in SNIPPETS]
    assert headings.count("Python: the official SDK, chat") == 1
    assert {"LangChain", "The Vercel AI SDK", "The native stream: EventSource"} <= set(headings)
    assert len(SNIPPETS) == 7


@pytest.mark.parametrize(
    ("language", "code"),
    [pytest.param(language, code, id=heading) for heading, language, code in SNIPPETS],
)
def test_a_snippet_runs_and_prints_the_answer(outcomes, language, code):
    if (outcome := outcomes[code]) is None:
        pytest.skip("node or the Node clients are missing: npm ci --prefix tests/clients/node")
    returncode, stdout, stderr = outcome
    assert returncode == 0, stderr
    assert "You asked: " in stdout  # the demo model's answer opens with the question
