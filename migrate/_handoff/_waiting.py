"""
The order in which a successor serves the connections it took at a
freeze: first those whose clients are waiting, the longest-waiting first;
the others once those have had a reactor turn.

While connections are frozen their clients go on sending, and the kernel
queues what they send.  At the commit the successor starts reading every
moved connection.  With the epoll reactor (Linux's default) the first
turn then reads them in the order they were registered (epoll reports
descriptors readable when registered in that order), and each
registration costs a few microseconds.  So a successor that registers a
thousand connections in whatever order before its first turn keeps the
client that sent first waiting behind every registration and, by chance,
behind hundreds of other answers.

Instead one C{poll(2)} over all of them tells which have bytes to read.
Those are served at once, the one whose newest bytes arrived longest ago
first: the kernel keeps that time for a TCP socket
(C{tcpi_last_data_recv} in C{TCP_INFO}, in milliseconds, at the
granularity of the kernel's tick).  A connection with nothing to read but
work of its own (output to send, buffered input to deliver), or with bytes
to read of unknown age, is served at once too, before them, and one whose
client hung up without sending anything after them.  The others, whose
clients wait for nothing, are served after that turn.  This is an
optimisation only: if anything in it fails, every connection is served at
once, in the order given, as before.
"""

from __future__ import annotations

import array
import fcntl
import select
import socket
import struct
import termios
from typing import Any, Callable, Protocol, Sequence, TypeVar

from twisted.logger import Logger

__all__ = ["lastArrivalAge", "servingOrder"]

_log = Logger()

_TCP_INFO = getattr(socket, "TCP_INFO", None)
_LAST_DATA_RECV = struct.Struct("=I")
_LAST_DATA_RECV_OFFSET = 52
"""
Where C{tcpi_last_data_recv} sits in Linux's C{struct tcp_info}: after
eight one-byte fields and eleven 32-bit ones, unchanged since Linux 2.6.
"""

_READABLE = select.POLLIN | select.POLLPRI
_HUNG_UP = (
    getattr(select, "POLLRDHUP", 0) | select.POLLHUP | select.POLLERR | select.POLLNVAL
)


class _Servable(Protocol):
    """
    A moved connection, as L{servingOrder} sees it
    (L{migrate._handoff._movement.AdoptedConnection}).
    """

    transport: Any

    def hasWork(self) -> bool: ...


_S = TypeVar("_S", bound=_Servable)


def lastArrivalAge(transport: Any) -> float | None:
    """
    How long ago the newest bytes a connection's client sent arrived, by
    the kernel's clock (C{TCP_INFO}).

    @param transport: a Twisted TCP transport (its C{socket} is asked).

    @return: milliseconds; L{None} for what is not a TCP socket, or if the
        kernel does not say.
    """
    sock = getattr(transport, "socket", None)
    if _TCP_INFO is None or sock is None:
        return None
    try:
        # Not asked of the socket's family first: reading it makes an enum
        # (1.6 us, a third of the whole), at each of hundreds of waiting
        # connections in a commit; a Unix socket refuses the option.
        info = sock.getsockopt(
            socket.IPPROTO_TCP, _TCP_INFO, _LAST_DATA_RECV_OFFSET + 4
        )
    except (OSError, AttributeError):
        return None
    if len(info) < _LAST_DATA_RECV_OFFSET + 4:
        return None
    return float(_LAST_DATA_RECV.unpack_from(info, _LAST_DATA_RECV_OFFSET)[0])


def _bytesToRead(descriptor: int) -> int:
    """
    How many bytes the kernel holds for reading on C{descriptor}
    (C{FIONREAD}); 0 if it will not say.
    """
    count = array.array("i", [0])
    try:
        fcntl.ioctl(descriptor, termios.FIONREAD, count)
    except OSError:
        return 0
    return count[0]


def servingOrder(
    connections: Sequence[_S],
    age: Callable[[Any], float | None] = lastArrivalAge,
) -> tuple[list[_S], list[_S]]:
    """
    Split moved connections, held and not reading yet, into those to serve
    at once and those to serve after a reactor turn.

    @param connections: each with its C{transport} and C{hasWork()}.
    @param age: how long ago (in any unit) a connection's newest bytes
        arrived, by its transport; L{None} if unknown.

    @return: the connections to serve at once, in the order to serve them
        (those with nothing to read but work of their own, or with bytes to
        read of unknown age, first; then those with bytes to read, the
        longest-waiting first; then those only hung up), and the others, in
        the order given.  If anything fails, every
        connection is to be served at once, in the order given.
    """
    try:
        return _servingOrder(connections, age)
    except Exception:
        _log.failure(
            "Ordering {count} moved connections failed; serving them all at once",
            count=len(connections),
        )
        return list(connections), []


def _servingOrder(
    connections: Sequence[_S], age: Callable[[Any], float | None]
) -> tuple[list[_S], list[_S]]:
    poller = select.poll()
    registered: list[tuple[int, _S]] = []
    seen: set[int] = set()
    first: list[_S] = []
    for each in connections:
        try:
            descriptor = each.transport.fileno()
        except Exception:
            descriptor = -1
        if type(descriptor) is not int or descriptor < 0 or descriptor in seen:
            first.append(each)
            continue
        seen.add(descriptor)
        registered.append((descriptor, each))
        poller.register(descriptor, _READABLE | _HUNG_UP)
    events = dict(poller.poll(0))
    byAge: list[tuple[float, int, _S]] = []
    hungUp: list[_S] = []
    quiet: list[_S] = []
    for descriptor, each in registered:
        happened = events.get(descriptor, 0)
        if not happened or (happened & _HUNG_UP and not _bytesToRead(descriptor)):
            # Nothing to read: served at once only for work of its own.
            if each.hasWork():
                first.append(each)
            else:
                (hungUp if happened else quiet).append(each)
            continue
        howLong = age(each.transport)
        if howLong is None:
            first.append(each)
        else:
            byAge.append((-howLong, len(byAge), each))
    byAge.sort(key=lambda entry: entry[:2])
    return first + [each for _, _, each in byAge] + hungUp, quiet
