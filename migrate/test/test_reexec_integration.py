"""
Integration tests for re-exec: a real C{twistd migrate-host} replaces its
own image with C{execv} and keeps its PID, its listening socket, its
control socket and its clients' connections.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import textwrap

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from migrate.strategies._reexec._outgoing import _ForkedCaretaker

from ._hostprocess import (
    HostFailed,
    LiveAppMixin,
    connectLineClient,
    fields,
    largestSendQueue,
    pidAlive,
    waitFor,
    writeModule,
)
from .test_capability_integration import MIGRATABLE_V1, MIGRATABLE_V2
from .test_gradual_integration import APP_V1, APP_V2

#: the migratable application, with execv failing while a file named
#: "fail-exec" exists in its working directory
FAILING_EXEC = MIGRATABLE_V1 + textwrap.dedent("""
    import errno
    _realExecve = os.execve

    def _execve(path, argv, env):
        if os.path.exists("fail-exec"):
            raise OSError(errno.E2BIG, "injected failure")
        _realExecve(path, argv, env)

    os.execve = _execve
    """)


#: version 1 that also reads version 2's state, to go back and forth
MIGRATABLE_V1_BACK = MIGRATABLE_V1.replace(
    'raise ValueError("cannot read version %r" % (fromVersion,))',
    'return {"count": state["total"]} if fromVersion == 2 else state',
)


def _descriptors(pid: int) -> dict[int, int]:
    """
    The open descriptors of process C{pid}, each with its open flags.
    """
    found = {}
    for name in os.listdir("/proc/{}/fd".format(pid)):
        try:
            with open("/proc/{}/fdinfo/{}".format(pid, name)) as info:
                for line in info:
                    if line.startswith("flags:"):
                        found[int(name)] = int(line.split()[1], 8)
        except FileNotFoundError:
            pass
    return found


_O_CLOEXEC = 0o2000000


#: the line a caretaker logs once it serves, naming itself
_CARETAKER_SERVES = re.compile(
    r"caretaker process (\d+) serves its connections meanwhile"
)


def _liveChildren(pid: int) -> list[int]:
    """
    The child processes of process C{pid} that have not exited.
    """
    try:
        with open("/proc/{0}/task/{0}/children".format(pid)) as f:
            children = [int(each) for each in f.read().split()]
    except OSError:
        return []
    live = []
    for child in children:
        try:
            with open("/proc/{}/stat".format(child), "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state not in (b"Z", b"X"):
            live.append(child)
    return live


def _caretakerOf(pid: int, output: str):
    """
    The caretaker child of host process C{pid}, if it has one now: a live
    child that the host's C{output} (its log, the caretaker's included)
    names as a caretaker serving.

    The caretaker says so itself, once it serves (after the old image's
    C{exec} succeeded).  A child's environment cannot tell it from the
    preflight process: a child being spawned shows its parent's
    environment (without C{MIGRATE_REEXEC_PREFLIGHT}), or none, until its
    own C{exec}; taking the preflight for the caretaker sent the old image
    work the test meant for the caretaker.
    """
    named = {int(each) for each in _CARETAKER_SERVES.findall(output)}
    for child in _liveChildren(pid):
        if child in named:
            return child
    return None


#: version 1 that answers "thread" from the reactor's thread pool, and
#: "wait" from a pool thread once the test creates the file "release"
THREADED_V1 = MIGRATABLE_V1.replace(
    '        if line.startswith(b"flood "):',
    '        if line == b"thread":\n'
    "            from twisted.internet.threads import deferToThread\n"
    "            deferToThread(os.getpid).addCallback(\n"
    '                lambda pid: self.sendLine(b"thread %d" % pid))\n'
    "            return\n"
    '        if line == b"wait":\n'
    "            from twisted.internet.threads import deferToThread\n"
    "            deferToThread(_released).addCallback(\n"
    '                lambda pid: self.sendLine(b"waited %d" % pid))\n'
    "            return\n"
    '        if line.startswith(b"flood "):',
).replace(
    "def makeFactory():",
    "def _released():\n"
    "    import time\n"
    '    open("waiting", "w").close()\n'
    "    for _ in range(6000):\n"
    '        if os.path.exists("release"):\n'
    "            return os.getpid()\n"
    "        time.sleep(0.01)\n"
    "    return -1\n"
    "\n"
    "def makeFactory():",
)

#: version 2 of L{THREADED_V1}, whose import in the new image (not in the
#: preflight child) waits until the test creates the file "go"
THREADED_V2_HELD = (
    "import os, time\n"
    "if 'MIGRATE_REEXEC_PREFLIGHT' not in os.environ:\n"
    "    for _ in range(6000):\n"
    "        if os.path.exists('go'):\n"
    "            break\n"
    "        time.sleep(0.01)\n"
) + THREADED_V1.replace('VERSION = b"v1"', 'VERSION = b"v2"')


class ReexecTests(LiveAppMixin, TestCase):
    """
    C{--strategy reexec} with real processes.
    """

    timeout = 240
    strategy = "reexec"
    initialApp = MIGRATABLE_V1

    @inlineCallbacks
    def upgradeTo(self, source: str):
        writeModule(self.host.workdir, "liveapp", source)
        result = yield self.host.upgrade()
        return result

    @inlineCallbacks
    def caretakerServing(self, pid: int):
        """
        Fire with the process id of host C{pid}'s caretaker once it
        serves (it said so in its log: see L{_caretakerOf}).
        """
        found: list[int] = []

        def serving() -> bool:
            caretaker = _caretakerOf(pid, self.host.output())
            if caretaker is not None:
                found.append(caretaker)
            return caretaker is not None

        yield waitFor(serving, timeout=60, what="the caretaker")
        return found[-1]

    def withHostOutput(self, failure: Failure) -> None:
        """
        Fail with C{failure}'s message and the end of the host's output
        (its log, the caretaker's included): what a timeout alone does not
        say.
        """
        raise HostFailed(
            "{}\n--- the host's output, last 6000 characters ---\n{}".format(
                failure.getErrorMessage(), self.host.output()[-6000:]
            )
        )

    @inlineCallbacks
    def threadedUpgrading(self):
        """
        Start L{THREADED_V1} (its thread pool started by a first answer),
        upgrade it to L{THREADED_V2_HELD}, and wait for the caretaker.

        @return: a L{Deferred} firing with the host's process id, the
            client, the upgrade's L{Deferred} and the caretaker's process
            id.
        """
        status = yield self.startHost(app=THREADED_V1)
        pid = status["pid"]
        (client,) = yield self.connectClients(1)
        self.assertEqual(
            (yield self.exchange(client, b"thread")), [b"thread", b"%d" % pid]
        )
        upgrading = self.upgradeTo(THREADED_V2_HELD)
        caretaker = yield self.caretakerServing(pid)
        return pid, client, upgrading, caretaker

    @inlineCallbacks
    def test_samePidConnectionsAndUpgradedState(self):
        """
        The process re-executes with the new code and keeps its PID: every
        client stays connected, now served by the new code, with its state
        upgraded from version 1 to 2; the generation goes up by one, the
        report is the host's last report, the pidfile still names it.
        """
        path = "/tmp/migrate-reexec-{}.sock".format(os.getpid())
        self.addCleanup(lambda: os.unlink(path) if os.path.exists(path) else None)
        status = yield self.startHost("--listen", "unix:" + path)
        pid = status["pid"]
        clients = yield self.connectClients(4)
        unixClient = yield connectLineClient(path=path)
        self.addCleanup(unixClient.transport.loseConnection)
        yield unixClient.waitForLines(1)
        clients.append(unixClient)
        for index, client in enumerate(clients):
            for n in range(index + 1):
                yield self.exchange(client, b"before")
        code, report, err = yield self.upgradeTo(MIGRATABLE_V2)
        self.assertEqual((code, report["outcome"]), (0, "success"), err)
        self.assertEqual((report["oldPid"], report["newPid"]), (pid, pid))
        self.assertEqual((report["fromGeneration"], report["toGeneration"]), (1, 2))
        self.assertEqual((report["moved"], report["failed"]), (5, 0))
        self.assertEqual(sorted(each["moved"] for each in report["listeners"]), [1, 4])
        for name in ("capture", "exec", "restore"):
            self.assertIn(name, report["durations"])
        for index, client in enumerate(clients):
            reply = yield self.exchange(client, b"after")
            self.assertEqual(
                reply, [b"v2", str(pid).encode(), b"after", b"%d" % (index + 2,)]
            )
            self.assertFalse(client.closed.called)
        status = yield self.host.status()
        self.assertEqual(
            (status["pid"], status["generation"], status["connections"]), (pid, 2, 5)
        )
        self.assertEqual(status["lastReport"]["fromGeneration"], 1)
        with open(self.host.pidfile) as f:
            self.assertEqual(int(f.read()), pid)
        newClient = yield connectLineClient(self.port)
        self.addCleanup(newClient.transport.loseConnection)
        hello = yield newClient.waitForLines(1)
        self.assertEqual(fields(hello[0]), [b"hello", b"v2", str(pid).encode()])

    @inlineCallbacks
    def test_halfLineCrossesTheExec(self):
        """
        The start of a line read by the old image and the rest sent to the
        new one make one line, answered once by the new code.
        """
        yield self.startHost()
        (client,) = yield self.connectClients(1)
        client.transport.write(b"first\nhal")
        yield client.waitForLines(2)
        code, report, err = yield self.upgradeTo(MIGRATABLE_V2)
        self.assertEqual(code, 0, err)
        reply = yield self.exchange(client, b"f")
        self.assertEqual(reply[0], b"v2")
        self.assertEqual(reply[2:], [b"half", b"2"])
        self.assertEqual(len(client.lines), 3)

    @inlineCallbacks
    def test_queuedOutputDelivered(self):
        """
        Output the old image had queued for a client that was not reading
        arrives whole, once, in order, before the new code's replies.
        """
        yield self.startHost()
        (client,) = yield self.connectClients(1)
        lines = 200000
        client.transport.pauseProducing()
        client.sendLine(b"flood %d" % (lines,))
        yield waitFor(
            lambda: largestSendQueue(self.port) > 100000, what="queued output"
        )
        code, report, err = yield self.upgradeTo(MIGRATABLE_V2)
        self.assertEqual((code, report["moved"]), (0, 1), err)
        client.transport.resumeProducing()
        yield client.waitForLines(1 + lines, timeout=60)
        reply = yield self.exchange(client, b"after")
        flood = client.lines[1 : 1 + lines]
        self.assertEqual(
            [line.split(b" ")[0] for line in flood], [b"f%d" % i for i in range(lines)]
        )
        self.assertEqual(reply[0], b"v2")
        self.assertEqual(len(client.lines), lines + 2)

    @inlineCallbacks
    def test_noByteLostUnderTraffic(self):
        """
        A client that keeps sending while the image is replaced gets exactly
        one reply per line, in order, counted without a gap: nothing is lost
        or duplicated in either direction.
        """
        yield self.startHost()
        (client,) = yield self.connectClients(1)
        (code, report, err), replies = yield self.pumpDuring(
            client, lambda: self.upgradeTo(MIGRATABLE_V2)
        )
        self.assertEqual(code, 0, err)
        self.assertEqual([int(r[3]) for r in replies], list(range(1, len(replies) + 1)))
        self.assertEqual({r[0] for r in replies[-1:]}, {b"v2"})
        self.assertGreater(len(replies), 20)

    @inlineCallbacks
    def pumpDuring(self, client, upgrade):
        """
        Send five lines every 2 ms until C{upgrade} (a function returning a
        L{Deferred}) has fired; fire with its result and every reply's
        fields, once each line has its reply.
        """
        sent = [0]
        upgrading = [True]

        def pump():
            if not upgrading[0] or client.closed.called:
                return
            for _ in range(5):
                sent[0] += 1
                client.sendLine(b"n%d" % (sent[0],))
            reactor.callLater(0.002, pump)

        before = len(client.lines)
        pump()
        try:
            result = yield upgrade()
        finally:
            upgrading[0] = False
        yield client.waitForLines(before + sent[0])
        replies = [fields(line) for line in client.lines[before:]]
        self.assertEqual(
            [r[2] for r in replies], [b"n%d" % i for i in range(1, sent[0] + 1)]
        )
        return result, replies

    @inlineCallbacks
    def closedCleanlyThenServed(self, clients, pid):
        """
        Every one of C{clients} was closed cleanly (no reset), and a new
        client is greeted by the new code in process C{pid}.
        """
        for client in clients:
            yield client.closed
            self.assertIsInstance(client.lostReason.value, ConnectionDone)
        newClient = yield connectLineClient(self.port)
        self.addCleanup(newClient.transport.loseConnection)
        hello = yield newClient.waitForLines(1)
        self.assertEqual(fields(hello[0]), [b"hello", b"v2", str(pid).encode()])

    @inlineCallbacks
    def test_caretakerServesWhileTheImageStarts(self):
        """
        While the new image starts (here slowly: its code takes a second to
        import), a child of the old image, the caretaker, goes on answering
        with the old code; then the new image answers, counting on.  No
        line is lost, duplicated or reordered, and the report shows the
        clients waited for the hand-over only, not for the exec.
        """
        status = yield self.startHost()
        pid = status["pid"]
        (client,) = yield self.connectClients(1)
        slow = "import time\ntime.sleep(1.0)\n" + MIGRATABLE_V2
        (code, report, err), replies = yield self.pumpDuring(
            client, lambda: self.upgradeTo(slow)
        )
        self.assertEqual(
            (code, report["outcome"], report["moved"]), (0, "success", 1), err
        )
        servers = [(r[0], r[1]) for r in replies]
        caretakers = {each for each in servers if each[1] != str(pid).encode()}
        self.assertEqual(len(caretakers), 1, servers[:3])
        ((version, caretaker),) = caretakers
        self.assertEqual(version, b"v1")
        # The caretaker answered between the old image and the new one.
        order = [
            each for i, each in enumerate(servers) if i == 0 or servers[i - 1] != each
        ]
        self.assertEqual(order[-2:], [(b"v1", caretaker), (b"v2", str(pid).encode())])
        self.assertEqual([int(r[3]) for r in replies], list(range(1, len(replies) + 1)))
        self.assertIn("handover", report["durations"])
        self.assertLess(report["durations"]["suspension"], report["durations"]["exec"])
        # The new image collects it once it has committed.
        yield waitFor(lambda: not pidAlive(int(caretaker)), what="the caretaker gone")

    @inlineCallbacks
    def test_caretakerLostBeforeHandOver(self):
        """
        If the caretaker dies before it hands over (killed here while the
        new image imports its code), the new image closes the connections
        it served cleanly, counts them as failed, says why, and serves new
        clients with the new code.
        """
        status = yield self.startHost()
        pid = status["pid"]
        clients = yield self.connectClients(2)
        slow = "import time\ntime.sleep(2.0)\n" + MIGRATABLE_V2
        killed = []

        def killCaretaker():
            found = _caretakerOf(pid, self.host.output())
            if found is not None:
                os.kill(found, signal.SIGKILL)
                killed.append(found)
                return True
            return False

        upgrading = self.upgradeTo(slow)
        yield waitFor(killCaretaker, timeout=60)
        code, report, err = yield upgrading
        self.assertEqual(
            (report["outcome"], report["moved"], report["failed"]),
            ("success", 0, 2),
            err,
        )
        self.assertTrue(
            any(
                "caretaker did not hand the connections over" in n
                for n in report["notes"]
            )
        )
        yield self.closedCleanlyThenServed(clients, pid)

    @inlineCallbacks
    def test_caretakerBesideTheKeeper(self):
        """
        The first process of a supervised service holds the keeper's socket
        name: its caretaker lets go of it at once, so that the new image
        binds it again; two re-execs in a row keep every client.
        """
        status = yield self.startHost("--keeper", "on")
        pid = status["pid"]
        self.assertEqual(status["keeper"]["mode"], "on")
        (client,) = yield self.connectClients(1)
        for version, count in ((MIGRATABLE_V2, 1), (MIGRATABLE_V2, 2)):
            code, report, err = yield self.upgradeTo(version)
            self.assertEqual(
                (code, report["outcome"], report["moved"]), (0, "success", 1), err
            )
            reply = yield self.exchange(client, b"x")
            self.assertEqual(reply, [b"v2", str(pid).encode(), b"x", b"%d" % count])

    @inlineCallbacks
    def test_caretakerNotAskedInTime(self):
        """
        A new image that does not ask for the connections within
        C{--ready-timeout} (here its code takes longer than that to import)
        finds them closed: the caretaker ended them politely, so their
        clients see a clean close and can come back to the new image,
        which counts them as failed and serves.
        """
        status = yield self.startHost("--ready-timeout", "3")
        pid = status["pid"]
        clients = yield self.connectClients(2)
        slow = (
            "import os, time\n"
            "if 'MIGRATE_REEXEC_PREFLIGHT' not in os.environ:\n"
            "    time.sleep(6.0)\n"
        ) + MIGRATABLE_V2
        code, report, err = yield self.upgradeTo(slow)
        self.assertEqual(
            (report["outcome"], report["moved"], report["failed"]),
            ("success", 0, 2),
            err,
        )
        yield self.closedCleanlyThenServed(clients, pid)

    @inlineCallbacks
    def test_caretakerBesideTheReactorThreadPool(self):
        """
        An application that uses the reactor's thread pool (idle when the
        exec comes) still gets a caretaker, which answers with a thread
        pool of its own; then the new image answers.
        """
        pid, client, upgrading, caretaker = yield self.threadedUpgrading()
        reply = yield self.exchange(client, b"thread")
        self.host.workdir.child("go").touch()
        code, report, err = yield upgrading
        self.assertEqual(
            (code, report["outcome"], report["moved"]), (0, "success", 1), err
        )
        self.assertFalse(
            [n for n in report["notes"] if "no caretaker" in n], report["notes"]
        )
        # The new image was still importing its code: the caretaker
        # answered, from a thread pool of its own (the old image's workers
        # are not in it).
        self.assertEqual(reply, [b"thread", b"%d" % caretaker])
        self.assertEqual(
            (yield self.exchange(client, b"thread")), [b"thread", b"%d" % pid]
        )
        self.assertEqual(
            (yield self.exchange(client, b"x"))[:3], [b"v2", b"%d" % pid, b"x"]
        )

    @inlineCallbacks
    def test_caretakerFinishesThreadWork(self):
        """
        Work a pool thread does for a client when the new image asks for
        the connections is finished, and its answer delivered, before the
        caretaker hands over: it is neither lost nor duplicated.
        """
        pid, client, upgrading, caretaker = yield self.threadedUpgrading()
        before = len(client.lines)
        client.sendLine(b"wait")
        yield waitFor(
            lambda: self.host.workdir.child("waiting").exists(),
            timeout=30,
            what="the caretaker's thread to start",
        )
        self.host.workdir.child("go").touch()
        yield waitFor(
            lambda: "caretaker waits up to" in self.host.output(),
            timeout=60,
            what="the caretaker to wait for the thread",
        ).addErrback(self.withHostOutput)
        self.host.workdir.child("release").touch()
        lines = yield client.waitForLines(before + 1)
        self.assertEqual(fields(lines[before]), [b"waited", b"%d" % caretaker])
        code, report, err = yield upgrading
        self.assertEqual(
            (code, report["outcome"], report["moved"]), (0, "success", 1), err
        )
        self.assertFalse(
            [n for n in report["notes"] if "in flight" in n], report["notes"]
        )
        self.assertEqual(
            (yield self.exchange(client, b"x"))[:3], [b"v2", b"%d" % pid, b"x"]
        )
        self.assertEqual(len(client.lines), before + 2)

    @inlineCallbacks
    def test_caretakerDocumentUnreadable(self):
        """
        A new image that cannot read the caretaker's document (here its
        code refuses it) tells the caretaker so: the caretaker closes the
        connections politely itself and exits, and the new image counts
        them as failed on their listener, says why, and serves new
        clients with the new code.
        """
        status = yield self.startHost()
        pid = status["pid"]
        clients = yield self.connectClients(2)
        refusing = MIGRATABLE_V2 + textwrap.dedent("""
            from migrate._codec import StateError
            from migrate.strategies._reexec import _incoming

            def _refuse(*args, **kwargs):
                raise StateError("injected: cannot read it")

            _incoming.afterCaretaker = _refuse
            """)
        code, report, err = yield self.upgradeTo(refusing)
        self.assertEqual(
            (report["outcome"], report["moved"], report["failed"]),
            ("success", 0, 2),
            err,
        )
        self.assertTrue(
            any(
                "injected: cannot read it" in n and "politely by the caretaker" in n
                for n in report["notes"]
            ),
            report["notes"],
        )
        yield self.closedCleanlyThenServed(clients, pid)
        yield waitFor(
            lambda: _caretakerOf(pid, self.host.output()) is None,
            what="the caretaker gone",
        )

    @inlineCallbacks
    def test_downgradeWithoutCaretaker(self):
        """
        New code that does not say it speaks the caretaker's protocol (as
        an older migrate would not) gets no caretaker: every client waits
        for the whole exec, and is carried over; the report says why.
        """
        status = yield self.startHost()
        pid = status["pid"]
        (client,) = yield self.connectClients(1)
        older = MIGRATABLE_V2 + textwrap.dedent("""
            from migrate.strategies._reexec import _incoming

            _incoming.newImageSpeaks = lambda: {}
            """)
        (code, report, err), replies = yield self.pumpDuring(
            client, lambda: self.upgradeTo(older)
        )
        self.assertEqual(
            (code, report["outcome"], report["moved"]), (0, "success", 1), err
        )
        self.assertEqual({r[1] for r in replies}, {str(pid).encode()})
        self.assertTrue(
            any(
                "no caretaker served" in n and "older migrate" in n
                for n in report["notes"]
            ),
            report["notes"],
        )

    @inlineCallbacks
    def test_withoutCaretaker(self):
        """
        With C{--reexec-caretaker none} every client waits for the whole
        exec: no reply comes from any process but the host's.
        """
        status = yield self.startHost("--reexec-caretaker", "none")
        pid = status["pid"]
        (client,) = yield self.connectClients(1)
        (code, report, err), replies = yield self.pumpDuring(
            client, lambda: self.upgradeTo(MIGRATABLE_V2)
        )
        self.assertEqual(
            (code, report["outcome"], report["moved"]), (0, "success", 1), err
        )
        self.assertEqual({r[1] for r in replies}, {str(pid).encode()})
        self.assertNotIn("handover", report["durations"])

    @inlineCallbacks
    def test_execvFailureRollsBack(self):
        """
        When execv itself fails, the old image resumes everything as if
        nothing had happened and reports a rollback: same code, same
        generation, every client served, no descriptor left over.  The next
        attempt works.
        """
        status = yield self.startHost(app=FAILING_EXEC)
        pid = status["pid"]
        clients = yield self.connectClients(3)
        for client in clients:
            yield self.exchange(client, b"a")
        before = _descriptors(pid)
        self.host.workdir.child("fail-exec").setContent(b"")
        code, report, err = yield self.upgradeTo(MIGRATABLE_V2)
        self.assertNotEqual(code, 0)
        self.assertEqual(report["outcome"], "rolled-back")
        self.assertIn("execv failed", report["reason"])
        self.assertIn("injected failure", report["reason"])
        for client in clients:
            reply = yield self.exchange(client, b"b")
            self.assertEqual(reply, [b"v1", str(pid).encode(), b"b", b"2"])
            self.assertFalse(client.closed.called)
        status = yield self.host.status()
        self.assertEqual((status["pid"], status["generation"]), (pid, 1))
        after = _descriptors(pid)
        self.assertEqual(_liveChildren(pid), [])
        self.assertEqual(sorted(after), sorted(before))
        self.assertEqual(
            [fd for fd, flags in after.items() if fd > 2 and not flags & _O_CLOEXEC], []
        )
        self.host.workdir.child("fail-exec").remove()
        code, report, err = yield self.host.upgrade()
        self.assertEqual(
            (code, report["outcome"], report["moved"]), (0, "success", 3), err
        )
        for client in clients:
            reply = yield self.exchange(client, b"c")
            self.assertEqual(reply, [b"v2", str(pid).encode(), b"c", b"3"])

    @inlineCallbacks
    def test_brokenNewCodeRefused(self):
        """
        New code that does not even import is found out before the exec:
        the migration is refused and the old image serves on untouched.
        """
        status = yield self.startHost()
        pid = status["pid"]
        (client,) = yield self.connectClients(1)
        code, report, err = yield self.upgradeTo(
            MIGRATABLE_V2 + "\nthis is not Python\n"
        )
        self.assertNotEqual(code, 0)
        self.assertEqual(report["outcome"], "refused")
        self.assertIn("does not start", report["reason"])
        reply = yield self.exchange(client, b"still")
        self.assertEqual(reply, [b"v1", str(pid).encode(), b"still", b"1"])
        status = yield self.host.status()
        self.assertEqual((status["generation"], status["phase"]), (1, "idle"))

    @inlineCallbacks
    def test_unopenableLogFileRefused(self):
        """
        A log file the new image could not open (a directory stands where
        it was) refuses the re-exec before anything is touched: twistd
        would have exited in the new image before restoring a connection.
        Once the file can be opened again, the re-exec goes ahead.
        """
        status = yield self.startHost(twistdArguments=["--logfile", "host.log"])
        pid = status["pid"]
        (client,) = yield self.connectClients(1)
        log = self.host.workdir.child("host.log").path
        os.rename(log, log + ".1")
        os.mkdir(log)
        code, report, err = yield self.upgradeTo(MIGRATABLE_V2)
        self.assertEqual((code, report["outcome"]), (1, "refused"), err)
        self.assertIn("could not open its log file host.log", report["reason"])
        reply = yield self.exchange(client, b"still")
        self.assertEqual(reply, [b"v1", str(pid).encode(), b"still", b"1"])
        os.rmdir(log)
        code, report, err = yield self.upgradeTo(MIGRATABLE_V2)
        self.assertEqual((code, report["outcome"]), (0, "success"), err)
        self.assertEqual(report["newPid"], pid)
        reply = yield self.exchange(client, b"after")
        self.assertEqual(reply, [b"v2", str(pid).encode(), b"after", b"2"])

    @inlineCallbacks
    def test_unserialisableStateRefused(self):
        """
        A migratable protocol whose state is not plain data refuses the
        re-exec before anything is touched.
        """
        app = MIGRATABLE_V1.replace(
            'return {"count": self.count}', 'return {"count": object()}'
        )
        status = yield self.startHost(app=app)
        (client,) = yield self.connectClients(1)
        code, report, err = yield self.upgradeTo(app)
        self.assertNotEqual(code, 0)
        self.assertEqual(report["outcome"], "refused")
        self.assertIn("cannot be carried over", report["reason"])
        reply = yield self.exchange(client, b"x")
        self.assertEqual(reply[:2], [b"v1", str(status["pid"]).encode()])

    @inlineCallbacks
    def test_unmovableClosedCleanly(self):
        """
        With the default policy a connection whose protocol is not
        migratable is closed cleanly before the exec (no reset) and counted
        as failed; new connections reach the new code in the same process.
        """
        status = yield self.startHost(app=APP_V1)
        pid = status["pid"]
        (client,) = yield self.connectClients(1)
        lost: Deferred = Deferred()
        original = client.connectionLost

        def connectionLost(reason):
            lost.callback([reason])
            original(reason)

        client.connectionLost = connectionLost
        code, report, err = yield self.upgradeTo(APP_V2)
        self.assertEqual((code, report["moved"], report["failed"]), (0, 0, 1), err)
        (reason,) = yield lost
        self.assertTrue(reason.check(ConnectionDone), reason)
        new = yield connectLineClient(self.port)
        self.addCleanup(new.transport.loseConnection)
        hello = yield new.waitForLines(1)
        self.assertEqual(fields(hello[0]), [b"hello", b"v2", str(pid).encode()])

    @inlineCallbacks
    def test_unmovableAdopted(self):
        """
        With C{--reexec-unmovable adopt} such a connection is handed to a
        fresh protocol of the new code (told connectionMade), and a half
        line it had sent is not lost.
        """
        status = yield self.startHost("--reexec-unmovable", "adopt", app=APP_V1)
        pid = status["pid"]
        (client,) = yield self.connectClients(1)
        yield self.exchange(client, b"one")
        client.transport.write(b"tw")
        code, report, err = yield self.upgradeTo(APP_V2)
        self.assertEqual((code, report["moved"], report["failed"]), (0, 1, 0), err)
        lines = yield client.waitForLines(3)
        self.assertEqual(fields(lines[2]), [b"hello", b"v2", str(pid).encode()])
        reply = yield self.exchange(client, b"o")
        self.assertEqual(reply, [b"v2", str(pid).encode(), b"two", b"1"])
        self.assertFalse(client.closed.called)

    @inlineCallbacks
    def test_repeatedReexecsLeakNothing(self):
        """
        Ten re-execs in a row (by the control channel and by SIGHUP) leave
        the process with the very same descriptors, none of them (but the
        standard streams) inheritable.
        """
        status = yield self.startHost()
        pid = status["pid"]
        clients = yield self.connectClients(3)
        before = _descriptors(pid)
        self.assertEqual(
            [fd for fd, flags in before.items() if fd > 2 and not flags & _O_CLOEXEC],
            [],
        )
        for attempt in range(10):
            source = (MIGRATABLE_V1_BACK, MIGRATABLE_V2)[attempt % 2 == 0]
            if attempt % 3 == 2:
                writeModule(self.host.workdir, "liveapp", source)
                os.kill(pid, signal.SIGHUP)
                yield waitFor(
                    lambda: self._generationIs(attempt + 2),
                    what="generation {}".format(attempt + 2),
                )
            else:
                code, report, err = yield self.upgradeTo(source)
                self.assertEqual((code, report["moved"]), (0, 3), err)
            after = _descriptors(pid)
            self.assertEqual(len(after), len(before), (attempt, before, after))
            self.assertEqual(
                [
                    fd
                    for fd, flags in after.items()
                    if fd > 2 and not flags & _O_CLOEXEC
                ],
                [],
            )
        status = yield self.host.status()
        self.assertEqual((status["pid"], status["generation"]), (pid, 11))
        self.assertTrue(pidAlive(pid))
        for client in clients:
            reply = yield self.exchange(client, b"end")
            self.assertEqual(reply[1], str(pid).encode())
            self.assertFalse(client.closed.called)

    @inlineCallbacks
    def _generationIs(self, generation):
        try:
            status = yield self.host.status()
        except AssertionError:
            return False
        return status["generation"] == generation and status["phase"] == "idle"


class ForkedCaretakerProcessTests(SynchronousTestCase):
    """
    L{_ForkedCaretaker} with a real fork (of the test process: the child
    only answers on its channel and exits, within a bounded wait).
    """

    def _forked(self, exec: bool) -> tuple[_ForkedCaretaker, socket.socket]:
        """
        Fork a real caretaker: once it serves it says so on its channel,
        with whether it let go of what the new image binds again, and
        exits.
        """
        caretaker = _ForkedCaretaker.prepare()
        released: list[bool] = []
        listening = caretaker.theirs.dup()
        self.addCleanup(listening.close)
        listening.settimeout(30)
        if caretaker.fork(os.fork, lambda: released.append(True)):
            try:
                caretaker.ours.sendall(b"served %d" % len(released))
            finally:
                os._exit(0)
        self.addCleanup(self._collect, caretaker.pid)
        if exec:
            # What a successful execv does: the close-on-exec end closes
            # without a word.
            os.close(caretaker._verdict)
            caretaker.ours.close()
            caretaker.theirs.close()
        return caretaker, listening

    def _collect(self, pid: int) -> None:
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass

    def test_servesOnceExecuted(self) -> None:
        """
        Once the parent's end of the pipe closes without a word (the exec
        succeeded), the child returns C{True}, having let go of what the
        new image binds again: it serves.
        """
        caretaker, listening = self._forked(exec=True)
        self.assertEqual(listening.recv(20), b"served 1")
        pid, status = os.waitpid(caretaker.pid, 0)
        self.assertEqual(os.waitstatus_to_exitcode(status), 0)

    def test_abandoned(self) -> None:
        """
        A caretaker abandoned (the exec failed) exits without serving.
        """
        caretaker, listening = self._forked(exec=False)
        caretaker.abandon()
        self.assertEqual(listening.recv(20), b"")
