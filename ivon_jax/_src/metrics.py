r"""Metrics for predictive distributions and out-of-distribution (OOD) detection.

Every function is pure JAX and works under ``jax.jit`` (pass ``k``, ``num_bins`` and ``tpr`` as
static arguments); called eagerly, each compiles its computation once per input shape. Inputs
are checked by shape and dtype at trace time; values (rows summing to one, labels in
``[0, C)``, no NaNs) are not checked, as that would need concrete arrays.

Classification metrics take predictive probabilities ``probs`` of shape ``(N, C)`` (each row a
distribution over ``C`` classes, e.g. a softmax or an average of softmaxes over posterior
samples) and integer ``labels`` of shape ``(N,)``.

OOD metrics take per-example scores of in-distribution data ``scores_in`` (shape
``(N_in,)``) and of OOD data ``scores_out`` (shape ``(N_out,)``), where a *higher score means
"more in-distribution"* (for example :func:`max_prob`, or minus :func:`entropy`). The
in-distribution data are the positive class: an example is declared in-distribution when its
score is ``>= t`` for a threshold ``t``, so

.. math::
    \mathrm{TPR}(t) = \#\{i : s^{in}_i \ge t\} / N_{in}, \qquad
    \mathrm{FPR}(t) = \#\{j : s^{out}_j \ge t\} / N_{out}.

Computations run in the input's floating dtype, or float32 for lower-precision or integer
inputs; results are scalar arrays (or ``(N,)`` arrays for per-example quantities).
"""

from __future__ import annotations

import functools
import math
from fractions import Fraction
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# ----------------------------------------------------------------------------- input checks


def _float_dtype(dtype: Any) -> jnp.dtype:
    """``dtype`` if it is a float of 32 bits or more, else float32."""
    dtype = jnp.dtype(dtype)
    if jnp.issubdtype(dtype, jnp.floating) and jnp.finfo(dtype).bits >= 32:
        return dtype
    return jnp.dtype(jnp.float32)


def _check_probs_labels(probs: Any, labels: Any) -> tuple[jax.Array, jax.Array]:
    probs, labels = jnp.asarray(probs), jnp.asarray(labels)
    if probs.ndim != 2:
        raise ValueError(
            f"ivon_jax.metrics: `probs` must be 2-D with shape (N, C), got shape {probs.shape}."
        )
    n, c = probs.shape
    if n == 0 or c == 0:
        raise ValueError(
            f"ivon_jax.metrics: `probs` must be non-empty, got shape {probs.shape}."
        )
    if not jnp.issubdtype(probs.dtype, jnp.floating):
        raise ValueError(
            f"ivon_jax.metrics: `probs` must be floating point, got dtype {probs.dtype}."
        )
    if labels.shape != (n,):
        raise ValueError(
            f"ivon_jax.metrics: `labels` must have shape (N,) = ({n},) to match `probs` of "
            f"shape {probs.shape}, got shape {labels.shape}."
        )
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(
            f"ivon_jax.metrics: `labels` must be integer class indices, got dtype "
            f"{labels.dtype}."
        )
    return probs.astype(_float_dtype(probs.dtype)), labels.astype(jnp.int32)


def _check_probs(probs: Any) -> jax.Array:
    probs = jnp.asarray(probs)
    if probs.ndim != 2 or probs.shape[0] == 0 or probs.shape[1] == 0:
        raise ValueError(
            "ivon_jax.metrics: `probs` must be a non-empty 2-D array of shape (N, C), got "
            f"shape {probs.shape}."
        )
    if not jnp.issubdtype(probs.dtype, jnp.floating):
        raise ValueError(
            f"ivon_jax.metrics: `probs` must be floating point, got dtype {probs.dtype}."
        )
    return probs.astype(_float_dtype(probs.dtype))


def _check_scores(scores_in: Any, scores_out: Any) -> tuple[jax.Array, jax.Array]:
    scores_in, scores_out = jnp.asarray(scores_in), jnp.asarray(scores_out)
    for name, s in (("scores_in", scores_in), ("scores_out", scores_out)):
        if s.ndim != 1 or s.shape[0] == 0:
            raise ValueError(
                f"ivon_jax.metrics: `{name}` must be a non-empty 1-D array of per-example "
                f"scores, got shape {s.shape}."
            )
        if not (jnp.issubdtype(s.dtype, jnp.floating) or jnp.issubdtype(s.dtype, jnp.integer)):
            raise ValueError(
                f"ivon_jax.metrics: `{name}` must be real numbers, got dtype {s.dtype}."
            )
    dt = jnp.promote_types(_float_dtype(scores_in.dtype), _float_dtype(scores_out.dtype))
    return scores_in.astype(dt), scores_out.astype(dt)


def _count_ge(sorted_x: jax.Array, t: jax.Array) -> jax.Array:
    """``#{x >= t}`` for each entry of ``t``, with ``sorted_x`` sorted ascending (int32)."""
    return (sorted_x.shape[0] - jnp.searchsorted(sorted_x, t, side="left")).astype(jnp.int32)


def _count_le(sorted_x: jax.Array, t: jax.Array) -> jax.Array:
    """``#{x <= t}`` for each entry of ``t``, with ``sorted_x`` sorted ascending (int32)."""
    return jnp.searchsorted(sorted_x, t, side="right").astype(jnp.int32)


# ------------------------------------------------------------------- classification metrics


def accuracy(probs: Any, labels: Any) -> jax.Array:
    r"""Top-1 accuracy: the fraction of examples whose most probable class is the label.

    .. math:: \mathrm{acc} = \frac1N \sum_{i=1}^N [\arg\max_c p_{ic} = y_i]

    Ties between classes go to the lowest class index (as ``jnp.argmax``).

    Args:
      probs: predictive probabilities, shape ``(N, C)``.
      labels: integer labels in ``[0, C)``, shape ``(N,)``.

    Returns:
      A scalar in ``[0, 1]``.

    Raises:
      ValueError: if the shapes or dtypes are wrong or the input is empty.

    Example:
      >>> import jax.numpy as jnp
      >>> from ivon_jax import metrics
      >>> probs = jnp.array([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.3, 0.3, 0.4], [0.2, 0.5, 0.3]])
      >>> labels = jnp.array([0, 1, 0, 2])
      >>> print(f"{float(metrics.accuracy(probs, labels)):.4f}")
      0.5000
    """
    return _accuracy(*_check_probs_labels(probs, labels))


@jax.jit
def _accuracy(probs: jax.Array, labels: jax.Array) -> jax.Array:
    correct = jnp.argmax(probs, axis=-1).astype(jnp.int32) == labels
    return jnp.mean(correct.astype(probs.dtype))


def top_k_accuracy(probs: Any, labels: Any, k: int) -> jax.Array:
    r"""Top-k accuracy: the fraction of examples whose label is among the k most probable.

    The rank of the label is the number of classes ranked above it,

    .. math:: r_i = \#\{c : p_{ic} > p_{iy_i}\} + \#\{c < y_i : p_{ic} = p_{iy_i}\},

    (ties go to the lowest class index, as in :func:`accuracy`), and
    :math:`\mathrm{acc}_k = \frac1N \sum_i [r_i < k]`. With ``k = 1`` this equals
    :func:`accuracy`.

    Args:
      probs: predictive probabilities, shape ``(N, C)``.
      labels: integer labels in ``[0, C)``, shape ``(N,)``.
      k: an int in ``[1, C]`` (static under ``jax.jit``).

    Returns:
      A scalar in ``[0, 1]``.

    Raises:
      ValueError: on bad shapes or dtypes, empty input, or ``k`` outside ``[1, C]``.

    Example:
      >>> import jax.numpy as jnp
      >>> from ivon_jax import metrics
      >>> probs = jnp.array([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.3, 0.3, 0.4], [0.2, 0.5, 0.3]])
      >>> labels = jnp.array([0, 1, 0, 2])
      >>> print(f"{float(metrics.top_k_accuracy(probs, labels, k=2)):.4f}")
      1.0000
    """
    probs, labels = _check_probs_labels(probs, labels)
    c = probs.shape[1]
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= c:
        raise ValueError(
            f"ivon_jax.metrics: `k` must be an int in [1, C] = [1, {c}], got {k!r}."
        )
    return _top_k_accuracy(probs, labels, int(k))


@functools.partial(jax.jit, static_argnames="k")
def _top_k_accuracy(probs: jax.Array, labels: jax.Array, k: int) -> jax.Array:
    c = probs.shape[1]
    p_label = jnp.take_along_axis(probs, labels[:, None], axis=1)  # (N, 1)
    classes = jnp.arange(c, dtype=jnp.int32)[None, :]
    above = (probs > p_label) | ((probs == p_label) & (classes < labels[:, None]))
    rank = jnp.sum(above.astype(jnp.int32), axis=1)
    return jnp.mean((rank < k).astype(probs.dtype))


def nll(probs: Any, labels: Any) -> jax.Array:
    r"""Mean negative log-likelihood (cross-entropy) of the labels.

    .. math:: \mathrm{NLL} = -\frac1N \sum_{i=1}^N \log \max(p_{iy_i}, \epsilon)

    with :math:`\epsilon` the machine epsilon of the computation dtype (as scikit-learn's
    ``log_loss``), so a zero probability gives a large finite loss instead of infinity.

    Args:
      probs: predictive probabilities, shape ``(N, C)``.
      labels: integer labels in ``[0, C)``, shape ``(N,)``.

    Returns:
      A non-negative scalar.

    Raises:
      ValueError: if the shapes or dtypes are wrong or the input is empty.

    Example:
      >>> import jax.numpy as jnp
      >>> from ivon_jax import metrics
      >>> probs = jnp.array([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.3, 0.3, 0.4], [0.2, 0.5, 0.3]])
      >>> labels = jnp.array([0, 1, 0, 2])
      >>> print(f"{float(metrics.nll(probs, labels)):.4f}")
      0.8189
    """
    return _nll(*_check_probs_labels(probs, labels))


@jax.jit
def _nll(probs: jax.Array, labels: jax.Array) -> jax.Array:
    p_label = jnp.take_along_axis(probs, labels[:, None], axis=1)[:, 0]
    eps = float(jnp.finfo(probs.dtype).eps)
    return -jnp.mean(jnp.log(jnp.maximum(p_label, eps)))


def calibration_bins(
    probs: Any, labels: Any, num_bins: int = 15
) -> tuple[jax.Array, jax.Array, jax.Array]:
    r"""Per-bin statistics of a reliability diagram with equal-width confidence bins.

    The confidence of example i is :math:`\hat p_i = \max_c p_{ic}`. With edges
    :math:`e_b = b/B` (``b = 0..B``, rounded to the computation dtype), bin ``b`` holds the
    examples with :math:`e_b < \hat p_i \le e_{b+1}`; a confidence of exactly 0 goes to the
    first bin. So every example is in exactly one bin, and one exactly on an inner edge goes
    to the lower bin.

    Args:
      probs: predictive probabilities, shape ``(N, C)``.
      labels: integer labels in ``[0, C)``, shape ``(N,)``.
      num_bins: B ≥ 1 (static under ``jax.jit``).

    Returns:
      ``(counts, accuracies, confidences)``, each of shape ``(B,)``: the number of examples
      per bin, and the mean correctness and mean confidence in each bin (0 for empty bins).

    Raises:
      ValueError: on bad shapes or dtypes, empty input, or ``num_bins < 1``.

    Example:
      >>> import jax.numpy as jnp
      >>> from ivon_jax import metrics
      >>> probs = jnp.array([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.3, 0.3, 0.4], [0.2, 0.5, 0.3]])
      >>> labels = jnp.array([0, 1, 0, 2])
      >>> counts, acc, conf = metrics.calibration_bins(probs, labels, num_bins=5)
      >>> counts
      Array([0., 1., 2., 1., 0.], dtype=float32)
      >>> acc.shape, conf.shape
      ((5,), (5,))
    """
    counts, acc_sum, conf_sum, _ = _bin_sums(probs, labels, num_bins)
    safe = jnp.maximum(counts, 1.0)
    return counts, acc_sum / safe, conf_sum / safe


def _bin_sums(
    probs: Any, labels: Any, num_bins: int
) -> tuple[jax.Array, jax.Array, jax.Array, int]:
    """Per-bin (count, sum of correctness, sum of confidence), and N."""
    probs, labels = _check_probs_labels(probs, labels)
    if isinstance(num_bins, bool) or not isinstance(num_bins, (int, np.integer)) or num_bins < 1:
        raise ValueError(f"ivon_jax.metrics: `num_bins` must be an int >= 1, got {num_bins!r}.")
    return (*_bin_sums_jit(probs, labels, int(num_bins)), probs.shape[0])


@functools.partial(jax.jit, static_argnames="num_bins")
def _bin_sums_jit(
    probs: jax.Array, labels: jax.Array, num_bins: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    dt = probs.dtype
    conf = jnp.max(probs, axis=1)
    correct = (jnp.argmax(probs, axis=1).astype(jnp.int32) == labels).astype(dt)
    # Inner edges b/B, b = 1..B-1, computed in float64 and rounded once to `dt`, so that a
    # confidence equal to the rounded value of b/B (e.g. float32(0.2)) lies on the edge.
    inner = jnp.asarray(np.arange(1, num_bins, dtype=np.float64) / num_bins, dt)
    # side="left": first index j with inner[j] >= conf, i.e. bins are (lo, hi].
    idx = jnp.searchsorted(inner, conf, side="left").astype(jnp.int32)
    seg = lambda x: jax.ops.segment_sum(x, idx, num_segments=num_bins)
    return seg(jnp.ones_like(conf)), seg(correct), seg(conf)


def ece(probs: Any, labels: Any, num_bins: int = 15) -> jax.Array:
    r"""Expected calibration error with equal-width confidence bins (Naeini et al. 2015).

    With the bins of :func:`calibration_bins` (``(lo, hi]``, confidence 0 in the first bin),
    :math:`n_b` examples in bin b, their accuracy :math:`\mathrm{acc}_b` and mean confidence
    :math:`\mathrm{conf}_b`,

    .. math::
        \mathrm{ECE} = \sum_{b=1}^{B} \frac{n_b}{N}\,
            \lvert \mathrm{acc}_b - \mathrm{conf}_b \rvert
          = \frac1N \sum_b \Big\lvert \sum_{i \in b} ([\hat y_i = y_i] - \hat p_i) \Big\rvert,

    the count-weighted *sum* over bins (not a mean over bins); empty bins contribute 0.

    Args:
      probs: predictive probabilities, shape ``(N, C)``.
      labels: integer labels in ``[0, C)``, shape ``(N,)``.
      num_bins: B ≥ 1 (static under ``jax.jit``); 15 is the common choice.

    Returns:
      A scalar in ``[0, 1]``.

    Raises:
      ValueError: on bad shapes or dtypes, empty input, or ``num_bins < 1``.

    Example:
      >>> import jax.numpy as jnp
      >>> from ivon_jax import metrics
      >>> probs = jnp.array([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.3, 0.3, 0.4], [0.2, 0.5, 0.3]])
      >>> labels = jnp.array([0, 1, 0, 2])
      >>> print(f"{float(metrics.ece(probs, labels, num_bins=5)):.4f}")
      0.2000
    """
    _, acc_sum, conf_sum, n = _bin_sums(probs, labels, num_bins)
    return jnp.sum(jnp.abs(acc_sum - conf_sum)) / float(n)


def brier(probs: Any, labels: Any) -> jax.Array:
    r"""Brier score, summed over classes and averaged over examples.

    .. math:: \mathrm{BS} = \frac1N \sum_{i=1}^N \sum_{c=1}^C (p_{ic} - [y_i = c])^2

    This multi-class convention lies in ``[0, 2]``. For two classes it is *twice* the usual
    binary Brier score :math:`\frac1N \sum_i (p_{i1} - y_i)^2` (scikit-learn's
    ``brier_score_loss`` for binary input), and equals ``brier_score_loss(...,
    scale_by_half=False)``.

    Args:
      probs: predictive probabilities, shape ``(N, C)``.
      labels: integer labels in ``[0, C)``, shape ``(N,)``.

    Returns:
      A scalar in ``[0, 2]``.

    Raises:
      ValueError: if the shapes or dtypes are wrong or the input is empty.

    Example:
      >>> import jax.numpy as jnp
      >>> from ivon_jax import metrics
      >>> probs = jnp.array([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.3, 0.3, 0.4], [0.2, 0.5, 0.3]])
      >>> labels = jnp.array([0, 1, 0, 2])
      >>> print(f"{float(metrics.brier(probs, labels)):.4f}")
      0.4800
    """
    return _brier(*_check_probs_labels(probs, labels))


@jax.jit
def _brier(probs: jax.Array, labels: jax.Array) -> jax.Array:
    onehot = jax.nn.one_hot(labels, probs.shape[1], dtype=probs.dtype)
    return jnp.mean(jnp.sum(jnp.square(probs - onehot), axis=1))


def entropy(probs: Any) -> jax.Array:
    r"""Predictive entropy of each example, in nats.

    .. math:: H_i = -\sum_c p_{ic} \log p_{ic}, \qquad 0 \log 0 = 0.

    Args:
      probs: predictive probabilities, shape ``(N, C)``.

    Returns:
      Shape ``(N,)``, each in ``[0, log C]``. Use ``-entropy(probs)`` as an OOD score.

    Raises:
      ValueError: if ``probs`` is not a non-empty floating 2-D array.

    Example:
      >>> import jax.numpy as jnp
      >>> from ivon_jax import metrics
      >>> probs = jnp.array([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.3, 0.3, 0.4], [0.2, 0.5, 0.3]])
      >>> labels = jnp.array([0, 1, 0, 2])
      >>> print(f"{float(metrics.entropy(probs)[0]):.4f}")
      0.8018
    """
    return _entropy(_check_probs(probs))


@jax.jit
def _entropy(probs: jax.Array) -> jax.Array:
    return jnp.sum(jax.scipy.special.entr(probs), axis=1)


def max_prob(probs: Any) -> jax.Array:
    r"""The confidence of each example, :math:`\max_c p_{ic}` (shape ``(N,)``).

    A common OOD score (Hendrycks & Gimpel 2017): higher means more in-distribution.

    Raises:
      ValueError: if ``probs`` is not a non-empty floating 2-D array.

    Example:
      >>> import jax.numpy as jnp
      >>> from ivon_jax import metrics
      >>> probs = jnp.array([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.3, 0.3, 0.4], [0.2, 0.5, 0.3]])
      >>> labels = jnp.array([0, 1, 0, 2])
      >>> metrics.max_prob(probs)
      Array([0.7, 0.6, 0.4, 0.5], dtype=float32)
    """
    probs = _check_probs(probs)
    return jnp.max(probs, axis=1)


# ------------------------------------------------------------------ OOD-detection metrics


def auroc(scores_in: Any, scores_out: Any) -> jax.Array:
    r"""Area under the ROC curve for separating in-distribution from OOD data.

    In-distribution is the positive class and a higher score means more in-distribution.
    Computed exactly as the Mann-Whitney statistic, ties counting one half (as scikit-learn's
    ``roc_auc_score``, i.e. the trapezoidal area):

    .. math::
        \mathrm{AUROC} = \frac{1}{N_{in} N_{out}} \sum_{i,j}
            \big([s^{in}_i > s^{out}_j] + \tfrac12 [s^{in}_i = s^{out}_j]\big).

    Cost :math:`O((N_{in}+N_{out}) \log N_{out})`, no pairwise matrix.

    Args:
      scores_in: scores of in-distribution examples, shape ``(N_in,)``.
      scores_out: scores of OOD examples, shape ``(N_out,)``.

    Returns:
      A scalar in ``[0, 1]``; 0.5 is chance.

    Raises:
      ValueError: if either input is not a non-empty 1-D real array.

    Example:
      >>> import jax.numpy as jnp
      >>> from ivon_jax import metrics
      >>> scores_in = jnp.array([0.9, 0.8, 0.7, 0.4])  # e.g. max_prob on test data
      >>> scores_out = jnp.array([0.5, 0.3, 0.2])  # ... and on out-of-distribution data
      >>> print(f"{float(metrics.auroc(scores_in, scores_out)):.4f}")
      0.9167
    """
    return _auroc(*_check_scores(scores_in, scores_out))


@jax.jit
def _auroc(s_in: jax.Array, s_out: jax.Array) -> jax.Array:
    sorted_out = jnp.sort(s_out)
    below = jnp.searchsorted(sorted_out, s_in, side="left")  # #{out < s_in_i}
    below_or_eq = jnp.searchsorted(sorted_out, s_in, side="right")  # #{out <= s_in_i}
    dt = s_in.dtype
    wins = below.astype(dt) + 0.5 * (below_or_eq - below).astype(dt)
    return jnp.sum(wins) / (float(s_in.shape[0]) * float(s_out.shape[0]))


def aupr_in(scores_in: Any, scores_out: Any) -> jax.Array:
    r"""Area under the precision-recall curve, in-distribution data as the positives.

    Step-wise (average-precision) area, without interpolation, as scikit-learn's
    ``average_precision_score(y, scores)`` with ``y = 1`` for in-distribution: with the
    precision at threshold t, :math:`P(t) = \#\{s^{in} \ge t\} / \#\{s \ge t\}` over both
    sets,

    .. math:: \mathrm{AUPR_{in}} = \frac{1}{N_{in}} \sum_{i=1}^{N_{in}} P(s^{in}_i),

    which is :math:`\sum_n (R_n - R_{n-1}) P_n` over the distinct thresholds (ties handled
    as one threshold).

    Args:
      scores_in: scores of in-distribution examples (higher = more in-distribution).
      scores_out: scores of OOD examples.

    Returns:
      A scalar in ``(0, 1]``; chance level is :math:`N_{in}/(N_{in}+N_{out})`.

    Raises:
      ValueError: if either input is not a non-empty 1-D real array.

    Example:
      >>> import jax.numpy as jnp
      >>> from ivon_jax import metrics
      >>> scores_in = jnp.array([0.9, 0.8, 0.7, 0.4])  # e.g. max_prob on test data
      >>> scores_out = jnp.array([0.5, 0.3, 0.2])  # ... and on out-of-distribution data
      >>> print(f"{float(metrics.aupr_in(scores_in, scores_out)):.4f}")
      0.9500
    """
    return _aupr_in(*_check_scores(scores_in, scores_out))


@jax.jit
def _aupr_in(s_in: jax.Array, s_out: jax.Array) -> jax.Array:
    sorted_in, sorted_out = jnp.sort(s_in), jnp.sort(s_out)
    tp = _count_ge(sorted_in, s_in).astype(s_in.dtype)
    fp = _count_ge(sorted_out, s_in).astype(s_in.dtype)
    return jnp.mean(tp / (tp + fp))


def aupr_out(scores_in: Any, scores_out: Any) -> jax.Array:
    r"""Area under the precision-recall curve, OOD data as the positives.

    The same step-wise average precision as :func:`aupr_in` with the roles swapped and the
    scores negated (scikit-learn's ``average_precision_score(y_out, -scores)``):

    .. math::
        \mathrm{AUPR_{out}} = \frac{1}{N_{out}} \sum_{j=1}^{N_{out}}
            \frac{\#\{s^{out} \le s^{out}_j\}}{\#\{s \le s^{out}_j\}}.

    Args:
      scores_in: scores of in-distribution examples (higher = more in-distribution).
      scores_out: scores of OOD examples.

    Returns:
      A scalar in ``(0, 1]``; chance level is :math:`N_{out}/(N_{in}+N_{out})`.

    Raises:
      ValueError: if either input is not a non-empty 1-D real array.

    Example:
      >>> import jax.numpy as jnp
      >>> from ivon_jax import metrics
      >>> scores_in = jnp.array([0.9, 0.8, 0.7, 0.4])  # e.g. max_prob on test data
      >>> scores_out = jnp.array([0.5, 0.3, 0.2])  # ... and on out-of-distribution data
      >>> print(f"{float(metrics.aupr_out(scores_in, scores_out)):.4f}")
      0.9167
    """
    return _aupr_out(*_check_scores(scores_in, scores_out))


@jax.jit
def _aupr_out(s_in: jax.Array, s_out: jax.Array) -> jax.Array:
    sorted_in, sorted_out = jnp.sort(s_in), jnp.sort(s_out)
    tp = _count_le(sorted_out, s_out).astype(s_out.dtype)
    fp = _count_le(sorted_in, s_out).astype(s_out.dtype)
    return jnp.mean(tp / (tp + fp))


def _needed(tpr: float, n: int) -> int:
    """The smallest count k with k / n >= tpr (exact rational arithmetic)."""
    frac = Fraction(tpr).limit_denominator(10**9)
    return max(1, math.ceil(frac * n))


def fpr_at_tpr(scores_in: Any, scores_out: Any, tpr: float = 0.95) -> jax.Array:
    r"""False-positive rate at the largest threshold whose true-positive rate is ≥ ``tpr``.

    With :math:`k = \lceil \mathrm{tpr} \cdot N_{in} \rceil`, the threshold
    :math:`t^*` is the k-th largest in-distribution score, which is the largest t with
    :math:`\mathrm{TPR}(t) \ge \mathrm{tpr}` (ties at :math:`t^*` only raise the TPR), and

    .. math:: \mathrm{FPR@tpr} = \#\{j : s^{out}_j \ge t^*\} / N_{out}.

    No interpolation and no "TPR within a band around 95%" search, which fails (or averages
    the wrong thresholds) when no threshold gives a TPR in the band.

    Args:
      scores_in: scores of in-distribution examples (higher = more in-distribution).
      scores_out: scores of OOD examples.
      tpr: the target true-positive rate in ``(0, 1]`` (static under ``jax.jit``).

    Returns:
      A scalar in ``[0, 1]``; lower is better.

    Raises:
      ValueError: on bad inputs, or ``tpr`` outside ``(0, 1]``.

    Example:
      >>> import jax.numpy as jnp
      >>> from ivon_jax import metrics
      >>> scores_in = jnp.array([0.9, 0.8, 0.7, 0.4])  # e.g. max_prob on test data
      >>> scores_out = jnp.array([0.5, 0.3, 0.2])  # ... and on out-of-distribution data
      >>> print(f"{float(metrics.fpr_at_tpr(scores_in, scores_out, tpr=0.75)):.4f}")
      0.0000
    """
    s_in, s_out = _check_scores(scores_in, scores_out)
    number = (int, float, np.integer, np.floating)
    if isinstance(tpr, bool) or not isinstance(tpr, number) or not 0 < tpr <= 1:
        raise ValueError(f"ivon_jax.metrics: `tpr` must be a number in (0, 1], got {tpr!r}.")
    return _fpr_at_count(s_in, s_out, _needed(float(tpr), s_in.shape[0]))


@functools.partial(jax.jit, static_argnames="k")
def _fpr_at_count(s_in: jax.Array, s_out: jax.Array, k: int) -> jax.Array:
    n_in = s_in.shape[0]
    threshold = jnp.sort(s_in)[n_in - k]  # k-th largest
    fp = jnp.sum((s_out >= threshold).astype(s_out.dtype))
    return fp / float(s_out.shape[0])


def fpr_at_95_tpr(scores_in: Any, scores_out: Any) -> jax.Array:
    r"""FPR at 95% TPR: :func:`fpr_at_tpr` with ``tpr = 0.95`` (Liang et al. 2018).

    The threshold :math:`t^*` is the largest one whose TPR on the in-distribution data is at
    least 0.95 (the :math:`\lceil 0.95 N_{in} \rceil`-th largest in-distribution score), and
    the result is the fraction of OOD scores :math:`\ge t^*`.

    Args:
      scores_in: scores of in-distribution examples (higher = more in-distribution).
      scores_out: scores of OOD examples.

    Returns:
      A scalar in ``[0, 1]``; lower is better.

    Raises:
      ValueError: if either input is not a non-empty 1-D real array.

    Example:
      >>> import jax.numpy as jnp
      >>> from ivon_jax import metrics
      >>> scores_in = jnp.array([0.9, 0.8, 0.7, 0.4])  # e.g. max_prob on test data
      >>> scores_out = jnp.array([0.5, 0.3, 0.2])  # ... and on out-of-distribution data
      >>> print(f"{float(metrics.fpr_at_95_tpr(scores_in, scores_out)):.4f}")
      0.3333
    """
    return fpr_at_tpr(scores_in, scores_out, 0.95)


def detection_error(scores_in: Any, scores_out: Any) -> jax.Array:
    r"""Minimum misclassification probability with equal priors (Liang et al. 2018).

    .. math::
        P_e = \min_t \; \tfrac12 (1 - \mathrm{TPR}(t)) + \tfrac12 \mathrm{FPR}(t),

    the minimum over all thresholds: every observed score, plus :math:`t = +\infty` (declare
    nothing in-distribution), which gives 0.5. So the result is at most 0.5.

    Args:
      scores_in: scores of in-distribution examples (higher = more in-distribution).
      scores_out: scores of OOD examples.

    Returns:
      A scalar in ``[0, 0.5]``; lower is better.

    Raises:
      ValueError: if either input is not a non-empty 1-D real array.

    Example:
      >>> import jax.numpy as jnp
      >>> from ivon_jax import metrics
      >>> scores_in = jnp.array([0.9, 0.8, 0.7, 0.4])  # e.g. max_prob on test data
      >>> scores_out = jnp.array([0.5, 0.3, 0.2])  # ... and on out-of-distribution data
      >>> print(f"{float(metrics.detection_error(scores_in, scores_out)):.4f}")
      0.1250
    """
    return _detection_error(*_check_scores(scores_in, scores_out))


@jax.jit
def _detection_error(s_in: jax.Array, s_out: jax.Array) -> jax.Array:
    sorted_in, sorted_out = jnp.sort(s_in), jnp.sort(s_out)
    thresholds = jnp.concatenate([s_in, s_out])
    dt = s_in.dtype
    tpr = _count_ge(sorted_in, thresholds).astype(dt) / float(s_in.shape[0])
    fpr = _count_ge(sorted_out, thresholds).astype(dt) / float(s_out.shape[0])
    err = 0.5 * (1.0 - tpr) + 0.5 * fpr
    return jnp.minimum(jnp.min(err), 0.5)
