"""
The hand-off channel's vocabulary: the AMP commands an old process and its
successor exchange over their inherited Unix socketpair.

The conversation, for capability and gradual transfer::

    successor -> old   Hello          I have loaded the new code; who am I?
    old -> successor   TakeListener   (once per listener, descriptor attached)
    old -> successor   AdoptConnections   (capability: descriptors in bulk)
    old -> successor   Commit         you serve now
    old -> successor   DrainStatus    (while the old process drains)

Anything that fails before C{Commit} is answered makes the old process kill
the successor and resume everything it holds: the successor abandons what
it adopted when the channel closes before C{Commit}.
"""

from __future__ import annotations

from twisted.protocols import amp

__all__ = [
    "AdoptConnections",
    "Commit",
    "DrainStatus",
    "HandoffRefused",
    "Hello",
    "TakeListener",
    "HANDOFF_PROTOCOL_VERSION",
]

HANDOFF_PROTOCOL_VERSION = 1


class HandoffRefused(Exception):
    """
    The successor will not take what it was offered.
    """


class Hello(amp.Command):
    """
    The successor has loaded its code and built its application.
    """

    arguments = [
        (b"pid", amp.Integer()),
        (b"protocolVersion", amp.Integer()),
        (b"listeners", amp.ListOf(amp.Unicode())),
    ]
    response = [
        (b"generation", amp.Integer()),
        (b"strategy", amp.Unicode()),
    ]
    errors = {HandoffRefused: b"HANDOFF_REFUSED"}


class TakeListener(amp.Command):
    """
    Here is the listening socket for one of your listeners; adopt it without
    accepting yet.
    """

    arguments = [
        (b"key", amp.Unicode()),
        (b"socket", amp.Descriptor()),
    ]
    response: list = []
    errors = {HandoffRefused: b"HANDOFF_REFUSED"}


class TakeControl(amp.Command):
    """
    Here is the listening control socket; adopt it without accepting yet.
    """

    arguments = [(b"socket", amp.Descriptor())]
    response: list = []
    errors = {HandoffRefused: b"HANDOFF_REFUSED"}


class AdoptConnections(amp.Command):
    """
    Adopt C{count} established connections, paused.

    The manifest (a memfd) holds one JSON entry per connection, in the same
    order as the descriptors sent over C{bulk}, a socket dedicated to this
    batch: descriptors travel there in batches of up to 253 per
    C{sendmsg}, since one AMP command per descriptor is far too slow.
    """

    arguments = [
        (b"count", amp.Integer()),
        (b"manifestSize", amp.Integer()),
        (b"manifest", amp.Descriptor()),
        (b"bulk", amp.Descriptor()),
    ]
    response = [
        (b"adopted", amp.ListOf(amp.Integer())),
        (b"refused", amp.Unicode()),
    ]
    errors = {HandoffRefused: b"HANDOFF_REFUSED"}


class Commit(amp.Command):
    """
    You serve now: accept, resume the adopted connections, take the
    control socket and the pidfile.  After answering, the successor never
    gives back what it holds.
    """

    arguments: list = []
    response = [(b"pid", amp.Integer())]
    errors = {HandoffRefused: b"HANDOFF_REFUSED"}


class DrainStatus(amp.Command):
    """
    The old generations still draining, as JSON: a list of objects with
    C{generation}, C{pid} and C{connections}.
    """

    arguments = [(b"draining", amp.Unicode())]
    requiresAnswer = False
