"""Packaging: the sdist and the wheel build, and the wheel works once installed.

``python -m build`` makes the sdist from a copy of the package's files and the wheel *from
that sdist*, so a file missing from the sdist breaks the wheel too. The wheel is installed
(``--no-deps``) into a fresh virtual environment, and the README's quickstart ("The explicit
path") runs with it from a directory outside the source tree: it must import the installed
copy, which carries the ``py.typed`` marker, and train.

That environment borrows jax, optax and flax (nothing is downloaded) from the environment
pytest runs in, and from nowhere else: it is made *without* ``--system-site-packages`` (which
would give it the *base* interpreter's packages when pytest runs in a venv, not the venv's),
and a ``.pth`` file appends the site-packages directories on this interpreter's ``sys.path``
after its own. Its own site-packages, where the wheel goes, comes first; the source tree and
this environment's editable-install hooks are not on its path (a ``.pth`` line is a path, its
directory's own ``.pth`` files are not run).

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
    "jax_file": jax.__file__,
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


_PURELIB = "import sysconfig; print(sysconfig.get_paths()['purelib'])"


def _active_site_packages() -> list[str]:
    """The site-packages directories on this interpreter's ``sys.path``: the active
    environment's (a venv's own, conda's, the system's, the user site where enabled), none
    from outside it and none in the source tree."""
    found = []
    for entry in sys.path:
        path = pathlib.Path(entry or ".").resolve()
        if (path.name in ("site-packages", "dist-packages") and path.is_dir()
                and not path.is_relative_to(ROOT) and str(path) not in found):
            found.append(str(path))
    return found


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
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp_path)
    python = venv / "bin" / "python"
    own = pathlib.Path(_run([str(python), "-c", _PURELIB], tmp_path).strip())
    borrowed = _active_site_packages()
    assert borrowed, f"no site-packages directory on sys.path: {sys.path}"
    # After the venv's own site-packages (where the wheel goes) on its sys.path: the
    # packages of the environment pytest runs in (jax & co., pip).
    (own / "_outer_environment.pth").write_text("".join(f"{d}\n" for d in borrowed))
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
    assert installed.is_relative_to(own.resolve()), installed
    # jax is the one pytest itself imports: from the active environment, not the base Python.
    import jax
    assert pathlib.Path(result["jax_file"]).resolve() == pathlib.Path(jax.__file__).resolve()
    assert not installed.is_relative_to(ROOT), installed
    assert result["py_typed"]
    assert result["version"] == VERSION
    assert result["count"] == 30
    # It trained: the loss fell (from log 10 at w = 0) and σ is positive.
    assert result["first"] == pytest.approx(2.302585, abs=1e-5)
    assert result["last"] < 0.8 * result["first"], result
    assert result["sigma_min"] > 0



def test_no_test_borrows_packages_from_outside_the_active_environment():
    """A subprocess interpreter made with ``--system-site-packages`` (or
    ``system_site_packages=True``) sees the base interpreter's packages: inside a venv those
    are not pytest's, so such a test passes only where the base Python happens to have jax.
    Tests and benchmarks run their subprocesses with ``sys.executable`` instead."""
    offenders = []
    for folder in ("tests", "benchmarks", ".ci"):
        for path in sorted((ROOT / folder).rglob("*")):
            if not path.is_file() or path.suffix not in ("", ".py", ".sh"):
                continue
            if path.resolve() == pathlib.Path(__file__).resolve():
                continue
            text = path.read_text(errors="replace")
            for needle in ("--system-site-packages", "system_site_packages=True"):
                if needle in text:
                    offenders.append(f"{path.relative_to(ROOT)}: {needle}")
    assert not offenders, offenders
