"""
The order in which a successor serves the connections it took at a
freeze: first those whose clients are waiting, the longest-waiting first;
the others once those have had a reactor turn.

While connections are frozen their clients go on sending, and the kernel
queues what they send.  At the commit the successor starts reading every
moved connection.  The reactor's first turn then reads them in the order
they were registered (epoll reports descriptors readable when registered
in that order), and each registration costs a few microseconds.  So a
successor that registers a thousand connections in whatever order before
its first turn keeps the client that sent first waiting behind every
registration and, by chance, behind hundreds of other answers.

Instead one C{poll(2)} over all of them tells which have bytes (or a
hang-up) to read.  Those are served at once, the one whose newest bytes
arrived longest ago first: the kernel keeps that time for a TCP socket
(C{tcpi_last_data_recv} in C{TCP_INFO}, in milliseconds, at the
granularity of the kernel's tick).  A connection with output to send (the
old process's, or what its new code wrote while held) is served at once
too, and so is one the kernel cannot say anything about.  The others,
whose clients wait for nothing, are served after that turn.
"""

from __future__ import annotations

import select
import socket
import struct
from typing import Any, Callable, Protocol, Sequence, TypeVar

__all__ = ["lastArrivalAge", "servingOrder"]

_TCP_INFO = getattr(socket, "TCP_INFO", None)
_LAST_DATA_RECV = struct.Struct("=I")
_LAST_DATA_RECV_OFFSET = 52
"""
Where C{tcpi_last_data_recv} sits in Linux's C{struct tcp_info}: after
eight one-byte fields and eleven 32-bit ones, unchanged since Linux 2.6.
"""

_READABLE = select.POLLIN | select.POLLPRI


class _Servable(Protocol):
    """
    A moved connection, as L{servingOrder} sees it
    (L{migrate._handoff._movement.AdoptedConnection}).
    """

    transport: Any

    def hasOutput(self) -> bool: ...


_S = TypeVar("_S", bound=_Servable)


def lastArrivalAge(transport: Any) -> float | None:
    """
    How long ago, in milliseconds, the newest bytes the connection's client
    sent arrived, by the kernel's clock (C{TCP_INFO}); L{None} for what is
    not a TCP socket, or if the kernel does not say.
    """
    sock = getattr(transport, "socket", None)
    if _TCP_INFO is None or sock is None:
        return None
    try:
        if sock.family not in (socket.AF_INET, socket.AF_INET6):
            return None
        info = sock.getsockopt(
            socket.IPPROTO_TCP, _TCP_INFO, _LAST_DATA_RECV_OFFSET + 4
        )
    except (OSError, AttributeError):
        return None
    if len(info) < _LAST_DATA_RECV_OFFSET + 4:
        return None
    return float(_LAST_DATA_RECV.unpack_from(info, _LAST_DATA_RECV_OFFSET)[0])


def servingOrder(
    connections: Sequence[_S],
    age: Callable[[Any], float | None] = lastArrivalAge,
) -> tuple[list[_S], list[_S]]:
    """
    Split moved connections into those to serve at once and those to serve
    after a reactor turn.

    @param connections: held, not reading yet.
    @param age: how long ago (in any unit) a connection's newest bytes
        arrived, by its transport; L{None} if unknown.

    @return: the connections to serve at once, in the order to serve them
        (output to send or an unknown age first, then the longest-waiting
        client first), and the others, in the order given.  If the kernel
        cannot be asked, every connection is to be served at once, in the
        order given.
    """
    poller = select.poll()
    registered: list[tuple[int, _S]] = []
    seen: set[int] = set()
    unknown: list[_S] = []
    for each in connections:
        try:
            descriptor = each.transport.fileno()
        except Exception:
            unknown.append(each)
            continue
        if descriptor < 0 or descriptor in seen:
            unknown.append(each)
            continue
        seen.add(descriptor)
        registered.append((descriptor, each))
        poller.register(descriptor, _READABLE)
    try:
        ready = poller.poll(0)
    except (OSError, ValueError):
        return list(connections), []
    readable = {descriptor for descriptor, _ in ready}
    first: list[_S] = []
    byAge: list[tuple[float, int, _S]] = []
    quiet: list[_S] = []
    for descriptor, each in registered:
        if descriptor in readable:
            howLong = age(each.transport)
            if howLong is None:
                first.append(each)
            else:
                byAge.append((-howLong, len(byAge), each))
        elif each.hasOutput():
            first.append(each)
        else:
            quiet.append(each)
    byAge.sort(key=lambda entry: entry[:2])
    return unknown + first + [each for _, _, each in byAge], quiet
