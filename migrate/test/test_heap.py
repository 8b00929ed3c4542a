"""
Tests for L{migrate._host._heap}: the collector kept out of the clients'
way while a migration runs.
"""

from __future__ import annotations

import gc

from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase

from .._host._heap import (
    collectionsPaused,
    freezeNewObjects,
    freezeUntilExit,
    heapFrozenDuring,
    heapFrozenUntil,
)


class CollectionsPausedTests(SynchronousTestCase):
    """
    L{collectionsPaused} turns the collector off for a step.
    """

    def test_pausedThenBack(self) -> None:
        """
        The collector is off inside and back as it was after, even when the
        step raises; left off if it was off.
        """
        self.assertTrue(gc.isenabled())
        with self.assertRaises(ZeroDivisionError):
            with collectionsPaused():
                self.assertFalse(gc.isenabled())
                1 / 0
        self.assertTrue(gc.isenabled())
        gc.disable()
        self.addCleanup(gc.enable)
        with collectionsPaused():
            pass
        self.assertFalse(gc.isenabled())


class HeapFrozenUntilTests(SynchronousTestCase):
    """
    L{heapFrozenUntil} leaves the objects of the moment out of collections
    until a migration ends.
    """

    def setUp(self) -> None:
        self.addCleanup(gc.unfreeze)
        gc.unfreeze()

    def test_frozenUntilDone(self) -> None:
        """
        The objects that exist are frozen out of collections until the
        L{Deferred} fires, whose result passes through, failure included.
        """
        for outcome in ("report", ValueError("rolled back")):
            done: Deferred[object] = Deferred()
            result = heapFrozenUntil(done)
            self.assertIs(result, done)
            self.assertGreater(gc.get_freeze_count(), 0)
            if isinstance(outcome, Exception):
                done.errback(outcome)
                self.failureResultOf(result, ValueError)
            else:
                done.callback(outcome)
                self.assertEqual(self.successResultOf(result), "report")
            self.assertEqual(gc.get_freeze_count(), 0)

    def test_applicationFroze(self) -> None:
        """
        A heap the application froze itself stays frozen: it is left alone.
        """
        gc.freeze()
        frozen = gc.get_freeze_count()
        done: Deferred[object] = Deferred()
        heapFrozenUntil(done)
        done.callback(None)
        self.assertEqual(gc.get_freeze_count(), frozen)


class HeapFrozenDuringTests(SynchronousTestCase):
    """
    L{heapFrozenDuring} freezes the heap before it starts the migration,
    and until the migration ends.
    """

    def setUp(self) -> None:
        self.addCleanup(gc.unfreeze)
        gc.unfreeze()

    def test_frozenBeforeTheFirstStep(self) -> None:
        """
        The heap is frozen when the migration's first step runs (what it
        makes is then frozen by L{freezeNewObjects}); it is unfrozen when
        the migration ends, and its result passes through.
        """
        seen: list[tuple[int, bool]] = []
        done: Deferred[object] = Deferred()

        def start(first: str, *, second: str) -> Deferred[object]:
            self.assertEqual((first, second), ("a", "b"))
            seen.append((gc.get_freeze_count(), freezeNewObjects()))
            return done

        result = heapFrozenDuring(start, "a", second="b")
        [(frozen, frozeNew)] = seen
        self.assertGreater(frozen, 0)
        self.assertTrue(frozeNew)
        done.callback("report")
        self.assertEqual(self.successResultOf(result), "report")
        self.assertEqual(gc.get_freeze_count(), 0)

    def test_firstStepRaises(self) -> None:
        """
        A migration whose first step raises fails, and the heap is
        unfrozen.
        """

        def start() -> None:
            raise ValueError("refused")

        self.failureResultOf(heapFrozenDuring(start), ValueError)
        self.assertEqual(gc.get_freeze_count(), 0)
        self.assertFalse(freezeNewObjects())

    def test_applicationFroze(self) -> None:
        """
        A heap the application froze itself stays frozen.
        """
        gc.freeze()
        frozen = gc.get_freeze_count()
        heapFrozenDuring(lambda: None)
        self.assertEqual(gc.get_freeze_count(), frozen)


class FreezeNewObjectsTests(SynchronousTestCase):
    """
    L{freezeNewObjects} freezes what a migration made since, while
    L{heapFrozenUntil} holds the heap frozen, and only then.
    """

    def setUp(self) -> None:
        self.addCleanup(gc.unfreeze)
        gc.unfreeze()

    def test_whileHeld(self) -> None:
        """
        While the heap is held frozen, objects made since are frozen too;
        all of them are unfrozen when the migration ends.
        """
        done: Deferred[object] = Deferred()
        heapFrozenUntil(done)
        frozen = gc.get_freeze_count()
        made = [[n] for n in range(100)]
        self.assertTrue(freezeNewObjects())
        self.assertGreaterEqual(gc.get_freeze_count(), frozen + len(made))
        done.callback(None)
        self.assertEqual(gc.get_freeze_count(), 0)
        self.assertFalse(freezeNewObjects())
        self.assertEqual(gc.get_freeze_count(), 0)

    def test_notHeld(self) -> None:
        """
        Outside a migration, or where the application froze the heap
        itself (which L{heapFrozenUntil} leaves alone), nothing is frozen.
        """
        self.assertFalse(freezeNewObjects())
        self.assertEqual(gc.get_freeze_count(), 0)
        gc.freeze()
        frozen = gc.get_freeze_count()
        done: Deferred[object] = Deferred()
        heapFrozenUntil(done)
        made = [[n] for n in range(100)]
        self.assertFalse(freezeNewObjects())
        self.assertEqual(gc.get_freeze_count(), frozen)
        done.callback(made)


class FreezeUntilExitTests(SynchronousTestCase):
    """
    L{freezeUntilExit} leaves what exists out of collections, for a process
    about to exit.
    """

    def setUp(self) -> None:
        self.addCleanup(gc.unfreeze)
        gc.unfreeze()

    def test_frozen(self) -> None:
        """
        What exists is frozen, whether a migration holds the heap or not;
        what is made afterwards is not.
        """
        made = [[n] for n in range(100)]
        freezeUntilExit()
        frozen = gc.get_freeze_count()
        self.assertGreaterEqual(frozen, len(made))
        later = [[n] for n in range(100)]
        self.assertTrue(gc.is_tracked(later[0]))
        self.assertEqual(gc.get_freeze_count(), frozen)
