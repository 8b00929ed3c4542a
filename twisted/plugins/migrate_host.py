"""
The twistd/twist plugin C{migrate-host}, served by L{migrate.tap}.

This directory has no C{__init__.py} on purpose: the file is installed
into Twisted's own C{twisted/plugins} package.
"""

from twisted.application.service import ServiceMaker

migrateHost = ServiceMaker(
    "migrate-host",
    "migrate.tap",
    "Host a Twisted service that can move to new code without dropping a connection.",
    "migrate-host",
)
