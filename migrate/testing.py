"""
Verified fakes for testing code that uses migrate.

L{FakeStrategy} stands in for a real L{IMigrationStrategy} in a
L{migrate.MigrationHost}: it starts no process and moves nothing, records
what the host asks of it and lets the test decide when and how each
migration ends.  It passes the same contract tests as the strategies that
ship with migrate (see C{migrate.test.test_host}).
"""

from __future__ import annotations

from typing import Any, Callable

from attrs import define, field
from twisted.internet.defer import Deferred
from zope.interface import implementer

from .interfaces import IMigrationHost, IMigrationStrategy

__all__ = ["FakeStrategy", "FakeMigration", "FakeInheritance"]


@define
class FakeMigration:
    """
    One call to L{FakeStrategy.migrate}.

    @ivar host: the host that asked for the migration.
    @ivar progress: the progress callable the host gave.
    @ivar result: the L{Deferred} the strategy returned; fire it with a
        L{migrate.MigrationReport} (or fail it) to end the migration.
    """

    host: IMigrationHost
    progress: Callable[[str], None]
    result: Deferred[Any] = field(factory=Deferred)


@define
class FakeInheritance:
    """
    One call to L{FakeStrategy.inherit}.

    @ivar host: the host that inherits.
    @ivar inheritance: what it was given to inherit.
    @ivar result: the L{Deferred} the strategy returned.
    """

    host: IMigrationHost
    inheritance: Any
    result: Deferred[None] = field(factory=Deferred)


@implementer(IMigrationStrategy)
@define
class FakeStrategy:
    """
    An L{IMigrationStrategy} that records every call and returns a
    L{Deferred} the test fires.

    @ivar name: the strategy's name.
    @ivar migrations: every L{FakeMigration}, oldest first.
    @ivar inheritances: every L{FakeInheritance}, oldest first.
    """

    name: str = "fake"
    migrations: list[FakeMigration] = field(factory=list)
    inheritances: list[FakeInheritance] = field(factory=list)

    def migrate(
        self, host: IMigrationHost, progress: Callable[[str], None]
    ) -> Deferred[Any]:
        """
        Record the migration and return its unfired L{Deferred}.
        """
        call = FakeMigration(host, progress)
        self.migrations.append(call)
        return call.result

    def inherit(self, host: IMigrationHost, inheritance: Any) -> Deferred[None]:
        """
        Record the inheritance and return its unfired L{Deferred}.
        """
        call = FakeInheritance(host, inheritance)
        self.inheritances.append(call)
        return call.result
