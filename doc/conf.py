"""
Sphinx configuration for migrate's narrative documentation.

The build needs no network and no extension beyond Sphinx itself.  The API
reference is written in epytext for pydoctor, so it is not rendered here.
"""

import os

# The version is written once, in migrate/_version.py: read, not imported
# (importing migrate needs Twisted).
_versionFile = os.path.join(os.path.dirname(__file__), "..", "migrate", "_version.py")
_versionNames: dict[str, object] = {}
with open(_versionFile) as _f:
    exec(_f.read(), _versionNames)

project = "migrate"
author = "the migrate developers"
copyright = "the migrate developers"
release = str(_versionNames["__version__"])
version = ".".join(release.split(".")[:2])

extensions: list[str] = []

root_doc = "index"
exclude_patterns = ["_build"]
language = "en"
highlight_language = "none"
nitpicky = True

html_theme = "alabaster"
html_title = "migrate"
html_static_path: list[str] = []
