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
    what the migration made, not the whole heap (L{heapFrozenUntil});
  - in the steps where every client waits (the freeze, the pause, the
    restore), the collector does not run at all (L{collectionsPaused}).
"""

from __future__ import annotations

import gc
from contextlib import contextmanager
from typing import Any, Iterator

from twisted.internet.defer import Deferred

__all__ = ["collectionsPaused", "heapFrozenUntil"]


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
    if gc.get_freeze_count():
        return done
    gc.freeze()

    def unfreeze(result: Any) -> Any:
        gc.unfreeze()
        return result

    return done.addBoth(unfreeze)
