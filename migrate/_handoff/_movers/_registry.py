# -*- test-case-name: migrate.test.test_movers -*-
"""
The mover registry: how migrate knows to move a protocol the application
did not write.

An application opts its own protocols in by providing L{IMigratable}.
Protocols that come from Twisted itself (the HTTP/1.1 channel of
C{twisted.web}, and through it C{twisted.web.websocket}) cannot: for them
migrate registers a I{mover}, an adapter that provides L{IMover} (an
L{IMigratable} with a little more) for one protocol instance.  The
registry is keyed on the qualified name of the protocol's class (or of one
of its bases), and a mover's module is imported only when a protocol of
that class is first met, so that a process that serves no web protocol
never imports C{twisted.web}.

L{migratableFor} is what the state layer asks: the protocol itself when it
provides L{IMigratable}, a mover for it when one is registered, L{None}
otherwise.  L{migrationBlocker} asks either of them whether the connection
can move I{now}.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable
from weakref import WeakKeyDictionary

from attrs import define, field

from migrate._codec import StateError
from migrate.interfaces import IMigratable

__all__ = [
    "IMover",
    "MoverRegistry",
    "NotAtSafePoint",
    "migratableFor",
    "migrationBlocker",
    "movers",
]


class NotAtSafePoint(StateError):
    """
    The connection cannot move now (a request is in flight, a message is
    half received, the application said "not now"), but may at its next
    safe point.  Other L{StateError}s mean it cannot move at all.
    """


class IMover(IMigratable):
    """
    Migrate's own L{IMigratable} for one protocol instance the application
    did not write: built by the registry around that protocol, on the old
    side to capture it and on the new side (around the new code's freshly
    built protocol) to restore it.

    A mover may also define C{watchSafePoint(reached)}: call C{reached()}
    the moment the connection may have reached a safe point (from inside
    its read path, before it can read more), and return a callable that
    stops watching.  Without it, a busy connection is only polled.
    """

    def migrationBlocker() -> str | None:
        """
        Can the connection move now?

        @return: L{None} when it can; otherwise why not, in a few words
            ("a request is in flight"), when it will be able to at a later
            safe point.  A connection that can never move raises
            L{StateError} from C{getMigrationState} instead.
        """

    def replayBufferedInput() -> None:
        """
        Deliver what the restored protocol holds unparsed and complete, once
        the connection reads again.
        """

    def closePolitely(code: int) -> bool:
        """
        End a connection that does not move, the polite way for its
        protocol, if it can be ended now.

        @param code: the WebSocket close code to use where one applies.

        @return: whether it was ended (or asked to end) now; C{False} when
            ending it now would be rude (a request in flight), to be asked
            again later.
        """


def _className(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _resolve(target: str | Callable[[Any], Any]) -> Callable[[Any], Any]:
    """
    @param target: a mover factory, or C{"module:name"} naming one.

    @return: the factory.
    """
    if not isinstance(target, str):
        return target
    moduleName, _, name = target.partition(":")
    result: Callable[[Any], Any] = getattr(importlib.import_module(moduleName), name)
    return result


@define
class MoverRegistry:
    """
    Mover factories keyed on the qualified name of a protocol class.

    A protocol gets the mover registered for the first class of its MRO
    that has one; a class's look-up is cached (weakly, so that classes of
    reloaded modules do not pile up).
    """

    _factories: dict[str, str | Callable[[Any], IMover]] = field(factory=dict)
    _cache: WeakKeyDictionary[type, Callable[[Any], IMover] | None] = field(
        factory=WeakKeyDictionary
    )

    def register(self, className: str, factory: str | Callable[[Any], IMover]) -> None:
        """
        Register a mover for a protocol class and its subclasses.

        @param className: the class's qualified name, module included
            (C{"twisted.web.http._GenericHTTPChannelProtocol"}).
        @param factory: called with a protocol instance, returns its
            L{IMover}; or C{"module:name"} naming such a callable, imported
            when first needed.
        """
        self._factories[className] = factory
        self._cache.clear()

    def _factoryFor(self, cls: type) -> Callable[[Any], IMover] | None:
        try:
            return self._cache[cls]
        except KeyError:
            pass
        found: Callable[[Any], IMover] | None = None
        for base in cls.__mro__:
            target = self._factories.get(_className(base))
            if target is not None:
                found = _resolve(target)
                break
        self._cache[cls] = found
        return found

    def moverFor(self, protocol: object) -> IMover | None:
        """
        @param protocol: a protocol.

        @return: its mover, or L{None} if its class has none.
        """
        factory = self._factoryFor(type(protocol))
        return None if factory is None else factory(protocol)


#: the registry the state layer uses
movers = MoverRegistry()
movers.register(
    "twisted.web.http._GenericHTTPChannelProtocol",
    "migrate._handoff._movers._http:GenericChannelMover",
)


def migratableFor(protocol: object, registry: MoverRegistry | None = None) -> Any:
    """
    What carries a protocol's state to new code.

    @param protocol: a protocol.
    @param registry: the registry to consult (the default one if L{None}).

    @return: C{protocol} itself if it provides L{IMigratable}; else its
        mover, if one is registered for its class; else L{None}.
    """
    if IMigratable.providedBy(protocol):
        return protocol
    return (movers if registry is None else registry).moverFor(protocol)


def migrationBlocker(migratable: object) -> str | None:
    """
    Ask an L{IMigratable} provider (an application protocol or a mover)
    whether its connection can move now.

    Application protocols may define C{migrationBlocker()} (optional: a
    protocol without it can always move); movers always do.

    @param migratable: what L{migratableFor} returned.

    @return: L{None} if it can move now, otherwise why not.

    @raise StateError: if C{migrationBlocker} raised or returned something
        other than L{None} or a C{str} (the connection is then treated as
        unable to move at all).
    """
    method = getattr(migratable, "migrationBlocker", None)
    if method is None:
        return None
    try:
        reason = method()
    except Exception as e:
        raise StateError(
            f"{_className(type(migratable))}.migrationBlocker() failed: {e!r}"
        ) from e
    if reason is not None and type(reason) is not str:
        raise StateError(
            f"{_className(type(migratable))}.migrationBlocker() returned "
            f"{type(reason).__qualname__}, not str or None"
        )
    return reason
