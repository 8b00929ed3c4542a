"""
The version of migrate (the C{txmigrate} distribution), written here only:
C{setup.cfg}, the documentation and towncrier read it from this file.
"""

__all__ = ["__version__", "DISTRIBUTION"]

#: the version of this release
__version__ = "0.1.0.dev0"

#: the name this package is published under (C{migrate} is another project's)
DISTRIBUTION = "txmigrate"
