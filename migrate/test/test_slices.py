"""
Tests for L{migrate._handoff._slices}.
"""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from .._handoff._slices import timedChunks


class TimedChunksTests(SynchronousTestCase):
    """
    L{timedChunks} bounds a step by count and by time.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.items = list(range(25))

    def test_byCount(self) -> None:
        """
        With time to spare, a step takes C{limit} items, in chunks, and
        stops at the end of the items.
        """
        chunks = list(timedChunks(self.items, 0, 12, self.clock, chunk=5))
        self.assertEqual(chunks, [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [10, 11]])
        chunks = list(timedChunks(self.items, 20, 12, self.clock, chunk=5))
        self.assertEqual(chunks, [[20, 21, 22, 23, 24]])
        self.assertEqual(list(timedChunks(self.items, 25, 12, self.clock)), [])

    def test_byTime(self) -> None:
        """
        Once the step has run its time, no further chunk comes; the first
        always does.
        """
        taken = []
        for piece in timedChunks(self.items, 0, 25, self.clock, 0.004, chunk=5):
            taken.append(piece)
            self.clock.advance(0.003)
        self.assertEqual(taken, [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]])
        slow = []
        for piece in timedChunks(self.items, 10, 25, self.clock, 0.004, chunk=5):
            slow.append(piece)
            self.clock.advance(1)
        self.assertEqual(slow, [[10, 11, 12, 13, 14]])
