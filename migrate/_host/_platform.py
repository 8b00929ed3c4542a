"""
Checking, before a host starts, that this Twisted and this reactor have
what migrate relies on, so that an unsuitable one fails at once with a
message that says what is missing, not in the middle of the first
migration.

Capabilities are checked, not version numbers: the reactor's interfaces
(adopting sockets, Unix sockets, processes, descriptor registration) and
the private attributes of Twisted's classes that L{migrate._handoff} and
L{migrate.state} reach into (each of those modules says which it uses).
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

from zope.interface import Interface

__all__ = ["PlatformUnsupported", "missingCapabilities", "checkPlatform"]


class PlatformUnsupported(Exception):
    """
    This Twisted or this reactor lacks something migrate needs.
    """


def _reactorNeeds() -> list[tuple[type[Interface], str]]:
    from twisted.internet.interfaces import (
        IReactorFDSet,
        IReactorProcess,
        IReactorSocket,
        IReactorUNIX,
    )

    return [
        (IReactorSocket, "adopting listening sockets and connections"),
        (IReactorUNIX, "the control socket"),
        (IReactorProcess, "starting a successor"),
        (IReactorFDSet, "pausing and resuming descriptors"),
    ]


def _fileDescriptorAttributes() -> Any:
    # FileDescriptor sets its output buffers up in __init__: look at a
    # fresh one (no descriptor is opened).
    from twisted.internet.abstract import FileDescriptor

    noReactor: Any = object()
    return FileDescriptor(reactor=noReactor)


def _twistedNeeds() -> list[tuple[Any, str, str]]:
    from twisted.internet import tcp, unix
    from twisted.protocols import basic

    descriptor = _fileDescriptorAttributes()
    return [
        (tcp.Port, "_shouldShutdown", "letting go of a listening socket"),
        (
            unix.Port,
            "_fromListeningDescriptor",
            "adopting a Unix listening socket",
        ),
        (tcp.Connection, "_aborting", "freezing a connection"),
        (descriptor, "dataBuffer", "carrying unwritten output"),
        (descriptor, "offset", "carrying unwritten output"),
        (descriptor, "_tempDataBuffer", "carrying unwritten output"),
        (descriptor, "_tempDataLen", "carrying unwritten output"),
        (basic.LineReceiver, "_buffer", "carrying a half-received line"),
        (basic.LineReceiver, "_busyReceiving", "carrying a half-received line"),
        (basic.IntNStringReceiver, "_unprocessed", "carrying a half-received frame"),
    ]


def missingCapabilities(
    reactor: Any,
    reactorNeeds: Sequence[tuple[type[Interface], str]] | None = None,
    twistedNeeds: Iterable[tuple[Any, str, str]] | None = None,
) -> list[str]:
    """
    What this reactor and this Twisted lack, one sentence each; empty when
    migrate can run.

    @param reactor: the reactor the host would run on.
    @param reactorNeeds: the interfaces the reactor must provide, each with
        what it is for (default: migrate's).
    @param twistedNeeds: (object, attribute, what for) that Twisted's
        classes must have (default: migrate's).
    """
    missing = []
    for interface, purpose in (
        _reactorNeeds() if reactorNeeds is None else reactorNeeds
    ):
        if not interface.providedBy(reactor):
            missing.append(
                "the reactor does not provide {} ({})".format(
                    interface.__name__, purpose
                )
            )
    for owner, attribute, purpose in (
        _twistedNeeds() if twistedNeeds is None else twistedNeeds
    ):
        if not hasattr(owner, attribute):
            missing.append(
                "{} has no {} ({})".format(
                    getattr(owner, "__name__", type(owner).__name__),
                    attribute,
                    purpose,
                )
            )
    return missing


def checkPlatform(reactor: Any) -> None:
    """
    Refuse to host on a reactor or a Twisted that lacks what migrate needs.

    @raise PlatformUnsupported: saying what is missing, on which Twisted
        and reactor, and what is supported.
    """
    missing = missingCapabilities(reactor)
    if not missing:
        return
    import twisted

    raise PlatformUnsupported(
        "migrate cannot run on Twisted {} with {}.{}: {}.  It needs Twisted "
        "24.7 or later with the epoll, poll, select or asyncio reactor "
        "(see 'Supported platforms' in the documentation).".format(
            twisted.__version__,
            type(reactor).__module__,
            type(reactor).__name__,
            "; ".join(missing),
        )
    )
