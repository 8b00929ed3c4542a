"""
Tests for L{migrate._host._platform}: what a reactor and Twisted must have.
"""

from __future__ import annotations

from twisted.internet import reactor
from twisted.internet.interfaces import IReactorSocket, IReactorTime
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from .._host._platform import PlatformUnsupported, checkPlatform, missingCapabilities


class _Bare:
    """
    Provides nothing.
    """


class MissingCapabilitiesTests(SynchronousTestCase):
    """
    L{missingCapabilities} names what is missing, by capability.
    """

    def test_runningReactor(self) -> None:
        """
        The reactor the tests run on (each one the matrix runs: epoll,
        poll, select, asyncio) and this Twisted have everything.
        """
        self.assertEqual(missingCapabilities(reactor), [])

    def test_reactorInterfaces(self) -> None:
        """
        A reactor that does not provide an interface is named with what
        the interface is for.
        """
        self.assertEqual(
            missingCapabilities(
                MemoryReactorClock(),
                reactorNeeds=[
                    (IReactorSocket, "adopting"),
                    (IReactorTime, "timing"),
                ],
                twistedNeeds=[],
            ),
            [],
        )
        self.assertEqual(
            missingCapabilities(
                _Bare(), reactorNeeds=[(IReactorSocket, "adopting")], twistedNeeds=[]
            ),
            ["the reactor does not provide IReactorSocket (adopting)"],
        )

    def test_attributes(self) -> None:
        """
        A class or object of Twisted's without an attribute migrate reaches
        for is named with the attribute and what it is for.
        """
        present = _Bare()
        present.dataBuffer = b""  # type: ignore[attr-defined]
        self.assertEqual(
            missingCapabilities(
                reactor,
                reactorNeeds=[],
                twistedNeeds=[
                    (present, "dataBuffer", "output"),
                    (_Bare, "_buffer", "a half line"),
                    (present, "_tempDataLen", "output"),
                ],
            ),
            [
                "_Bare has no _buffer (a half line)",
                "_Bare has no _tempDataLen (output)",
            ],
        )

    def test_checkPlatform(self) -> None:
        """
        L{checkPlatform} accepts the running reactor and refuses a reactor
        without the interfaces, with a message that names Twisted's
        version, the reactor and what is supported.
        """
        checkPlatform(reactor)
        e = self.assertRaises(PlatformUnsupported, checkPlatform, _Bare())
        message = str(e)
        self.assertIn("_Bare", message)
        self.assertIn("IReactorSocket", message)
        self.assertIn("epoll, poll, select or asyncio", message)
