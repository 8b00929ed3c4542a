# -*- test-case-name: migrate.test.test_spawning -*-
"""
Making the host's first child process cheap to start.

Twisted's C{spawnProcess} closes, in the child, every descriptor the
parent has open, so it lists them (C{/proc/PID/fd}) each time it starts a
process, in the reactor's thread.  On its first call in a process it also
decides I{how} to list them, by listing them three times
(C{twisted.internet.process._FDDetector}).  A host's first child is often
the trial of a reload or a re-exec, started while ten thousand
connections are open: the decision alone then kept every client waiting
about 70 to 130 ms (a listing costs 4 to 13 microseconds per descriptor
on a loaded two-CPU machine).  L{prepareSpawning} makes the decision as
the host starts, while few descriptors are open; later calls list them
once, as they always did.

This module is the one place that reaches into Twisted's private
C{twisted.internet.process.detector} and its C{_listOpenFDs}.
"""

from __future__ import annotations

from typing import Any

from twisted.logger import Logger

__all__ = ["prepareSpawning"]

_log = Logger()


def prepareSpawning(detector: Any = None) -> bool:
    """
    Have Twisted decide now how it lists a process's open descriptors, if
    it has not yet.

    @param detector: Twisted's detector; L{None} for the process's own.

    @return: whether the decision was made now.
    """
    try:
        if detector is None:
            from twisted.internet import process

            detector = process.detector
        if "_listOpenFDs" in vars(detector):
            return False
        detector._listOpenFDs()
    except Exception:
        # Not worth a failed start: the first child then pays for it.
        _log.failure("Could not prepare the listing of open descriptors")
        return False
    return True
