"""Writes the small Sphinx inventories (``*.inv``) that let the docs link to Python, NumPy, JAX,
Optax, Flax and Chex offline.

``intersphinx`` normally downloads each project's full ``objects.inv``; these files list only
the names the ivon_jax docs refer to, each with its page in that project's documentation, so
the build needs no network. Add a name here when the docs start to refer to it, then run

    python docs/_inventories/make_inventories.py

and commit the regenerated ``.inv`` files (``tests/test_docs.py`` checks they are up to date).
Type aliases (``optax.Params``) are entered as ``py:type``, which annotations' ``py:class``
references resolve to. A few entries are the module paths that annotations resolve to at run time (``jax.Array`` is
``jax.jaxlib._jax.Array``, optax's types live in ``optax._src.base``); they point at the page
of the public name.
"""

import zlib
from pathlib import Path

HERE = Path(__file__).resolve().parent

# project -> (documentation root, {name: (role, page#anchor)})
INVENTORIES: dict[str, tuple[str, dict[str, tuple[str, str]]]] = {
    "python": (
        "https://docs.python.org/3/",
        {
            "collections.abc.Callable": ("class", "library/collections.abc.html"),
            "collections.abc.Hashable": ("class", "library/collections.abc.html"),
            "collections.abc.Iterable": ("class", "library/collections.abc.html"),
            "collections.abc.Mapping": ("class", "library/collections.abc.html"),
            "collections.abc.Sequence": ("class", "library/collections.abc.html"),
            "typing.Any": ("data", "library/typing.html"),
            "typing.Literal": ("data", "library/typing.html"),
            "typing.NamedTuple": ("class", "library/typing.html"),
            "bool": ("class", "library/functions.html"),
            "complex": ("class", "library/functions.html"),
            "float": ("class", "library/functions.html"),
            "int": ("class", "library/functions.html"),
            "object": ("class", "library/functions.html"),
            "dict": ("class", "library/stdtypes.html"),
            "list": ("class", "library/stdtypes.html"),
            "str": ("class", "library/stdtypes.html"),
            "tuple": ("class", "library/stdtypes.html"),
            "None": ("data", "library/constants.html"),
            "ValueError": ("exception", "library/exceptions.html"),
        },
    ),
    "numpy": (
        "https://numpy.org/doc/stable/",
        {
            "numpy.ndarray": ("class", "reference/generated/numpy.ndarray.html"),
            "numpy.number": ("class", "reference/arrays.scalars.html"),
            "numpy.bool": ("class", "reference/arrays.scalars.html"),
        },
    ),
    "jax": (
        "https://docs.jax.dev/en/latest/",
        {
            "jax.Array": ("class", "_autosummary/jax.Array.html"),
            "jax.jaxlib._jax.Array": ("class", "_autosummary/jax.Array.html#jax.Array"),
            "jax.jit": ("function", "_autosummary/jax.jit.html"),
            "jax.vmap": ("function", "_autosummary/jax.vmap.html"),
            "jax.grad": ("function", "_autosummary/jax.grad.html"),
            "jax.value_and_grad": ("function", "_autosummary/jax.value_and_grad.html"),
            "jax.pmap": ("function", "_autosummary/jax.pmap.html"),
            "jax.random.key": ("function", "_autosummary/jax.random.key.html"),
            "jax.random.split": ("function", "_autosummary/jax.random.split.html"),
            "jax.random.fold_in": ("function", "_autosummary/jax.random.fold_in.html"),
            "jax.lax.scan": ("function", "_autosummary/jax.lax.scan.html"),
            "jax.lax.cond": ("function", "_autosummary/jax.lax.cond.html"),
            "jax.shard_map": ("function", "_autosummary/jax.shard_map.html"),
        },
    ),
    "optax": (
        "https://optax.readthedocs.io/en/latest/",
        {
            "optax.GradientTransformation": ("class", "api/transformations.html"),
            "optax.GradientTransformationExtraArgs": ("class", "api/transformations.html"),
            "optax._src.base.GradientTransformation": (
                "class",
                "api/transformations.html#optax.GradientTransformation",
            ),
            "optax._src.base.GradientTransformationExtraArgs": (
                "class",
                "api/transformations.html#optax.GradientTransformationExtraArgs",
            ),
            "optax.Params": ("type", "api/transformations.html"),
            "optax.OptState": ("type", "api/transformations.html"),
            "optax.Updates": ("type", "api/transformations.html"),
            "optax.ScalarOrSchedule": ("type", "api/optimizer_schedules.html"),
            "optax.adam": ("function", "api/optimizers.html"),
            "optax.adamw": ("function", "api/optimizers.html"),
            "optax.apply_updates": ("function", "api/apply_updates.html"),
            "optax.apply_if_finite": ("function", "api/optimizer_wrappers.html"),
            "optax.chain": ("function", "api/combining_optimizers.html"),
            "optax.multi_transform": ("function", "api/combining_optimizers.html"),
            "optax.clip_by_global_norm": ("function", "api/transformations.html"),
            "optax.inject_hyperparams": ("function", "api/optimizer_schedules.html"),
            "optax.masked": ("function", "api/optimizer_wrappers.html"),
            "optax.tree_utils.tree_get": ("function", "api/utilities.html"),
        },
    ),
    "flax": (
        "https://flax.readthedocs.io/en/latest/",
        {
            "flax.nnx.Module": ("class", "api_reference/flax.nnx/module.html"),
            "flax.nnx.Optimizer": ("class", "api_reference/flax.nnx/training/optimizer.html"),
            "flax.nnx.State": ("class", "api_reference/flax.nnx/state.html"),
            "flax.nnx.statelib.State": (
                "class",
                "api_reference/flax.nnx/state.html#flax.nnx.State",
            ),
        },
    ),
    "flax_linen": (
        "https://flax-linen.readthedocs.io/en/latest/",
        {
            "flax.core.FrozenDict": (
                "class",
                "api_reference/flax.core.frozen_dict.html#flax.core.frozen_dict.FrozenDict",
            ),
            "flax.core.frozen_dict.FrozenDict": (
                "class",
                "api_reference/flax.core.frozen_dict.html",
            ),
            "flax.training.train_state.TrainState": (
                "class",
                "api_reference/flax.training.html",
            ),
        },
    ),
    "chex": (
        "https://chex.readthedocs.io/en/latest/",
        {"chex.ArrayTree": ("type", "api.html")},
    ),
}


def inventory(project: str, names: dict[str, tuple[str, str]]) -> bytes:
    """A Sphinx inventory, version 2: a text header, then zlib-compressed lines of
    ``name domain:role priority uri display-name``."""
    lines = []
    for name, (role, page) in sorted(names.items()):
        uri = page if "#" in page else f"{page}#{name}"
        lines.append(f"{name} py:{role} 1 {uri} -\n")
    header = (
        "# Sphinx inventory version 2\n"
        f"# Project: {project}\n"
        "# Version: \n"
        "# The remainder of this file is compressed using zlib.\n"
    )
    return header.encode() + zlib.compress("".join(lines).encode(), 9)


def main() -> None:
    for project, (_, names) in INVENTORIES.items():
        (HERE / f"{project}.inv").write_bytes(inventory(project, names))


if __name__ == "__main__":
    main()
