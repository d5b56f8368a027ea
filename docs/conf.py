"""Sphinx configuration for the sc_dta documentation."""

from __future__ import annotations

import os
import sys
import warnings
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

# --- Tutorials: executed at build time, outputs cached by jupyter-cache ----------------------------------------------
# A notebook runs again only when its cells change, not when the package does: delete docs/_build/.jupyter_cache*
# (or pass -D nb_execution_mode=force) to rerun it against new code; CI starts from a clean tree, so it always runs
# them. The quick start runs at its normal size (86 s on one CPU thread, measured when it was last rewritten);
# the fetal cardiomyocyte study needs a GPU, Census data and hg38, so the docs render its smoke mode (simulated data,
# tiny models). `SC_DTA_SMOKE=1 sphinx-build ...` renders every tutorial in smoke mode, for a fast local build; its
# results are cached separately so that they never stand in for a full run.
_ALL_SMOKE = os.environ.get("SC_DTA_SMOKE", "0").strip().lower() not in ("", "0", "false", "no")
SMOKE_DOCS = {"tutorials/fetal_cardiomyocytes"}  # docnames always rendered in smoke mode
nb_execution_mode = "cache"
nb_execution_cache_path = str(HERE / "_build" / (".jupyter_cache_smoke" if _ALL_SMOKE else ".jupyter_cache"))
nb_execution_in_temp = True  # run in a temporary directory: nothing is written next to the notebooks
nb_execution_timeout = 900  # seconds per cell; training the quick start's model is the longest cell
nb_execution_raise_on_error = True  # a failing cell fails the build
nb_execution_show_tb = True
nb_merge_streams = True

# The kernels inherit this environment. No progress bars in rendered pages; figures inline, even where the caller set
# MPLBACKEND=Agg (as .ci/run does), since ipykernel only picks its inline backend when MPLBACKEND is unset.
os.environ["SC_DTA_PROGRESS"] = "0"
os.environ.pop("MPLBACKEND", None)
os.environ.setdefault("PYDEVD_DISABLE_FILE_VALIDATION", "1")
# tqdm.auto warns on import in a kernel without ipywidgets ("IProgress not found"); the bars are off here anyway.
os.environ["PYTHONWARNINGS"] = ",".join(filter(None, [os.environ.get("PYTHONWARNINGS"), "ignore:IProgress not found"]))


def _set_smoke_mode(app, docname: str, source: list[str]) -> None:
    """Set ``SC_DTA_SMOKE`` for the kernel of the notebook about to be parsed (myst-nb executes it while parsing)."""
    os.environ["SC_DTA_SMOKE"] = "1" if _ALL_SMOKE or docname in SMOKE_DOCS else "0"


# --- API pages ---------------------------------------------------------------------------------------------------------
# sphinx-autodoc-typehints (3.6) calls a parser API that Sphinx 9 deprecates, once per docstring it inspects; the
# warning is about the extension, not about these docs.
warnings.filterwarnings(
    "ignore", message=r".*_RstSnippetParser\.set_application.* is deprecated", module="sphinx_autodoc_typehints"
)


def _skip_torch_module_members(app, what: str, name: str, obj, skip: bool, options) -> bool | None:
    """Leave out what ``Adapter``, ``DynamicTokenEmbedding`` and ``BioDTA`` inherit from ``torch.nn.Module``.

    torch documents those members itself; listing them here buried the package's own methods among ~50 others, and
    eight of their docstrings are not valid reStructuredText (docutils: "Unexpected indentation").
    """
    torch = sys.modules.get("torch")
    if torch is None or skip:
        return None
    module_members = set(vars(torch.nn.Module)) | set(getattr(torch.nn.Module, "__annotations__", {}))
    if name not in module_members or name.startswith("__"):
        return None
    # an override written in this package stays documented
    own = getattr(obj, "__module__", None) or ""
    return None if own.startswith("sc_dta") else True


intersphinx_mapping = {}  # CI builds offline; keep links local


html_theme = "sphinx_book_theme"
html_title = "sc_dta"
html_static_path = ["_static"]
html_theme_options = {
    "repository_url": "https://github.com/sc-dta/sc_dta",
    "use_repository_button": True,
    "path_to_docs": "docs/",
}


def setup(app) -> None:
    """Connect the handlers above."""
    app.connect("source-read", _set_smoke_mode)
    app.connect("autodoc-skip-member", _skip_torch_module_members)
