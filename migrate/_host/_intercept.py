"""
Owning the listening ports of an application that has never heard of
migrate: another twistd plugin, hosted unmodified.

While installed on the reactor, every TCP or Unix listening port the
application opens (through strports, endpoints, C{internet.TCPServer} or a
direct C{listenTCP}/C{listenUNIX}/C{listenSSL}) is created, or inherited from
the previous generation, by the host, which tracks its connections and
hands it on at the next migration.  What the host cannot hand on (UDP,
multicast) is refused with a clear error instead of being silently left
behind.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort, IProtocolFactory
from twisted.logger import Logger

from ._tracking import TrackingFactory

__all__ = ["CannotHost", "ListeningInterceptor", "tcpListenerKey", "unixListenerKey"]

_log = Logger()


class CannotHost(Exception):
    """
    The hosted application asked for something the host cannot hand on to
    a successor.
    """


def tcpListenerKey(port: int, interface: str) -> str:
    """
    The listener key for a TCP port, as an endpoint description.
    """
    if not interface:
        return "tcp:{}".format(port)
    return "tcp:{}:interface={}".format(port, interface.replace(":", "\\:"))


def unixListenerKey(address: str | bytes) -> str:
    """
    The listener key for a Unix socket path, as an endpoint description.
    """
    if isinstance(address, bytes):
        address = address.decode("utf-8", "surrogateescape")
    return "unix:{}".format(address.replace(":", "\\:"))


class _OriginalReactor:
    """
    The reactor as it was before the interceptor: endpoints the host builds
    itself (for C{--listen} redirections) must not be intercepted again.
    """

    def __init__(self, reactor: Any, originals: dict[str, Any]) -> None:
        self._reactor = reactor
        self._originals = originals

    def __getattr__(self, name: str) -> Any:
        if name in self._originals:
            return self._originals[name]
        return getattr(self._reactor, name)


class ListeningInterceptor:
    """
    Puts a host between a hosted application and the reactor's listening
    methods.

    @ivar host: the L{migrate.MigrationHost} that owns the ports.
    @ivar redirects: endpoint descriptions given with C{--listen}: the
        application's first listening port is opened on the first of them,
        and so on, whatever port the application asked for.
    """

    _intercepted = ("listenTCP", "listenUNIX", "listenUDP", "listenMulticast")

    def __init__(self, reactor: Any, host: Any, redirects: Sequence[str] = ()) -> None:
        self.reactor = reactor
        self.host = host
        self.redirects = list(redirects)
        self._originals: dict[str, Any] = {}
        self._listened = 0

    def install(self) -> None:
        """
        Intercept the reactor's listening methods.
        """
        for name in self._intercepted:
            if hasattr(self.reactor, name):
                self._originals[name] = getattr(self.reactor, name)
                setattr(self.reactor, name, getattr(self, name))

    def uninstall(self) -> None:
        """
        Give the reactor its own listening methods back.
        """
        for name, original in self._originals.items():
            try:
                delattr(self.reactor, name)
            except AttributeError:
                setattr(self.reactor, name, original)
        self._originals.clear()

    # The reactor's methods, intercepted

    def listenTCP(
        self,
        port: int,
        factory: IProtocolFactory,
        backlog: int = 50,
        interface: str = "",
    ) -> IListeningPort:
        return self._listen(
            tcpListenerKey(port, interface),
            factory,
            lambda tracking: self._originals["listenTCP"](
                port, tracking, backlog, interface
            ),
        )

    def listenUNIX(
        self,
        address: str | bytes,
        factory: IProtocolFactory,
        backlog: int = 50,
        mode: int = 0o666,
        wantPID: int = 0,
    ) -> IListeningPort:
        return self._listen(
            unixListenerKey(address),
            factory,
            lambda tracking: self._originals["listenUNIX"](
                address, tracking, backlog, mode, wantPID
            ),
        )

    def listenUDP(self, port: int, *args: Any, **kwargs: Any) -> Any:
        raise CannotHost(
            "the hosted application listens on UDP port {}: migrate-host can "
            "hand on only stream listeners (TCP, TLS over TCP, Unix); run it "
            "without migrate-host".format(port)
        )

    def listenMulticast(self, port: int, *args: Any, **kwargs: Any) -> Any:
        raise CannotHost(
            "the hosted application listens on multicast port {}: migrate-host "
            "can hand on only stream listeners (TCP, TLS over TCP, Unix)".format(port)
        )

    # Ports

    def _listen(
        self,
        key: str,
        factory: IProtocolFactory,
        create: Callable[[TrackingFactory], IListeningPort],
    ) -> IListeningPort:
        if self.redirects:
            if self._listened >= len(self.redirects):
                raise CannotHost(
                    "the hosted application opens more listening ports than "
                    "--listen gives ({}): it asked for {}".format(
                        len(self.redirects), key
                    )
                )
            asked = key
            key = self.redirects[self._listened]
            original = _OriginalReactor(self.reactor, self._originals)

            def create(tracking: TrackingFactory) -> IListeningPort:  # noqa: F811
                result: list[Any] = []
                serverFromString(original, key).listen(tracking).addBoth(result.append)
                outcome = result[0]
                if hasattr(outcome, "raiseException"):
                    outcome.raiseException()
                port: IListeningPort = outcome
                return port

            _log.info(
                "Hosted application's listener {asked} opened as {key}",
                asked=asked,
                key=key,
            )
        self._listened += 1
        claimed: IListeningPort = self.host.claimListener(key, factory, create)
        return claimed
