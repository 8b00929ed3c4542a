# -*- test-case-name: migrate.test.test_reload -*-
"""
Loading an application's new code into the running process, all or
nothing.

The strategy in L{migrate.strategies.reload} is built on three parts, all
here:

  - I{which modules}: L{findApplicationModules} names the modules that make
    up the application (the C{--app} module's package, or the modules given
    with C{--reload-module}) and the ones that cannot be reloaded, and why
    (Twisted, migrate, the standard library, C extensions, ...);
    L{modulesToReload} picks those whose source changed, by content, and
    the modules that import from them;

  - I{staging}: L{ModuleStaging} imports the new code under the modules'
    own names, always compiled from the source file (never from a
    C{__pycache__} that may be stale), so that the new modules import each
    other in whatever order they need, exactly as in a fresh process; until
    it commits, L{ModuleStaging.restore} puts C{sys.modules} back exactly as
    it was, and L{ModuleStaging.park} sets the new modules aside while the
    old code serves between two steps of a reload;

  - I{live objects}: L{HeldTransport} holds what a new protocol writes while
    it is restored, until the reload commits; L{DetachedTransport} is what
    the replaced protocol is left with; L{counterpart} and
    L{classSwapProblem} decide whether an instance can be given its class's
    new code in place (C{__class__} assignment).
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import importlib.machinery
import os
import sys
import traceback
import weakref
from types import ModuleType
from typing import Any, Iterable, Mapping, MutableMapping, Sequence

from attrs import define, field, frozen
from twisted.internet.interfaces import ITransport
from zope.interface import implementer

from ..._handoff._transport import DetachedTransport

__all__ = [
    "ApplicationModules",
    "DetachedTransport",
    "Fingerprint",
    "HeldTransport",
    "ModuleFingerprints",
    "ModuleStaging",
    "ReloadFailed",
    "classSwapProblem",
    "counterpart",
    "describeError",
    "findApplicationModules",
    "hostModuleReason",
    "importedModules",
    "modulesToReload",
]

#: top-level packages never reloaded: the host runs on them
_HOST_PACKAGES = frozenset(
    [
        "attr",
        "attrs",
        "automat",
        "constantly",
        "hyperlink",
        "incremental",
        "migrate",
        "twisted",
        "typing_extensions",
        "zope",
    ]
)

#: the part of migrate that is application code, not host machinery
_MIGRATE_APPLICATIONS = "migrate.examples"


class ReloadFailed(Exception):
    """
    The new code could not be loaded; nothing was changed.

    @ivar module: the module that failed, if one did.
    @ivar reason: why, for the report.
    """

    def __init__(self, module: str | None, reason: str) -> None:
        Exception.__init__(self, module, reason)
        self.module = module
        self.reason = reason

    def __str__(self) -> str:
        return self.reason


def describeError(error: BaseException, filename: str | None = None) -> str:
    """
    Describe an exception raised by application code, in one line.

    @param error: the exception.
    @param filename: a source file; the last line of it the traceback went
        through is named.

    @return: C{Type: message}, with C{(file, line N)} where known.
    """
    try:
        text = "{}: {}".format(type(error).__name__, error)
    except Exception:
        text = type(error).__name__
    if len(text) > 500:
        text = text[:497] + "..."
    if filename is not None and not isinstance(error, SyntaxError):
        frames = [
            frame
            for frame in traceback.extract_tb(error.__traceback__)
            if frame.filename == filename
        ]
        if frames:
            text += " ({}, line {})".format(
                os.path.basename(filename), frames[-1].lineno
            )
    return text


def _topLevel(name: str) -> str:
    return name.partition(".")[0]


def _within(name: str, unit: str) -> bool:
    return name == unit or name.startswith(unit + ".")


def hostModuleReason(name: str) -> str | None:
    """
    Why a module must never be reloaded, if it must not.

    @param name: a module's name.

    @return: the reason, or L{None} when it belongs to no part of what the
        host itself runs on.
    """
    top = _topLevel(name)
    if name == "__main__":
        return "it is the program's main module"
    if top == "migrate" and not _within(name, _MIGRATE_APPLICATIONS):
        return "it is part of migrate, which the host runs on"
    if top == "twisted":
        return "it is part of Twisted, which the host runs on"
    if top in _HOST_PACKAGES and top != "migrate":
        return "the host runs on it ({})".format(top)
    if top in sys.builtin_module_names or top in sys.stdlib_module_names:
        return "it is part of the standard library"
    return None


def _loaderReason(module: ModuleType) -> str | None:
    """
    Why a loaded module cannot be reloaded from source, if it cannot.

    @return: the reason, or L{None} for a module loaded from a source file
        that still exists.
    """
    spec = getattr(module, "__spec__", None)
    loader = getattr(spec, "loader", None)
    origin = getattr(spec, "origin", None)
    if isinstance(loader, importlib.machinery.ExtensionFileLoader):
        return "it is a C extension ({})".format(os.path.basename(origin or "?"))
    if isinstance(loader, importlib.machinery.SourcelessFileLoader):
        return "it was loaded from bytecode, without source"
    if not isinstance(loader, importlib.machinery.SourceFileLoader):
        return "it was not loaded from a source file ({})".format(
            type(loader).__name__ if loader is not None else "no loader"
        )
    if not origin or not os.path.isfile(origin):
        return "its source file is gone ({})".format(origin)
    return None


def _isNamespacePackage(module: ModuleType) -> bool:
    spec = getattr(module, "__spec__", None)
    return (
        spec is not None
        and spec.origin in (None, "namespace")
        and spec.submodule_search_locations is not None
    )


@frozen
class ApplicationModules:
    """
    The modules that make up the application, as loaded now.

    @ivar entry: the module the application's factory comes from, if known.
    @ivar units: names whose module and submodules are the application.
    @ivar loaded: the application's reloadable modules now in
        C{sys.modules}, in import order.
    @ivar refused: C{(name, why)} for each application module, or unit,
        that cannot be reloaded.
    """

    entry: str | None
    units: tuple[str, ...]
    loaded: tuple[str, ...]
    refused: tuple[tuple[str, str], ...]

    def contains(self, name: str) -> bool:
        """
        Whether a module, loaded or not, is part of the application and may
        be reloaded.

        @param name: a module's name.
        """
        if hostModuleReason(name) is not None:
            return False
        return name == self.entry or any(_within(name, unit) for unit in self.units)


def findApplicationModules(
    entry: str | None,
    explicit: Sequence[str] = (),
    modules: Mapping[str, ModuleType] | None = None,
) -> ApplicationModules:
    """
    Name the modules that make up the application.

    By default the application is the package of the module its factory
    comes from (C{--app pkg.server:make}: C{pkg} and everything under it;
    C{--app server:make}: C{server}, and its submodules if it is a
    package).  Given C{explicit} names (C{--reload-module}), it is those
    modules and their submodules, plus the entry module itself (the factory
    is always rebuilt from new code).

    @param entry: the module named by the host's C{applicationSpec}.
    @param explicit: module names from C{--reload-module}.
    @param modules: C{sys.modules}, or a stand-in.

    @return: the application's modules.
    """
    if modules is None:
        modules = sys.modules
    if explicit:
        units = tuple(dict.fromkeys(explicit))
    elif entry is not None:
        units = (entry.rpartition(".")[0] or entry,)
    else:
        units = ()
    refused: dict[str, str] = {}
    usable: list[str] = []
    for unit in units:
        why = hostModuleReason(unit)
        if why is not None:
            refused[unit] = why
        elif not any(_within(name, unit) for name in list(modules)):
            refused[unit] = "it is not loaded in this process"
        else:
            usable.append(unit)
    if entry is not None:
        why = hostModuleReason(entry)
        if why is not None:
            refused[entry] = why
    app = ApplicationModules(entry, tuple(usable), (), ())
    loaded: list[str] = []
    for name, module in list(modules.items()):
        if module is None or not app.contains(name):
            continue
        if _isNamespacePackage(module):
            continue
        why = _loaderReason(module)
        if why is not None:
            refused[name] = why
            continue
        loaded.append(name)
    return ApplicationModules(
        entry, tuple(usable), tuple(loaded), tuple(sorted(refused.items()))
    )


@frozen
class Fingerprint:
    """
    Which source a module was compiled from.

    The content's hash decides whether a module changed: a file rewritten
    within the file system's timestamp granularity, with the same size, is
    still seen to have changed (the case in which Python's own
    C{__pycache__} check serves stale bytecode).

    @ivar digest: SHA-256 of the source bytes.
    @ivar size: their length.
    @ivar mtimeNs: the file's modification time, for messages only.
    """

    digest: bytes
    size: int
    mtimeNs: int

    @classmethod
    def ofSource(cls, data: bytes, mtimeNs: int) -> Fingerprint:
        """
        @param data: source bytes.
        @param mtimeNs: the modification time of the file they came from.
        """
        return cls(hashlib.sha256(data).digest(), len(data), mtimeNs)

    @classmethod
    def ofFile(cls, path: str) -> Fingerprint:
        """
        @param path: a source file.

        @raise OSError: if it cannot be read.
        """
        return cls.ofSource(*_readSource(path))


def _readSource(path: str) -> tuple[bytes, int]:
    """
    Read a source file.

    @return: its bytes and modification time, in nanoseconds.

    @raise OSError: if it cannot be read.
    """
    with open(path, "rb") as f:
        mtimeNs = os.fstat(f.fileno()).st_mtime_ns
        return f.read(), mtimeNs


def importedModules(source: bytes, name: str, isPackage: bool) -> frozenset[str]:
    """
    The modules a module's source imports from, anywhere in it.

    @param source: the module's source.
    @param name: the module's name (to resolve relative imports).
    @param isPackage: whether it is a package's C{__init__}.

    @return: the absolute names of the modules named by its C{import} and
        C{from ... import} statements, and of the names imported from them
        (which may be submodules); empty if it does not parse.
    """
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return frozenset()
    package = name if isPackage else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".") if package else []
                if node.level - 1 > len(parts):
                    continue
                base = ".".join(parts[: len(parts) - (node.level - 1)])
                if node.module:
                    base = base + "." + node.module if base else node.module
            else:
                base = node.module or ""
            if not base:
                continue
            found.add(base)
            found.update(base + "." + alias.name for alias in node.names)
    return frozenset(found)


class ModuleFingerprints:
    """
    Remembers which source each module this process reloaded was compiled
    from.

    Entries name the module object weakly: a module replaced by anything
    else (or collected) is no longer known, and there is at most one entry
    per module name, so repeated reloads do not grow this.
    """

    def __init__(self) -> None:
        self._known: dict[str, tuple[weakref.ref[ModuleType], Fingerprint]] = {}
        self._imports: dict[str, tuple[bytes, frozenset[str]]] = {}

    def record(self, module: ModuleType, fingerprint: Fingerprint) -> None:
        """
        Note that C{module} was compiled from source with C{fingerprint}.
        """
        self._known[module.__name__] = (weakref.ref(module), fingerprint)

    def fingerprintOf(self, module: ModuleType) -> Fingerprint | None:
        """
        The fingerprint of the source C{module} was compiled from, or
        L{None} if this process does not know it (a module imported the
        ordinary way, before any reload).
        """
        entry = self._known.get(module.__name__)
        if entry is None or entry[0]() is not module:
            return None
        return entry[1]

    def importsOf(
        self, module: ModuleType, source: bytes, digest: bytes
    ) -> frozenset[str]:
        """
        What C{module}'s source imports (see L{importedModules}), parsed
        once per version of the source.
        """
        name = module.__name__
        cached = self._imports.get(name)
        if cached is None or cached[0] != digest:
            isPackage = getattr(module, "__path__", None) is not None
            cached = (digest, importedModules(source, name, isPackage))
            self._imports[name] = cached
        return cached[1]

    def __len__(self) -> int:
        return len(self._known)

    def prune(self) -> None:
        """
        Forget modules that no longer exist.
        """
        for name, (ref, _) in list(self._known.items()):
            if ref() is None:
                del self._known[name]
                self._imports.pop(name, None)


def _dependsOn(module: ModuleType, names: set[str]) -> bool:
    """
    Whether a module's globals hold anything from the modules C{names}: a
    module itself (C{import a}), or a class, function or other object
    defined there (C{from a import X}).  A package's attribute naming its
    own submodule is not a dependency (the import system updates it).
    """
    own = module.__name__
    name: str | None
    for key, value in list(vars(module).items()):
        if isinstance(value, ModuleType):
            name = value.__name__
            if name == own + "." + key:
                continue
        elif isinstance(value, type) or callable(value):
            name = getattr(value, "__module__", None)
        else:
            name = type(value).__module__
        if name in names:
            return True
    return False


def modulesToReload(
    app: ApplicationModules,
    fingerprints: ModuleFingerprints,
    modules: Mapping[str, ModuleType] | None = None,
) -> tuple[list[str], list[str], list[str]]:
    """
    Decide which application modules to reload.

    A module is reloaded when its source changed since it was compiled (by
    content), when this process does not know what it was compiled from
    (every module, at the first reload), or when it imports from a module
    that is reloaded (otherwise a C{from a import X} would keep the old
    C{X}): its source imports it, or its globals hold something from it.

    @return: C{(reload, changed, unknown)}: the modules to reload, in import
        order; those among them whose source changed; those whose source
        this process had no record of.
    """
    if modules is None:
        modules = sys.modules
    changed: list[str] = []
    unknown: list[str] = []
    imports: dict[str, frozenset[str]] = {}
    for name in app.loaded:
        module = modules[name]
        known = fingerprints.fingerprintOf(module)
        if known is None:
            unknown.append(name)
            continue
        try:
            source, mtimeNs = _readSource(module.__spec__.origin)  # type: ignore[union-attr,arg-type]
        except OSError:
            changed.append(name)
            continue
        current = Fingerprint.ofSource(source, mtimeNs)
        if current.digest != known.digest:
            changed.append(name)
        else:
            imports[name] = fingerprints.importsOf(module, source, current.digest)
    chosen = set(changed) | set(unknown)
    grew = bool(chosen)
    while grew:
        grew = False
        for name in app.loaded:
            if name in chosen:
                continue
            if not imports.get(name, frozenset()).isdisjoint(chosen) or _dependsOn(
                modules[name], chosen
            ):
                chosen.add(name)
                grew = True
    return [name for name in app.loaded if name in chosen], changed, unknown


class _SourceOnlyLoader(importlib.machinery.SourceFileLoader):
    """
    Loads a module by compiling its source file, never from bytecode in
    C{__pycache__} (which Python trusts when the source's size and
    modification time, in whole seconds, match: not enough for a file
    rewritten within the same second), and writes no bytecode.

    @ivar fingerprint: the fingerprint of the source it compiled.
    @ivar failures: where it notes C{(name, exception)} when executing the
        module fails; set to L{None} once the staging is over.
    """

    fingerprint: Fingerprint | None = None
    failures: list[tuple[str, BaseException]] | None = None

    def get_code(self, fullname: str) -> Any:
        path = self.get_filename(fullname)
        with open(path, "rb") as f:
            mtimeNs = os.fstat(f.fileno()).st_mtime_ns
            data = f.read()
        self.fingerprint = Fingerprint.ofSource(data, mtimeNs)
        return self.source_to_code(data, path)

    def exec_module(self, module: ModuleType) -> None:
        try:
            super().exec_module(module)
        except BaseException as e:
            if self.failures is not None:
                self.failures.append((module.__name__, e))
            raise


@define
class _StagingFinder:
    """
    Finds the application's modules during staging, loading them with
    L{_SourceOnlyLoader}; every other module is left to the ordinary
    finders.
    """

    app: ApplicationModules
    loaders: list[_SourceOnlyLoader] = field(factory=list)
    failures: list[tuple[str, BaseException]] = field(factory=list)

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if not self.app.contains(name):
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if (
            spec is None
            or type(spec.loader) is not importlib.machinery.SourceFileLoader
        ):
            return spec
        loader = _SourceOnlyLoader(spec.name, spec.origin)  # type: ignore[arg-type]
        loader.failures = self.failures
        spec.loader = loader
        self.loaders.append(loader)
        return spec

    def invalidate_caches(self) -> None:
        pass


_MISSING = object()


@define
class ModuleStaging:
    """
    New code for some modules, imported under their own names but not
    committed yet.

    L{stage} takes the modules out of C{sys.modules} and imports each one
    afresh, from source; the new modules import each other (and whatever
    else they need) on demand, in the order they need, as in a fresh
    process, while modules outside the set stay as they are.  Until
    L{commit}, L{restore} puts C{sys.modules} (and the attributes the import
    system set on packages outside the set) back exactly as they were, and
    L{park} sets the new modules aside (the old ones back in their place)
    while the old code serves between two steps of a reload, until
    L{unpark}.

    @ivar app: the application's modules.
    @ivar names: the modules to reload, in import order.
    @ivar staged: the modules the staging loaded from the application's
        source, by name (C{names} and any new application module the new
        code imported).
    @ivar parked: whether the staged modules are set aside (L{park}).
    """

    app: ApplicationModules
    names: Sequence[str]
    modules: MutableMapping[str, Any] = field(factory=lambda: sys.modules)
    staged: dict[str, ModuleType] = field(factory=dict)
    _snapshot: dict[str, Any] | None = None
    _parents: list[tuple[ModuleType, str, Any]] = field(factory=list)
    _loaders: list[_SourceOnlyLoader] = field(factory=list)
    #: the staged modules' links from packages outside the staged set:
    #: (package, name, before the staging, after it)
    _links: list[tuple[ModuleType, str, Any, Any]] = field(factory=list)
    parked: bool = False

    def stage(self) -> dict[str, ModuleType]:
        """
        Import the new code.

        @return: L{staged}.

        @raise ReloadFailed: naming the module that failed and why, once
            everything is as it was.
        """
        modules = self.modules
        self._snapshot = dict(modules)
        for name in self.names:
            parentName, _, child = name.rpartition(".")
            parent = modules.get(parentName) if parentName else None
            if isinstance(parent, ModuleType) and parentName not in self.names:
                self._parents.append((parent, child, vars(parent).get(child, _MISSING)))
        for name in self.names:
            modules.pop(name, None)
        importlib.invalidate_caches()
        finder = _StagingFinder(self.app)
        sys.meta_path.insert(0, finder)
        current = None
        try:
            for name in self.names:
                if name not in modules:
                    current = name
                    importlib.import_module(name)
        except (Exception, SystemExit) as e:
            culprit = next(
                (where for where, error in finder.failures if error is e), current
            )
            module = self._snapshot.get(culprit) if culprit else None
            filename = getattr(getattr(module, "__spec__", None), "origin", None)
            if isinstance(e, SyntaxError) or filename is None:
                filename = getattr(e, "filename", None) or filename
            self.restore()
            raise ReloadFailed(
                culprit,
                "the new code of {} does not import: {}".format(
                    culprit, describeError(e, filename)
                ),
            ) from None
        finally:
            sys.meta_path.remove(finder)
            for loader in finder.loaders:
                loader.failures = None
        self._loaders = finder.loaders
        for loader in finder.loaders:
            module = modules.get(loader.name)
            if (
                isinstance(module, ModuleType)
                and getattr(module.__spec__, "loader", None) is loader
            ):
                self.staged[loader.name] = module
        missing = [name for name in self.names if name not in self.staged]
        if missing:
            self.restore()
            raise ReloadFailed(
                missing[0],
                "the new code of {} was not loaded from its source file".format(
                    missing[0]
                ),
            )
        before = {(id(parent), child): value for parent, child, value in self._parents}
        for name, module in self.staged.items():
            parentName, _, child = name.rpartition(".")
            parent = modules.get(parentName) if parentName else None
            if isinstance(parent, ModuleType) and parentName not in self.staged:
                self._links.append(
                    (
                        parent,
                        child,
                        before.get((id(parent), child), _MISSING),
                        vars(parent).get(child, _MISSING),
                    )
                )
        return self.staged

    def park(self) -> None:
        """
        Put the old modules back in C{sys.modules} (and on the packages
        outside the staged set) while the staged ones wait, not committed:
        between the turns of the reactor in which a reload works ahead of
        its pause, the old code serves, and must find what it always found.
        L{unpark} puts the staged modules back; L{restore} and L{commit}
        work either way.
        """
        snapshot = self._snapshot
        if snapshot is None or self.parked:
            return
        modules = self.modules
        for name, module in self.staged.items():
            old = snapshot.get(name, _MISSING)
            if old is not _MISSING:
                modules[name] = old
            elif modules.get(name) is module:
                del modules[name]
        for parent, child, old, _ in self._links:
            _setLink(parent, child, old)
        self.parked = True

    def unpark(self) -> None:
        """
        Undo L{park}: the staged modules are in C{sys.modules} again.
        """
        if self._snapshot is None or not self.parked:
            return
        self.modules.update(self.staged)
        for parent, child, _, new in self._links:
            _setLink(parent, child, new)
        self.parked = False

    def restore(self) -> None:
        """
        Put C{sys.modules} back exactly as it was before L{stage}.
        """
        snapshot = self._snapshot
        if snapshot is None:
            return
        self.unpark()
        modules = self.modules
        added = [name for name in list(modules) if name not in snapshot]
        for name in added:
            parentName, _, child = name.rpartition(".")
            parent = snapshot.get(parentName)
            if (
                isinstance(parent, ModuleType)
                and vars(parent).get(child) is modules[name]
            ):
                delattr(parent, child)
            del modules[name]
        for name, module in snapshot.items():
            if modules.get(name, _MISSING) is not module:
                modules[name] = module
        for parent, child, value in self._parents:
            if value is _MISSING:
                vars(parent).pop(child, None)
            else:
                setattr(parent, child, value)
        self._forget()

    def commit(self, fingerprints: ModuleFingerprints) -> None:
        """
        Keep the new code, and remember which source it was compiled from.
        """
        self.unpark()
        for loader in self._loaders:
            module = self.staged.get(loader.name)
            if module is not None and loader.fingerprint is not None:
                fingerprints.record(module, loader.fingerprint)
        fingerprints.prune()
        self._forget()

    def _forget(self) -> None:
        # Let go of the old modules: nothing here may keep them alive.
        self._snapshot = None
        self._parents = []
        self._loaders = []
        self._links = []
        self.parked = False


def _setLink(parent: ModuleType, child: str, value: Any) -> None:
    if value is _MISSING:
        vars(parent).pop(child, None)
    else:
        setattr(parent, child, value)


def counterpart(cls: type, staged: Mapping[str, ModuleType]) -> Any:
    """
    The new code's version of a class: the object of the same qualified
    name in the reloaded module.

    @param cls: a class from a reloaded module.
    @param staged: the new modules, by name.

    @return: what the new module has under that name, or L{None}.
    """
    found: Any = staged.get(cls.__module__)
    if found is None or "<locals>" in cls.__qualname__:
        return None
    for part in cls.__qualname__.split("."):
        found = vars(found).get(part) if hasattr(found, "__dict__") else None
        if found is None:
            return None
    return found


def _addsSlots(cls: type) -> bool:
    slots = vars(cls).get("__slots__")
    if slots is None:
        return False
    if isinstance(slots, str):
        return True
    return bool(tuple(slots))


def classSwapProblem(old: type, new: Any) -> str | None:
    """
    Why the instances of C{old} cannot be given the class C{new}, if they
    cannot.

    Python allows C{__class__} assignment only between classes of the same
    layout; slotted classes (C{__slots__}, as attrs' C{define} makes) are
    refused outright: their layouts differ even when their definitions do
    not.

    @return: the reason, or L{None} when the swap is safe.
    """
    name = "{}.{}".format(old.__module__, old.__qualname__)
    if new is None:
        return "{} no longer exists in the new code".format(name)
    if not isinstance(new, type):
        return "{} is no longer a class in the new code".format(name)
    for each in old.__mro__ + new.__mro__:
        if each is not object and _addsSlots(each):
            return (
                "{} is slotted ({}.__slots__): Python cannot change the "
                "class of its instances".format(name, each.__qualname__)
            )
    layout = ("__basicsize__", "__itemsize__", "__dictoffset__", "__weakrefoffset__")
    if any(getattr(old, a) != getattr(new, a) for a in layout):
        return "the new {} has another object layout".format(name)
    return None


@implementer(ITransport)
class HeldTransport:
    """
    The transport of a protocol built by the new code while the reload is
    prepared: what the protocol writes (and any other call it makes on its
    transport) is held, and happens on the real connection only if the
    reload commits.  Calls whose name starts with C{get} (C{getPeer},
    C{getHost}, ...) are answered at once.

    @ivar hosted: the connection's L{migrate._host._tracking.HostedProtocol}.
    """

    def __init__(self, hosted: Any) -> None:
        self.hosted = hosted
        self._calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] | None = []
        self._discarded = False

    def write(self, data: bytes) -> None:
        self._call("write", data)

    def writeSequence(self, data: Iterable[bytes]) -> None:
        self._call("writeSequence", list(data))

    def loseConnection(self) -> None:
        self._call("loseConnection")

    def getPeer(self) -> Any:
        return self.hosted.getPeer()

    def getHost(self) -> Any:
        return self.hosted.getHost()

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        value = getattr(self.hosted, name)
        if not callable(value) or name.startswith("get"):
            return value
        return lambda *args, **kwargs: self._call(name, *args, **kwargs)

    def _call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        if self._discarded:
            return None
        if self._calls is None:
            return getattr(self.hosted, name)(*args, **kwargs)
        self._calls.append((name, args, kwargs))
        return None

    @property
    def held(self) -> list[tuple[str, tuple[Any, ...], dict[str, Any]]]:
        """
        The calls held so far.
        """
        return list(self._calls or ())

    def release(self) -> None:
        """
        The reload commits: make the held calls, in order, and pass every
        later one straight through.
        """
        calls, self._calls = self._calls or [], None
        for name, args, kwargs in calls:
            getattr(self.hosted, name)(*args, **kwargs)

    def discard(self) -> None:
        """
        The reload rolled back: drop the held calls, and every later one
        (the protocol they come from serves nothing).
        """
        self._calls = None
        self._discarded = True
