"""
Integration tests for the tutorial's promises: the demo chat, copied next
to the host as C{mychat}, upgraded to version 2 (L{migrate.examples.chat2})
while users are connected, then refused the way back.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.python.filepath import FilePath
from twisted.trial.unittest import TestCase

from migrate.examples import chat, chat2

from ._hostprocess import HostProcess, connectLineClient, freePort, writeModule

VERSION_1 = FilePath(chat.__file__).getContent().decode("utf-8")
VERSION_2 = FilePath(chat2.__file__).getContent().decode("utf-8")


class ChatVersion2Tests(TestCase):
    """
    The tutorial's "From version 1 to version 2", with real processes.
    """

    timeout = 120

    @inlineCallbacks
    def say(self, client: Any, text: str, *others: Any) -> Any:
        """
        Send a line from C{client}; fire with the next line C{client} and
        each of C{others} receives.
        """
        counts = [len(each.lines) for each in (client,) + others]
        client.sendLine(text.encode("utf-8"))
        replies = []
        for each, count in zip((client,) + others, counts):
            lines = yield each.waitForLines(count + 1)
            replies.append(lines[count].decode("utf-8"))
        return replies

    @inlineCallbacks
    def test_upgradeToVersion2AndRefuseTheWayBack(self) -> Any:
        """
        Capability transfer from version 1 to version 2 keeps both users
        with their nicknames, and version 2's C{/away} works on the moved
        connections; going back to version 1 is refused (version 1 cannot
        read version 2's state), rolls back, and the users go on with
        version 2.
        """
        port = freePort()
        host = HostProcess(
            self,
            [
                "--app",
                "mychat:makeFactory",
                "--listen",
                "tcp:{}:interface=127.0.0.1".format(port),
            ],
        )
        writeModule(host.workdir, "mychat", VERSION_1)
        yield host.start()
        users = []
        for nick in ["alice", "bob"]:
            client = yield connectLineClient(port)
            self.addCleanup(client.transport.loseConnection)
            yield client.waitForLines(1)
            users.append(client)
            reply = yield self.say(client, "/nick " + nick)
            self.assertEqual(reply, ["* You are now {}.".format(nick)])
        alice, bob = users

        writeModule(host.workdir, "mychat", VERSION_2)
        code, report, err = yield host.upgrade()
        self.assertEqual((code, report["outcome"], report["moved"]), (0, "success", 2))
        replies = yield self.say(alice, "/away lunch", bob)
        self.assertEqual(replies, ["* You are away: lunch", "* alice is away: lunch"])
        replies = yield self.say(bob, "/who")
        self.assertEqual(replies, ["* In lobby: alice (away: lunch), bob"])

        writeModule(host.workdir, "mychat", VERSION_1)
        code, report, err = yield host.upgrade()
        self.assertEqual((code, report["outcome"]), (1, "rolled-back"))
        self.assertIn("cannot read chat state version 2", report["reason"])
        replies = yield self.say(alice, "/away", bob)
        self.assertEqual(replies, ["* You are back.", "* alice is back"])
