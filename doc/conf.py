"""
Sphinx configuration for migrate's narrative documentation.

The build needs no network and no extension beyond Sphinx itself.  The API
reference is written in epytext for pydoctor, so it is not rendered here.
"""

project = "migrate"
author = "the migrate developers"
copyright = "the migrate developers"
release = "0.1.0.dev0"
version = "0.1"

extensions: list[str] = []

root_doc = "index"
exclude_patterns = ["_build"]
language = "en"
highlight_language = "none"
nitpicky = True

html_theme = "alabaster"
html_title = "migrate"
html_static_path: list[str] = []
