"""ivon_jax: IVON (Improved Variational Online Newton) for JAX and Optax.

IVON trains networks at Adam's cost while learning a diagonal Gaussian posterior over the
weights (Shen et al., "Variational Learning is Effective for Large Deep Networks", ICML 2024).
"""

from ivon_jax import merging
from ivon_jax import metrics
from ivon_jax import predictive
from ivon_jax import sensitivity
from ivon_jax._src.diagnostics import posterior_health
from ivon_jax._src.diagnostics import state_summary
from ivon_jax._src.estimators import estimate_hessian
from ivon_jax._src.grad import accumulated_value_and_grad
from ivon_jax._src.grad import value_and_grad
from ivon_jax._src.posterior import find_ivon_states
from ivon_jax._src.posterior import posterior_std
from ivon_jax._src.posterior import sample_params
from ivon_jax._src.prior import posterior_as_prior
from ivon_jax._src.prior import set_prior
from ivon_jax._src.pruning import prune_by_magnitude
from ivon_jax._src.pruning import prune_by_snr
from ivon_jax._src.state import IVONState
from ivon_jax._src.state import ScaleByIVONState
from ivon_jax._src.transform import ivon
from ivon_jax._src.transform import scale_by_ivon
from ivon_jax._src.wrappers import SkipNonFiniteState
from ivon_jax._src.wrappers import skip_nonfinite

__version__ = "0.1.0"

__all__ = [
    "IVONState",
    "ScaleByIVONState",
    "SkipNonFiniteState",
    "accumulated_value_and_grad",
    "estimate_hessian",
    "find_ivon_states",
    "ivon",
    "merging",
    "metrics",
    "posterior_as_prior",
    "posterior_health",
    "posterior_std",
    "predictive",
    "prune_by_magnitude",
    "prune_by_snr",
    "sample_params",
    "scale_by_ivon",
    "sensitivity",
    "set_prior",
    "skip_nonfinite",
    "state_summary",
    "value_and_grad",
]
