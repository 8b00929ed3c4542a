"""
The C{txmigrate} command, and the check that C{import migrate} finds this
distribution's package.

The distribution is called C{txmigrate} but its import package is
C{migrate}, a name other distributions install too (C{sqlalchemy-migrate}
and the database tool published as C{migrate}).  This module has the
distribution's own name, which nothing else takes, so it can say what went
wrong when another C{migrate} comes first on the path, instead of a
C{ModuleNotFoundError} about C{migrate._cli} or C{migrate.tap}.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from typing import Sequence

__all__ = ["foreignPackage", "main"]

#: the file that only this distribution's C{migrate} package has, and the
#: line in it that says so
_MARKER_FILE = "_version.py"
_MARKER_LINE = 'DISTRIBUTION = "txmigrate"'


def foreignPackage() -> str | None:
    """
    Say why C{import migrate} does not find this distribution's package,
    without importing it; L{None} when it does.
    """
    module = sys.modules.get("migrate")
    if module is not None:
        where = getattr(module, "__file__", None) or repr(module)
        directories = list(getattr(module, "__path__", []))
    else:
        try:
            spec = importlib.util.find_spec("migrate")
        except (ImportError, ValueError) as e:
            return "import migrate fails ({}); reinstall txmigrate".format(e)
        if spec is None:
            return "no package migrate is installed; reinstall txmigrate"
        where = spec.origin or "?"
        directories = list(spec.submodule_search_locations or [])
    for directory in directories:
        try:
            with open(os.path.join(directory, _MARKER_FILE)) as f:
                if _MARKER_LINE in f.read():
                    return None
        except OSError:
            continue
    return (
        "import migrate finds {}, which is not txmigrate's package: another "
        "distribution installs a package named migrate too (sqlalchemy-migrate "
        "or the database tool 'migrate').  Install txmigrate in a virtual "
        "environment without it, or uninstall the other one.".format(where)
    )


def main(argv: Sequence[str] | None = None) -> None:
    """
    The C{txmigrate} command: C{python -m migrate}'s control client, once
    C{import migrate} is known to find this distribution's package.
    """
    problem = foreignPackage()
    if problem is not None:
        sys.stderr.write("txmigrate: " + problem + "\n")
        raise SystemExit(2)
    from migrate._cli import main as cliMain

    cliMain(argv, program="txmigrate")


if __name__ == "__main__":
    main()
