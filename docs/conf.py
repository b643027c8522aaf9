"""Sphinx configuration for the ivon_jax documentation.

Build offline, nitpicky, with warnings as errors: every cross-reference must resolve. Links to
Python, NumPy, JAX, Optax, Flax and Chex come from the small inventories stored in
``docs/_inventories/`` (intersphinx reads them from disk, never from the network); notebooks
are rendered from their stored outputs (the test suite executes them); MathJax is shipped with
the pages by sphinx-mathjax-offline, so the maths renders offline too:

    pip install -e ".[docs]" && sphinx-build -n -W -b html docs docs/_build/html
"""

import importlib
import inspect
import re
import tomllib
from pathlib import Path


from sphinx import addnodes
from sphinx.util.docutils import SphinxDirective

import ivon_jax

_ROOT = Path(__file__).resolve().parent.parent
# The repository's address is defined once, in pyproject.toml's [project.urls].
_URLS = tomllib.loads((_ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["urls"]
REPOSITORY = _URLS["Repository"]

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
    "sphinx.ext.intersphinx",
    "sphinx.ext.viewcode",  # a [source] link beside every documented name
    "sphinx_copybutton",
    "sphinx-mathjax-offline",  # MathJax 3 shipped with the docs: the maths renders offline
]

# Offline intersphinx: (documentation root, local inventory) per project; see
# docs/_inventories/make_inventories.py for what they hold and how to add a name.
_INVENTORIES = Path(__file__).resolve().parent / "_inventories"
intersphinx_mapping = {
    name: (url, str(_INVENTORIES / f"{name}.inv"))
    for name, url in {
        "python": "https://docs.python.org/3/",
        "numpy": "https://numpy.org/doc/stable/",
        "jax": "https://docs.jax.dev/en/latest/",
        "optax": "https://optax.readthedocs.io/en/latest/",
        "flax": "https://flax.readthedocs.io/en/latest/",
        "flax_linen": "https://flax-linen.readthedocs.io/en/latest/",
        "chex": "https://chex.readthedocs.io/en/latest/",
    }.items()
}

# Every reference must resolve (the tests build with -n -W); no name is exempted.
nitpicky = True

source_suffix = {".md": "myst-nb", ".ipynb": "myst-nb", ".rst": "restructuredtext"}
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "**.ipynb_checkpoints"]

# Markdown (MyST): $...$ maths, ::: fences, definition lists, heading anchors for links.
myst_enable_extensions = ["dollarmath", "colon_fence", "deflist"]
myst_heading_anchors = 3

# Notebooks are shown with the outputs stored in them; tests/test_notebooks.py runs them.
nb_execution_mode = "off"
# Their Markdown outputs (the result tables) are parsed as MyST, so tables render as tables.
nb_render_markdown_format = "myst"

# The copy button leaves out the prompts of doctest examples and their outputs.
copybutton_prompt_text = r">>> |\.\.\. "
copybutton_prompt_is_regexp = True
copybutton_only_copy_prompt_lines = False

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
    "repository_url": REPOSITORY,
    "use_repository_button": True,
    # The sidebar has the search field; without this the theme adds a header bar above every
    # page holding only a second search button.
    "navbar_persistent": [],
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
            obj = getattr(module, n)
            if not inspect.isclass(obj):
                lines += [f".. autofunction:: {n}", ""]
                continue
            # A class's own public methods (TrainState.apply_gradients); NamedTuple fields are
            # described in the class docstring's Attributes section instead.
            methods = [
                m
                for m, v in vars(obj).items()
                if not m.startswith("_") and inspect.isfunction(v) and v.__doc__
            ]
            lines += [f".. autoclass:: {n}"]
            lines += [f"   :members: {', '.join(methods)}"] if methods else []
            lines += [""]
        return self.parse_text_to_nodes("\n".join(lines))


# Signatures as the reader should see them. Type aliases inside generics come out of
# autodoc_type_aliases as "TypeAliasForwardRef('optax.Params')"; the private aliases of the
# predictive helpers are written out; a Flax dataclass field typed optax.OptState is shown by
# that name, not as chex's eight-member union.
_OPT_STATE_UNION = (
    r"~?jax\.jaxlib\._jax\.Array \| ~?numpy\.ndarray \| .*?Mapping\[[~\w.]*Any, ArrayTree\]"
)
_SIGNATURE_REWRITES = [
    (re.compile(r"TypeAliasForwardRef\('([\w.]+)'\)"), r"\1"),
    (re.compile(r"\bMember\b"), "tuple[optax.Params, optax.OptState]"),
    (re.compile(r"\bOptimizerLike\b"), "flax.nnx.Optimizer | optax.OptState"),
    (re.compile(r"(?<![\w.])nnx\.(Module|Optimizer|State)\b"), r"flax.nnx.\1"),
    (re.compile(_OPT_STATE_UNION), "optax.OptState"),
]


def _rewrite(text):
    if text is None:
        return None
    for pattern, replacement in _SIGNATURE_REWRITES:
        text = pattern.sub(replacement, text)
    return text


def _readable_signature(app, what, name, obj, options, signature, return_annotation):
    return _rewrite(signature), _rewrite(return_annotation)


def setup(app):
    app.connect("autodoc-process-signature", _readable_signature)
    app.connect("doctree-read", _relink_notebooks)
    app.add_directive("module-api", ModuleAPI)
