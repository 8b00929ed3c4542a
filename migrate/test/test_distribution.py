"""
Tests for what the distribution (C{txmigrate}) installs besides the package:
the C{txmigrate} command and the plugin's check that C{import migrate}
finds this distribution's package, not another one of that name.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

from twisted.trial.unittest import SynchronousTestCase

import migrate
import txmigrate

#: the directories holding this C{migrate} package and C{txmigrate}
_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(migrate.__file__)))
_MODULE_ROOT = os.path.dirname(os.path.abspath(txmigrate.__file__))


class ForeignPackageTests(SynchronousTestCase):
    """
    Another distribution's C{migrate} found first is named, not a
    C{ModuleNotFoundError}.
    """

    def setUp(self) -> None:
        self.foreign = tempfile.mkdtemp(prefix="foreign-migrate-")
        self.addCleanup(_removeTree, self.foreign)
        os.mkdir(os.path.join(self.foreign, "migrate"))
        with open(os.path.join(self.foreign, "migrate", "__init__.py"), "w") as f:
            f.write('"""sqlalchemy-migrate, say."""\n')

    def runPython(self, *argv: str) -> subprocess.CompletedProcess[str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([self.foreign, _MODULE_ROOT, _PACKAGE_ROOT])
        env["PYTHONDONTWRITEBYTECODE"] = "1"
        return subprocess.run(
            [sys.executable, *argv],
            env=env,
            cwd=self.foreign,
            capture_output=True,
            text=True,
            timeout=60,
        )

    def test_ownPackage(self) -> None:
        """
        Where C{import migrate} finds this distribution's package, nothing
        is said.
        """
        self.assertIsNone(txmigrate.foreignPackage())

    def test_command(self) -> None:
        """
        The C{txmigrate} command names the package it found instead and
        exits with status 2.
        """
        done = self.runPython("-c", "import txmigrate; txmigrate.main(['status'])")
        self.assertEqual(done.returncode, 2, done.stderr)
        self.assertIn("import migrate finds " + self.foreign, done.stderr)
        self.assertIn("not txmigrate's package", done.stderr)

    def test_plugin(self) -> None:
        """
        C{twistd migrate-host} says so too, as a usage error, and does not
        start.
        """
        done = self.runPython(
            "-c",
            "import sys; from twisted.scripts.twistd import run; "
            "sys.argv[0] = 'twistd'; run()",
            "-n",
            "migrate-host",
        )
        # twistd exits with status 1 after a usage error (Twisted 24.7: 0).
        self.assertIn(done.returncode, (0, 1), done.stderr)
        self.assertIn("import migrate finds " + self.foreign, done.stdout)


def _removeTree(path: str) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)
