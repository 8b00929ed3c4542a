"""
Tests for L{migrate._host._spawning}.
"""

from __future__ import annotations

import os

from twisted.internet import process
from twisted.trial.unittest import SynchronousTestCase

from .._host._spawning import prepareSpawning


class _CountingDetector(process._FDDetector):
    """
    Twisted's detector, counting the listings it makes.
    """

    listings = 0

    def listdir(self, path: str) -> list[str]:  # type: ignore[override]
        self.listings += 1
        return os.listdir(path)


class PrepareSpawningTests(SynchronousTestCase):
    """
    L{prepareSpawning} makes Twisted's choice of how to list the open
    descriptors before the first child process is started.
    """

    def test_decidesOnce(self) -> None:
        """
        The first call decides (listing the descriptors more than once);
        from then on a listing lists once, and another call does nothing.
        """
        detector = _CountingDetector()
        self.assertTrue(prepareSpawning(detector))
        self.assertGreater(detector.listings, 1)
        detector.listings = 0
        self.assertFalse(prepareSpawning(detector))
        self.assertEqual(detector.listings, 0)
        detector._listOpenFDs()
        self.assertEqual(detector.listings, 1)

    def test_failureLogged(self) -> None:
        """
        A detector that fails is logged, and the host starts all the same.
        """

        class Broken:
            def _listOpenFDs(self) -> None:
                raise OSError("no /proc")

        self.assertFalse(prepareSpawning(Broken()))
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
