"""
Integration tests for hosting an unmodified twistd plugin (C{twistd web})
under C{migrate-host}, with a real HTTP client through repeated upgrades.
"""

from __future__ import annotations

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool, readBody

from ._hostprocess import HostProcess, freePort, pidAlive, waitFor


class HostedWebTests(TestCase):
    """
    C{twistd migrate-host --strategy gradual web --listen ... --path ...}.
    """

    timeout = 120

    @inlineCallbacks
    def startWeb(self, *hostOptions: str, webListen: bool = True):
        self.port = freePort()
        pluginArguments = ["web", "--path", "."]
        if webListen:
            pluginArguments[1:1] = [
                "--listen",
                "tcp:{}:interface=127.0.0.1".format(self.port),
            ]
        self.host = HostProcess(self, list(hostOptions) + pluginArguments)
        self.host.workdir.child("index.html").setContent(b"served by migrate-host\n")
        status = yield self.host.start()
        return status

    def fetch(self, agent):
        d = agent.request(
            b"GET", "http://127.0.0.1:{}/index.html".format(self.port).encode("ascii")
        )
        d.addCallback(
            lambda response: readBody(response).addCallback(
                lambda body: (response.code, body)
            )
        )
        return d

    @inlineCallbacks
    def test_webThroughRepeatedUpgrades(self):
        """
        Requests on fresh and on keep-alive connections never fail while the
        plugin's listening port is handed on three times; the keep-alive
        connections stay on the old processes, which exit once they close.
        """
        status = yield self.startWeb("--strategy", "gradual")
        self.assertEqual(
            [each["key"] for each in status["listeners"]],
            ["tcp:{}:interface=127.0.0.1".format(self.port)],
        )
        pool = HTTPConnectionPool(reactor, persistent=True)
        pool.maxPersistentPerHost = 4
        keepAlive = Agent(reactor, pool=pool)
        fresh = Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False))
        failures: list[object] = []
        answered = [0]
        running = [True]

        @inlineCallbacks
        def load(agent):
            while running[0]:
                try:
                    code, body = yield self.fetch(agent)
                    if (code, body) != (200, b"served by migrate-host\n"):
                        failures.append((code, body))
                    answered[0] += 1
                except Exception as e:
                    failures.append(repr(e))

        loaders = [load(keepAlive), load(keepAlive), load(fresh), load(fresh)]
        oldPids = []
        for generation in range(3):
            before = answered[0]
            yield waitFor(lambda: answered[0] > before + 20, what="requests to flow")
            code, report, err = yield self.host.upgrade()
            self.assertEqual((code, report["outcome"]), (0, "success"), err)
            oldPids.append(report["oldPid"])
        before = answered[0]
        yield waitFor(
            lambda: answered[0] > before + 20, what="requests after the upgrades"
        )
        running[0] = False
        for each in loaders:
            yield each
        self.assertEqual(failures, [])
        yield pool.closeCachedConnections()
        for pid in oldPids:
            yield waitFor(
                lambda: not pidAlive(pid), what="old process {} to exit".format(pid)
            )
        status = yield self.host.status()
        self.assertEqual(status["generation"], 4)
        self.assertEqual(status["draining"], [])

    @inlineCallbacks
    def test_hostListenRedirectsThePluginsPort(self):
        """
        The host's C{--listen} replaces the port the plugin asks for.
        """
        self.port = freePort()
        self.host = HostProcess(
            self,
            [
                "--listen",
                "tcp:{}:interface=127.0.0.1".format(self.port),
                "web",
                "--path",
                ".",
            ],
        )
        self.host.workdir.child("index.html").setContent(b"served by migrate-host\n")
        status = yield self.host.start()
        self.assertEqual(
            [each["key"] for each in status["listeners"]],
            ["tcp:{}:interface=127.0.0.1".format(self.port)],
        )
        agent = Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False))
        code, body = yield self.fetch(agent)
        self.assertEqual(code, 200)
        code, report, err = yield self.host.upgrade()
        self.assertEqual((code, report["outcome"]), (0, "success"), err)
        code, body = yield self.fetch(agent)
        self.assertEqual(code, 200)

    @inlineCallbacks
    def test_appAndPluginExcludeEachOther(self):
        """
        Naming both an application and a plugin is a usage error before
        anything starts.
        """
        host = HostProcess(self, ["--app", "migrate.examples.echo:EchoFactory", "web"])
        with self.assertRaises(AssertionError) as raised:
            yield host.start()
        self.assertIn("exclude each other", str(raised.exception))
