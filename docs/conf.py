"""Sphinx configuration for the sc_dta documentation."""

from __future__ import annotations

import sys
from datetime import date
from importlib.metadata import version as _version
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent / "src"))

project = "sc_dta"
author = "sc_dta developers"
copyright = f"{date.today():%Y}, {author}"
try:
    release = _version("sc-dta")
except Exception:  # pragma: no cover - docs built from a source tree without install
    release = "0.0.0"
version = release

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.intersphinx",
    "sphinx.ext.mathjax",
    "sphinx_autodoc_typehints",
]

templates_path = ["_templates"]
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "**.ipynb_checkpoints"]
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
master_doc = "index"

autosummary_generate = True
autodoc_member_order = "groupwise"
autodoc_default_options = {"members": True, "inherited-members": False}
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = True
napoleon_use_param = True
typehints_defaults = "braces"
always_document_param_types = False
# Types from optional/heavy libraries are not all resolvable by intersphinx offline.
nitpicky = False
suppress_warnings = ["myst.header", "autosummary.import_cycle"]

myst_enable_extensions = ["colon_fence", "dollarmath", "deflist"]
nb_execution_mode = "off"  # notebooks are executed by the test suite (SC_DTA_SMOKE=1), not by the docs build
nb_merge_streams = True

intersphinx_mapping = {}  # CI builds offline; keep links local

html_theme = "sphinx_book_theme"
html_title = "sc_dta"
html_static_path = ["_static"]
html_theme_options = {
    "repository_url": "https://github.com/sc-dta/sc_dta",
    "use_repository_button": True,
    "path_to_docs": "docs/",
}
