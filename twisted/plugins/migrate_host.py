"""
The twistd/twist plugin C{migrate-host}, served by L{migrate.tap}.

This directory has no C{__init__.py} on purpose: the file is installed
into Twisted's own C{twisted/plugins} package.
"""

from typing import Any

from twisted.application.service import ServiceMaker
from twisted.python.usage import UsageError


class _MigrateHostMaker(ServiceMaker):
    """
    L{ServiceMaker} that first checks that C{import migrate} finds
    txmigrate's package, not another distribution's of the same name.
    """

    @property
    def options(self) -> Any:
        try:
            from txmigrate import foreignPackage
        except ImportError:
            pass
        else:
            problem = foreignPackage()
            if problem is not None:
                raise UsageError(problem)
        return ServiceMaker.options.fget(self)  # type: ignore[attr-defined]


migrateHost = _MigrateHostMaker(
    "migrate-host",
    "migrate.tap",
    "Host a Twisted service that can move to new code without dropping a connection.",
    "migrate-host",
)
