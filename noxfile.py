"""
The test matrix: migrate on every supported Python, Twisted release and
reactor (doc/platforms.rst).

    nox -l                                  # the sessions
    nox -s tests                            # the whole suite on each Python
    nox -s twisted                          # ... on each Twisted release
    nox -s reactor                          # strategies on each reactor
    nox -s "reactor(reactor='asyncio')" -- migrate.test.test_platform_integration

Arguments after C{--} replace the test modules a session runs.  Each
session installs migrate (not editable: twistd must find the plugin) into
its own virtual environment and runs trial from a scratch directory, so the
installed copy is what is tested.  Pythons installed with pyenv are found
even when pyenv does not select them.  CI (.ci/run) runs a subset.
"""

from __future__ import annotations

import atexit
import glob
import os
import shutil
import tempfile

import nox

nox.options.error_on_missing_interpreters = True
nox.options.reuse_existing_virtualenvs = False

#: the supported Pythons, oldest first
PYTHONS = ["3.10", "3.11", "3.12", "3.13"]

#: Twisted releases tested on the oldest Python: the oldest supported, then
#: the newest of each year since, and the newest
TWISTEDS = ["24.7.0", "24.11.0", "25.5.0", "26.4.0", "26.10.0"]

#: Twisted releases whose TLS sets a connection's ALPN protocols on a
#: context already in use (Twisted issue 12500, fixed in 26.4), which
#: pyOpenSSL 26.2 and later refuse: a TLS server offering ALPN (HTTP/2)
#: fails every connection.  They are tested with the pyOpenSSL before.
MUTATING_TLS = {"24.7.0", "24.11.0", "25.5.0"}

#: twistd's names of the reactors migrate supports (epoll is the default)
REACTORS = ["epoll", "poll", "select", "asyncio"]

#: the integration tests of the strategies, with real processes
STRATEGY_TESTS = [
    "migrate.test.test_platform_integration",
    "migrate.test.test_capability_integration",
    "migrate.test.test_gradual_integration",
    "migrate.test.test_reexec_integration",
    "migrate.test.test_reload_integration",
    "migrate.test.test_metrics_integration",
]


def _findPyenvPythons() -> None:
    """
    Make every Python pyenv installed findable as C{pythonX.Y}, as nox
    looks for it, whichever version pyenv selects (its shims answer only
    for the selected ones).
    """
    root = os.environ.get("PYENV_ROOT", os.path.expanduser("~/.pyenv"))
    links = tempfile.mkdtemp(prefix="migrate-nox-pythons-")
    atexit.register(shutil.rmtree, links, True)
    for version in PYTHONS:
        found = sorted(glob.glob(os.path.join(root, "versions", version + ".*")))
        executable = (
            os.path.join(found[-1], "bin", "python" + version) if found else None
        )
        if executable and os.access(executable, os.X_OK):
            os.symlink(executable, os.path.join(links, "python" + version))
    os.environ["PATH"] = links + os.pathsep + os.environ.get("PATH", "")


_findPyenvPythons()


def _install(session: nox.Session, *pins: str) -> None:
    session.install(".[test]", *pins)


def _twisted(version: str) -> list[str]:
    """
    The pins that install Twisted C{version}, with a pyOpenSSL its TLS
    works with (L{MUTATING_TLS}).
    """
    return ["twisted[tls]==" + version] + (
        ["pyOpenSSL<26.2"] if version in MUTATING_TLS else []
    )


def _trial(
    session: nox.Session,
    modules: list[str],
    reactor: str | None = None,
) -> None:
    """
    Run trial on the installed copy, from a scratch directory, with the
    hosts the tests start on C{reactor} too.
    """
    env = {"MIGRATE_TEST_REACTOR": reactor} if reactor else {}
    session.run("python", "-c", "import twisted, sys; print(sys.version, twisted)")
    session.chdir(session.create_tmp())
    session.run(
        "python",
        "-m",
        "twisted.trial",
        *(["--reactor=" + reactor] if reactor else []),
        *(session.posargs or modules),
        env=env,
    )


@nox.session(python=PYTHONS)
def tests(session: nox.Session) -> None:
    """
    The whole suite on each Python, with the newest Twisted it takes.
    """
    _install(session)
    _trial(session, ["migrate"])


@nox.session(python=PYTHONS[0])
@nox.parametrize("twisted", TWISTEDS)
def twisted(session: nox.Session, twisted: str) -> None:
    """
    The whole suite on the oldest Python with each Twisted release.
    """
    _install(session, *_twisted(twisted))
    _trial(session, ["migrate"])


@nox.session
@nox.parametrize("reactor", REACTORS)
def reactor(session: nox.Session, reactor: str) -> None:
    """
    The strategies' integration tests with the test process and every host
    on one reactor.
    """
    _install(session)
    _trial(session, STRATEGY_TESTS, reactor)


@nox.session(python=[PYTHONS[0], PYTHONS[-1]])
def strategies(session: nox.Session) -> None:
    """
    The strategies' integration tests on the oldest and the newest Python
    (with the oldest Twisted on the oldest Python).
    """
    _install(session, *(_twisted(TWISTEDS[0]) if session.python == PYTHONS[0] else []))
    _trial(session, STRATEGY_TESTS)
