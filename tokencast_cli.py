"""The ``tokencast`` command's entry point, which puts tokencast's own packages first.

tokencast installs the top-level packages ``services``, ``web`` and
``worker``. A directory on ``PYTHONPATH`` (or the current one, under
``python -m``) holding a package of one of those names, a project's own
``services`` say, comes before site-packages on ``sys.path`` and would hide
tokencast's: the command would not start, or would mix the two. So this
module, whose name is its own, imports tokencast's packages from where they
were installed, beside it, before anything else can, then runs
``services.cli``. A backend whose project has such a package still cannot
import it in a worker (README, "Writing a backend"): one process holds one
module of a name.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

OWN_PACKAGES = ("services", "web", "worker")


def import_own_packages() -> None:
    """Bind ``services``, ``web`` and ``worker`` to the packages beside this file."""
    here = Path(__file__).resolve().parent
    for name in OWN_PACKAGES:
        if name in sys.modules:
            continue
        package = here / name
        spec = importlib.util.spec_from_file_location(
            name, package / "__init__.py", submodule_search_locations=[str(package)]
        )
        if spec is None or spec.loader is None:
            raise ImportError(f"tokencast's package {name!r} is missing from {here}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)


def main() -> int:
    import_own_packages()
    from services.cli import main as run

    return run()


if __name__ == "__main__":
    sys.exit(main())
