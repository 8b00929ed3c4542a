"""
Tests for L{migrate._handoff._deadline}.
"""

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from .._handoff._deadline import DeadlinePassed, firstOf


class FirstOfTests(SynchronousTestCase):
    """
    L{firstOf} decides on the first outcome, success or failure.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.cancelled: list[str] = []
        self.a: Deferred[object] = Deferred(lambda d: self.cancelled.append("a"))
        self.b: Deferred[object] = Deferred(lambda d: self.cancelled.append("b"))
        self.result = firstOf([self.a, self.b], self.clock, 5, "nothing happened")

    def test_firstSuccessWins(self) -> None:
        """
        The first result is the outcome; the others are cancelled.
        """
        self.a.callback("a")
        self.assertEqual(self.successResultOf(self.result), "a")
        self.assertEqual(self.cancelled, ["b"])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_firstFailureWins(self) -> None:
        """
        A failure decides at once, unlike L{twisted.internet.defer.race}.
        """
        self.b.errback(ValueError("successor died"))
        failure = self.failureResultOf(self.result, ValueError)
        self.assertEqual(str(failure.value), "successor died")
        self.assertEqual(self.cancelled, ["a"])

    def test_deadline(self) -> None:
        """
        Nothing in time fails with L{DeadlinePassed} and the reason.
        """
        self.clock.advance(4.9)
        self.assertNoResult(self.result)
        self.clock.advance(0.1)
        failure = self.failureResultOf(self.result, DeadlinePassed)
        self.assertEqual(str(failure.value), "nothing happened")
        self.assertEqual(self.cancelled, ["a", "b"])

    def test_lateResultsIgnored(self) -> None:
        """
        Outcomes after the decision change nothing.
        """
        self.a.callback(1)
        self.clock.advance(10)
        self.assertEqual(self.successResultOf(self.result), 1)

    def test_cancel(self) -> None:
        """
        Cancelling the outcome cancels every contender and the timer.
        """
        self.result.cancel()
        self.failureResultOf(self.result, CancelledError)
        self.assertEqual(self.cancelled, ["a", "b"])
        self.assertEqual(self.clock.getDelayedCalls(), [])
