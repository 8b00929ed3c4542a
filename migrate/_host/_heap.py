"""
Keeping Python's cyclic garbage collector out of the clients' way while a
migration runs.

A full collection walks every object of the process: with thousands of
connections, each holding protocol, transport and application objects,
that is 80 to 250 ms on a two-core machine, a stall for every client of the
process.  A migration makes many objects at once (copies of states,
manifests, new protocols), which is what triggers full collections.  So:

  - while a migration runs, the objects that existed when it started are
    frozen out of collections (C{gc.freeze}): a collection then walks only
    what the migration made, not the whole heap (L{heapFrozenDuring},
    frozen before the migration's first step; L{heapFrozenUntil});
  - a migration that makes many objects over many steps freezes them
    too as it goes (L{freezeNewObjects});
  - in the steps where every client waits (the freeze, the pause, the
    restore), the collector does not run at all (L{collectionsPaused});
  - a process that only hands its connections over and exits (re-exec's
    caretaker) leaves everything it holds out of collections until then
    (L{freezeUntilExit}).
"""

from __future__ import annotations

import gc
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from twisted.internet.defer import Deferred, maybeDeferred

__all__ = [
    "collectionsPaused",
    "freezeNewObjects",
    "freezeUntilExit",
    "heapFrozenDuring",
    "heapFrozenUntil",
]

#: what the latest L{heapFrozenUntil} froze the heap for, until it ends;
#: L{None} if it did not freeze it (it was frozen already) or it ended
_holder: object | None = None


@contextmanager
def collectionsPaused() -> Iterator[None]:
    """
    No garbage collection inside: for a step where every client waits and
    thousands of objects are made or looked at.  The collector runs again
    as it was afterwards, even if the step raises.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def heapFrozenUntil(done: Deferred[Any]) -> Deferred[Any]:
    """
    Leave the objects that exist now out of every collection until C{done}
    fires (C{gc.freeze}, then C{gc.unfreeze}); its result passes through.

    An application that freezes the heap itself (C{gc.get_freeze_count()}
    is not 0, as in a pre-forking server) is left alone: unfreezing would
    undo its own freeze.

    @return: C{done}.
    """
    unfreeze = _freezeHeld()
    return done if unfreeze is None else done.addBoth(unfreeze)


def heapFrozenDuring(
    start: Callable[..., Any], *args: Any, **kwargs: Any
) -> Deferred[Any]:
    """
    Freeze the heap as L{heapFrozenUntil} does, I{then} start a migration
    (C{start(*args, **kwargs)}), and hold it frozen until the migration
    ends.

    A migration's first steps run at once, inside the call: the objects
    they make would otherwise trigger a full collection over a heap that
    is not frozen yet (a module reload's first pre-copy slice took 42 ms
    instead of 4 at 10,000 connections, the host having just opened 9,000
    of them).

    @return: a L{Deferred} firing with what C{start} returned or raised.
    """
    unfreeze = _freezeHeld()
    done = maybeDeferred(start, *args, **kwargs)
    return done if unfreeze is None else done.addBoth(unfreeze)


def _freezeHeld() -> Callable[[Any], Any] | None:
    """
    Freeze the heap for a migration, unless the application froze it.

    @return: what unfreezes it once the migration ends (its result passes
        through), or L{None} if it was left alone.
    """
    global _holder
    if gc.get_freeze_count():
        _holder = None
        return None
    gc.freeze()
    holder = _holder = object()

    def unfreeze(result: Any) -> Any:
        global _holder
        if _holder is holder:
            _holder = None
        gc.unfreeze()
        return result

    return unfreeze


def freezeNewObjects() -> bool:
    """
    While L{heapFrozenUntil} holds the heap frozen, leave out of
    collections what was made since too: for a migration that makes many
    objects step by step (a pre-copy), so that a full collection in one
    step walks only what was made since the previous one, not everything
    the migration made so far (tens of milliseconds with thousands of
    connections).  They are collected as usual once the heap is unfrozen.
    Nothing happens otherwise (the heap is not frozen, or the application,
    or a migration that has not ended, froze it).

    @return: whether it froze them.
    """
    # Not gc.get_freeze_count(): it counts the frozen objects one by one
    # (10 to 30 ms with thousands of connections).
    if _holder is None:
        return False
    gc.freeze()
    return True


def freezeUntilExit() -> None:
    """
    Leave every object that exists now out of collections for good: for a
    process that exits soon after, whatever happens (re-exec's caretaker,
    once the new image asked for its connections), so that a full
    collection in its last steps walks only what it made since, not every
    connection's objects.  The objects made afterwards are collected as
    usual; the frozen ones are freed (by reference counting, or with the
    process) as they would be otherwise, only their cycles wait for the
    exit.
    """
    gc.freeze()
