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
exclude_patterns = ["_build", "results"]  # results/: benchmark outputs (JSON, generated Markdown), linked, not pages
autodoc_member_order = "bysource"
autodoc_default_options = {"members": True, "show-inheritance": True}
autodoc_typehints = "description"
# furo: a wide content column, code blocks and tables that scroll sideways instead of wrapping
html_theme = "furo"
html_title = "rank1-pyro"
html_static_path = ["_static"]
html_css_files = ["custom.css"]  # numeric table cells never wrap
nitpicky = False
suppress_warnings = ["myst.header"]
