"""The documentation builds offline, nitpicky (every cross-reference resolves), with warnings as
errors, documents every public name, and the examples in the docstrings run.

The Sphinx build runs in a subprocess into a temporary folder (``docs/`` is never written to);
the notebooks are rendered from their stored outputs (``tests/test_notebooks.py`` executes
them). The docstring examples run in this process, so they see ``conftest.py``'s strict dtype
and rank promotion and its 8 simulated devices, and pytest's warnings-as-errors.
"""

import doctest
import importlib
import json
import os
import pkgutil
import subprocess
import sys
import types
from pathlib import Path

import pytest

import ivon_jax

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"

# API page (docs/api/<page>.html) of each public module.
API_PAGES = {
    "ivon_jax": "ivon_jax",
    "ivon_jax.metrics": "metrics",
    "ivon_jax.predictive": "predictive",
    "ivon_jax.merging": "merging",
    "ivon_jax.sensitivity": "sensitivity",
    "ivon_jax.flax.nnx": "flax_nnx",
    "ivon_jax.flax.linen": "flax_linen",
    "ivon_jax.equinox": "equinox",
}
GUIDE_PAGES = [
    "training",
    "equinox",
    "prediction",
    "scaling",
    "checkpointing",
    "nonfinite",
    "performance",
    "hyperparameters",
    "merging_sensitivity",
    "evidence",
    "correctness",
    "finetuning",
]
NOTEBOOKS = sorted(p.stem for p in (ROOT / "notebooks").glob("*.ipynb"))


def _public_names() -> list[tuple[str, str]]:
    """(module, name) for every public function or class, modules themselves excluded."""
    names = []
    for module_name in API_PAGES:
        module = importlib.import_module(module_name)
        for name in module.__all__:
            if not isinstance(getattr(module, name), types.ModuleType):
                names.append((module_name, name))
    return names


def test_every_public_module_has_an_api_page():
    """Every public module named in ``ivon_jax.__all__`` or ``ivon_jax.flax.__all__`` has a page,
    and so has the optional ``ivon_jax.equinox`` (not imported by ``ivon_jax``: it needs
    equinox)."""
    public_modules = {"ivon_jax", "ivon_jax.equinox"}
    for parent in (ivon_jax, importlib.import_module("ivon_jax.flax")):
        for name in parent.__all__:
            obj = getattr(parent, name)
            if isinstance(obj, types.ModuleType):
                public_modules.add(obj.__name__)
    assert public_modules == set(API_PAGES)


@pytest.fixture(scope="module")
def html(tmp_path_factory) -> Path:
    for package in ("sphinx", "myst_nb", "sphinx_book_theme"):
        pytest.importorskip(package, reason='the docs need pip install -e ".[docs]"')
    out = tmp_path_factory.mktemp("docs")
    cmd = [sys.executable, "-m", "sphinx", "-n", "-W", "--keep-going", "-q", "-b", "html"]
    cmd += ["-d", str(out / "doctrees"), str(DOCS), str(out / "html")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"sphinx-build -n -W failed:\n{proc.stdout}\n{proc.stderr}"
    return out / "html"


def test_docs_build_without_warnings(html):
    assert (html / "index.html").is_file()
    assert (html / "getting_started.html").is_file()
    for page in GUIDE_PAGES:
        assert (html / "guide" / f"{page}.html").is_file(), page
    for page in API_PAGES.values():
        assert (html / "api" / f"{page}.html").is_file(), page


def test_inventories_are_up_to_date(tmp_path):
    """docs/_inventories/*.inv are what make_inventories.py writes (edit the script, rerun it)."""
    sys.path.insert(0, str(DOCS / "_inventories"))
    try:
        make_inventories = importlib.import_module("make_inventories")
    finally:
        sys.path.pop(0)
    stored = {p.stem for p in (DOCS / "_inventories").glob("*.inv")}
    assert stored == set(make_inventories.INVENTORIES)
    for project, (_, names) in make_inventories.INVENTORIES.items():
        expected = make_inventories.inventory(project, names)
        assert (DOCS / "_inventories" / f"{project}.inv").read_bytes() == expected, project


def test_pages_show_no_raw_markup(html):
    """Signatures name optax's aliases (no TypeAliasForwardRef, no private alias), nothing is
    turned into an e-mail link, and the notebooks' result tables are tables."""
    for page in sorted(html.rglob("*.html")):
        name = page.relative_to(html).as_posix()
        if name.startswith("_modules/"):
            continue  # the highlighted source code (viewcode) shows the code as it is
        text = page.read_text(encoding="utf-8")
        for needle in ("TypeAliasForwardRef", "mailto:", "OptimizerLike", "ArrayTree"):
            assert needle not in text, f"{name}: {needle}"
    for notebook in NOTEBOOKS:
        cells = json.loads((ROOT / "notebooks" / f"{notebook}.ipynb").read_text("utf-8"))["cells"]
        tables = sum(
            "".join(out.get("data", {}).get("text/markdown", "")).count("\n|---")
            for cell in cells
            for out in cell.get("outputs", [])
        )
        text = (html / "notebooks" / f"{notebook}.html").read_text(encoding="utf-8")
        assert text.count("<table") >= tables, f"{notebook}: a Markdown table is not rendered"


def test_named_tuple_fields_and_methods_are_documented(html):
    page = (html / "api" / "ivon_jax.html").read_text(encoding="utf-8")
    for field in ("count", "momentum", "hess", "ess", "weight_decay"):
        assert f'id="ivon_jax.IVONState.{field}"' in page, field
    for field in ("inner_state", "skipped"):
        assert f'id="ivon_jax.SkipNonFiniteState.{field}"' in page, field
    page = (html / "api" / "sensitivity.html").read_text(encoding="utf-8")
    for field in ("loo", "loss", "scores", "shifts", "residuals", "outputs"):
        assert f'id="ivon_jax.sensitivity.Sensitivity.{field}"' in page, field
    page = (html / "api" / "flax_linen.html").read_text(encoding="utf-8")
    assert 'id="ivon_jax.flax.linen.TrainState.apply_gradients"' in page


@pytest.mark.parametrize("module_name,name", _public_names(), ids=lambda x: x)
def test_public_name_is_documented(html, module_name, name):
    page = (html / "api" / f"{API_PAGES[module_name]}.html").read_text(encoding="utf-8")
    assert f'id="{module_name}.{name}"' in page, f"{module_name}.{name} is not in the API docs"


@pytest.mark.parametrize("notebook", NOTEBOOKS)
def test_notebook_is_rendered_with_its_figures(html, notebook):
    page = html / "notebooks" / f"{notebook}.html"
    assert page.is_file(), f"notebooks/{notebook}.ipynb is not in the docs (docs/notebooks/)"
    assert "<img" in page.read_text(encoding="utf-8"), f"{notebook}: no figure rendered"


@pytest.mark.parametrize("module_name,name", _public_names(), ids=lambda x: x)
def test_public_name_has_an_example(module_name, name):
    """Every public function and class shows a runnable ``>>>`` example (run below)."""
    obj = getattr(importlib.import_module(module_name), name)
    assert ">>> " in (obj.__doc__ or ""), f"{module_name}.{name} has no Example section"


def test_landing_page_example_runs(tmp_path):
    """docs/index.md's complete example trains, predicts with the MC predictive and learns.

    It runs as a user would run it: a script in a fresh interpreter, with JAX's default
    settings (not conftest's strict promotion) and one CPU device.
    """
    text = (DOCS / "index.md").read_text(encoding="utf-8")
    section = text.split("## A complete example", 1)[1]
    code = section.split("```python\n", 1)[1].split("\n```", 1)[0]
    script = tmp_path / "example.py"
    script.write_text(code + "\nassert probs.shape == (512, 2), probs.shape\n")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    accuracy = float(proc.stdout.split("accuracy ")[1].split(",")[0])
    assert accuracy > 0.9, proc.stdout  # the classes are linearly separable


def _docstring_tests(module_name: str) -> list[doctest.DocTest]:
    module = importlib.import_module(module_name)
    return [t for t in doctest.DocTestFinder().find(module, module_name) if t.examples]


def _modules_with_examples() -> list[str]:
    names = ["ivon_jax"]
    for info in pkgutil.walk_packages(ivon_jax.__path__, prefix="ivon_jax."):
        names.append(info.name)
    return sorted(name for name in names if _docstring_tests(name))


@pytest.mark.parametrize("module_name", _modules_with_examples())
def test_docstring_examples(module_name):
    flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    runner = doctest.DocTestRunner(optionflags=flags)
    report: list[str] = []
    for test in _docstring_tests(module_name):
        runner.run(test, out=report.append)
    result = runner.summarize(verbose=False)
    assert result.attempted > 0
    assert result.failed == 0, "".join(report)
