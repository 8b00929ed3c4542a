"""
The hand-off channel's vocabulary: the AMP commands an old process and its
successor exchange over their inherited Unix socketpair.

The conversation, for capability and gradual transfer::

    successor -> old   Hello          I have loaded the new code; who am I?
    old -> successor   TakeListener   (once per listener, descriptor attached)
    old -> successor   TakeControl    (the control socket)
    old -> successor   TakeMetrics    (the metrics endpoint and its counters)
    old -> successor   Prepare        start the application
    old -> successor   PrecopyConnections (capability: descriptors in bulk
                                      and a first copy of their state, while
                                      the old process still serves them)
    old -> successor   RecopyConnections  (capability, a few rounds: the
                                      states of the pre-copied connections
                                      that changed since their last copy)
    old -> successor   AdoptConnections   (capability: the connections the
                                      pre-copy did not take, frozen)
    old -> successor   Commit         you serve now (after a pre-copy: one
                                      message on the freeze socketpair
                                      instead, see _freeze.py)
    old -> successor   AdoptConnections, CommitAdopted
                                      (capability, repeated: connections that
                                      were busy, each batch as it reaches its
                                      safe point)
    old -> successor   DrainStatus    (while the old process drains)

Anything that fails before C{Commit} is answered makes the old process kill
the successor and resume everything it holds: the successor abandons what
it adopted when the channel closes before C{Commit}.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.protocols import amp

from ..._handoff._transport import flushNow, writeNow

__all__ = [
    "AdoptConnections",
    "CloseDraining",
    "Commit",
    "CommitAdopted",
    "DrainStatus",
    "HandoffRefused",
    "HandoffAMP",
    "Hello",
    "PrecopyConnections",
    "Prepare",
    "RecopyConnections",
    "Reported",
    "TakeControl",
    "TakeListener",
    "TakeMetrics",
    "HANDOFF_PROTOCOL_VERSION",
    "parseDrainStatus",
]

HANDOFF_PROTOCOL_VERSION = 1


class HandoffAMP(amp.AMP):
    """
    AMP whose boxes leave at once, with one C{send()} where the socket
    takes them (L{writeNow}), not on the reactor's next turn.

    The old process serves its clients throughout the hand-off: under
    load, one of its reactor turns answers hundreds of requests (10 to 15
    ms), and each command to the successor waited for the end of the turn
    that made it.  A box with descriptors attached (C{TakeListener},
    C{AdoptConnections}) goes through the transport, which sends each
    descriptor with its bytes, and is written out at once too
    (L{flushNow}).
    """

    def sendBox(self, box: amp.AmpBox) -> None:
        transport = self.transport
        if (
            transport is None
            or getattr(self, "_locked", False)
            or getattr(self, "_startingTLSBuffer", None) is not None
        ):
            amp.AMP.sendBox(self, box)
            return
        writeNow(transport, box.serialize())
        if getattr(transport, "_sendmsgQueue", None):
            # Descriptors go with the box's first bytes: through the
            # transport (writeNow left it there), written out now.
            flushNow(transport)


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
        (b"anyListener", amp.Boolean(optional=True)),
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
    response = []
    errors = {HandoffRefused: b"HANDOFF_REFUSED"}


class TakeControl(amp.Command):
    """
    Here is the listening control socket; adopt it without accepting yet.
    """

    arguments = [(b"socket", amp.Descriptor())]
    response = []
    errors = {HandoffRefused: b"HANDOFF_REFUSED"}


class TakeMetrics(amp.Command):
    """
    Here is the metrics endpoint's listening socket, and the counters so
    far (JSON, bounded); adopt it without accepting yet.
    """

    arguments = [(b"socket", amp.Descriptor()), (b"carried", amp.Unicode())]
    response = []
    errors = {HandoffRefused: b"HANDOFF_REFUSED"}


class Prepare(amp.Command):
    """
    You hold the listeners: start the application (a hosted plugin opens
    its ports now, claiming the inherited ones), still without accepting.
    """

    arguments = []
    response = []
    errors = {HandoffRefused: b"HANDOFF_REFUSED"}


class AdoptConnections(amp.Command):
    """
    Adopt C{count} established connections, paused.

    The manifest (a memfd) holds one JSON entry per connection, in the same
    order as the descriptors sent over C{bulk}, a socket dedicated to this
    batch: descriptors travel there in batches of up to 253 per
    C{sendmsg}, since one AMP command per descriptor is far too slow.

    The answer counts what was adopted and describes only the first few
    refusals (as JSON), so that it stays far below AMP's 64 KiB value limit
    however many connections move.
    """

    arguments = [
        (b"count", amp.Integer()),
        (b"manifestSize", amp.Integer()),
        (b"manifest", amp.Descriptor()),
        (b"bulk", amp.Descriptor()),
    ]
    response = [
        (b"adopted", amp.Integer()),
        (b"refusedCount", amp.Integer()),
        (b"refused", amp.Unicode()),
    ]
    errors = {HandoffRefused: b"HANDOFF_REFUSED"}


class PrecopyConnections(amp.Command):
    """
    Stage C{count} established connections that the old process still
    serves: adopt each held (not reading), build the new code's protocol,
    check its state, but restore nothing yet.

    As for L{AdoptConnections}, the manifest is a memfd and the descriptors
    travel over C{bulk}.  C{freeze} is the successor's end of a socketpair
    dedicated to the freeze: the old process sends what changed since this
    copy there, and the successor restores every staged connection, serves,
    and answers (see L{migrate.strategies._transfer._freeze}).  Until then
    the old process may withdraw any of them.

    An old successor that does not know this command answers
    C{UNHANDLED}: the old process then hands connections over the way it
    did before.  A successor that answers C{streamed} takes the freeze's
    delta in parts (see L{migrate.strategies._transfer._freeze.FreezeReceiver});
    one that does not (older code) takes the first message for the whole
    delta, so it is sent one.  A successor that answers C{appStateOnly}
    takes, for a connection of which only the application state changed,
    that alone (see L{migrate._handoff._precopy.freezeDelta}); one that
    does not (older code) is sent every changed state whole.
    """

    arguments = [
        (b"count", amp.Integer()),
        (b"manifestSize", amp.Integer()),
        (b"manifest", amp.Descriptor()),
        (b"bulk", amp.Descriptor()),
        (b"freeze", amp.Descriptor()),
    ]
    response = [
        (b"staged", amp.Integer()),
        (b"refusedCount", amp.Integer()),
        (b"refused", amp.Unicode()),
        (b"streamed", amp.Boolean(optional=True)),
        (b"appStateOnly", amp.Boolean(optional=True)),
    ]
    errors = {HandoffRefused: b"HANDOFF_REFUSED"}


class RecopyConnections(amp.Command):
    """
    After L{PrecopyConnections}, before the freeze: a fresh copy of the
    state of C{count} staged connections whose state changed since their
    last copy (the old process still serves them).  The manifest (a memfd)
    holds one C{{"id", "state"}} entry per connection: no descriptor, no
    output (what Twisted holds then may still be written by the old
    process, and travels at the freeze).  The successor takes each new
    state and, for a connection it restored ahead of the freeze, abandons
    that object and restores a fresh one from the new state.

    A refusal (a state the new code refuses) abandons every staged
    connection, as in L{PrecopyConnections}: the old process keeps
    everything.  A successor that does not know this command (older code)
    answers C{UNHANDLED}: the old process then goes to the freeze, which
    carries every change.
    """

    arguments = [
        (b"count", amp.Integer()),
        (b"manifestSize", amp.Integer()),
        (b"manifest", amp.Descriptor()),
    ]
    response = [
        (b"updated", amp.Integer()),
        (b"refusedCount", amp.Integer()),
        (b"refused", amp.Unicode()),
    ]
    errors = {HandoffRefused: b"HANDOFF_REFUSED"}


class Commit(amp.Command):
    """
    You serve now: accept, resume the adopted connections, take the
    control socket and the pidfile.  After answering, the successor never
    gives back what it holds.
    """

    arguments = []
    response = [(b"pid", amp.Integer())]
    errors = {HandoffRefused: b"HANDOFF_REFUSED"}


class CommitAdopted(amp.Command):
    """
    After L{Commit}: serve the connections adopted since (by
    L{AdoptConnections}), which the old process lets go of once this is
    answered.  Sent once with nothing adopted first, to learn that the
    successor knows it.
    """

    arguments = []
    response = [(b"committed", amp.Integer())]
    errors = {HandoffRefused: b"HANDOFF_REFUSED"}


class Reported(amp.Command):
    """
    The report of the migration that made the successor serve, as JSON, so
    that its status shows it, and the metrics' counters with this migration
    counted (JSON).
    """

    arguments = [
        (b"report", amp.Unicode()),
        (b"metrics", amp.Unicode(optional=True)),
    ]
    requiresAnswer = False


class DrainStatus(amp.Command):
    """
    The old generations still draining, as JSON: a list of objects with
    C{generation}, C{pid} and C{connections}.
    """

    arguments = [(b"draining", amp.Unicode())]
    requiresAnswer = False


class CloseDraining(amp.Command):
    """
    Sent by the serving process towards older generations: generation
    C{generation} is to close its connections cleanly now (it is one too
    many: C{--max-draining}); each process relays it to the older one it
    names.
    """

    arguments = [(b"generation", amp.Integer())]
    requiresAnswer = False


def parseDrainStatus(draining: str) -> list[dict[str, Any]]:
    """
    Read a L{DrainStatus}'s list strictly.

    @raise ValueError: if it is not a list of such objects.
    """
    try:
        entries = json.loads(draining)
        if not isinstance(entries, list):
            raise ValueError("not a list")
        return [
            dict(
                {
                    "generation": int(each["generation"]),
                    "pid": int(each["pid"]),
                    "connections": int(each["connections"]),
                },
                **({"closing": True} if each.get("closing") is True else {}),
            )
            for each in entries
        ]
    except (TypeError, KeyError, AttributeError) as e:
        raise ValueError("{}: {}".format(type(e).__name__, e))
