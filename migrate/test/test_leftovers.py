"""
Tests for L{migrate._leftovers}: where a graph of objects still refers to
one object, and which of an object's attributes changed.
"""

from __future__ import annotations

import functools
from collections import Counter, deque
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from migrate._leftovers import Snapshot, referencesTo


class Thing:
    """
    An object with attributes.
    """

    def __init__(self, **attributes: Any) -> None:
        vars(self).update(attributes)

    def method(self) -> None:
        pass


class Slotted:
    """
    An object with slots.
    """

    __slots__ = ("held", "empty")

    def __init__(self, held: object) -> None:
        self.held = held


class ReferencesToTests(SynchronousTestCase):
    """
    Tests for L{referencesTo}.
    """

    def setUp(self) -> None:
        self.target = Thing()

    def test_nowhere(self) -> None:
        """
        A graph without the object: no place.
        """
        root = Thing(rooms={"a": {Thing()}}, count=3, name="x")
        self.assertEqual(referencesTo(self.target, root, "factory"), [])

    def test_containers(self) -> None:
        """
        Each container names the place as Python would write it: a dict's
        value by its key, a key as a key, a sequence's item by its index,
        a set's member by the set.
        """
        target = self.target
        root = Thing(
            rooms={"games": {target}},
            byUser={target: 1},
            queue=deque([0, target]),
            pairs=[("x", target)],
            frozen=frozenset([target]),
        )
        self.assertEqual(
            sorted(referencesTo(target, root, "factory")),
            sorted(
                [
                    "factory.rooms['games']",
                    "factory.byUser (a key)",
                    "factory.queue[1]",
                    "factory.pairs[0][1]",
                    "factory.frozen",
                ]
            ),
        )

    def test_objects(self) -> None:
        """
        Objects' attributes are followed, slots included; bound methods by
        their object and C{functools.partial} by its function and
        arguments.
        """
        target = self.target
        root = Thing(
            room=Thing(owner=Slotted(target)),
            callback=target.method,
            later=functools.partial(print, target, end=target),
            slotted=Slotted(None),
        )
        self.assertEqual(
            sorted(referencesTo(target, root, "f")),
            sorted(
                [
                    "f.room.owner.held",
                    "f.callback.__self__",
                    "f.later.args[0]",
                    "f.later.keywords['end']",
                ]
            ),
        )

    def test_cyclesAndSkip(self) -> None:
        """
        A cycle is walked once; C{skip} is not looked into, nor are
        classes and modules.
        """
        target = self.target
        root: Any = Thing()
        root.self = root
        root.clock = Thing(calls=[target])
        root.kind = Thing
        Thing.shared = target  # type: ignore[attr-defined]
        self.addCleanup(delattr, Thing, "shared")
        self.assertEqual(referencesTo(target, root, "f"), ["f.clock.calls[0]"])
        self.assertEqual(referencesTo(target, root, "f", skip=(root.clock,)), [])
        self.assertEqual(referencesTo(target, target, "f"), ["f"])


class SnapshotTests(SynchronousTestCase):
    """
    Tests for L{Snapshot}.
    """

    def test_unchanged(self) -> None:
        """
        An object whose attributes are as they were: nothing changed, even
        when its containers were changed and changed back.
        """
        member = Thing()
        value: Any = Thing(rooms={"games": {member}}, counts=Counter(a=1), n=1)
        snapshot = Snapshot.of(value)
        value.rooms["games"].remove(member)
        del value.rooms["games"]
        value.rooms["games"] = {member}
        self.assertEqual(snapshot.changed(value), [])

    def test_changed(self) -> None:
        """
        Attributes added, removed, replaced, or whose nested containers
        changed, are named, sorted.
        """
        value: Any = Thing(
            rooms={"games": {Thing()}},
            counts=Counter(a=1),
            history=[[1]],
            gone=1,
            same=(1, 2),
        )
        snapshot = Snapshot.of(value)
        value.rooms["games"].add(Thing())
        value.counts["a"] += 1
        value.history[0].append(2)
        del value.gone
        value.added = 1
        self.assertEqual(
            snapshot.changed(value), ["added", "counts", "gone", "history", "rooms"]
        )

    def test_otherObject(self) -> None:
        """
        An attribute holding another object changed; the same object
        changed inside is not seen (only containers are copied).
        """
        inner: Any = Thing(n=1)
        value: Any = Thing(inner=inner, other=Thing())
        snapshot = Snapshot.of(value)
        inner.n = 2
        value.other = Thing()
        self.assertEqual(snapshot.changed(value), ["other"])

    def test_cycle(self) -> None:
        """
        A container that holds itself is copied once.
        """
        loop: list[Any] = []
        loop.append(loop)
        value: Any = Thing(loop=loop)
        snapshot = Snapshot.of(value)
        self.assertEqual(snapshot.changed(value), [])
        loop.append(1)
        self.assertEqual(snapshot.changed(value), ["loop"])
