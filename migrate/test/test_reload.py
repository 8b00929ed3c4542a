"""
Tests for module reload (L{migrate.strategies.reload} and
L{migrate.strategies._reload._modules}): a host on a memory reactor, connections on
L{StringTransport}s, and application modules written to a temporary
directory on C{sys.path}.
"""

from __future__ import annotations

import gc
import importlib
import importlib.machinery
import itertools
import os
import py_compile
import sys
import textwrap
import weakref
from types import ModuleType
from typing import Any

from attrs import evolve
from twisted.internet.address import IPv4Address
from twisted.internet.defer import succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase

from .. import tap
from .._handoff._threadwork import THREAD_WORK_POLL
from .._handoff._trial import TrialOutcome
from .._host._metrics import HostMetrics
from .._host._service import MigrationHost
from .._report import MigrationPhase
from ..strategies import ModuleReload, strategyNamed, strategyNames
from ..strategies._reload._attempt import PRECOPY_SLICE_SECONDS, ReloadAttempt
from ..strategies._reload._modules import (
    DetachedTransport,
    Fingerprint,
    HeldTransport,
    ModuleFingerprints,
    ModuleStaging,
    ReloadFailed,
    classSwapProblem,
    counterpart,
    findApplicationModules,
    importedModules,
    modulesToReload,
)
from ..strategies.reload import NoIncomingHalf
from ._fakes import HostReactor, RecordingPort, ThreadedFakeReactor
from .test_host import MigrationStrategyContractMixin

_serial = itertools.count()

#: a protocol that does not provide IMigratable; its replies say which code
#: answered, and count the lines of the connection
PLAIN = """
from twisted.internet.protocol import Factory
from twisted.protocols.basic import LineReceiver

VERSION = b"v1"


class Counter(LineReceiver):
    delimiter = b"\\n"

    def connectionMade(self):
        self.count = 0

    def lineReceived(self, line):
        self.count += 1
        self.sendLine(VERSION + b" " + line + b" %d" % (self.count,))


def makeFactory():
    return Factory.forProtocol(Counter)
"""

#: a migratable protocol, version 1 of its state: {"count": N}
MIGRATABLE = """
from zope.interface import implementer
from twisted.internet.protocol import Factory
from twisted.protocols.basic import LineReceiver
from migrate.interfaces import IMigratable

VERSION = b"v1"


@implementer(IMigratable)
class Counter(LineReceiver):
    delimiter = b"\\n"
    migrationVersion = 1

    def connectionMade(self):
        self.count = 0

    def lineReceived(self, line):
        self.count += 1
        self.sendLine(VERSION + b" " + line + b" %d" % (self.count,))

    def getMigrationState(self):
        return {"count": self.count}

    def restoreMigrationState(self, state):
        self.count = state["count"]

    def upgradeMigrationState(self, fromVersion, state):
        raise ValueError("cannot read version %r" % (fromVersion,))


class CountingFactory(Factory):
    protocol = Counter
    started = 0
    stopped = 0

    def startFactory(self):
        type(self).started += 1

    def stopFactory(self):
        type(self).stopped += 1


def makeFactory():
    return CountingFactory()
"""


def _versionTwo(source: str) -> str:
    """
    The version 2 of a source derived from L{MIGRATABLE}: the state's
    field renamed, and its restore writes C{restored N}.
    """
    return (
        source.replace('VERSION = b"v1"', 'VERSION = b"v2"')
        .replace("migrationVersion = 1", "migrationVersion = 2")
        .replace('return {"count": self.count}', 'return {"total": self.count}')
        .replace(
            'self.count = state["count"]',
            'self.count = state["total"]\n'
            '        self.sendLine(b"restored %d" % (self.count,))',
        )
        .replace(
            'raise ValueError("cannot read version %r" % (fromVersion,))',
            'return {"total": state["count"]} if fromVersion == 1 else state',
        )
    )


#: version 2 renames the state's field, and says hello when restored
MIGRATABLE_V2 = _versionTwo(MIGRATABLE)


class AppDirectory:
    """
    A directory on C{sys.path} holding application modules with names
    unique to one test, all forgotten (and the directory taken off
    C{sys.path}) when the test ends.
    """

    def __init__(self, testCase: SynchronousTestCase) -> None:
        self.path = FilePath(testCase.mktemp())
        self.path.makedirs()
        self.prefix = "rlapp{}x{}".format(os.getpid(), next(_serial))
        sys.path.insert(0, self.path.path)
        testCase.addCleanup(self.forget)

    def name(self, suffix: str = "") -> str:
        return self.prefix + suffix

    def write(self, name: str, source: str, *, package: bool = False) -> FilePath:
        parts = name.split(".")
        where = self.path
        for part in parts[:-1]:
            where = where.child(part)
            if not where.exists():
                where.makedirs()
                where.child("__init__.py").setContent(b"")
        if package:
            where = where.child(parts[-1])
            if not where.exists():
                where.makedirs()
            target = where.child("__init__.py")
        else:
            target = where.child(parts[-1] + ".py")
        target.setContent(textwrap.dedent(source).encode("utf-8"))
        return target

    def forget(self) -> None:
        if self.path.path in sys.path:
            sys.path.remove(self.path.path)
        for name in [n for n in sys.modules if n.split(".")[0].startswith(self.prefix)]:
            del sys.modules[name]
        importlib.invalidate_caches()


def originOf(name: str) -> str:
    """
    The source file of the loaded module C{name}.
    """
    spec = sys.modules[name].__spec__
    assert spec is not None and spec.origin is not None
    return spec.origin


def snapshotModules() -> dict[str, Any]:
    return dict(sys.modules)


class ModulesUnchangedMixin:
    def assertModulesAre(self, snapshot: dict[str, Any]) -> None:
        """
        C{sys.modules} holds exactly the objects of C{snapshot}.
        """
        current = dict(sys.modules)
        self.assertEqual(sorted(set(current) ^ set(snapshot)), [])  # type: ignore[attr-defined]
        changed = [name for name in current if current[name] is not snapshot[name]]
        self.assertEqual(changed, [])  # type: ignore[attr-defined]


class Live:
    """
    A host serving an application module from an L{AppDirectory}, with
    connections on L{StringTransport}s.
    """

    def __init__(
        self,
        testCase: SynchronousTestCase,
        source: str,
        *,
        listen: tuple[str, ...] = ("tcp:8000",),
        reloadModules: tuple[str, ...] = (),
        package: bool = False,
        extra: dict[str, str] | None = None,
        trial: Any = None,
        sliceSizes: tuple[int, int] | None = None,
        reactor: Any = None,
    ) -> None:
        """
        @param source: the application module's source (C{PREFIX} stands
            for the test's unique module name prefix).
        @param package: whether the application module is C{PREFIX.server}
            (in a package) rather than C{PREFIX}.
        @param extra: other modules to write first, by name (C{PREFIX}
            expanded).
        @param reactor: the host's reactor; by default a memory reactor
            with no threads.
        """
        self.testCase = testCase
        self.app = AppDirectory(testCase)
        self.module = self.app.name(".server" if package else "")
        for name, text in (extra or {}).items():
            self.write(name, text)
        self.change(source)
        self.fingerprints = ModuleFingerprints()
        if sliceSizes is None:
            self.strategy = ModuleReload(fingerprints=self.fingerprints, trial=trial)
        else:
            self.strategy = ModuleReload(
                fingerprints=self.fingerprints, trial=trial, sliceSizes=sliceSizes
            )
        factory = importlib.import_module(self.module).makeFactory()
        self.host = MigrationHost(
            _NoReactor() if reactor is None else reactor,
            factory,
            listen,
            self.strategy,
            controlPath=None,
            installSignalHandlers=False,
            applicationSpec=self.module + ":makeFactory",
            reloadModules=[self.expand(name) for name in reloadModules],
        )
        self.progress: list[str] = []
        self._peers = itertools.count(40000)

    def connect(self, key: str | None = None) -> tuple[Any, StringTransport]:
        listener = self.host.listeners[key or next(iter(self.host.listeners))]
        hosted = listener.factory.buildProtocol(
            IPv4Address("TCP", "10.0.0.1", next(self._peers))
        )
        assert hosted is not None
        transport = StringTransport()
        hosted.makeConnection(transport)
        return hosted, transport

    def expand(self, text: str) -> str:
        return text.replace("PREFIX", self.app.prefix)

    def write(self, name: str, source: str) -> None:
        self.app.write(self.expand(name), self.expand(source))

    def change(self, source: str) -> None:
        self.write(self.module, source)

    def reload(self) -> Any:
        report = self.testCase.successResultOf(
            self.strategy.migrate(self.host, self.progress.append)
        )
        return report

    def upgrade(self) -> dict[str, Any]:
        return self.testCase.successResultOf(
            self.host.requestUpgrade(None, self.progress.append)
        )


class _NoReactor(HostReactor):
    """
    The host's reactor: module reload uses only its clock, which times the
    phases (a memory reactor, which a host accepts as it starts).
    """

    def stop(self) -> None:
        raise AssertionError("the host stopped its reactor")


def exchange(hosted: Any, transport: StringTransport, line: bytes) -> bytes:
    transport.clear()
    hosted.dataReceived(line + b"\n")
    value: bytes = transport.value()
    return value


class ModuleReloadContractTests(MigrationStrategyContractMixin, SynchronousTestCase):
    """
    L{ModuleReload} keeps the L{IMigrationStrategy} contract.
    """

    def makeStrategy(self) -> ModuleReload:
        return ModuleReload(fingerprints=ModuleFingerprints())

    def test_inheritReturnsDeferred(self) -> None:
        """
        C{inherit} returns a L{Deferred}, which fails: there is no incoming
        half to a reload within one process.
        """
        strategy = self.makeStrategy()
        host: Any = None
        self.failureResultOf(strategy.inherit(host, None), NoIncomingHalf)

    def test_registered(self) -> None:
        """
        The strategy is available as C{reload}.
        """
        self.assertIn("reload", strategyNames())
        self.assertIsInstance(strategyNamed("reload"), ModuleReload)


class OptionsTests(SynchronousTestCase):
    """
    C{--reload-module} in L{tap.Options}.
    """

    def test_repeatable(self) -> None:
        """
        Each C{--reload-module} adds a module, once, and L{tap.buildHost}
        gives the list to the host.
        """
        options = tap.Options()
        options.parseOptions(
            [
                "--listen",
                "tcp:0",
                "--strategy",
                "reload",
                "--reload-module",
                "app.core",
                "--reload-module",
                "helpers",
                "--reload-module",
                "app.core",
            ]
        )
        self.assertEqual(options["reload-modules"], ["app.core", "helpers"])
        host = tap.buildHost(_NoReactor(), options)
        self.assertEqual(host.settings.reloadModules, ("app.core", "helpers"))
        self.assertEqual(host.strategy.name, "reload")

    def test_default(self) -> None:
        """
        Without the option the list is empty (the C{--app} package).
        """
        options = tap.Options()
        options.parseOptions(["--listen", "tcp:0"])
        self.assertEqual(options["reload-modules"], [])

    def test_notAModuleName(self) -> None:
        """
        Something that is not a dotted module name is a usage error.
        """
        for bad in ["", "app/core.py", "app..core", "1app"]:
            self.assertRaises(
                usage.UsageError,
                tap.Options().parseOptions,
                ["--reload-module", bad],
            )


class ApplicationModulesTests(SynchronousTestCase):
    """
    L{findApplicationModules} names the application's modules and what
    cannot be reloaded.
    """

    def setUp(self) -> None:
        self.app = AppDirectory(self)

    def test_packageOfTheEntryModule(self) -> None:
        """
        By default the application is the package of the C{--app} module:
        the package and all its loaded submodules, in the order their
        imports completed (a module after those it imports).
        """
        pkg = self.app.name()
        self.app.write(pkg, "", package=True)
        self.app.write(pkg + ".util", "X = 1")
        self.app.write(pkg + ".server", "from . import util")
        importlib.import_module(pkg + ".server")
        found = findApplicationModules(pkg + ".server")
        self.assertEqual(found.loaded, (pkg, pkg + ".util", pkg + ".server"))
        self.assertEqual(found.refused, ())
        self.assertTrue(found.contains(pkg + ".notYetLoaded"))
        self.assertFalse(found.contains("json"))

    def test_topLevelModule(self) -> None:
        """
        A top-level C{--app} module is the application by itself.
        """
        name = self.app.name()
        self.app.write(name, "X = 1")
        self.app.write(name + "other", "Y = 1")
        importlib.import_module(name)
        importlib.import_module(name + "other")
        found = findApplicationModules(name)
        self.assertEqual(found.loaded, (name,))

    def test_explicit(self) -> None:
        """
        C{--reload-module} names replace the package; the entry module is
        always included.
        """
        pkg = self.app.name()
        self.app.write(pkg, "", package=True)
        self.app.write(pkg + ".server", "")
        self.app.write(pkg + ".util", "")
        self.app.write(pkg + "helpers", "")
        for name in [pkg + ".server", pkg + ".util", pkg + "helpers"]:
            importlib.import_module(name)
        found = findApplicationModules(pkg + ".server", [pkg + "helpers"])
        self.assertEqual(set(found.loaded), {pkg + ".server", pkg + "helpers"})

    def test_hostModulesRefused(self) -> None:
        """
        Twisted, migrate (but its examples), the libraries the host runs on
        and the standard library are refused, each with the reason.
        """
        importlib.import_module("migrate.examples.chat")
        found = findApplicationModules(
            None,
            [
                "twisted.web",
                "migrate.state",
                "zope.interface",
                "json",
                "migrate.examples",
                "notLoadedAnywhere",
            ],
        )
        refused = dict(found.refused)
        self.assertIn("Twisted", refused["twisted.web"])
        self.assertIn("migrate", refused["migrate.state"])
        self.assertIn("zope", refused["zope.interface"])
        self.assertIn("standard library", refused["json"])
        self.assertIn("not loaded", refused["notLoadedAnywhere"])
        self.assertNotIn("migrate.examples", refused)
        self.assertIn("migrate.examples.chat", found.loaded)
        self.assertNotIn("migrate.state", found.loaded)

    def test_extensionRefused(self) -> None:
        """
        A C extension in the application is named, not reloaded.
        """
        name = self.app.name()
        modules = {
            name: _moduleWithLoader(name, None, package=True),
            name
            + "._speedups": _moduleWithLoader(
                name + "._speedups",
                importlib.machinery.ExtensionFileLoader(name, "/x/_speedups.so"),
            ),
            name
            + ".compiled": _moduleWithLoader(
                name + ".compiled",
                importlib.machinery.SourcelessFileLoader(name, "/x/compiled.pyc"),
            ),
        }
        found = findApplicationModules(name + ".server", (), modules)
        refused = dict(found.refused)
        self.assertIn("C extension", refused[name + "._speedups"])
        self.assertIn("bytecode", refused[name + ".compiled"])
        self.assertEqual(found.loaded, ())


def _moduleWithLoader(name: str, loader: Any, package: bool = False) -> ModuleType:
    module = ModuleType(name)
    origin = getattr(loader, "path", None)
    module.__spec__ = importlib.machinery.ModuleSpec(
        name, loader, origin=origin, is_package=package
    )
    return module


class ChangeDetectionTests(SynchronousTestCase):
    """
    L{modulesToReload} picks modules by the content of their source.
    """

    def setUp(self) -> None:
        self.app = AppDirectory(self)
        self.pkg = self.app.name()
        self.app.write(self.pkg, "", package=True)
        self.app.write(self.pkg + ".base", "class Base:\n    pass\n")
        self.app.write(self.pkg + ".user", "from .base import Base\n")
        self.app.write(self.pkg + ".alone", "X = 1\n")
        self.app.write(self.pkg + ".server", "from . import user, alone\n")
        importlib.import_module(self.pkg + ".server")
        self.fingerprints = ModuleFingerprints()

    def loaded(self) -> Any:
        return findApplicationModules(self.pkg + ".server")

    def remember(self) -> None:
        for name in self.loaded().loaded:
            self.fingerprints.record(
                sys.modules[name], Fingerprint.ofFile(originOf(name))
            )

    def test_unknownReloaded(self) -> None:
        """
        Modules whose source this process has no record of are reloaded.
        """
        names, changed, unknown = modulesToReload(self.loaded(), self.fingerprints)
        self.assertEqual(set(names), set(self.loaded().loaded))
        self.assertEqual(changed, [])
        self.assertEqual(unknown, names)

    def test_nothingChanged(self) -> None:
        """
        Modules whose source is as recorded are not reloaded.
        """
        self.remember()
        self.assertEqual(
            modulesToReload(self.loaded(), self.fingerprints), ([], [], [])
        )

    def test_changedAndDependents(self) -> None:
        """
        A changed module is reloaded with the modules that import from it,
        and theirs, but not the others.
        """
        self.remember()
        self.app.write(self.pkg + ".base", "class Base:\n    x = 2\n")
        names, changed, unknown = modulesToReload(self.loaded(), self.fingerprints)
        self.assertEqual(changed, [self.pkg + ".base"])
        self.assertEqual(
            set(names), {self.pkg + ".base", self.pkg + ".user", self.pkg + ".server"}
        )
        self.assertEqual(unknown, [])

    def test_sameSizeSameTime(self) -> None:
        """
        A file rewritten with the same size and modification time is still
        seen to have changed.
        """
        self.remember()
        path = originOf(self.pkg + ".alone")
        before = os.stat(path)
        with open(path, "wb") as f:
            f.write(b"X = 2\n")
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
        self.assertEqual(os.stat(path).st_size, before.st_size)
        names, changed, unknown = modulesToReload(self.loaded(), self.fingerprints)
        self.assertEqual(changed, [self.pkg + ".alone"])

    def test_replacedModuleUnknown(self) -> None:
        """
        A module replaced by anything else since it was recorded is no
        longer known.
        """
        self.remember()
        name = self.pkg + ".alone"
        old = sys.modules[name]
        sys.modules[name] = ModuleType(name)
        sys.modules[name].__spec__ = old.__spec__
        self.assertIsNone(self.fingerprints.fingerprintOf(sys.modules[name]))


class ImportedModulesTests(SynchronousTestCase):
    """
    L{importedModules} reads what a module's source imports.
    """

    def test_absoluteAndRelative(self) -> None:
        """
        Absolute imports, relative ones resolved against the package, and
        the names imported from a module (which may be submodules).
        """
        source = textwrap.dedent("""
            import os.path, json as j
            from . import sibling
            from .sub import THING
            from .. import up
            def later():
                from pkg.deep import x
            """).encode()
        self.assertEqual(
            importedModules(source, "pkg.mod.leaf", isPackage=False),
            {
                "os.path",
                "json",
                "pkg.mod",
                "pkg.mod.sibling",
                "pkg.mod.sub",
                "pkg.mod.sub.THING",
                "pkg",
                "pkg.up",
                "pkg.deep",
                "pkg.deep.x",
            },
        )
        self.assertIn(
            "pkg.mod.sibling",
            importedModules(b"from . import sibling", "pkg.mod", isPackage=True),
        )

    def test_unparsable(self) -> None:
        """
        Source that does not parse imports nothing (it is reloaded only if
        it changed, and then fails to import).
        """
        self.assertEqual(
            importedModules(b"import (", "m", isPackage=False), frozenset()
        )


class StagingTests(ModulesUnchangedMixin, SynchronousTestCase):
    """
    L{ModuleStaging} imports new code under the modules' names and puts
    everything back on failure.
    """

    def setUp(self) -> None:
        self.app = AppDirectory(self)
        self.pkg = self.app.name()
        self.app.write(self.pkg, "from . import helper\n", package=True)
        self.app.write(self.pkg + ".helper", "VALUE = 1\n")
        self.app.write(self.pkg + ".server", "from .helper import VALUE\n")
        importlib.import_module(self.pkg + ".server")

    def staging(self) -> ModuleStaging:
        app = findApplicationModules(self.pkg + ".server")
        return ModuleStaging(app, list(app.loaded))

    def test_stagesNewCode(self) -> None:
        """
        The new modules are in C{sys.modules} under their names, and import
        each other's new code whatever order they are listed in.
        """
        old = sys.modules[self.pkg + ".server"]
        self.app.write(self.pkg + ".helper", "VALUE = 2\n")
        staging = self.staging()
        staged = staging.stage()
        self.assertEqual(
            set(staged), {self.pkg, self.pkg + ".helper", self.pkg + ".server"}
        )
        server = sys.modules[self.pkg + ".server"]
        self.assertIsNot(server, old)
        self.assertEqual(server.VALUE, 2)
        self.assertIs(sys.modules[self.pkg].helper, staged[self.pkg + ".helper"])
        staging.commit(ModuleFingerprints())

    def test_restore(self) -> None:
        """
        L{ModuleStaging.restore} puts C{sys.modules} back exactly.
        """
        before = snapshotModules()
        self.app.write(
            self.pkg + ".helper", "import " + self.pkg + ".extra\nVALUE = 2\n"
        )
        self.app.write(self.pkg + ".extra", "")
        staging = self.staging()
        staging.stage()
        self.assertIn(self.pkg + ".extra", sys.modules)
        staging.restore()
        self.assertModulesAre(before)
        self.assertFalse(hasattr(sys.modules[self.pkg], "extra"))
        self.assertEqual(sys.modules[self.pkg + ".server"].VALUE, 1)

    def test_parkAndUnpark(self) -> None:
        """
        L{ModuleStaging.park} puts the old modules back in C{sys.modules}
        and on their package while the staged ones wait, including a module
        only the new code imports; L{ModuleStaging.unpark} puts the staged
        ones back; L{ModuleStaging.restore} works on parked modules too.
        """
        before = snapshotModules()
        package = sys.modules[self.pkg]
        oldHelper = sys.modules[self.pkg + ".helper"]
        self.app.write(self.pkg + ".helper", "from . import extra\nVALUE = 2\n")
        self.app.write(self.pkg + ".extra", "")
        app = findApplicationModules(self.pkg + ".server")
        staging = ModuleStaging(app, [self.pkg + ".helper"])
        staged = staging.stage()
        newHelper = staged[self.pkg + ".helper"]
        staging.park()
        self.assertModulesAre(before)
        self.assertIs(package.helper, oldHelper)
        self.assertFalse(hasattr(package, "extra"))
        staging.unpark()
        self.assertIs(sys.modules[self.pkg + ".helper"], newHelper)
        self.assertIs(package.helper, newHelper)
        self.assertIs(package.extra, sys.modules[self.pkg + ".extra"])
        staging.park()
        staging.restore()
        self.assertModulesAre(before)
        self.assertIs(package.helper, oldHelper)
        self.assertFalse(hasattr(package, "extra"))

    def test_syntaxError(self) -> None:
        """
        A module that does not compile fails the staging, naming it and the
        error, with C{sys.modules} as it was and no finder left behind.
        """
        before = snapshotModules()
        finders = list(sys.meta_path)
        self.app.write(self.pkg + ".helper", "VALUE = (\n")
        error = self.assertRaises(ReloadFailed, self.staging().stage)
        self.assertEqual(error.module, self.pkg + ".helper")
        self.assertIn("SyntaxError", error.reason)
        self.assertIn(self.pkg + ".helper", error.reason)
        self.assertModulesAre(before)
        self.assertEqual(sys.meta_path, finders)

    def test_exceptionAtImport(self) -> None:
        """
        A module that raises while it is imported by another fails the
        staging, naming the module that raised, the error and the line.
        """
        before = snapshotModules()
        self.app.write(
            self.pkg + ".helper", "VALUE = 2\nraise RuntimeError('broken')\n"
        )
        error = self.assertRaises(ReloadFailed, self.staging().stage)
        self.assertEqual(error.module, self.pkg + ".helper")
        self.assertIn("RuntimeError: broken (helper.py, line 2)", error.reason)
        self.assertModulesAre(before)

    def test_suppressedFailureNotBlamed(self) -> None:
        """
        A failure the new code itself catches is not the one reported.
        """
        self.app.write(self.pkg + ".optional", "raise ImportError('absent')\n")
        self.app.write(
            self.pkg + ".helper",
            "try:\n    from . import optional\nexcept ImportError:\n    pass\n"
            "VALUE = 1 / 0\n",
        )
        error = self.assertRaises(ReloadFailed, self.staging().stage)
        self.assertEqual(error.module, self.pkg + ".helper")
        self.assertIn("ZeroDivisionError", error.reason)

    def test_staleBytecodeIgnored(self) -> None:
        """
        Bytecode in C{__pycache__} that Python would trust (same size and
        modification time as the new source) is not used: the new source
        is compiled.
        """
        path = originOf(self.pkg + ".helper")
        before = os.stat(path)
        py_compile.compile(
            path,
            cfile=importlib.util.cache_from_source(path),
            invalidation_mode=py_compile.PycInvalidationMode.TIMESTAMP,
        )
        with open(path, "wb") as f:
            f.write(b"VALUE = 7\n")
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
        # The ordinary loader would run the stale bytecode:
        ordinary = importlib.machinery.SourceFileLoader("probe", path)
        probe = ModuleType("probe")
        ordinary.exec_module(probe)
        self.assertEqual(probe.VALUE, 1)
        staging = self.staging()
        staged = staging.stage()
        self.assertEqual(staged[self.pkg + ".helper"].VALUE, 7)
        staging.restore()


class ClassSwapTests(SynchronousTestCase):
    """
    L{counterpart} and L{classSwapProblem}.
    """

    def test_counterpart(self) -> None:
        """
        The class of the same qualified name in the new module.
        """
        new = ModuleType("m")
        exec("class A:\n    class B:\n        pass\n", vars(new))
        old = ModuleType("m")
        exec("class A:\n    class B:\n        pass\n", vars(old))
        old.A.__module__ = old.A.B.__module__ = "m"
        self.assertIs(counterpart(old.A.B, {"m": new}), new.A.B)
        self.assertIsNone(counterpart(old.A, {"other": new}))

    def test_slotted(self) -> None:
        """
        Slotted classes are refused; empty C{__slots__} add nothing and are
        not.
        """

        class Old:
            __slots__ = ("x",)

        class New:
            __slots__ = ("x",)

        class Plain:
            pass

        class EmptySlots:
            __slots__ = ()

        class WithEmpty(EmptySlots):
            pass

        problem = classSwapProblem(Old, New)
        assert problem is not None
        self.assertIn("slotted", problem)
        self.assertIsNone(classSwapProblem(Plain, WithEmpty))

    def test_gone(self) -> None:
        """
        A class that no longer exists, or is no longer a class, is named.
        """

        class Old:
            pass

        self.assertIn("no longer exists", classSwapProblem(Old, None) or "")
        self.assertIn("no longer a class", classSwapProblem(Old, 3) or "")


class TransportTests(SynchronousTestCase):
    """
    L{HeldTransport} and L{DetachedTransport}.
    """

    def setUp(self) -> None:
        self.live = Live(self, PLAIN)
        self.hosted, self.transport = self.live.connect()

    def test_heldUntilReleased(self) -> None:
        """
        Writes and other calls are held, in order, until released; then
        they pass straight through.  Queries are answered at once.
        """
        held = HeldTransport(self.hosted)
        held.write(b"a")
        held.writeSequence([b"b", b"c"])
        held.pauseProducing()
        self.assertEqual(held.getPeer(), self.transport.getPeer())
        self.assertEqual(self.transport.value(), b"")
        self.assertEqual(self.transport.producerState, "producing")
        held.release()
        self.assertEqual(self.transport.value(), b"abc")
        self.assertEqual(self.transport.producerState, "paused")
        held.write(b"d")
        self.assertEqual(self.transport.value(), b"abcd")

    def test_discarded(self) -> None:
        """
        Discarded, it drops what it held and whatever comes later.
        """
        held = HeldTransport(self.hosted)
        held.write(b"a")
        held.discard()
        held.write(b"b")
        held.loseConnection()
        self.assertEqual(self.transport.value(), b"")
        self.assertFalse(self.transport.disconnecting)

    def test_detached(self) -> None:
        """
        A detached transport counts and drops what is written to it.
        """
        detached = DetachedTransport("peer", "host")
        detached.write(b"abc")
        detached.writeSequence([b"de"])
        detached.loseConnection()
        self.assertEqual((detached.discarded, detached.getPeer()), (5, "peer"))

    def test_detachedLazily(self) -> None:
        """
        A transport detached lazily asks for its host's address only when
        (and the first time) it is asked for it.
        """
        asked: list[str] = []

        def hostOf() -> str:
            asked.append("host")
            return "host"

        detached = DetachedTransport.lazily("peer", hostOf)
        self.assertEqual((detached.getPeer(), asked), ("peer", []))
        self.assertEqual((detached.getHost(), detached.getHost()), ("host", "host"))
        self.assertEqual(asked, ["host"])


class ReloadTests(ModulesUnchangedMixin, SynchronousTestCase):
    """
    L{ModuleReload} on a host with live connections.
    """

    def test_inPlace(self) -> None:
        """
        A protocol that does not provide L{IMigratable} runs the new code
        from its next event, with its attributes as they were; new
        connections get the new code too; the report counts it as moved.
        """
        live = Live(self, PLAIN)
        hosted, transport = live.connect()
        old = hosted.wrappedProtocol
        self.assertEqual(exchange(hosted, transport, b"a"), b"v1 a 1\n")
        live.change(PLAIN.replace('b"v1"', 'b"v2"'))
        report = live.upgrade()
        self.assertEqual(
            (report["outcome"], report["moved"], report["draining"]), ("success", 1, 0)
        )
        self.assertEqual((report["fromGeneration"], report["toGeneration"]), (1, 2))
        # The report names the process that serves the new code: this one.
        self.assertEqual(
            (report["oldPid"], report["newPid"]), (live.host.pid, live.host.pid)
        )
        self.assertIs(hosted.wrappedProtocol, old)
        self.assertEqual(exchange(hosted, transport, b"b"), b"v2 b 2\n")
        fresh, freshTransport = live.connect()
        self.assertEqual(exchange(fresh, freshTransport, b"c"), b"v2 c 1\n")
        self.assertIn("reloaded: " + live.module, report["notes"])
        self.assertEqual(live.host.generation, 2)
        self.assertEqual(live.host.phase, MigrationPhase.idle)
        self.assertEqual(
            set(report["durations"]),
            {
                "precopy",
                "precopy slice",
                "import",
                "prepare",
                "commit",
                "pause",
                "total",
            },
        )

    def test_migratableRebuilt(self) -> None:
        """
        A migratable protocol is replaced by one the new factory built,
        restored from its upgraded state; what it writes while restored
        reaches the connection at the commit; the old object is detached.
        """
        live = Live(self, MIGRATABLE)
        hosted, transport = live.connect()
        old = hosted.wrappedProtocol
        exchange(hosted, transport, b"a")
        exchange(hosted, transport, b"b")
        oldFactory = live.host.applicationFactory
        live.change(MIGRATABLE_V2)
        transport.clear()
        report = live.upgrade()
        self.assertEqual((report["outcome"], report["moved"]), ("success", 1))
        self.assertEqual(transport.value(), b"restored 2\n")
        new = hosted.wrappedProtocol
        self.assertIsNot(new, old)
        self.assertIs(new.transport, hosted)
        self.assertIs(new.factory, live.host.applicationFactory)
        self.assertIsNot(oldFactory, live.host.applicationFactory)
        self.assertIsInstance(old.transport, DetachedTransport)
        self.assertEqual(exchange(hosted, transport, b"c"), b"v2 c 3\n")
        old.sendLine(b"stale")
        self.assertEqual(transport.value(), b"v2 c 3\n")
        self.assertTrue(
            any(
                "from state version 1 upgraded to 2" in note for note in report["notes"]
            )
        )

    def test_oldObjectTold(self) -> None:
        """
        Once its connection switched to the new protocol object, the old
        object is told C{connectionMigrated()} (its transport detached by
        then), and the new one is not: the old code stops its timers.
        """
        told = """
    def connectionMigrated(self):
        self.told = getattr(self, "told", []) + [type(self.transport).__name__]
"""
        source = MIGRATABLE.replace(
            "    def getMigrationState(self):",
            told + "\n    def getMigrationState(self):",
        )
        live = Live(self, source)
        hosted, transport = live.connect()
        old = hosted.wrappedProtocol
        exchange(hosted, transport, b"a")
        live.change(_versionTwo(source))
        report = live.upgrade()
        self.assertEqual((report["outcome"], report["moved"]), ("success", 1))
        self.assertEqual(old.told, ["DetachedTransport"])
        self.assertFalse(hasattr(hosted.wrappedProtocol, "told"))

    def test_bufferedInputReplayed(self) -> None:
        """
        Complete lines the old protocol held back while paused are
        delivered to the new protocol after the commit, and half a line
        is completed by the next bytes.
        """
        live = Live(self, MIGRATABLE)
        hosted, transport = live.connect()
        hosted.wrappedProtocol.pauseProducing()
        hosted.dataReceived(b"held\nhal")
        live.change(MIGRATABLE_V2)
        live.upgrade()
        self.assertEqual(transport.value(), b"restored 0\nv2 held 1\n")
        self.assertEqual(exchange(hosted, transport, b"f"), b"v2 half 2\n")

    def test_listenersGetTheNewFactory(self) -> None:
        """
        Every listener's tracking factory wraps the new factory, which is
        started once per listening port; the old one is stopped as many
        times.
        """
        live = Live(self, MIGRATABLE, listen=("tcp:8000", "tcp:8001"))
        for listener in live.host.listeners.values():
            listener.port = RecordingPort(IPv4Address("TCP", "127.0.0.1", 1))
            listener.factory.doStart()
        module = sys.modules[live.module]
        self.assertEqual(
            (module.CountingFactory.started, module.CountingFactory.stopped), (1, 0)
        )
        live.change(MIGRATABLE_V2)
        report = live.upgrade()
        self.assertEqual(report["outcome"], "success")
        new = sys.modules[live.module]
        self.assertIsNot(new, module)
        self.assertEqual(module.CountingFactory.stopped, 1)
        self.assertEqual(new.CountingFactory.started, 1)
        for listener in live.host.listeners.values():
            self.assertIs(listener.factory.wrappedFactory, live.host.applicationFactory)
            self.assertIsInstance(live.host.applicationFactory, new.CountingFactory)

    def test_nothingChanged(self) -> None:
        """
        A second reload with nothing changed reloads nothing and touches no
        connection.
        """
        live = Live(self, MIGRATABLE)
        hosted, transport = live.connect()
        live.upgrade()
        protocol = hosted.wrappedProtocol
        before = snapshotModules()
        report = live.upgrade()
        self.assertEqual(
            (report["outcome"], report["moved"], report["toGeneration"]),
            ("success", 0, None),
        )
        self.assertIn(
            "no application module changed on disk: nothing reloaded", report["notes"]
        )
        self.assertIs(hosted.wrappedProtocol, protocol)
        self.assertModulesAre(before)
        self.assertEqual(live.host.generation, 2)

    def test_onlyChangedModules(self) -> None:
        """
        Once this process knows the source of each module, only the
        changed ones (and the modules importing from them) are reloaded.
        """
        live = Live(
            self,
            "from .proto import makeFactory\nfrom . import other\n",
            package=True,
            extra={
                "PREFIX.proto": PLAIN.replace(
                    'VERSION = b"v1"', "from .version import VERSION"
                ),
                "PREFIX.version": 'VERSION = b"v1"\n',
                "PREFIX.other": "X = 1\n",
            },
        )
        pkg = live.app.prefix
        first = live.upgrade()
        self.assertEqual(first["outcome"], "success")
        other = sys.modules[pkg + ".other"]
        hosted, transport = live.connect()
        live.write("PREFIX.version", 'VERSION = b"v2"\n')
        report = live.upgrade()
        self.assertEqual(report["outcome"], "success")
        self.assertIs(sys.modules[pkg + ".other"], other)
        self.assertIn("changed on disk: " + pkg + ".version", report["notes"])
        reloaded = [n for n in report["notes"] if n.startswith("reloaded: ")][0]
        self.assertEqual(
            set(reloaded[len("reloaded: ") :].split(", ")),
            {pkg + ".version", pkg + ".proto", pkg + ".server"},
        )
        self.assertEqual(exchange(hosted, transport, b"x"), b"v2 x 1\n")

    def test_syntaxErrorRollsBack(self) -> None:
        """
        New code that does not compile leaves every protocol and module as
        it was; the report names the module.
        """
        live = Live(self, MIGRATABLE)
        hosted, transport = live.connect()
        plainHosted, plainTransport = live.connect()
        old = hosted.wrappedProtocol
        before = snapshotModules()
        live.change(MIGRATABLE_V2 + "\ndef broken(:\n")
        report = live.upgrade()
        self.assertEqual(report["outcome"], "rolled-back")
        self.assertIn(live.module, report["reason"])
        self.assertIn("SyntaxError", report["reason"])
        self.assertEqual((report["moved"], report["draining"]), (0, 0))
        # No new code serves: no new process is named.
        self.assertEqual((report["newPid"], report["toGeneration"]), (None, None))
        self.assertIs(hosted.wrappedProtocol, old)
        self.assertModulesAre(before)
        self.assertEqual(exchange(hosted, transport, b"a"), b"v1 a 1\n")
        self.assertEqual(live.host.generation, 1)

    def test_refusedStateRollsBack(self) -> None:
        """
        A restore that raises for one connection leaves every connection
        on the old code, including those already rebuilt, whose writes
        never reach their connection; the report names the connection.
        """
        live = Live(self, MIGRATABLE)
        connections = [live.connect() for _ in range(3)]
        exchange(*connections[1], b"poison")
        olds = [hosted.wrappedProtocol for hosted, _ in connections]
        before = snapshotModules()
        live.change(
            MIGRATABLE_V2.replace(
                'self.sendLine(b"restored %d" % (self.count,))',
                'self.sendLine(b"restored %d" % (self.count,))\n'
                '        if self.count == 1: raise RuntimeError("state refused")',
            )
        )
        for _, transport in connections:
            transport.clear()
        report = live.upgrade()
        self.assertEqual(report["outcome"], "rolled-back")
        peer = connections[1][0].getPeer()
        self.assertIn("{}:{}".format(peer.host, peer.port), report["reason"])
        self.assertIn("RuntimeError('state refused')", report["reason"])
        self.assertModulesAre(before)
        for (hosted, transport), old in zip(connections, olds):
            self.assertIs(hosted.wrappedProtocol, old)
            self.assertEqual(transport.value(), b"")
            self.assertIs(old.transport, hosted)
        self.assertEqual(exchange(*connections[0], b"x"), b"v1 x 1\n")

    def test_refusedUpgradeRollsBack(self) -> None:
        """
        An C{upgradeMigrationState} that raises rolls back, saying so.
        """
        live = Live(self, MIGRATABLE)
        live.connect()
        live.change(MIGRATABLE.replace("migrationVersion = 1", "migrationVersion = 3"))
        report = live.upgrade()
        self.assertEqual(report["outcome"], "rolled-back")
        self.assertIn(
            "upgradeMigrationState() refused state version 1", report["reason"]
        )

    def test_unplainStateRollsBack(self) -> None:
        """
        Old code whose state is not plain data rolls back.
        """
        live = Live(
            self, MIGRATABLE.replace('{"count": self.count}', '{"count": {1, 2}}')
        )
        live.connect()
        live.change(MIGRATABLE_V2)
        report = live.upgrade()
        self.assertEqual(report["outcome"], "rolled-back")
        self.assertIn("getMigrationState() returned", report["reason"])

    def test_factoryFailureRollsBack(self) -> None:
        """
        New code whose factory cannot be built rolls back, and a new
        factory that was started is stopped again.
        """
        live = Live(self, MIGRATABLE)
        live.connect()
        before = snapshotModules()
        live.change(
            MIGRATABLE_V2.replace(
                "return CountingFactory()", "raise KeyError('config')"
            )
        )
        report = live.upgrade()
        self.assertEqual(report["outcome"], "rolled-back")
        self.assertIn("cannot build the application's factory", report["reason"])
        self.assertIn("KeyError", report["reason"])
        self.assertModulesAre(before)

    def test_factoryStartFailureRollsBack(self) -> None:
        """
        A new factory that fails to start rolls back.
        """
        live = Live(self, MIGRATABLE)
        listener = next(iter(live.host.listeners.values()))
        listener.port = RecordingPort(IPv4Address("TCP", "127.0.0.1", 1))
        hosted, transport = live.connect()
        old = hosted.wrappedProtocol
        before = snapshotModules()
        live.change(
            MIGRATABLE_V2.replace(
                "type(self).started += 1", "raise RuntimeError('no database')"
            )
        )
        report = live.upgrade()
        self.assertEqual(report["outcome"], "rolled-back")
        self.assertIn("failed to start: RuntimeError: no database", report["reason"])
        self.assertIs(hosted.wrappedProtocol, old)
        self.assertModulesAre(before)

    def test_slottedStaysOld(self) -> None:
        """
        A slotted protocol class cannot be swapped: such connections stay
        on the old code, counted as drained and explained.
        """
        source = PLAIN.replace(
            "class Counter(LineReceiver):",
            "class Counter(LineReceiver):\n    __slots__ = ('extra',)",
        )
        live = Live(self, source)
        hosted, transport = live.connect()
        live.change(source.replace('b"v1"', 'b"v2"'))
        report = live.upgrade()
        self.assertEqual(
            (report["outcome"], report["moved"], report["draining"]), ("success", 0, 1)
        )
        self.assertTrue(
            any(
                "slotted" in note and "stays on the old code" in note
                for note in report["notes"]
            )
        )
        self.assertEqual(exchange(hosted, transport, b"a"), b"v1 a 1\n")

    def test_removedClassStaysOld(self) -> None:
        """
        A protocol whose class the new code no longer has stays on the old
        code.
        """
        live = Live(self, PLAIN)
        hosted, transport = live.connect()
        live.change(PLAIN.replace("Counter", "Renamed").replace('b"v1"', 'b"v2"'))
        report = live.upgrade()
        self.assertEqual((report["moved"], report["draining"]), (0, 1))
        self.assertTrue(any("no longer exists" in note for note in report["notes"]))
        self.assertEqual(exchange(hosted, transport, b"a"), b"v1 a 1\n")

    def test_subclassOutsideStaysOld(self) -> None:
        """
        A protocol whose class is defined outside the reloaded modules but
        inherits from a reloaded class stays on the old code; the report
        names that module as outside the application.
        """
        source = PLAIN.replace(
            "    return Factory.forProtocol(Counter)",
            "    from PREFIXoutside import Sub\n    return Factory.forProtocol(Sub)",
        )
        live = Live(
            self,
            source,
            extra={
                "PREFIXoutside": "from PREFIX import Counter\nclass Sub(Counter):\n    pass\n"
            },
        )
        hosted, transport = live.connect()
        live.change(source.replace('b"v1"', 'b"v2"'))
        report = live.upgrade()
        self.assertEqual((report["outcome"], report["draining"]), ("success", 1))
        self.assertTrue(
            any("defined outside the reloaded modules" in n for n in report["notes"])
        )
        self.assertIn(
            "not reloaded, outside the application: {}outside (name them with "
            "--reload-module to reload them)".format(live.app.prefix),
            report["notes"],
        )
        self.assertEqual(exchange(hosted, transport, b"a"), b"v1 a 1\n")

    def test_swapRefusedUndoesEverySwap(self) -> None:
        """
        If Python refuses one class assignment at the commit, every object
        already given its new class gets its old one back.
        """
        source = PLAIN.replace(
            "def makeFactory():\n    return Factory.forProtocol(Counter)",
            """
class Stubborn(Counter):
    def __setattr__(self, name, value):
        if name == "__class__" and getattr(value, "REFUSE", False):
            raise TypeError("refused")
        object.__setattr__(self, name, value)


class Alternating(Factory):
    built = 0

    def buildProtocol(self, addr):
        self.built += 1
        protocol = (Counter if self.built % 2 else Stubborn)()
        protocol.factory = self
        return protocol


def makeFactory():
    return Alternating()
""",
        )
        live = Live(self, source)
        plain, _ = live.connect()
        stubborn, _ = live.connect()
        before = [type(plain.wrappedProtocol), type(stubborn.wrappedProtocol)]
        self.assertEqual([cls.__name__ for cls in before], ["Counter", "Stubborn"])
        live.change(
            source.replace('b"v1"', 'b"v2"').replace(
                "class Stubborn(Counter):",
                "class Stubborn(Counter):\n    REFUSE = True",
            )
        )
        modules = snapshotModules()
        report = live.upgrade()
        self.assertEqual(report["outcome"], "rolled-back")
        self.assertIn("TypeError: refused", report["reason"])
        self.assertEqual(
            [type(plain.wrappedProtocol), type(stubborn.wrappedProtocol)], before
        )
        self.assertModulesAre(modules)

    def test_wrappedProtocolsSwapped(self) -> None:
        """
        A protocol wrapping the application's (a policy wrapper of
        Twisted's) is unchanged; the application protocol it wraps gets the
        new code.
        """
        source = PLAIN.replace(
            "def makeFactory():\n    return Factory.forProtocol(Counter)",
            "from twisted.protocols.policies import WrappingFactory\n"
            "def makeFactory():\n    return WrappingFactory(Factory.forProtocol(Counter))",
        )
        live = Live(self, source)
        hosted, transport = live.connect()
        live.change(source.replace('b"v1"', 'b"v2"'))
        report = live.upgrade()
        self.assertEqual((report["moved"], report["draining"]), (1, 0))
        self.assertEqual(exchange(hosted, transport, b"a"), b"v2 a 1\n")

    def test_wrappedMigratableVersionChanged(self) -> None:
        """
        A migratable protocol behind a wrapper is upgraded in place while
        its C{migrationVersion} stays, and stays on the old code once it
        changes: its state could not be converted.
        """
        source = MIGRATABLE.replace(
            "def makeFactory():\n    return CountingFactory()",
            "from twisted.protocols.policies import WrappingFactory\n"
            "def makeFactory():\n    return WrappingFactory(CountingFactory())",
        )
        live = Live(self, source)
        hosted, transport = live.connect()
        exchange(hosted, transport, b"a")
        live.change(source.replace('b"v1"', 'b"v2"'))
        report = live.upgrade()
        self.assertEqual((report["moved"], report["draining"]), (1, 0))
        self.assertEqual(exchange(hosted, transport, b"b"), b"v2 b 2\n")
        live.change(
            source.replace('b"v1"', 'b"v3"').replace(
                "migrationVersion = 1", "migrationVersion = 2"
            )
        )
        report = live.upgrade()
        self.assertEqual((report["moved"], report["draining"]), (0, 1))
        self.assertTrue(
            any("migrationVersion changed (1 to 2)" in n for n in report["notes"])
        )
        self.assertEqual(exchange(hosted, transport, b"c"), b"v2 c 3\n")

    def test_unchangedProtocolClass(self) -> None:
        """
        A protocol whose class no reloaded module defines goes on as it
        was, and the report says so.
        """
        source = (
            "from twisted.internet.protocol import Factory\nfrom twisted.protocols.wire import Echo\n"
            "def makeFactory():\n    return Factory.forProtocol(Echo)\n"
        )
        live = Live(self, source)
        hosted, transport = live.connect()
        live.change(source + "\n# changed\n")
        report = live.upgrade()
        self.assertEqual((report["outcome"], report["moved"]), ("success", 1))
        self.assertTrue(
            any(
                "twisted.protocols.wire.Echo, which no reloaded module defines" in n
                for n in report["notes"]
            )
        )

    def test_importFailureNamesModule(self) -> None:
        """
        A module of the application's package that raises at import rolls
        back with its name and the error.
        """
        live = Live(
            self,
            "from .proto import makeFactory\n",
            package=True,
            extra={"PREFIX.proto": PLAIN},
        )
        live.write("PREFIX.proto", PLAIN + "\nraise ValueError('bad config')\n")
        report = live.upgrade()
        self.assertEqual(report["outcome"], "rolled-back")
        self.assertIn(
            "the new code of {}.proto does not import".format(live.app.prefix),
            report["reason"],
        )
        self.assertIn("ValueError: bad config (proto.py, line ", report["reason"])

    def test_explicitModules(self) -> None:
        """
        With C{reloadModules} a module outside the C{--app} package is
        reloaded too.
        """
        live = Live(
            self,
            PLAIN.replace('VERSION = b"v1"', "from PREFIXhelper import VERSION"),
            extra={"PREFIXhelper": 'VERSION = b"v1"\n'},
            reloadModules=("PREFIXhelper",),
        )
        hosted, transport = live.connect()
        live.write("PREFIXhelper", 'VERSION = b"v2"\n')
        report = live.upgrade()
        self.assertEqual(report["outcome"], "success")
        self.assertEqual(exchange(hosted, transport, b"a"), b"v2 a 1\n")

    def test_noApplicationSpec(self) -> None:
        """
        A host that does not know where its application's code is refuses.
        """
        live = Live(self, PLAIN)
        live.host.settings = evolve(live.host.settings, applicationSpec=None)
        report = live.upgrade()
        self.assertEqual(report["outcome"], "refused")
        self.assertIn("applicationSpec", report["reason"])

    def test_hostModuleRefused(self) -> None:
        """
        An application inside Twisted cannot be reloaded.
        """
        live = Live(self, PLAIN)
        live.host.settings = evolve(
            live.host.settings, applicationSpec="twisted.protocols.wire:Echo"
        )
        report = live.upgrade()
        self.assertEqual(report["outcome"], "refused")
        self.assertIn("part of Twisted", report["reason"])

    def test_notesNameWhatIsNeverReloaded(self) -> None:
        """
        The report names what is never reloaded.
        """
        live = Live(self, PLAIN)
        report = live.upgrade()
        self.assertTrue(
            any(
                n.startswith("never reloaded: Twisted, migrate")
                for n in report["notes"]
            )
        )

    def test_progress(self) -> None:
        """
        Progress says what is imported and how it ended.
        """
        live = Live(self, PLAIN)
        live.connect()
        live.upgrade()
        self.assertEqual(live.progress[0], "importing the new code of " + live.module)
        self.assertTrue(
            live.progress[-1].startswith(
                "generation 2 serves the new code: 1 connection upgraded, 0 left"
            )
        )

    def test_oldCodeCollected(self) -> None:
        """
        Repeated reloads leave nothing of the old code alive: modules,
        classes, factories and protocol objects replaced are collected.
        """
        live = Live(self, MIGRATABLE)
        connections = [live.connect() for _ in range(3)]
        refs: list[weakref.ref[Any]] = []
        for n in range(2, 6):
            refs.append(weakref.ref(sys.modules[live.module]))
            refs.append(weakref.ref(live.host.applicationFactory))
            refs.append(weakref.ref(connections[0][0].wrappedProtocol))
            live.change(MIGRATABLE_V2.replace('b"v2"', 'b"v%d"' % n))
            report = live.upgrade()
            self.assertEqual(report["outcome"], "success")
        gc.collect()
        self.assertEqual([ref for ref in refs if ref() is not None], [])
        self.assertEqual(len(live.fingerprints), 1)
        self.assertEqual(exchange(*connections[0], b"x"), b"v5 x 1\n")


class ReloadTrialTests(ModulesUnchangedMixin, SynchronousTestCase):
    """
    Module reload tries the new code in a child process first (here a
    stand-in), and bounds its own import.
    """

    def test_trialSeesEveryMigratableState(self) -> None:
        """
        Once it knows there is new code, module reload asks the trial about
        every migratable connection, with the host's policy, before it
        imports anything; its cost is in the report.
        """
        seen: list[Any] = []

        def trial(host: Any, cases: Any, policy: str) -> Any:
            seen.append((cases, policy, snapshotModules()))
            return succeed(
                TrialOutcome(None, tried=len(cases), duration=0.75, restoring=0.5)
            )

        live = Live(self, MIGRATABLE, trial=trial)
        live.host.settings = evolve(
            live.host.settings, strategyOptions={"trial-failure": "close"}
        )
        hosted, transport = live.connect()
        exchange(hosted, transport, b"a")
        before = snapshotModules()
        live.change(MIGRATABLE_V2)
        report = live.upgrade()
        [(cases, policy, modules)] = seen
        self.assertEqual([case.connection for case in cases], [hosted])
        self.assertEqual(cases[0].state["appState"], {"count": 1})
        self.assertEqual(policy, "close")
        self.assertEqual(sorted(set(modules) ^ set(before)), [])
        self.assertEqual((report["outcome"], report["moved"]), ("success", 1))
        self.assertEqual(
            (report["durations"]["preflight"], report["durations"]["trial"]),
            (0.75, 0.5),
        )

    def test_nothingChangedNoTrial(self) -> None:
        """
        Without new code on disk there is nothing to try.
        """
        seen: list[Any] = []

        def trial(*args: Any) -> Any:
            seen.append(args)
            return succeed(TrialOutcome(None))

        live = Live(self, MIGRATABLE, trial=trial)
        live.upgrade()
        report = live.upgrade()
        self.assertEqual((report["outcome"], len(seen)), ("success", 1))

    def test_trialRefusalImportsNothing(self) -> None:
        """
        A failed trial refuses the reload: nothing was imported into this
        process, every connection is on the old code.
        """
        live = Live(
            self,
            MIGRATABLE,
            trial=lambda *a: succeed(TrialOutcome("the new code did not load")),
        )
        live.host.metrics = HostMetrics(live.host, live.host.reactor.seconds)
        hosted, transport = live.connect()
        live.change(MIGRATABLE_V2)
        before = snapshotModules()
        report = live.upgrade()
        self.assertEqual(
            (report["outcome"], report["reason"]),
            ("refused", "the new code did not load"),
        )
        self.assertEqual(live.host.metrics.trialRuns, {("reload", "failed"): 1})
        self.assertModulesAre(before)
        self.assertEqual(exchange(hosted, transport, b"x"), b"v1 x 1\n")
        self.assertEqual(live.host.phase, MigrationPhase.idle)

    def test_trialCloseClosesFirst(self) -> None:
        """
        With C{--trial-failure close}, a connection the new code failed on
        is closed cleanly and counted as failed; the others are rebuilt.
        """

        def trial(host: Any, cases: Any, policy: str) -> Any:
            return succeed(TrialOutcome(None, closing=((cases[0], "boom"),)))

        live = Live(self, MIGRATABLE, trial=trial)
        doomed, doomedTransport = live.connect()
        kept, keptTransport = live.connect()
        live.change(MIGRATABLE_V2)
        report = live.upgrade()
        self.assertTrue(doomedTransport.disconnecting)
        self.assertEqual(
            (report["outcome"], report["moved"], report["failed"]), ("success", 1, 1)
        )
        self.assertEqual(exchange(kept, keptTransport, b"y"), b"v2 y 1\n")
        self.assertTrue(any("boom" in note for note in report["notes"]))

    def test_importBounded(self) -> None:
        """
        New code that passed the trial but blocks at import in this process
        is interrupted at the ready timeout: rolled back, C{sys.modules} as
        it was.
        """
        live = Live(self, MIGRATABLE, trial=lambda *a: succeed(TrialOutcome(None)))
        live.host.settings = evolve(live.host.settings, readyTimeout=0.2)
        hosted, transport = live.connect()
        live.change("import time\ntime.sleep(30)\n" + MIGRATABLE_V2)
        before = snapshotModules()
        report = live.upgrade()
        self.assertEqual(report["outcome"], "rolled-back")
        self.assertIn("ImportTimedOut", report["reason"])
        self.assertIn("longer than 0.2 s", report["reason"])
        self.assertModulesAre(before)
        self.assertEqual(exchange(hosted, transport, b"x"), b"v1 x 1\n")


#: L{MIGRATABLE}, recording in a module global which code was told that a
#: connection was lost
LOSING = MIGRATABLE.replace(
    'VERSION = b"v1"\n', 'VERSION = b"v1"\nLOST = []\n'
).replace(
    "    def getMigrationState(self):",
    "    def connectionLost(self, reason):\n"
    "        LOST.append(VERSION)\n\n"
    "    def getMigrationState(self):",
)

LOSING_V2 = (
    LOSING.replace('VERSION = b"v1"', 'VERSION = b"v2"')
    .replace("migrationVersion = 1", "migrationVersion = 2")
    .replace('return {"count": self.count}', 'return {"total": self.count}')
    .replace('self.count = state["count"]', 'self.count = state["total"]')
    .replace(
        'raise ValueError("cannot read version %r" % (fromVersion,))',
        'return {"total": state["count"]} if fromVersion == 1 else state',
    )
)


def chatSource(welcome: str = "Welcome") -> str:
    """
    The demo chat server's source, its welcome changed to C{welcome}.
    """
    from ..examples import chat

    with open(chat.__file__, encoding="utf-8") as f:
        return f.read().replace("* Welcome, ", "* {}, ".format(welcome))


def runOne(clock: Clock) -> None:
    """
    Run the first call C{clock} has scheduled, and only that one.
    """
    call = clock.calls.pop(0)
    call.func(*call.args, **call.kw)


class ReloadSliceTests(ModulesUnchangedMixin, SynchronousTestCase):
    """
    The states are copied in slices before the pause; after it, rebuilt
    connections switch to their new protocol object in slices, or before
    their next event.
    """

    def live(self, source: str, slices: tuple[int, int], count: int) -> Any:
        live: Any = Live(self, source, sliceSizes=slices)
        live.connections = [live.connect() for _ in range(count)]
        for n, (hosted, transport) in enumerate(live.connections):
            for _ in range(n + 1):
                exchange(hosted, transport, b"x")
            transport.clear()
        return live

    def test_switchedBeforeFirstEvent(self) -> None:
        """
        After the pause, a connection that receives bytes before its slice
        comes is switched first: the new protocol writes what it wrote when
        restored, then answers the bytes.  The report waits for the last
        slice.
        """
        live = self.live(MIGRATABLE, (500, 1), 3)
        olds = [hosted.wrappedProtocol for hosted, _ in live.connections]
        live.change(MIGRATABLE_V2)
        d = live.host.requestUpgrade(None, live.progress.append)
        self.assertNoResult(d)
        self.assertEqual(live.host.phase, MigrationPhase.committing)
        hosted, transport = live.connections[2]
        self.assertIs(hosted.wrappedProtocol, olds[2])
        self.assertEqual(transport.value(), b"")
        self.assertEqual(exchange(hosted, transport, b"y"), b"restored 3\nv2 y 4\n")
        self.assertIsNot(hosted.wrappedProtocol, olds[2])
        self.assertIsInstance(olds[2].transport, DetachedTransport)
        self.assertIs(live.connections[0][0].wrappedProtocol, olds[0])
        live.host.reactor.advance(0)
        report = self.successResultOf(d)
        self.assertEqual((report["outcome"], report["moved"]), ("success", 3))
        self.assertEqual(live.host.phase, MigrationPhase.idle)
        for (hosted, transport), old in zip(live.connections[:2], olds):
            self.assertIsNot(hosted.wrappedProtocol, old)
        self.assertEqual(live.connections[0][1].value(), b"restored 1\n")
        self.assertEqual(live.connections[1][1].value(), b"restored 2\n")
        self.assertLessEqual(
            {"pause", "switch", "switch slice"}, set(report["durations"])
        )

    def test_switchedInSlices(self) -> None:
        """
        Connections are switched a slice per turn of the reactor, the old
        factory stopped once none is left on the old protocol objects.
        """
        live = self.live(MIGRATABLE, (500, 2), 3)
        listener = live.host.listeners["tcp:8000"]
        listener.port = RecordingPort(IPv4Address("TCP", "127.0.0.1", 1))
        listener.factory.doStart()
        oldFactoryClass = type(live.host.applicationFactory)
        olds = [hosted.wrappedProtocol for hosted, _ in live.connections]
        live.change(MIGRATABLE_V2)
        d = live.host.requestUpgrade(None, live.progress.append)
        switched = lambda: [  # noqa: E731
            hosted.wrappedProtocol is not old
            for (hosted, _), old in zip(live.connections, olds)
        ]
        self.assertEqual(switched(), [False, False, False])
        runOne(live.host.reactor)
        self.assertEqual(switched(), [True, True, False])
        self.assertEqual(oldFactoryClass.stopped, 0)
        self.assertNoResult(d)
        runOne(live.host.reactor)
        self.assertEqual(switched(), [True, True, True])
        self.assertEqual(oldFactoryClass.stopped, 1)
        self.assertEqual(self.successResultOf(d)["moved"], 3)

    def test_closedBeforeSwitch(self) -> None:
        """
        A connection lost before its slice is switched first: its new
        protocol, which the new code restored, is told; the old one is
        not.
        """
        live = self.live(LOSING, (500, 1), 2)
        oldModule = sys.modules[live.module]
        live.change(LOSING_V2)
        d = live.host.requestUpgrade(None, live.progress.append)
        hosted, transport = live.connections[1]
        hosted.connectionLost(Failure(ConnectionDone()))
        newModule = sys.modules[live.module]
        self.assertEqual((oldModule.LOST, newModule.LOST), ([], [b"v2"]))
        live.host.reactor.advance(0)
        report = self.successResultOf(d)
        self.assertEqual(report["outcome"], "success")
        self.assertEqual(len(live.host.listeners["tcp:8000"].factory.connections), 1)

    def test_broadcastDuringSwitchReachesEveryone(self) -> None:
        """
        While connections are switched, every one is already restored in
        the new code: what a switched user says reaches the users not
        switched yet (once they are, in order), and theirs reach it.
        """
        live = Live(self, chatSource(), sliceSizes=(500, 1))
        users = [live.connect() for _ in range(3)]
        for _, transport in users:
            transport.clear()
        live.change(chatSource("Hello"))
        d = live.host.requestUpgrade(None, live.progress.append)
        (first, firstTransport), second, (third, thirdTransport) = users
        first.dataReceived(b"one\n")
        third.dataReceived(b"three\n")
        live.host.reactor.advance(0)
        self.assertEqual(self.successResultOf(d)["moved"], 3)
        self.assertEqual(firstTransport.value(), b"<guest3> three\n")
        self.assertEqual(second[1].value(), b"<guest1> one\n<guest3> three\n")
        self.assertEqual(thirdTransport.value(), b"<guest1> one\n")
        fresh, freshTransport = live.connect()
        self.assertIn(b"* Hello, guest4!", freshTransport.value())
        fresh.dataReceived(b"/who\n")
        self.assertIn(
            b"* In lobby: guest1, guest2, guest3, guest4", freshTransport.value()
        )

    def test_precopyInSlices(self) -> None:
        """
        The states are copied a slice per turn of the reactor before the
        pause; a connection whose state changed since its copy is captured
        again in the pause, and nothing it did is lost.
        """
        live = self.live(MIGRATABLE, (1, 500), 3)
        live.change(MIGRATABLE_V2)
        d = live.host.requestUpgrade(None, live.progress.append)
        self.assertNoResult(d)
        hosted, transport = live.connections[0]
        self.assertEqual(exchange(hosted, transport, b"y"), b"v1 y 2\n")
        transport.clear()
        live.host.reactor.advance(0)
        report = self.successResultOf(d)
        self.assertEqual(report["moved"], 3)
        self.assertIn(
            "2 states of 3 migratable connections taken before the pause, while "
            "the old code served, and unchanged since; the others were taken "
            "in the pause",
            report["notes"],
        )
        self.assertEqual(transport.value(), b"restored 2\n")
        self.assertEqual(exchange(hosted, transport, b"z"), b"v2 z 3\n")
        self.assertLessEqual({"precopy", "precopy slice"}, set(report["durations"]))

    def ticking(self, live: Any, step: float) -> None:
        """
        Make the host's clock move on by C{step} seconds each time it is
        read, as a real clock does while a slice works.
        """
        clock = live.host.reactor

        def seconds() -> float:
            clock.rightNow += step
            return float(clock.rightNow)

        clock.seconds = seconds

    def test_precopySliceBoundedInTime(self) -> None:
        """
        A pre-copy slice ends once it has taken the slice's time, even with
        connections left within its count: the rest are copied in the next
        turns of the reactor, and the reload ends once they are.
        """
        live = self.live(MIGRATABLE, (500, 500), 3)
        # Two reads of the clock (one per connection copied) per 4 ms.
        self.ticking(live, PRECOPY_SLICE_SECONDS * 0.75)
        live.change(MIGRATABLE_V2)
        d = live.host.requestUpgrade(None, live.progress.append)
        self.assertNoResult(d)
        self.assertEqual(len(live.host.reactor.calls), 1)
        runOne(live.host.reactor)
        report = self.successResultOf(d)
        self.assertEqual((report["outcome"], report["moved"]), ("success", 3))
        self.assertIn(
            "3 states of 3 migratable connections taken before the pause, while "
            "the old code served, and unchanged since; the others were taken "
            "in the pause",
            report["notes"],
        )

    def test_precopySliceTakesOneAtLeast(self) -> None:
        """
        A slice copies one connection at least, however long that one
        takes: the pre-copy always ends.
        """
        live = self.live(MIGRATABLE, (500, 500), 3)
        self.ticking(live, PRECOPY_SLICE_SECONDS * 2)
        live.change(MIGRATABLE_V2)
        d = live.host.requestUpgrade(None, live.progress.append)
        for _ in range(2):
            self.assertNoResult(d)
            runOne(live.host.reactor)
        self.assertEqual(self.successResultOf(d)["moved"], 3)

    def reloadWithTwoSlices(self) -> Any:
        """
        Three migratable connections, the pre-copy's slices two ticks long
        (so that a connection is copied in each), and a reload to version
        2 requested.

        @return: the live host, the upgrade's L{Deferred}, and the first
            connection's protocol and transport.
        """
        live = self.live(MIGRATABLE, (500, 500), 3)
        self.ticking(live, PRECOPY_SLICE_SECONDS * 2)
        live.change(MIGRATABLE_V2)
        d = live.host.requestUpgrade(None, live.progress.append)
        hosted, transport = live.connections[0]
        return live, d, hosted, transport

    def assertTakenBeforeThePause(self, d: Any) -> None:
        """
        The reload succeeded, two of the three states taken before its
        pause and unchanged since.
        """
        report = self.successResultOf(d)
        self.assertIn(
            "2 states of 3 migratable connections taken before the pause, while "
            "the old code served, and unchanged since; the others were taken "
            "in the pause",
            report["notes"],
        )

    def test_precopyChangedBetweenSlices(self) -> None:
        """
        A connection copied in an earlier slice that changes before the
        pause is taken again in the pause: what it did in between is kept.
        """
        live, d, hosted, transport = self.reloadWithTwoSlices()
        self.assertEqual(exchange(hosted, transport, b"y"), b"v1 y 2\n")
        runOne(live.host.reactor)
        runOne(live.host.reactor)
        self.assertTakenBeforeThePause(d)
        self.assertEqual(exchange(hosted, transport, b"z"), b"v2 z 3\n")

    def test_precopyChangedWithoutInput(self) -> None:
        """
        A connection whose state changes after its copy without any byte
        on it (a timer, another connection's event) is taken again in the
        pause: the new code gets the state as it is at the pause, not the
        copy.
        """
        live, d, hosted, transport = self.reloadWithTwoSlices()
        hosted.wrappedProtocol.count = 41
        runOne(live.host.reactor)
        runOne(live.host.reactor)
        self.assertTakenBeforeThePause(d)
        self.assertEqual(transport.value(), b"restored 41\n")
        self.assertEqual(exchange(hosted, transport, b"z"), b"v2 z 42\n")

    def test_trialLinesAsTheCodecWrites(self) -> None:
        """
        The trial's cases are encoded by the pre-copy, a slice at a time, to
        the very bytes L{TrialCase.toLine} writes.
        """
        live = self.live(MIGRATABLE, (500, 500), 2)
        attempt = ReloadAttempt(
            live.host, live.progress.append, live.fingerprints, "reload"
        )
        cases = self.successResultOf(attempt.copyStates())
        self.assertEqual(len(cases), 2)
        for case in cases:
            self.assertIsNotNone(case.line)
            self.assertEqual(case.line, evolve(case, line=None).toLine())


#: a migratable protocol whose state is its own list, which the new code
#: changes in place; a connection that said "refuse" is refused
KEEPER = """
from zope.interface import implementer
from twisted.internet.protocol import Factory
from twisted.protocols.basic import LineReceiver
from migrate.interfaces import IMigratable

VERSION = b"v1"


@implementer(IMigratable)
class Keeper(LineReceiver):
    delimiter = b"\\n"
    migrationVersion = 1

    def connectionMade(self):
        self.items = []

    def lineReceived(self, line):
        self.items.append(line.decode())
        self.sendLine(VERSION + b" " + ",".join(self.items).encode())

    def getMigrationState(self):
        return {"items": self.items}

    def restoreMigrationState(self, state):
        if "refuse" in state["items"]:
            raise ValueError("refused")
        self.items = state["items"]

    def upgradeMigrationState(self, fromVersion, state):
        state["items"].append("upgraded")
        return state


def makeFactory():
    return Factory.forProtocol(Keeper)
"""


class ReloadCopyTests(ModulesUnchangedMixin, SynchronousTestCase):
    """
    The new code is given copies: whatever it does to them, the old
    protocols are as they were if the reload rolls back.
    """

    def test_changedSinceCopyNotShared(self) -> None:
        """
        A state taken again in the pause (it changed since the pre-copy) is
        a copy: the new code changing it in place leaves the old protocol
        as it was when another connection makes the reload roll back.
        """
        live = Live(self, KEEPER, sliceSizes=(1, 500))
        (first, firstTransport), (second, secondTransport) = (
            live.connect(),
            live.connect(),
        )
        exchange(first, firstTransport, b"a")
        exchange(second, secondTransport, b"refuse")
        live.change(KEEPER.replace('b"v1"', 'b"v2"').replace("= 1\n", "= 2\n"))
        before = snapshotModules()
        d = live.host.requestUpgrade(None, live.progress.append)
        self.assertEqual(exchange(first, firstTransport, b"b"), b"v1 a,b\n")
        live.host.reactor.advance(0)
        report = self.successResultOf(d)
        self.assertEqual(report["outcome"], "rolled-back")
        self.assertIn("refused", report["reason"])
        self.assertModulesAre(before)
        self.assertEqual(exchange(first, firstTransport, b"c"), b"v1 a,b,c\n")
        self.assertEqual(exchange(second, secondTransport, b"d"), b"v1 refuse,d\n")


#: L{MIGRATABLE} whose protocol can abandon a restore (noting its count)
ABANDONING = MIGRATABLE.replace(
    'VERSION = b"v1"\n', 'VERSION = b"v1"\nABANDONED = []\n'
).replace(
    "    def upgradeMigrationState(self, fromVersion, state):",
    "    def abandonMigrationState(self):\n"
    "        ABANDONED.append(self.count)\n\n"
    "    def upgradeMigrationState(self, fromVersion, state):",
)
ABANDONING_V2 = _versionTwo(ABANDONING)


class RestoreAheadTests(ModulesUnchangedMixin, SynchronousTestCase):
    """
    Connections whose protocol can abandon a restore
    (C{abandonMigrationState}) are restored into their new protocol object
    ahead of the pause, while the old code serves; the pause keeps each
    one whose connection did not change since, and restores the others
    again.
    """

    def live(self, source: str = ABANDONING, count: int = 3) -> Any:
        """
        A host with C{count} connections of C{source}, the C{n}th having
        said C{n} lines, and a reload to version 2 requested: the new code
        is imported and parked, the restores ahead wait for the next turn.
        """
        live: Any = Live(self, source)
        live.connections = [live.connect() for _ in range(count)]
        for n, (hosted, transport) in enumerate(live.connections):
            for _ in range(n + 1):
                exchange(hosted, transport, b"x")
            transport.clear()
        live.oldModule = sys.modules[live.module]
        live.before = snapshotModules()
        live.change(_versionTwo(source))
        live.d = live.host.requestUpgrade(None, live.progress.append)
        self.assertNoResult(live.d)
        return live

    def test_restoredAhead(self) -> None:
        """
        The new code is imported first and waits outside C{sys.modules}
        while the old code serves; every connection is restored ahead of
        the pause, its new object's writes held until the commit; the pause
        keeps them all.
        """
        live = self.live()
        self.assertModulesAre(live.before)
        runOne(live.host.reactor)
        self.assertModulesAre(live.before)
        for (hosted, transport), n in zip(live.connections, [1, 2, 3]):
            self.assertIsInstance(hosted.wrappedProtocol, live.oldModule.Counter)
            self.assertEqual(exchange(hosted, transport, b"y"), b"v1 y %d\n" % (n + 1))
        # They changed: restored again in the pause.
        runOne(live.host.reactor)
        report = self.successResultOf(live.d)
        self.assertEqual((report["outcome"], report["moved"]), ("success", 3))
        newModule = sys.modules[live.module]
        self.assertIsNot(newModule, live.oldModule)
        self.assertEqual(newModule.ABANDONED, [1, 2, 3])

    def test_unchangedKept(self) -> None:
        """
        A connection unchanged between its restore ahead and the pause
        keeps the object restored ahead: what it wrote then reaches the
        client once, after the commit, and it goes on from its state.
        """
        live = self.live()
        runOne(live.host.reactor)
        for _, transport in live.connections:
            self.assertEqual(transport.value(), b"")
        runOne(live.host.reactor)
        report = self.successResultOf(live.d)
        self.assertIn(
            "3 connections restored by the new code ahead of the pause, while "
            "the old code served; 0 of them abandoned (abandonMigrationState): "
            "their connection changed or closed before the pause",
            report["notes"],
        )
        self.assertEqual(sys.modules[live.module].ABANDONED, [])
        for (hosted, transport), n in zip(live.connections, [1, 2, 3]):
            self.assertEqual(transport.value(), b"restored %d\n" % (n,))
            self.assertEqual(exchange(hosted, transport, b"z"), b"v2 z %d\n" % (n + 1))

    def test_switchedBeforeNextEventAfterCommit(self) -> None:
        """
        A connection restored ahead and kept is switched, after the commit,
        before its next event when that comes before its slice: what its
        new object wrote when restored, then the answer of the new code.
        Before the commit, its events are the old code's.
        """
        live: Any = Live(self, ABANDONING, sliceSizes=(500, 1))
        connections = [live.connect() for _ in range(3)]
        for hosted, transport in connections:
            exchange(hosted, transport, b"x")
        live.change(ABANDONING_V2)
        d = live.host.requestUpgrade(None, live.progress.append)
        runOne(live.host.reactor)
        second, secondTransport = connections[1]
        self.assertEqual(exchange(second, secondTransport, b"w"), b"v1 w 2\n")
        runOne(live.host.reactor)
        self.assertNoResult(d)
        hosted, transport = connections[2]
        transport.clear()
        self.assertEqual(exchange(hosted, transport, b"y"), b"restored 1\nv2 y 2\n")
        live.host.reactor.advance(0)
        self.assertEqual(self.successResultOf(d)["moved"], 3)
        first, firstTransport = connections[0]
        self.assertEqual(firstTransport.value(), b"v1 x 1\nrestored 1\n")

    def test_changedRestoredAgain(self) -> None:
        """
        A connection whose state changed between its restore ahead and the
        pause is restored again in the pause from its new state, into a
        fresh object; the stale object is abandoned and what it wrote is
        dropped: nothing the connection did is lost, nothing doubled.
        """
        live = self.live()
        runOne(live.host.reactor)
        hosted, transport = live.connections[1]
        self.assertEqual(exchange(hosted, transport, b"y"), b"v1 y 3\n")
        transport.clear()
        runOne(live.host.reactor)
        report = self.successResultOf(live.d)
        self.assertEqual((report["outcome"], report["moved"]), ("success", 3))
        self.assertIn(
            "3 connections restored by the new code ahead of the pause, while "
            "the old code served; 1 of them abandoned (abandonMigrationState): "
            "their connection changed or closed before the pause",
            report["notes"],
        )
        self.assertEqual(sys.modules[live.module].ABANDONED, [2])
        self.assertEqual(transport.value(), b"restored 3\n")
        self.assertEqual(exchange(hosted, transport, b"z"), b"v2 z 4\n")
        other, otherTransport = live.connections[2]
        self.assertEqual(otherTransport.value(), b"restored 3\n")

    def test_closedAbandoned(self) -> None:
        """
        A connection lost between its restore ahead and the pause has its
        object abandoned; the others are switched.
        """
        live = self.live()
        runOne(live.host.reactor)
        hosted, transport = live.connections[0]
        hosted.connectionLost(Failure(ConnectionDone()))
        runOne(live.host.reactor)
        report = self.successResultOf(live.d)
        self.assertEqual((report["outcome"], report["moved"]), ("success", 2))
        self.assertEqual(sys.modules[live.module].ABANDONED, [1])
        self.assertEqual(transport.value(), b"")

    def test_chatKnowsEveryoneOnce(self) -> None:
        """
        The chat example's users are in the new code's room once each,
        with their latest nickname, whether they changed between their
        restore ahead and the pause, left, or did nothing.
        """
        live = Live(self, chatSource())
        users = [live.connect() for _ in range(4)]
        for _, transport in users:
            transport.clear()
        live.change(chatSource("Hello"))
        d = live.host.requestUpgrade(None, live.progress.append)
        runOne(live.host.reactor)
        first, firstTransport = users[0]
        first.dataReceived(b"/nick alice\n")
        users[3][0].connectionLost(Failure(ConnectionDone()))
        runOne(live.host.reactor)
        live.host.reactor.advance(0)
        self.assertEqual(self.successResultOf(d)["moved"], 3)
        firstTransport.clear()
        first.dataReceived(b"/who\n")
        self.assertEqual(firstTransport.value(), b"* In lobby: alice, guest2, guest3\n")

    def test_refusedAheadRollsBack(self) -> None:
        """
        A state the new code refuses while restoring ahead rolls everything
        back: C{sys.modules} exactly as before, every connection on the old
        code, nothing written by the new objects.
        """
        live = self.live(
            ABANDONING.replace(
                "    def restoreMigrationState(self, state):\n",
                "    def restoreMigrationState(self, state):\n"
                "        if VERSION == b'v2' and state['total'] == 2:\n"
                "            raise ValueError('not two')\n",
            )
        )
        runOne(live.host.reactor)
        report = self.successResultOf(live.d)
        self.assertEqual(report["outcome"], "rolled-back")
        self.assertIn("not two", report["reason"])
        self.assertModulesAre(live.before)
        self.assertEqual(live.host.reactor.calls, [])
        for (hosted, transport), n in zip(live.connections, [1, 2, 3]):
            # Nothing left for its next event: the object restored ahead is
            # let go of.
            self.assertFalse(hosted.finishNow())
            self.assertEqual(transport.value(), b"")
            self.assertEqual(exchange(hosted, transport, b"y"), b"v1 y %d\n" % (n + 1))

    def test_failedAbandonRollsBack(self) -> None:
        """
        If the new code fails to abandon a stale object, the reload rolls
        back: the new code's shared state cannot be trusted.
        """
        live = self.live(
            ABANDONING.replace(
                "        ABANDONED.append(self.count)\n",
                "        raise RuntimeError('cannot abandon')\n",
            )
        )
        runOne(live.host.reactor)
        hosted, transport = live.connections[0]
        self.assertEqual(exchange(hosted, transport, b"y"), b"v1 y 2\n")
        runOne(live.host.reactor)
        report = self.successResultOf(live.d)
        self.assertEqual(report["outcome"], "rolled-back")
        self.assertIn("cannot abandon", report["reason"])
        self.assertModulesAre(live.before)
        for (hosted, transport), n in zip(live.connections, [2, 2, 3]):
            self.assertFalse(hosted.finishNow())
            transport.clear()
            self.assertEqual(exchange(hosted, transport, b"z"), b"v1 z %d\n" % (n + 1))


class ReloadThreadWorkTests(ModulesUnchangedMixin, SynchronousTestCase):
    """
    An answer a thread owes the reactor (C{deferToThread}, C{callFromThread})
    while a migratable connection is live would reach its I{old} protocol
    object after the pause, once the new object (restored from the state
    taken before) serves the connection: lost.  A reload waits for such
    work before the pause, while the old code serves, at most
    C{--safe-point-timeout} seconds (3 by default), and rolls back rather
    than pause with work in flight.
    """

    def live(self, source: str, count: int = 1) -> Any:
        """
        A host on a reactor with threads, with C{count} connections of
        C{source}, the C{n}th having said C{n} lines, and the version 2 of
        C{source} written.
        """
        live: Any = Live(self, source, reactor=ThreadedFakeReactor())
        live.reactor = live.host.reactor
        live.connections = [live.connect() for _ in range(count)]
        for n, (hosted, transport) in enumerate(live.connections):
            for _ in range(n + 1):
                exchange(hosted, transport, b"x")
            transport.clear()
        live.before = snapshotModules()
        live.change(_versionTwo(source))
        return live

    def owe(self, live: Any, index: int = 0) -> Any:
        """
        Start a thread job whose answer the C{index}th connection's
        protocol object (as it is now) counts, and writes, when the
        reactor gets it, as a C{deferToThread} callback would.

        @return: the callable ending the job with an answer.
        """
        hosted, _ = live.connections[index]
        protocol = hosted.wrappedProtocol

        def answered(answer: bytes) -> None:
            protocol.count += 1
            protocol.sendLine(answer)

        return live.reactor.startJob("answer", answered)

    def waitOut(self, live: Any, d: Any, seconds: float) -> None:
        """
        Let the reactor's clock run to just before C{seconds}, with C{d}
        still waiting, then to C{seconds}.
        """
        live.reactor.advance(seconds - THREAD_WORK_POLL)
        self.assertNoResult(d)
        live.reactor.advance(THREAD_WORK_POLL)

    def test_answerDeliveredBeforeThePause(self) -> None:
        """
        The reload waits, saying so, while the old code serves; the
        answer reaches the client from the old object, and the new object
        is restored from the state that includes it.
        """
        live = self.live(MIGRATABLE)
        finish = self.owe(live)
        hosted, transport = live.connections[0]
        old = hosted.wrappedProtocol
        d = live.host.requestUpgrade(None, live.progress.append)
        self.assertNoResult(d)
        self.assertIn(
            "waiting up to 3 s for 1 job of the reactor's thread pool "
            "(deferToThread) running to finish before the pause",
            live.progress,
        )
        # Nothing imported yet, and the old code serves.
        self.assertModulesAre(live.before)
        self.assertEqual(exchange(hosted, transport, b"y"), b"v1 y 2\n")
        live.reactor.advance(1)
        self.assertNoResult(d)
        transport.clear()
        finish(b"answer")
        live.reactor.advance(THREAD_WORK_POLL)
        report = self.successResultOf(d)
        self.assertEqual((report["outcome"], report["moved"]), ("success", 1))
        self.assertEqual(transport.value(), b"answer\nrestored 3\n")
        self.assertIsNot(hosted.wrappedProtocol, old)
        self.assertEqual(exchange(hosted, transport, b"z"), b"v2 z 4\n")
        self.assertTrue(
            any(
                "the threads' work finished after 1.0" in step for step in live.progress
            ),
            live.progress,
        )

    def test_answerTooSlowRollsBack(self) -> None:
        """
        Work still in flight at C{--safe-point-timeout} rolls the reload
        back, naming it; the answer, when it comes, reaches the client from
        the old code, which serves on.
        """
        live = self.live(MIGRATABLE)
        finish = self.owe(live)
        hosted, transport = live.connections[0]
        d = live.host.requestUpgrade(None, live.progress.append)
        self.waitOut(live, d, 3.0)
        report = self.successResultOf(d)
        self.assertEqual(report["outcome"], "rolled-back")
        self.assertEqual(
            report["reason"],
            "threads still owed answers after 3 s (1 job of the reactor's "
            "thread pool (deferToThread) running), which would reach the old "
            "protocol objects after the new code took their connections: try "
            "again once they are done, or raise --safe-point-timeout",
        )
        self.assertModulesAre(live.before)
        self.assertEqual(live.host.generation, 1)
        finish(b"late")
        live.reactor.advance(0)
        self.assertEqual(transport.value(), b"late\n")
        self.assertEqual(exchange(hosted, transport, b"y"), b"v1 y 3\n")

    def test_inPlaceDoesNotWait(self) -> None:
        """
        Protocols upgraded in place keep their object and its transport:
        an answer on its way reaches the client all the same, so the reload
        does not wait for it.
        """
        live = self.live(PLAIN)
        finish = self.owe(live)
        hosted, transport = live.connections[0]
        old = hosted.wrappedProtocol
        report = live.upgrade()
        self.assertEqual((report["outcome"], report["moved"]), ("success", 1))
        self.assertFalse(any("waiting" in step for step in live.progress))
        finish(b"answer")
        live.reactor.advance(0)
        self.assertIs(hosted.wrappedProtocol, old)
        self.assertEqual(transport.value(), b"answer\n")
        self.assertEqual(exchange(hosted, transport, b"y"), b"v2 y 3\n")

    def test_callFromThreadWaitedFor(self) -> None:
        """
        A call another thread queued for the reactor (C{callFromThread})
        is delivered before the pause too.
        """
        live = self.live(MIGRATABLE)
        hosted, transport = live.connections[0]
        protocol = hosted.wrappedProtocol
        live.reactor.callFromThread(protocol.lineReceived, b"queued")
        d = live.host.requestUpgrade(None, live.progress.append)
        self.assertNoResult(d)
        live.reactor.advance(THREAD_WORK_POLL)
        report = self.successResultOf(d)
        self.assertEqual(report["outcome"], "success")
        self.assertEqual(transport.value(), b"v1 queued 2\nrestored 2\n")

    def test_restoredAheadThenAnswered(self) -> None:
        """
        With restores ahead of the pause, the wait comes after them, right
        before the pause: an answer that changes a connection meanwhile has
        its object restored ahead abandoned, and the connection restored
        again in the pause from its state with the answer.
        """
        live = self.live(ABANDONING, count=2)
        finish = self.owe(live, 1)
        d = live.host.requestUpgrade(None, live.progress.append)
        # The restores ahead, then the start of the wait.
        runOne(live.reactor)
        runOne(live.reactor)
        self.assertNoResult(d)
        self.assertTrue(any("before the pause" in step for step in live.progress))
        self.assertModulesAre(live.before)
        finish(b"answer")
        live.reactor.advance(THREAD_WORK_POLL)
        report = self.successResultOf(d)
        self.assertEqual((report["outcome"], report["moved"]), ("success", 2))
        self.assertEqual(sys.modules[live.module].ABANDONED, [2])
        hosted, transport = live.connections[1]
        self.assertEqual(transport.value(), b"answer\nrestored 3\n")
        self.assertEqual(exchange(hosted, transport, b"z"), b"v2 z 4\n")
        first, firstTransport = live.connections[0]
        self.assertEqual(firstTransport.value(), b"restored 1\n")

    def test_restoredAheadRolledBack(self) -> None:
        """
        A rollback for work still in flight after restores ahead drops the
        new code and every object restored ahead: each connection stays
        on its old object, and the answer reaches it there.
        """
        live = self.live(ABANDONING, count=2)
        finish = self.owe(live, 0)
        d = live.host.requestUpgrade(None, live.progress.append)
        runOne(live.reactor)
        runOne(live.reactor)
        self.waitOut(live, d, 3.0)
        report = self.successResultOf(d)
        self.assertEqual(report["outcome"], "rolled-back")
        self.assertIn("threads still owed answers after 3 s", report["reason"])
        self.assertModulesAre(live.before)
        finish(b"late")
        live.reactor.advance(0)
        self.assertEqual(live.connections[0][1].value(), b"late\n")
        for hosted, transport in live.connections:
            # Nothing left for its next event: the object restored ahead is
            # let go of.
            self.assertFalse(hosted.finishNow())
            self.assertEqual(exchange(hosted, transport, b"y"), b"v1 y 3\n")
        self.assertEqual(sys.modules[live.module].ABANDONED, [])

    def test_pauseChecksAgain(self) -> None:
        """
        The pause itself, as it begins, refuses to replace a protocol
        object while thread work is in flight (the wait before it, in the
        same reactor step, rules that out; this is the last guard).
        """
        live = self.live(MIGRATABLE)
        attempt = ReloadAttempt(
            live.host, live.progress.append, live.fingerprints, "reload"
        )
        self.assertIsNone(attempt.begin())
        self.successResultOf(attempt.copyStates())
        self.owe(live)
        report = self.successResultOf(attempt._pause())
        self.assertEqual(report.outcome.value, "rolled-back")
        self.assertEqual(
            report.reason,
            "threads still owed answers as the pause began (1 job of the "
            "reactor's thread pool (deferToThread) running), which would reach "
            "the old protocol objects after the new code took their "
            "connections: try again once they are done, or raise "
            "--safe-point-timeout",
        )
        self.assertModulesAre(live.before)
        hosted, transport = live.connections[0]
        self.assertEqual(exchange(hosted, transport, b"y"), b"v1 y 2\n")

    def test_pauseGoesOnWithoutRebuilds(self) -> None:
        """
        The pause's own look rolls nothing back when no connection is
        rebuilt: an object upgraded in place receives its answer.
        """
        live = self.live(PLAIN)
        attempt = ReloadAttempt(
            live.host, live.progress.append, live.fingerprints, "reload"
        )
        self.assertIsNone(attempt.begin())
        self.successResultOf(attempt.copyStates())
        finish = self.owe(live)
        report = self.successResultOf(attempt._pause())
        self.assertEqual(report.outcome.value, "success")
        hosted, transport = live.connections[0]
        finish(b"answer")
        live.reactor.advance(0)
        self.assertEqual(transport.value(), b"answer\n")
