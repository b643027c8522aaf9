"""Metrics for IVON's predictive distributions: accuracy, NLL, calibration, OOD detection.

Classification metrics take predictive probabilities ``probs`` (shape ``(N, C)``) and integer
``labels`` (shape ``(N,)``); OOD-detection metrics take per-example scores of in-distribution
and OOD data, higher meaning "more in-distribution" (e.g. :func:`max_prob` or ``-entropy``).
All are pure JAX functions that work under ``jax.jit``.
"""

from ivon_jax._src.metrics import accuracy
from ivon_jax._src.metrics import aupr_in
from ivon_jax._src.metrics import aupr_out
from ivon_jax._src.metrics import auroc
from ivon_jax._src.metrics import brier
from ivon_jax._src.metrics import calibration_bins
from ivon_jax._src.metrics import detection_error
from ivon_jax._src.metrics import ece
from ivon_jax._src.metrics import entropy
from ivon_jax._src.metrics import fpr_at_95_tpr
from ivon_jax._src.metrics import fpr_at_tpr
from ivon_jax._src.metrics import max_prob
from ivon_jax._src.metrics import nll
from ivon_jax._src.metrics import top_k_accuracy

__all__ = [
    "accuracy",
    "aupr_in",
    "aupr_out",
    "auroc",
    "brier",
    "calibration_bins",
    "detection_error",
    "ece",
    "entropy",
    "fpr_at_95_tpr",
    "fpr_at_tpr",
    "max_prob",
    "nll",
    "top_k_accuracy",
]
