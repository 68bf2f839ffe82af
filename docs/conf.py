"""Sphinx configuration of the rank1-pyro documentation (``make docs``; warnings are errors)."""

project = "rank1-pyro"
author = "the rank1-pyro developers"
copyright = "2026, the rank1-pyro developers"

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.mathjax",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
]
myst_enable_extensions = ["dollarmath", "amsmath"]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
exclude_patterns = ["_build"]
autodoc_member_order = "bysource"
autodoc_default_options = {"members": True, "show-inheritance": True}
autodoc_typehints = "description"
html_theme = "alabaster"
nitpicky = False
suppress_warnings = ["myst.header"]
