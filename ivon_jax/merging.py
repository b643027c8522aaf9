r"""Uncertainty-guided model merging with IVON's Hessians (Daheim et al., ICLR 2024).

Merge ``T`` models fine-tuned from a common base :math:`\theta_0`, elementwise,

.. math::
    \bar\theta = \theta_0 + \sum_t \frac{\alpha_t h_t}{h_0' + \sum_{t'} \alpha_{t'} h_{t'}}
                 \odot (\theta_t - \theta_0),

with the Hessians :math:`h_t` read for free from each run's IVON state
(:func:`hessian_from_state`) or computed with one extra pass over each task's data
(:func:`squared_gradient_hessian`). :func:`task_arithmetic` is the equal-weight special case.
"""

from ivon_jax._src.merging import hessian_from_state
from ivon_jax._src.merging import merge
from ivon_jax._src.merging import squared_gradient_hessian
from ivon_jax._src.merging import task_arithmetic

__all__ = [
    "hessian_from_state",
    "merge",
    "squared_gradient_hessian",
    "task_arithmetic",
]
