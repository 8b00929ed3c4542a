# -*- test-case-name: migrate.test.test_control -*-
"""
Bounds on the AMP boxes a peer may send, enforced while they are parsed.

L{twisted.protocols.amp.AMP} only bounds each key (255 bytes) and each value
(65,535 bytes); a peer may still send boxes of any number of keys, or many
values up to that size, and everything is buffered before the box is
dispatched.  L{BoundedBoxParser} bounds a whole box, in bytes and in keys,
and refuses a value before buffering it when it could not fit.

Twisted offers no public way to do this, so this is the one module that
reaches into the private parsing machinery of
L{twisted.protocols.amp.BinaryBoxProtocol} and of the string receivers it
is built on; a Twisted upgrade that changes them breaks here, covered by
C{migrate.test.test_control}'s C{DisconnectTests}:

  - C{proto_init}, C{proto_key}, C{proto_value}: the parser's states
    (L{twisted.protocols.basic.StatefulStringProtocol} calls C{proto_<state>}
    with each length-prefixed string and moves to the state it returns).
    Overridden to count every string; a new state C{"dropped"}
    (C{proto_dropped}) swallows whatever follows a refusal.
  - C{MAX_LENGTH} (L{twisted.protocols.basic.IntNStringReceiver}): the
    longest string the receiver accepts next.  AMP sets it to
    C{_MAX_VALUE_LENGTH} before each value; it is lowered to the room the
    box has left, so an oversized value is refused from its length prefix.
  - C{_MAX_VALUE_LENGTH} (L{twisted.protocols.amp.BinaryBoxProtocol}): read,
    never changed, as the upper bound of that room.
  - C{lengthLimitExceeded} (L{twisted.protocols.basic.IntNStringReceiver}):
    called for a length prefix above C{MAX_LENGTH}; AMP's own loses the
    connection politely, this one reports the refusal instead.
  - C{paused} (L{twisted.protocols.basic.IntNStringReceiver}): set to stop
    the receiver's loop over the strings already received in this chunk.
"""

from __future__ import annotations

__all__ = ["BoundedBoxParser"]

_PREFIX_BYTES = 2
"""
The length prefix of every key and value (AMP uses 16-bit prefixes).
"""


class BoundedBoxParser:
    """
    A mixin for L{twisted.protocols.amp.AMP} (listed before it in the bases)
    that bounds each box a peer sends to C{maxBoxBytes} bytes (every length
    prefix, key and value, and the terminating empty key) and C{maxBoxKeys}
    keys.

    Past a bound, parsing stops and L{boxRefused} is called with the
    reason; nothing more that the peer sends is parsed.

    @cvar maxBoxBytes: the largest box, in bytes.
    @cvar maxBoxKeys: the most keys one box may hold.
    """

    maxBoxBytes: int
    maxBoxKeys: int

    _parsingStopped = False
    _boxBytes = 0
    _boxKeys = 0

    # What the AMP parser below provides.
    MAX_LENGTH: int
    _MAX_VALUE_LENGTH: int
    paused: bool

    def boxRefused(self, why: str) -> None:
        """
        A box broke a bound; the subclass drops the connection.

        @param why: which bound, in words.
        """
        raise NotImplementedError()

    def stopParsing(self) -> None:
        """
        Parse nothing more the peer sends, from the next string on (even
        within the chunk being parsed).
        """
        self._parsingStopped = True
        self.paused = True

    def _account(self, string: bytes) -> bool:
        self._boxBytes += _PREFIX_BYTES + len(string)
        if self._boxBytes > self.maxBoxBytes:
            self.stopParsing()
            self.boxRefused("message larger than {} bytes".format(self.maxBoxBytes))
            return False
        return True

    def proto_init(self, string: bytes) -> str:
        self._boxBytes = 0
        self._boxKeys = 0
        state: str = super().proto_init(string)  # type: ignore[misc]
        return state

    def proto_key(self, string: bytes) -> str:
        if self._parsingStopped or not self._account(string):
            return "dropped"
        if string:
            self._boxKeys += 1
            if self._boxKeys > self.maxBoxKeys:
                self.stopParsing()
                self.boxRefused(
                    "message with more than {} keys".format(self.maxBoxKeys)
                )
                return "dropped"
        state: str = super().proto_key(string)  # type: ignore[misc]
        if self._parsingStopped:
            return "dropped"
        if state == "value":
            # Refuse a value before buffering it if it cannot fit: its
            # prefix, and the terminating empty key, still have to come.
            self.MAX_LENGTH = max(
                0,
                min(
                    self._MAX_VALUE_LENGTH,
                    self.maxBoxBytes - self._boxBytes - 2 * _PREFIX_BYTES,
                ),
            )
        return state

    def proto_value(self, string: bytes) -> str:
        if self._parsingStopped or not self._account(string):
            return "dropped"
        state: str = super().proto_value(string)  # type: ignore[misc]
        return state

    def proto_dropped(self, string: bytes) -> str:
        return "dropped"

    def lengthLimitExceeded(self, length: int) -> None:
        self.stopParsing()
        self.boxRefused(
            "length prefix {} exceeds what the message may hold".format(length)
        )
