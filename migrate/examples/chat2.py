"""
Version 2 of the demo chat server: L{migrate.examples.chat} with away
messages.

The tutorial (C{doc/tutorial.rst}) serves a copy of version 1, puts this
module in its place while users are connected, and upgrades: every user
keeps their nickname, room and queued messages, and can now say they are
away.  It is complete and runnable on its own
(C{--app migrate.examples.chat2:makeFactory}).  Lines starting with C{/}
are commands:

  - C{/nick NAME}: change your nickname;
  - C{/join ROOM}: leave your room and enter C{ROOM};
  - C{/who}: list who is in your room, and who of them is away;
  - C{/away [MESSAGE]}: say you are away (new in version 2); C{/away}
    alone says you are back;
  - C{/quit}: say goodbye and disconnect.

Any other line goes to everyone else in your room as C{<nick> text}.
Lines from the server itself start with C{* }.  Lines end with C{\\n};
a C{\\r} before it is ignored, so C{telnet} works as well as C{nc}.

L{ChatProtocol} provides L{IMigratable}.  Its state gained a key, the away
message, so its C{migrationVersion} is 2, and L{ChatProtocol.upgradeMigrationState}
reads the state version 1 wrote: a user who moves from version 1 is not
away.  Version 1 refuses version 2's state (it cannot know what the new key
means), so going back to version 1 rolls a capability transfer back rather
than lose the away messages.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from twisted.internet.protocol import ServerFactory, connectionDone
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure
from zope.interface import implementer

from migrate.interfaces import IMigratable

__all__ = ["ChatFactory", "ChatProtocol", "makeFactory"]

_COMMANDS = "/nick NAME, /join ROOM, /who, /away [MESSAGE], /quit"
_MAX_NAME = 32
_MAX_AWAY = 200


def _isName(text: str) -> bool:
    """
    Is C{text} usable as a nickname or a room name?

    @param text: the candidate name.

    @return: C{True} for one word of printable characters, at most
        C{_MAX_NAME} long.
    """
    return (
        0 < len(text) <= _MAX_NAME
        and text.isprintable()
        and not any(c.isspace() for c in text)
    )


@implementer(IMigratable)
class ChatProtocol(LineReceiver):
    """
    One chat user.

    While the protocol is paused (L{pauseProducing}), messages for its user
    are queued in L{unread} instead of being written; L{resumeProducing}
    delivers them.  The queue is part of the migration state, so messages
    held back when a connection moves are delivered by the new code.

    @ivar factory: the L{ChatFactory} serving this user.
    @ivar nick: the user's nickname.
    @ivar room: the name of the room the user is in.
    @ivar unread: messages for the user not written yet, oldest first; at
        most L{maxUnread} of them are kept.
    @ivar away: the user's away message, or L{None} when they are here.
    """

    delimiter = b"\n"
    migrationVersion = 2
    maxUnread = 100

    def __init__(self) -> None:
        self.nick = ""
        self.room = ""
        self.unread: list[str] = []
        self.away: str | None = None

    # Connection life cycle

    def connectionMade(self) -> None:
        """
        Welcome a new user into the default room under a guest nickname.
        """
        self.nick = self.factory.guestNick()
        self.room = self.factory.defaultRoom
        self.factory.join(self)
        self.deliver(
            f"* Welcome, {self.nick}! You are in {self.room}. Commands: {_COMMANDS}"
        )
        self.factory.broadcast(self.room, f"* {self.nick} joined {self.room}", self)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """
        Take the user out of their room and tell the others.
        """
        if self.factory.leave(self):
            self.factory.broadcast(self.room, f"* {self.nick} left {self.room}")

    # Input

    def lineReceived(self, line: bytes) -> None:
        """
        Run a command or say something to the room.

        @param line: one line from the user, without C{\\n}.
        """
        text = line.removesuffix(b"\r").decode("utf-8", "replace")
        if not text.strip():
            return
        if not text.startswith("/"):
            self.factory.broadcast(self.room, f"<{self.nick}> {text}", self)
            return
        command, _, argument = text[1:].partition(" ")
        command, argument = command.lower(), argument.strip()
        if command == "nick":
            self._changeNick(argument)
        elif command == "join":
            self._changeRoom(argument)
        elif command == "who":
            names = ", ".join(self.factory.nicks(self.room))
            self.deliver(f"* In {self.room}: {names}")
        elif command == "away":
            self._changeAway(argument)
        elif command == "quit":
            self.deliver(f"* Bye, {self.nick}.")
            assert self.transport is not None
            self.transport.loseConnection()
        else:
            self.deliver(f"* Unknown command /{command}. Commands: {_COMMANDS}")

    def _changeNick(self, nick: str) -> None:
        """
        Handle C{/nick NAME}.

        @param nick: the requested nickname.
        """
        if not _isName(nick):
            self.deliver(
                f"* Usage: /nick NAME (one word, at most {_MAX_NAME} characters)"
            )
        elif nick == self.nick:
            self.deliver(f"* You are already {nick}.")
        elif self.factory.nickInUse(nick):
            self.deliver(f"* {nick} is taken.")
        else:
            old = self.nick
            self.factory.rename(self, nick)
            self.deliver(f"* You are now {nick}.")
            self.factory.broadcast(self.room, f"* {old} is now {nick}", self)

    def _changeAway(self, message: str) -> None:
        """
        Handle C{/away [MESSAGE]}.

        @param message: the away message; empty to say the user is back.
        """
        if len(message) > _MAX_AWAY or not message.isprintable():
            self.deliver(f"* Usage: /away [MESSAGE] (at most {_MAX_AWAY} characters)")
        elif message:
            self.away = message
            self.deliver(f"* You are away: {message}")
            self.factory.broadcast(self.room, f"* {self.nick} is away: {message}", self)
        elif self.away is None:
            self.deliver("* You are not away.")
        else:
            self.away = None
            self.deliver("* You are back.")
            self.factory.broadcast(self.room, f"* {self.nick} is back", self)

    def _changeRoom(self, room: str) -> None:
        """
        Handle C{/join ROOM}.

        @param room: the name of the room to enter.
        """
        if not _isName(room):
            self.deliver(
                f"* Usage: /join ROOM (one word, at most {_MAX_NAME} characters)"
            )
            return
        if room == self.room:
            self.deliver(f"* You are already in {room}.")
            return
        self.factory.leave(self)
        self.factory.broadcast(self.room, f"* {self.nick} left {self.room}")
        self.room = room
        self.factory.join(self)
        names = ", ".join(self.factory.nicks(room))
        self.deliver(f"* You are in {room}: {names}")
        self.factory.broadcast(room, f"* {self.nick} joined {room}", self)

    # Output

    def deliver(self, message: str) -> None:
        """
        Send one line to this user, or queue it while the protocol is paused.

        @param message: the line, without its line ending.
        """
        if self.paused:
            self.unread.append(message)
            del self.unread[: -self.maxUnread]
        else:
            self.sendLine(message.encode("utf-8"))

    def _flushUnread(self) -> None:
        """
        Write the queued messages, oldest first.
        """
        unread, self.unread = self.unread, []
        for message in unread:
            self.sendLine(message.encode("utf-8"))

    def resumeProducing(self) -> None:
        """
        Deliver the messages queued while paused, then read input again.
        """
        self.paused = False
        self._flushUnread()
        super().resumeProducing()

    # IMigratable

    def getMigrationState(self) -> dict[str, Any]:
        """
        Describe this user as plain data.

        @return: C{{"nick": str, "room": str, "unread": [str, ...],
            "away": str | None}}.
        """
        return {
            "nick": self.nick,
            "room": self.room,
            "unread": list(self.unread),
            "away": self.away,
        }

    def restoreMigrationState(self, state: Any) -> None:
        """
        Bring the user back in the new code: same nickname, same room, the
        queued messages delivered, and no welcome or join notice (from the
        user's point of view nothing happened).

        @param state: what L{getMigrationState} returned, or what
            L{upgradeMigrationState} made of an older version's state.

        @raise ValueError: if C{state} does not have that shape.
        """
        if not (
            isinstance(state, dict)
            and isinstance(state.get("nick"), str)
            and isinstance(state.get("room"), str)
            and isinstance(state.get("unread"), list)
            and all(isinstance(m, str) for m in state["unread"])
            and "away" in state
            and (state["away"] is None or isinstance(state["away"], str))
        ):
            raise ValueError(
                f"chat state must be {{'nick': str, 'room': str, "
                f"'unread': [str, ...], 'away': str | None}}, not {state!r:.200}"
            )
        self.nick = state["nick"]
        self.room = state["room"]
        self.unread = list(state["unread"])
        self.away = state["away"]
        self.factory.join(self)
        self._flushUnread()

    def abandonMigrationState(self) -> None:
        """
        This object was restored ahead of a module reload's pause (or of a
        capability transfer's freeze, in the successor) but will never serve
        (its connection changed, and is restored again, or closed, or stays
        with the old process): leave the room it joined, telling no one.
        """
        self.factory.leave(self)

    def upgradeMigrationState(self, fromVersion: int, state: Any) -> Any:
        """
        Read state written by other versions of this code.

        Called on the new side, before L{restoreMigrationState}, when the
        old code's version differs from this one's.  It may run on an
        instance whose attributes are not set up yet: it looks only at its
        arguments.

        @param fromVersion: the old code's L{migrationVersion}.
        @param state: the old code's state.

        @return: C{state} in version 2's shape.

        @raise ValueError: for a version this code cannot read (3 and later,
            written by newer code), which keeps the connection on the code
            that understands it.
        """
        if fromVersion == 1:
            # Version 1 had no away messages: nobody was away.
            if not isinstance(state, dict):
                raise ValueError(
                    f"chat state version 1 must be a dict, not {state!r:.200}"
                )
            return {**state, "away": None}
        raise ValueError(
            f"cannot read chat state version {fromVersion!r}; "
            f"this code reads version {self.migrationVersion}"
        )


class ChatFactory(ServerFactory):
    """
    The chat server: its rooms and who is in them.

    @ivar rooms: the users in each room, by room name; rooms with nobody in
        them are removed.
    @ivar defaultRoom: the room new users start in.
    """

    protocol = ChatProtocol
    defaultRoom = "lobby"

    def __init__(self) -> None:
        self.rooms: dict[str, set[ChatProtocol]] = {}
        # How many users in rooms have each nickname: two users restored
        # from different processes may share one.
        self._nicks: Counter[str] = Counter()
        self._lastGuest = 0

    def join(self, user: ChatProtocol) -> None:
        """
        Put C{user} into the room named by its C{room} attribute.

        @param user: the user.
        """
        members = self.rooms.setdefault(user.room, set())
        if user not in members:
            members.add(user)
            self._nicks[user.nick] += 1

    def leave(self, user: ChatProtocol) -> bool:
        """
        Take C{user} out of the room named by its C{room} attribute.

        @param user: the user.

        @return: whether C{user} was in that room.
        """
        members = self.rooms.get(user.room)
        if members is None or user not in members:
            return False
        members.remove(user)
        if not members:
            del self.rooms[user.room]
        self._nicks[user.nick] -= 1
        if not self._nicks[user.nick]:
            del self._nicks[user.nick]
        return True

    def rename(self, user: ChatProtocol, nick: str) -> None:
        """
        Change the nickname of C{user}, who is in a room.

        @param user: the user.
        @param nick: the new nickname.
        """
        self.leave(user)
        user.nick = nick
        self.join(user)

    def broadcast(
        self, room: str, message: str, sender: ChatProtocol | None = None
    ) -> None:
        """
        Send a line to everyone in a room.

        @param room: the room's name.
        @param message: the line.
        @param sender: a user not to send it to (who said it), or L{None}.
        """
        for user in list(self.rooms.get(room, ())):
            if user is not sender:
                user.deliver(message)

    def nicks(self, room: str) -> list[str]:
        """
        @param room: the room's name.

        @return: the nicknames of the users in C{room}, sorted, each away
            user's followed by their away message.
        """
        return sorted(
            user.nick if user.away is None else f"{user.nick} (away: {user.away})"
            for user in self.rooms.get(room, ())
        )

    def nickInUse(self, nick: str) -> bool:
        """
        @param nick: a nickname.

        @return: whether a user in any room has that nickname.
        """
        return nick in self._nicks

    def guestNick(self) -> str:
        """
        @return: the next of C{guest1}, C{guest2}, ... that nobody uses
            (users restored from a previous process included).
        """
        while True:
            self._lastGuest += 1
            nick = f"guest{self._lastGuest}"
            if not self.nickInUse(nick):
                return nick


def makeFactory() -> ChatFactory:
    """
    Build the chat server (C{--app migrate.examples.chat2:makeFactory}).

    @return: a new L{ChatFactory} with no users.
    """
    return ChatFactory()
