"""
Packaging shim: the metadata lives in C{setup.cfg}, the build system and
tool settings in C{pyproject.toml}.
"""

from setuptools import setup

setup()
