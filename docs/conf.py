"""Sphinx configuration for the ivon_jax documentation.

Build offline with warnings as errors (no intersphinx: it would fetch inventories over the
network; notebooks are rendered from their stored outputs, the test suite executes them):

    pip install -e ".[docs]" && sphinx-build -W -b html docs docs/_build/html
"""

from pathlib import Path

from sphinx import addnodes

import ivon_jax

project = "ivon_jax"
author = "ivon_jax developers"
copyright = "ivon_jax developers"
release = ivon_jax.__version__
version = release

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
]

source_suffix = {".md": "myst-nb", ".ipynb": "myst-nb", ".rst": "restructuredtext"}
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "**.ipynb_checkpoints"]

# Markdown (MyST): $...$ maths, ::: fences, definition lists, heading anchors for links.
myst_enable_extensions = ["dollarmath", "colon_fence", "deflist"]
myst_heading_anchors = 3

# Notebooks are shown with the outputs stored in them; tests/test_notebooks.py runs them.
nb_execution_mode = "off"

# The API pages list each name explicitly (autosummary tables without generated stubs, and
# one autodoc directive per name), so the build writes nothing into the source tree.
autosummary_generate = False
autodoc_default_options = {"member-order": "bysource"}
autodoc_typehints = "signature"
autodoc_preserve_defaults = True
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

html_theme = "sphinx_book_theme"
html_title = f"ivon_jax {release}"
html_static_path = ["_static"]
html_css_files = ["custom.css"]
html_theme_options = {
    "show_toc_level": 2,
    "home_page_in_toc": True,
    "use_download_button": False,
}

# docs/notebooks/*.ipynb are symbolic links to the repository's notebooks/ folder (one copy of
# each notebook). Sphinx resolves links, so a Markdown link to `other.ipynb` inside a notebook
# (or to a linked notebook) points at the file's real path, outside the source tree; map it
# back to the page that renders it.
_NOTEBOOKS_DIR = Path(__file__).resolve().parent.parent / "notebooks"


def _relink_notebooks(app, doctree):
    for node in doctree.findall(addnodes.pending_xref):
        target = node.get("reftarget", "")
        if node.get("reftype") == "myst" and target.startswith(str(_NOTEBOOKS_DIR) + "/"):
            node["reftarget"] = "notebooks/" + target[len(str(_NOTEBOOKS_DIR)) + 1 :]


def setup(app):
    app.connect("doctree-read", _relink_notebooks)
