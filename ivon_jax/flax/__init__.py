"""Flax adapters for IVON: ``ivon_jax.flax.nnx`` (NNX) and ``ivon_jax.flax.linen`` (Linen).

Thin wrappers over the model-agnostic Monte-Carlo predictive (``ivon_jax._src.predictive``):
weight samples for a model, the MC predictive for classification and regression, Multi-IVON
mixtures, and for Linen a ``TrainState`` whose ``apply_gradients`` passes ``hess`` to IVON.
Only the trained parameters are ever perturbed; batch statistics and other collections are
used as they are.
"""

from ivon_jax.flax import linen
from ivon_jax.flax import nnx

__all__ = [
    "linen",
    "nnx",
]
