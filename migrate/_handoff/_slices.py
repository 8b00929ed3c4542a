# -*- test-case-name: migrate.test.test_slices -*-
"""
Work done while the old code still serves (copying connections ahead of a
freeze), cut into steps that a count and a time both bound.

Between two steps the reactor polls, so a client's request waits for one
step at most.  A count alone does not bound a step: a hundred connections
with large states, or on a machine whose other work takes the processor,
take many times what they take idle.  So a step also ends once it has run
a few milliseconds, after a small chunk at least, so that it always makes
progress.
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence, TypeVar

__all__ = ["STEP_SECONDS", "CHUNK", "timedChunks"]

T = TypeVar("T")

STEP_SECONDS = 0.004
"""
The longest a step of capability transfer's pre-copy or re-copy runs, in
seconds, before the reactor polls again (as re-exec's and module
reload's pre-copy slices, which take their own budget, one connection a
chunk: L{PRECOPY_SLICE_SECONDS
<migrate.strategies._reexec._outgoing.PRECOPY_SLICE_SECONDS>}).
"""

CHUNK = 10
"""
How many items a step takes between two looks at the clock: a few
hundred microseconds of copying, idle.
"""


def timedChunks(
    items: Sequence[T],
    start: int,
    limit: int,
    clock: Any,
    seconds: float = STEP_SECONDS,
    chunk: int = CHUNK,
) -> Iterator[Sequence[T]]:
    """
    The chunks of one step: consecutive slices of C{items} from C{start},
    C{chunk} items each, up to C{limit} items in all, and none more once
    C{seconds} of C{clock}'s time have passed since the step began (the
    first chunk always comes).

    @param clock: what tells the time (the reactor: C{seconds()}).

    @return: an iterator of the chunks; the caller adds up their lengths
        to know where the next step starts.
    """
    deadline = clock.seconds() + seconds
    end = min(start + limit, len(items))
    while start < end:
        piece = items[start : min(start + chunk, end)]
        start += len(piece)
        yield piece
        if clock.seconds() >= deadline:
            return
