"""Sphinx configuration for the ivon_jax documentation.

Build offline with warnings as errors (no intersphinx: it would fetch inventories over the
network; notebooks are rendered from their stored outputs, the test suite executes them; MathJax
is shipped with the pages by sphinx-mathjax-offline, so the maths renders offline too):

    pip install -e ".[docs]" && sphinx-build -W -b html docs docs/_build/html
"""

import importlib
import inspect
from pathlib import Path

from sphinx import addnodes
from sphinx.util.docutils import SphinxDirective

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
    "sphinx-mathjax-offline",  # MathJax 3 shipped with the docs: the maths renders offline
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
# Show optax's aliases by name, not expanded into their unions (ScalarOrSchedule is 8 lines).
autodoc_type_aliases = {
    name: name
    for name in ("optax.ScalarOrSchedule", "optax.Params", "optax.OptState", "optax.Updates")
}
# One parameter per line once a signature is longer than this.
python_maximum_signature_line_length = 88
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


class ModuleAPI(SphinxDirective):
    """``.. module-api:: ivon_jax.metrics``: a module's docstring, an autosummary table of its
    ``__all__`` and one autodoc entry per name, in ``__all__``'s order.

    The page follows ``__all__``, so a new public name is documented without editing it.
    """

    required_arguments = 1

    def run(self):
        name = self.arguments[0]
        module = importlib.import_module(name)
        names = [n for n in module.__all__ if not inspect.ismodule(getattr(module, n))]
        lines = [f".. automodule:: {name}", "", f".. currentmodule:: {name}", ""]
        lines += [".. autosummary::", ""] + [f"   {n}" for n in names] + [""]
        for n in names:
            kind = "autoclass" if inspect.isclass(getattr(module, n)) else "autofunction"
            lines += [f".. {kind}:: {n}", ""]
        return self.parse_text_to_nodes("\n".join(lines))


def setup(app):
    app.connect("doctree-read", _relink_notebooks)
    app.add_directive("module-api", ModuleAPI)
