"""
Tests for L{migrate._host._pidfile}: the pidfile replaced atomically,
written ahead and named at the commit.
"""

from __future__ import annotations

import errno
import os
from typing import Any

from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase

from .._host import _pidfile
from .._host._pidfile import preparePidfile, writePidfile


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


class PreparedPidfileTests(SynchronousTestCase):
    """
    L{preparePidfile} writes the content ahead without a name;
    L{PreparedPidfile.install} names it, replacing the pidfile.
    """

    def setUp(self) -> None:
        self.directory = os.path.abspath(self.mktemp())
        os.mkdir(self.directory)
        self.path = os.path.join(self.directory, "twistd.pid")

    def read(self) -> bytes:
        with open(self.path, "rb") as f:
            return f.read()

    def test_namedOnlyWhenInstalled(self) -> None:
        """
        Prepared, the content is nowhere in the directory; installed, it
        replaces the old pidfile and leaves nothing else behind.
        """
        writePidfile(self.path, 41)
        prepared = preparePidfile(self.path, 42)
        self.assertEqual(os.listdir(self.directory), ["twistd.pid"])
        self.assertEqual(self.read(), b"41\n")
        prepared.install()
        self.assertEqual(self.read(), b"42\n")
        self.assertEqual(os.listdir(self.directory), ["twistd.pid"])

    def test_noFlushWhenInstalled(self) -> None:
        """
        The content is flushed to disk when prepared, not when installed.
        """
        flushed: list[int] = []
        realFsync = os.fsync

        def fsync(descriptor: int) -> None:
            flushed.append(descriptor)
            realFsync(descriptor)

        self.patch(_pidfile.os, "fsync", fsync)
        prepared = preparePidfile(self.path, 42)
        self.assertEqual(len(flushed), 1)
        prepared.install()
        self.assertEqual(len(flushed), 1)
        self.assertEqual(self.read(), b"42\n")

    def test_discard(self) -> None:
        """
        Discarded, the content written ahead leaves the pidfile as it was.
        """
        writePidfile(self.path, 41)
        before = os.listdir("/proc/self/fd")
        prepared = preparePidfile(self.path, 42)
        prepared.discard()
        prepared.discard()
        self.assertEqual(self.read(), b"41\n")
        self.assertEqual(os.listdir(self.directory), ["twistd.pid"])
        self.assertEqual(len(os.listdir("/proc/self/fd")), len(before))

    def test_leftOverTemporaryName(self) -> None:
        """
        A temporary name left by a process of the same ID that died does
        not stop the install.
        """
        temporary = os.path.join(
            self.directory, ".twistd.pid.{}.tmp".format(os.getpid())
        )
        with open(temporary, "wb") as f:
            f.write(b"junk")
        preparePidfile(self.path, 42).install()
        self.assertEqual(self.read(), b"42\n")
        self.assertEqual(os.listdir(self.directory), ["twistd.pid"])

    def test_withoutUnnamedFiles(self) -> None:
        """
        On a filesystem that cannot hold a file without a name, nothing is
        written ahead and the install writes the pidfile.
        """
        realOpen = os.open

        def refusing(path: str, flags: int, *args: Any) -> int:
            if flags & os.O_TMPFILE == os.O_TMPFILE:
                raise OSError(errno.EOPNOTSUPP, "not supported")
            return realOpen(path, flags, *args)

        self.patch(_pidfile.os, "open", refusing)
        prepared = preparePidfile(self.path, 42)
        self.assertFalse(os.path.exists(self.path))
        prepared.install()
        self.assertEqual(self.read(), b"42\n")

    def test_fullDisk(self) -> None:
        """
        A failure to write ahead other than a missing feature is raised,
        and leaves no descriptor open.
        """
        before = len(os.listdir("/proc/self/fd"))

        def full(descriptor: int, data: bytes) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

        self.patch(_pidfile.os, "write", full)
        self.assertRaises(OSError, preparePidfile, self.path, 42)
        self.assertEqual(len(os.listdir("/proc/self/fd")), before)
