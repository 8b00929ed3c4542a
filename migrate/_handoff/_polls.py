"""
Letting the reactor poll before a step that stops it: requests that
arrived while the reactor was busy are read and their answers written
first, instead of waiting, queued, through the whole stop.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import deferLater

__all__ = ["afterPolls"]


@inlineCallbacks
def afterPolls(reactor: Any, polls: int) -> Any:
    """
    Wait until the reactor has polled for input and output C{polls} times.

    A call made with C{callLater(0)} may run before the next poll: from a
    process or I/O event, the reactor runs its due calls first.  Each call
    made from the previous one runs only after the poll in between.

    @return: a L{Deferred} firing with L{None}, from a timed call (outside
        any protocol's C{dataReceived}).
    """
    for _ in range(polls + 1):
        yield deferLater(reactor, 0, lambda: None)
