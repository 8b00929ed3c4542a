# -*- test-case-name: migrate.test.test_testing -*-
"""
What an object left behind in the objects around it: for
L{migrate.testing.abandonedRestore}, which checks that a protocol object a
module reload abandons (C{abandonMigrationState}) undid what its restore
registered.

Two views, because neither sees everything: L{referencesTo} finds where a
graph of objects (a factory, its containers, the objects they hold) still
refers to one object, and names each place as Python would write it
(C{factory.rooms['games']}); L{Snapshot} copies the containers in an
object's attributes so that a later comparison sees a change that holds no
reference (a count, a name in a set).
"""

from __future__ import annotations

import functools
import types
from collections import deque
from typing import Any, Iterator

from attrs import frozen

__all__ = ["Snapshot", "referencesTo"]

#: how many objects L{referencesTo} looks into at most
MAX_VISITS = 100_000

#: how deep L{Snapshot} copies nested containers
MAX_DEPTH = 8

_ATOMS = (str, bytes, bytearray, int, float, complex, bool, type(None))
_OPAQUE = (
    type,
    types.ModuleType,
    types.FunctionType,
    types.BuiltinFunctionType,
    types.CodeType,
)


def _children(value: Any, path: str) -> Iterator[tuple[Any, str]]:
    """
    The objects C{value} refers to, each with its place written from
    C{path}.
    """
    if isinstance(value, dict):
        for key, item in list(value.items()):
            yield key, "{} (a key)".format(path)
            yield item, "{}[{!r}]".format(path, key)
        return
    if isinstance(value, (list, tuple, deque)):
        for index, item in enumerate(list(value)):
            yield item, "{}[{}]".format(path, index)
        return
    if isinstance(value, (set, frozenset)):
        for item in list(value):
            yield item, path
        return
    if isinstance(value, types.MethodType):
        yield value.__self__, "{}.__self__".format(path)
        return
    if isinstance(value, functools.partial):
        yield value.func, "{}.func".format(path)
        for index, item in enumerate(value.args):
            yield item, "{}.args[{}]".format(path, index)
        for key, item in value.keywords.items():
            yield item, "{}.keywords[{!r}]".format(path, key)
        return
    try:
        attributes = vars(value)
    except TypeError:
        attributes = {}
    for name, item in list(attributes.items()):
        yield item, "{}.{}".format(path, name)
    for cls in type(value).__mro__:
        for name in getattr(cls, "__slots__", ()):
            if name in ("__dict__", "__weakref__"):
                continue
            try:
                item = getattr(value, name)
            except AttributeError:
                continue
            yield item, "{}.{}".format(path, name)


def referencesTo(
    target: object, root: object, rootName: str, *, skip: tuple[object, ...] = ()
) -> list[str]:
    """
    Where the objects reachable from C{root} refer to C{target}.

    The walk goes breadth first through containers (C{dict} keys and
    values, C{list}, C{tuple}, C{deque}, C{set}, C{frozenset}), objects'
    attributes (C{__dict__} and C{__slots__}), bound methods' C{__self__}
    and C{functools.partial}'s function and arguments; not into classes,
    modules or functions, nor into C{target} itself or C{skip}.  It stops
    after L{MAX_VISITS} objects.

    @param target: the object looked for (compared with C{is}).
    @param root: where the walk starts.
    @param rootName: how the places found start (C{"factory"}).
    @param skip: objects not to look into (a clock whose delayed calls
        are checked on their own).

    @return: each place that refers to C{target}, as Python would write
        it (C{factory.rooms['games']} for a member of that set), shortest
        first.
    """
    if root is target:
        return [rootName]
    seen = {id(target), id(root)}
    seen.update(id(each) for each in skip)
    queue: deque[tuple[Any, str]] = deque([(root, rootName)])
    found: list[str] = []
    visits = 0
    while queue and visits < MAX_VISITS:
        value, path = queue.popleft()
        visits += 1
        for child, place in _children(value, path):
            if child is target:
                if place not in found:
                    found.append(place)
                continue
            if isinstance(child, _ATOMS) or isinstance(child, _OPAQUE):
                continue
            if id(child) in seen:
                continue
            seen.add(id(child))
            queue.append((child, place))
    return found


def _copy(value: Any, depth: int, active: set[int]) -> Any:
    """
    Copy the containers of C{value}, the objects they hold kept as they
    are, so that C{==} tells whether a container changed since.
    """
    if depth >= MAX_DEPTH or id(value) in active:
        return value
    kind = type(value)
    if not isinstance(value, (dict, list, tuple, deque, set, frozenset)):
        return value
    active.add(id(value))
    try:
        if isinstance(value, dict):
            return (
                kind,
                {key: _copy(item, depth + 1, active) for key, item in value.items()},
            )
        if isinstance(value, (set, frozenset)):
            return (kind, frozenset(_copy(item, depth + 1, active) for item in value))
        return (kind, tuple(_copy(item, depth + 1, active) for item in value))
    finally:
        active.discard(id(value))


def _same(before: Any, after: Any) -> bool:
    try:
        return bool(before == after)
    except Exception:
        return before is after


@frozen
class Snapshot:
    """
    An object's attributes as they were: each value's containers copied
    (to L{MAX_DEPTH}), the objects in them kept by reference.

    @ivar values: the copies, by attribute name.
    """

    values: dict[str, Any]

    @classmethod
    def of(cls, value: object) -> Snapshot:
        """
        @param value: an object with attributes (a factory).

        @return: its attributes as they are now.
        """
        try:
            attributes = dict(vars(value))
        except TypeError:
            attributes = {}
        return cls({name: _copy(item, 0, set()) for name, item in attributes.items()})

    def changed(self, value: object) -> list[str]:
        """
        @param value: the object this snapshot was taken of.

        @return: the names of the attributes that were added, removed or
            changed since (a container with other contents; another
            object), sorted.
        """
        now = Snapshot.of(value).values
        names = set(self.values) | set(now)
        return sorted(
            name
            for name in names
            if name not in self.values
            or name not in now
            or not _same(self.values[name], now[name])
        )
