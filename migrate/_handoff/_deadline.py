"""
Waiting with a deadline for the first of several outcomes.
"""

from __future__ import annotations

from typing import Any, Sequence

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

__all__ = ["DeadlinePassed", "firstOf"]


class DeadlinePassed(Exception):
    """
    Nothing happened in time; the message says what was awaited.
    """


def firstOf(
    contenders: Sequence[Deferred[Any]],
    clock: IReactorTime,
    timeout: float,
    timeoutReason: str,
) -> Deferred[Any]:
    """
    Fire with the first result or failure among C{contenders}, or fail with
    L{DeadlinePassed} after C{timeout} seconds; cancel the others.

    Unlike L{twisted.internet.defer.race}, a failure wins as soon as it
    arrives: here a successor that dies must end the wait at once.

    @param contenders: the outcomes awaited.
    @param clock: the clock for the deadline.
    @param timeout: seconds to wait.
    @param timeoutReason: the message of L{DeadlinePassed}.
    """
    outcome: Deferred[Any] = Deferred(lambda _: cancelAll())
    decided = False

    def cancelAll() -> None:
        for each in contenders:
            if not each.called:
                each.cancel()
        if timer.active():
            timer.cancel()

    def decide(result: Any) -> None:
        nonlocal decided
        if decided:
            return None
        decided = True
        cancelAll()
        if isinstance(result, Failure):
            outcome.errback(result)
        else:
            outcome.callback(result)
        return None

    def expire() -> None:
        decide(Failure(DeadlinePassed(timeoutReason)))

    timer = clock.callLater(timeout, expire)
    for each in contenders:
        each.addBoth(decide)
    return outcome
