"""Packaging: the sdist and the wheel build, and the wheel works once installed.

``python -m build`` makes the sdist from a copy of the package's files and the wheel *from
that sdist*, so a file missing from the sdist breaks the wheel too. The wheel is installed
(``--no-deps``) into a fresh virtual environment that sees this interpreter's packages (jax,
optax, flax: nothing is downloaded), and the README's quickstart ("The explicit path") runs
with it from a directory outside the source tree: it must import the installed copy, which
carries the ``py.typed`` marker, and train.

The build runs without isolation (no network): it needs ``build`` and the setuptools that
``pyproject.toml`` asks for, both in the ``test`` extra.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile

import pytest

pytest.importorskip("build")

ROOT = pathlib.Path(__file__).resolve().parent.parent
NAME, VERSION = "ivon_jax", "0.1.0"

# Runs after the README's snippet: a synthetic 10-class problem, 30 steps.
DRIVER = """
import json, os, pathlib
import numpy as np

rng = np.random.default_rng(0)
x = jnp.asarray(rng.normal(size=(128, 64)), jnp.float32)
y = jnp.asarray(np.argmax(np.asarray(x) @ rng.normal(size=(64, 10)), axis=1), jnp.int32)
key = jax.random.key(0)
first = float(loss_fn(params, x, y))
for _ in range(30):
    key, sub = jax.random.split(key)
    params, opt_state = train_step(sub, params, opt_state, x, y)
last = float(loss_fn(params, x, y))
sigma = jax.tree.leaves(ivon_jax.posterior_std(opt_state))
package = pathlib.Path(ivon_jax.__file__).parent
print(json.dumps({
    "first": first,
    "last": last,
    "sigma_min": min(float(s.min()) for s in sigma),
    "count": int(ivon_jax.find_ivon_states(opt_state)[0].count),
    "file": ivon_jax.__file__,
    "py_typed": (package / "py.typed").is_file(),
    "version": ivon_jax.__version__,
}))
"""


def _run(cmd, cwd, env=None, timeout=120):
    proc = subprocess.run(
        cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def _quickstart() -> str:
    """The first code block under the "The explicit path" heading (README, else the guide)."""
    for page in ("README.md", "docs/guide/training.md"):
        path = ROOT / page
        text = path.read_text() if path.is_file() else ""
        found = re.search(r"^#+ The explicit path\n.*?```python\n(.*?)```", text, re.S | re.M)
        if found:
            return found.group(1)
    raise AssertionError("no 'The explicit path' quickstart in README.md or the guide")


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    """Builds the sdist and the wheel from a copy of the files an sdist starts from (the
    shared source tree gets no build/ or egg-info)."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(
        ROOT / NAME, src / NAME, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
    )
    out = tmp_path_factory.mktemp("dist")
    _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(src)], src)
    return out


def test_sdist_holds_the_package_and_readme(dist):
    (sdist,) = dist.glob("*.tar.gz")
    assert sdist.name == f"{NAME}-{VERSION}.tar.gz"
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    for required in ("README.md", "LICENSE", "pyproject.toml", "PKG-INFO",
                     f"{NAME}/__init__.py", f"{NAME}/py.typed", f"{NAME}/_src/transform.py",
                     f"{NAME}/flax/nnx.py"):
        assert required in names, required
    # Every module of the package is in it.
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / NAME).rglob("*.py")}
    assert modules <= names, sorted(modules - names)


def test_wheel_installs_and_runs_the_quickstart_outside_the_source_tree(dist, tmp_path):
    (wheel,) = dist.glob("*.whl")
    assert wheel.name == f"{NAME}-{VERSION}-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        metadata = zf.read(f"{NAME}-{VERSION}.dist-info/METADATA").decode()
    assert f"{NAME}/py.typed" in names
    assert {n.split("/")[0] for n in names} == {NAME, f"{NAME}-{VERSION}.dist-info"}
    assert "Requires-Dist: jax>=" in metadata and "Requires-Dist: optax>=" in metadata

    venv = tmp_path / "venv"
    # The venv sees this interpreter's packages (jax & co., pip); the wheel goes into its own
    # site-packages, which comes first on sys.path.
    _run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)],
         tmp_path)
    python = venv / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["JAX_PLATFORMS"] = "cpu"
    _run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "--quiet",
          str(wheel)], tmp_path, env)

    work = tmp_path / "elsewhere"
    work.mkdir()
    script = work / "quickstart.py"
    script.write_text(_quickstart() + DRIVER)
    result = json.loads(_run([str(python), str(script)], work, env).strip().splitlines()[-1])

    installed = pathlib.Path(result["file"]).resolve()
    assert installed.is_relative_to(venv.resolve()), installed
    assert not installed.is_relative_to(ROOT), installed
    assert result["py_typed"]
    assert result["version"] == VERSION
    assert result["count"] == 30
    # It trained: the loss fell (from log 10 at w = 0) and σ is positive.
    assert result["first"] == pytest.approx(2.302585, abs=1e-5)
    assert result["last"] < 0.8 * result["first"], result
    assert result["sigma_min"] > 0

