"""
Tests for L{migrate._host._pidfile}.
"""

import os

from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase

from .._host._pidfile import writePidfile


class WritePidfileTests(SynchronousTestCase):
    """
    L{writePidfile} replaces a pidfile atomically.
    """

    def test_replaces(self) -> None:
        """
        The file names the new pid, and no temporary file is left.
        """
        directory = FilePath(self.mktemp())
        directory.makedirs()
        path = directory.child("twistd.pid")
        path.setContent(b"1\n")
        writePidfile(path.path, 4242)
        self.assertEqual(path.getContent(), b"4242\n")
        self.assertEqual(os.listdir(directory.path), ["twistd.pid"])

    def test_creates(self) -> None:
        """
        A missing pidfile is created.
        """
        directory = FilePath(self.mktemp())
        directory.makedirs()
        writePidfile(directory.child("x.pid").path, 7)
        self.assertEqual(directory.child("x.pid").getContent(), b"7\n")
