"""
When each answer reached a benchmark client's socket, as the kernel
stamped it, rather than when the client's process got round to reading it.

The load generator plays a thousand clients in one process on the same
two cores as the server it measures.  When the server answers a burst
(the backlog a migration leaves), the generator takes about as long to
read the answers as the server took to write them, one after the other,
so the last answers read carry the generator's own queue in their
latency.  Real clients sit on their own machines and read in parallel.
With C{SO_TIMESTAMPNS} the kernel stamps every segment as it arrives
(on loopback: as the server sends it), and C{recvmsg} hands the stamp of
the last segment read to the client, which then measures the server, not
itself.

Linux only: elsewhere, or if the option is refused, nothing is stamped
and the clients keep measuring at read time.

This reaches into Twisted's TCP transport in one place: it replaces the
transport's C{doRead} with the same read done by C{recvmsg}, and calls
C{_dataReceived} as C{doRead} does (L{twisted.internet.tcp.Connection}).
"""

from __future__ import annotations

import socket
import struct
import sys
from errno import EAGAIN, EWOULDBLOCK
from typing import Any, Callable

from twisted.internet import main

__all__ = ["CONTROL_SPACE", "arrivalStamp", "enableStamps", "stampArrivals"]

_SO_TIMESTAMPNS = 35
"""
Linux's C{SO_TIMESTAMPNS} (C{SO_TIMESTAMPNS_OLD} in the generic ABI that
x86 and ARM use; SPARC, PA-RISC and Alpha number it otherwise, and there
reads simply come without stamps): control messages carry a C{struct
timespec} of C{CLOCK_REALTIME}, the clock of the reactor's C{seconds()}.
"""

_TIMESPEC = struct.Struct("@ll")

CONTROL_SPACE = socket.CMSG_SPACE(_TIMESPEC.size) if sys.platform == "linux" else 0
"""
The room for a stamp to ask C{recvmsg} for (0 where there are none).
"""


def enableStamps(sock: Any) -> bool:
    """
    Ask the kernel to stamp what arrives on C{sock}.

    @return: whether it will (Linux, and the socket took the option).
    """
    if not CONTROL_SPACE:
        return False
    try:
        sock.setsockopt(socket.SOL_SOCKET, _SO_TIMESTAMPNS, 1)
    except OSError:
        return False
    return True


def arrivalStamp(ancillary: list[tuple[int, int, bytes]]) -> float | None:
    """
    The arrival time a C{recvmsg} reported in its control messages, in
    seconds since the epoch; L{None} if it reported none.
    """
    stamp = None
    for level, kind, payload in ancillary:
        if (
            level == socket.SOL_SOCKET
            and kind == _SO_TIMESTAMPNS
            and len(payload) == _TIMESPEC.size
        ):
            seconds, nanoseconds = _TIMESPEC.unpack(payload)
            stamp = seconds + nanoseconds * 1e-9
    return stamp


def stampArrivals(transport: Any, record: Callable[[float | None], None]) -> bool:
    """
    Have C{transport} (a connected Twisted TCP transport) read with
    C{recvmsg} and hand C{record} the kernel's arrival time of the last
    bytes of each read (L{None} if a read came without one), before the
    protocol sees them.

    @return: whether arrivals will be stamped (Linux, a real socket, and
        the socket took the option); if not, C{transport} is unchanged.
    """
    sock: Any = getattr(transport, "socket", None)
    if not hasattr(sock, "recvmsg") or not enableStamps(sock):
        return False
    bufferSize = transport.bufferSize
    dataReceived = transport._dataReceived

    def doRead() -> Any:
        try:
            data, ancillary, _, _ = sock.recvmsg(bufferSize, CONTROL_SPACE)
        except OSError as e:
            if e.args[0] in (EWOULDBLOCK, EAGAIN):
                return None
            return main.CONNECTION_LOST
        record(arrivalStamp(ancillary))
        return dataReceived(data)

    transport.doRead = doRead
    return True
