"""The package's layering: the modules under ``ivon_jax/_src`` import each other without a
circle, so each one only uses modules below it (``state`` at the bottom), and nothing there
imports the public modules or the Flax adapters.

Imports are read from the source (also those inside functions), not from ``sys.modules``.
"""

from __future__ import annotations

import ast
import pathlib

import ivon_jax

SRC = pathlib.Path(ivon_jax.__file__).parent / "_src"


def _imports(path: pathlib.Path) -> set[str]:
    """The ``ivon_jax`` modules that ``path`` imports, as dotted names."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("ivon_jax")}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("ivon_jax"):
            module = node.module or ""
            for a in node.names:
                # `from ivon_jax._src import noise` names a module; `... import IVONState` not.
                sub = f"{module}.{a.name}"
                file = SRC.parent / (sub.replace(".", "/").removeprefix("ivon_jax/") + ".py")
                out.add(sub if file.exists() else module)
    return out


def _graph() -> dict[str, set[str]]:
    return {
        f"ivon_jax._src.{p.stem}": _imports(p) - {f"ivon_jax._src.{p.stem}"}
        for p in sorted(SRC.glob("*.py"))
        if p.stem != "__init__"
    }


def test_src_modules_import_no_public_module():
    for module, deps in _graph().items():
        outside = {d for d in deps if not d.startswith("ivon_jax._src.")}
        assert not outside, f"{module} imports {sorted(outside)}"


def test_src_import_graph_is_acyclic():
    graph = _graph()
    # Peel off modules whose dependencies are all placed; a circle leaves some unplaced.
    placed: list[str] = []
    remaining = dict(graph)
    while remaining:
        ready = sorted(m for m, deps in remaining.items() if deps <= set(placed))
        circle = {m: sorted(d - set(placed)) for m, d in remaining.items()}
        assert ready, f"import circle among {circle}"
        placed += ready
        for m in ready:
            del remaining[m]
    # The state is at the bottom; the transform sits above its wrappers.
    assert graph["ivon_jax._src.state"] == set()
    assert "ivon_jax._src.transform" not in graph["ivon_jax._src.wrappers"]
    assert placed.index("ivon_jax._src.wrappers") < placed.index("ivon_jax._src.transform")
