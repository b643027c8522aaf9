r"""Sensitivity to training data and leave-one-out estimates (memory-perturbation equation).

With IVON's posterior variance σ² (``ivon_jax.posterior_std``), removing training example i
moves the network output by about :math:`V_i e_i`, with
:math:`V_i = J_i\,\mathrm{diag}(\sigma^2)\,J_i^\top` and residual :math:`e_i` (Nickl et al.,
NeurIPS 2023). :func:`sensitivity` returns :math:`V_i e_i`, the score
:math:`\|V_i e_i\|_2` and the leave-one-out estimate
:math:`\frac1N\sum_i \ell(y_i, f_i + V_i e_i)` of the test loss; :func:`loo_estimator` wraps it
as a ``(params, opt_state, data)`` callback for training loops; :func:`prediction_variance`
returns the ``C × C`` matrices :math:`V_i`.
"""

from ivon_jax._src.sensitivity import Sensitivity
from ivon_jax._src.sensitivity import loo_estimator
from ivon_jax._src.sensitivity import prediction_variance
from ivon_jax._src.sensitivity import sensitivity

__all__ = [
    "Sensitivity",
    "loo_estimator",
    "prediction_variance",
    "sensitivity",
]
