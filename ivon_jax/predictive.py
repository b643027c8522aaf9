"""Monte-Carlo predictive distributions from IVON posteriors, for any ``apply_fn``."""

from ivon_jax._src.predictive import expectation
from ivon_jax._src.predictive import mean_and_variance
from ivon_jax._src.predictive import mixture_of_moments
from ivon_jax._src.predictive import mixture_of_probs
from ivon_jax._src.predictive import mixture_predict_proba
from ivon_jax._src.predictive import mixture_predict_regression
from ivon_jax._src.predictive import predict_proba
from ivon_jax._src.predictive import predict_regression

__all__ = [
    "expectation",
    "mean_and_variance",
    "mixture_of_moments",
    "mixture_of_probs",
    "mixture_predict_proba",
    "mixture_predict_regression",
    "predict_proba",
    "predict_regression",
]
