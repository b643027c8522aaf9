"""Tests for ivon_jax.metrics against scikit-learn, SciPy and hand-computed cases."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
from sklearn import metrics as skm

from ivon_jax import metrics

F32 = np.float32


def random_probs(seed: int, n: int = 200, c: int = 7) -> tuple[np.ndarray, np.ndarray]:
    """Dirichlet rows (float64) and labels drawn from them (so accuracy is far from 0 and 1)."""
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.full(c, 0.5), size=n)
    labels = np.array([rng.choice(c, p=p) for p in probs])
    return probs, labels


def random_scores(seed: int, ties: bool) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    if ties:  # few distinct values: many ties within and across the two sets
        return (rng.integers(0, 6, 150).astype(F32), rng.integers(0, 4, 90).astype(F32))
    return (rng.normal(1.0, 1.0, 150).astype(F32), rng.normal(0.0, 1.0, 90).astype(F32))


def close(a, b, tol=1e-5) -> bool:
    return bool(np.allclose(np.asarray(a, np.float64), b, rtol=tol, atol=tol))


# ----------------------------------------------------------------- classification vs sklearn


@pytest.mark.parametrize("seed", [0, 1])
def test_accuracy_nll_brier_top_k_match_sklearn(seed):
    probs, labels = random_probs(seed)
    c = probs.shape[1]
    p32 = probs.astype(F32)
    assert close(metrics.accuracy(p32, labels), skm.accuracy_score(labels, probs.argmax(1)))
    assert close(metrics.nll(p32, labels), skm.log_loss(labels, probs, labels=range(c)))
    assert close(
        metrics.brier(p32, labels),
        skm.brier_score_loss(labels, probs, labels=range(c), scale_by_half=False),
    )
    assert close(metrics.top_k_accuracy(p32, labels, c), 1.0)  # k = C: always a hit
    for k in (1, 2, 5):
        assert close(
            metrics.top_k_accuracy(p32, labels, k),
            skm.top_k_accuracy_score(labels, probs, k=k, labels=range(c)),
        )
    # Sanity: the data make these non-trivial.
    assert 0.2 < float(metrics.accuracy(p32, labels)) < 0.9


def test_top_k_with_k1_equals_accuracy_and_breaks_ties_like_argmax():
    probs = np.array([[0.4, 0.4, 0.2], [0.4, 0.4, 0.2], [0.2, 0.4, 0.4]], F32)
    labels = np.array([0, 1, 2])
    # argmax picks the lowest index among ties: correct, wrong, wrong.
    assert close(metrics.accuracy(probs, labels), 1 / 3)
    assert close(metrics.top_k_accuracy(probs, labels, 1), 1 / 3)
    assert close(metrics.top_k_accuracy(probs, labels, 2), 1.0)


def test_brier_binary_is_twice_sklearn_binary_brier():
    rng = np.random.default_rng(3)
    p1 = rng.uniform(size=300)
    y = rng.integers(0, 2, 300)
    probs = np.stack([1 - p1, p1], axis=1).astype(F32)
    assert close(metrics.brier(probs, y), 2 * skm.brier_score_loss(y, p1))


def test_nll_clips_zero_probability():
    # -log(eps) with eps = 2^-23 (float32 machine epsilon) = 23 ln 2.
    probs = np.array([[1.0, 0.0], [0.5, 0.5]], F32)
    labels = np.array([1, 0])
    expected = (23 * np.log(2) + np.log(2)) / 2
    out = metrics.nll(probs, labels)
    assert np.isfinite(float(out))
    assert close(out, expected)


def test_entropy_and_max_prob():
    probs = np.array([[0.25] * 4, [1.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0]], F32)
    assert close(metrics.entropy(probs), [np.log(4), 0.0, np.log(2)])
    assert close(metrics.max_prob(probs), [0.25, 1.0, 0.5])
    p, _ = random_probs(4, n=50)
    assert close(metrics.entropy(p.astype(F32)), scipy.stats.entropy(p, axis=1), tol=1e-4)


# ------------------------------------------------------------------------------------- ECE


def ece_reference(probs: np.ndarray, labels: np.ndarray, num_bins: int) -> float:
    """Loop over bins (lo, hi], confidence 0 in the first bin; count-weighted sum."""
    conf, pred = probs.max(1), probs.argmax(1)
    total = 0.0
    for b in range(num_bins):
        lo, hi = b / num_bins, (b + 1) / num_bins
        in_bin = (conf > lo) & (conf <= hi)
        if b == 0:
            in_bin |= conf == 0
        if in_bin.any():
            acc = np.mean(pred[in_bin] == labels[in_bin])
            total += in_bin.sum() / len(conf) * abs(acc - conf[in_bin].mean())
    return total


@pytest.mark.parametrize("num_bins", [1, 10, 15])
def test_ece_matches_loop_reference(num_bins):
    probs, labels = random_probs(5, n=300)
    assert close(
        metrics.ece(probs.astype(F32), labels, num_bins),
        ece_reference(probs, labels, num_bins),
    )


def test_ece_points_on_bin_edges_go_to_lower_bin():
    # 4 bins with edges 0.25, 0.5, 0.75 (exact in binary). By hand:
    #   bin (0, .25]:   b (conf .25, wrong)            |0 - .25|  = .25
    #   bin (.25, .5]:  a (.5, right), e (.4, right)   |2 - .9|   = 1.1
    #   bin (.5, .75]:  c (.75, wrong), f (.6, right)  |1 - 1.35| = .35
    # ECE = (.25 + 1.1 + .35) / 5 = 0.34. Edges into the upper bin would give 0.4.
    probs = np.array(
        [
            [0.5, 0.25, 0.25, 0.0],  # a
            [0.25, 0.25, 0.25, 0.25],  # b (argmax 0)
            [0.75, 0.25, 0.0, 0.0],  # c
            [0.4, 0.3, 0.3, 0.0],  # e
            [0.6, 0.4, 0.0, 0.0],  # f
        ],
        F32,
    )
    labels = np.array([0, 1, 1, 0, 0])
    assert close(metrics.ece(probs, labels, num_bins=4), 0.34)
    counts, acc, conf = metrics.calibration_bins(probs, labels, num_bins=4)
    assert close(counts, [1, 2, 2, 0])
    assert close(acc, [0.0, 1.0, 0.5, 0.0])
    assert close(conf, [0.25, 0.45, 0.675, 0.0])


def test_ece_edges_not_exact_in_binary():
    # Confidence float32(b/5) lies on the edge float32(b/5): lower bin; confidence 0 (an
    # all-zero row, not a distribution) goes to the first bin. Every point in one bin.
    probs = np.array(
        [
            [0.2] * 5,
            [0.4, 0.15, 0.15, 0.15, 0.15],
            [0.6, 0.1, 0.1, 0.1, 0.1],
            [0.8, 0.05, 0.05, 0.05, 0.05],
            [0.0] * 5,
            [1.0, 0.0, 0.0, 0.0, 0.0],
        ],
        F32,
    )
    counts, _, _ = metrics.calibration_bins(probs, np.zeros(6, np.int32), num_bins=5)
    assert close(counts, [2, 1, 1, 1, 1])


def test_ece_all_correct():
    # All correct: ECE = Σ_b (Σ_i∈b (1 - conf_i)) / N = 1 - mean confidence.
    probs = np.array([[0.9, 0.1], [0.3, 0.7], [1.0, 0.0], [0.45, 0.55]], F32)
    labels = np.array([0, 1, 0, 1])
    assert close(metrics.ece(probs, labels), 1 - (0.9 + 0.7 + 1.0 + 0.55) / 4)
    one_hot = np.eye(3, dtype=F32)[[0, 2, 1, 1]]
    assert close(metrics.ece(one_hot, np.array([0, 2, 1, 1])), 0.0)


def test_ece_constant_predictions():
    # One bin holds everything: ECE = |accuracy - 0.7| = |0.6 - 0.7|.
    probs = np.tile(np.array([[0.7, 0.2, 0.1]], F32), (10, 1))
    labels = np.array([0] * 6 + [1] * 3 + [2])
    assert close(metrics.ece(probs, labels), 0.1)
    assert close(metrics.ece(probs, labels, num_bins=1), 0.1)


def test_single_class_present():
    # Labels are all class 2. Bins of width 0.1: conf .8 (right) in (.7, .8]; conf .6 (wrong)
    # and .6 (right) in (.5, .6]. ECE = (|1 - .8| + |1 - 1.2|) / 3.
    probs = np.array([[0.1, 0.1, 0.8], [0.6, 0.1, 0.3], [0.2, 0.2, 0.6]], F32)
    labels = np.array([2, 2, 2])
    assert close(metrics.ece(probs, labels, num_bins=10), 0.4 / 3)
    assert close(metrics.accuracy(probs, labels), 2 / 3)
    assert close(metrics.nll(probs, labels), -(np.log(0.8) + np.log(0.3) + np.log(0.6)) / 3)
    brier = ((0.01 + 0.01 + 0.04) + (0.36 + 0.01 + 0.49) + (0.04 + 0.04 + 0.16)) / 3
    assert close(metrics.brier(probs, labels), brier)


def test_ece_is_sum_not_mean_over_bins():
    # All wrong; two points at conf .9, one at .6, in two bins: (1.8 + .6) / 3 = .8. A mean
    # over the non-empty bins would give (.9 + .6) / 2 = .75, a mean over all 15 bins .1.
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.4, 0.6]], F32)
    labels = np.array([1, 1, 0])
    assert close(metrics.ece(probs, labels), 0.8)


# ------------------------------------------------------------------------------------- OOD


@pytest.mark.parametrize("ties", [False, True])
def test_auroc_aupr_match_sklearn(ties):
    s_in, s_out = random_scores(6, ties)
    y = np.r_[np.ones(len(s_in)), np.zeros(len(s_out))]
    s = np.r_[s_in, s_out].astype(np.float64)
    assert close(metrics.auroc(s_in, s_out), skm.roc_auc_score(y, s))
    assert close(metrics.aupr_in(s_in, s_out), skm.average_precision_score(y, s))
    assert close(metrics.aupr_out(s_in, s_out), skm.average_precision_score(1 - y, -s))


def test_auroc_ties_count_half():
    # Pairs (in, out): (1,2)=0 (1,0)=1 (2,2)=½ (2,0)=1 (2,2)=½ (2,0)=1 -> 4/6.
    assert close(metrics.auroc(np.array([1.0, 2.0, 2.0], F32), np.array([2.0, 0.0], F32)), 4 / 6)
    assert close(metrics.auroc(np.ones(3, F32), np.ones(4, F32)), 0.5)


@pytest.mark.parametrize("ties", [False, True])
def test_fpr_at_95_and_detection_error_match_roc_curve(ties):
    s_in, s_out = random_scores(7, ties)
    y = np.r_[np.ones(len(s_in)), np.zeros(len(s_out))]
    fpr, tpr, _ = skm.roc_curve(y, np.r_[s_in, s_out], drop_intermediate=False)
    # roc_curve's thresholds decrease, so the first point with TPR ≥ .95 is the largest one.
    assert close(metrics.fpr_at_95_tpr(s_in, s_out), fpr[np.argmax(tpr >= 0.95)])
    assert close(metrics.detection_error(s_in, s_out), np.min(0.5 * (1 - tpr) + 0.5 * fpr))


def test_fpr_at_95_where_band_or_interpolation_differ():
    # 10 in-distribution scores: TPR takes values k/10, none in a band like [.9495, .9505],
    # so a band test finds no threshold. TPR ≥ .95 needs all 10: threshold 1 (the smallest
    # in-score); OOD scores ≥ 1 are 1.2, 3, 11, 2 -> FPR 4/6. The interpolated 5th percentile
    # of the in-scores (1.45) would give 3/6 instead.
    s_in = np.arange(1, 11, dtype=F32)
    s_out = np.array([0.5, 1.2, 3.0, 11.0, 0.9, 2.0], F32)
    naive = np.mean(s_out >= np.percentile(s_in, 5))
    tprs = np.arange(11) / 10
    assert not np.any((tprs >= 0.9495) & (tprs <= 0.9505))
    assert naive == 0.5
    assert close(metrics.fpr_at_95_tpr(s_in, s_out), 4 / 6)


def test_fpr_at_95_exact_count_and_ties():
    # 20 in-scores: TPR ≥ .95 needs 19 of them (0.95 * 20 = 19 exactly): threshold 2.
    s_in = np.arange(1, 21, dtype=F32)
    assert close(metrics.fpr_at_95_tpr(s_in, np.array([1.5, 2.0, 2.5, 0.0], F32)), 0.5)
    # Ties at the threshold: all in-scores 2 (TPR 1 at t = 2); out-score 2 counts as positive.
    assert close(metrics.fpr_at_95_tpr(np.full(20, 2.0, F32), np.array([2.0, 1.9], F32)), 0.5)
    assert close(metrics.fpr_at_tpr(s_in, np.array([1.5, 10.5], F32), tpr=0.5), 0.0)
    assert close(metrics.fpr_at_tpr(s_in, np.array([1.5, 10.5], F32), tpr=1.0), 1.0)


def test_detection_error_by_hand():
    # t = 3: TPR 1, FPR 1/3 -> 1/6; t = 4: TPR 2/3, FPR 0 -> 1/6; t = 3.5: 1/3; min 1/6.
    s_in, s_out = np.array([3.0, 4.0, 5.0], F32), np.array([1.0, 2.0, 3.5], F32)
    assert close(metrics.detection_error(s_in, s_out), 1 / 6)
    assert close(metrics.detection_error(s_in + 10, s_out), 0.0)  # separable
    assert close(metrics.detection_error(s_out - 10, s_in), 0.5)  # reversed: say "all OOD"


def test_ood_metrics_accept_mixed_dtypes_and_entropy_scores():
    probs, _ = random_probs(8, n=40)
    s_in = -metrics.entropy(probs.astype(F32))
    s_out = np.zeros(10, np.int32)  # integer scores are cast explicitly
    assert 0.0 <= float(metrics.auroc(s_in, s_out)) <= 1.0


# ------------------------------------------------------------------------------ jit, dtypes


def test_everything_jits():
    probs, labels = random_probs(9, n=64)
    p, y = jnp.asarray(probs, jnp.float32), jnp.asarray(labels, jnp.int32)
    assert close(jax.jit(metrics.nll)(p, y), skm.log_loss(labels, probs, labels=range(7)))
    assert close(jax.jit(metrics.ece, static_argnames="num_bins")(p, y, num_bins=7),
                 ece_reference(probs, labels, 7))
    assert close(jax.jit(functools.partial(metrics.top_k_accuracy, k=3))(p, y),
                 skm.top_k_accuracy_score(labels, probs, k=3, labels=range(7)))
    s_in, s_out = random_scores(10, ties=True)
    y_ood = np.r_[np.ones(len(s_in)), np.zeros(len(s_out))]
    fpr, tpr, _ = skm.roc_curve(y_ood, np.r_[s_in, s_out], drop_intermediate=False)
    assert close(jax.jit(metrics.auroc)(s_in, s_out), skm.roc_auc_score(y_ood, np.r_[s_in, s_out]))
    assert close(jax.jit(metrics.fpr_at_95_tpr)(s_in, s_out), fpr[np.argmax(tpr >= 0.95)])


def test_bfloat16_probs():
    probs = jnp.asarray([[0.75, 0.25], [0.25, 0.75]], jnp.bfloat16)
    labels = jnp.asarray([0, 0], jnp.int32)
    assert metrics.nll(probs, labels).dtype == jnp.float32
    # One bin (conf .75 twice), one right: |1 - 1.5| / 2.
    assert close(metrics.ece(probs, labels), 0.25)


# ----------------------------------------------------------------------------- bad inputs


P = np.full((4, 3), 1 / 3, F32)
Y = np.array([0, 1, 2, 0])


@pytest.mark.parametrize(
    ("fn", "args", "match"),
    [
        (metrics.accuracy, (P[0], Y), "2-D"),
        (metrics.accuracy, (P, Y[:3]), "`labels`"),
        (metrics.nll, (P, Y[:, None]), "`labels`"),
        (metrics.brier, (P, Y.astype(F32)), "integer"),
        (metrics.nll, (P.astype(np.int32), Y), "floating"),
        (metrics.accuracy, (np.zeros((0, 3), F32), np.zeros(0, np.int32)), "non-empty"),
        (metrics.ece, (np.zeros((2, 0), F32), np.zeros(2, np.int32)), "non-empty"),
        (metrics.top_k_accuracy, (P, Y, 0), "`k`"),
        (metrics.top_k_accuracy, (P, Y, 4), "`k`"),
        (metrics.top_k_accuracy, (P, Y, 1.0), "`k`"),
        (metrics.ece, (P, Y, 0), "`num_bins`"),
        (metrics.calibration_bins, (P, Y, 2.5), "`num_bins`"),
        (metrics.entropy, (P[0],), "2-D"),
        (metrics.max_prob, (np.zeros((0, 2), F32),), "non-empty"),
        (metrics.auroc, (np.zeros((2, 2), F32), np.zeros(3, F32)), "`scores_in`"),
        (metrics.aupr_in, (np.zeros(2, F32), np.zeros(0, F32)), "`scores_out`"),
        (metrics.aupr_out, (np.zeros(0, F32), np.zeros(2, F32)), "`scores_in`"),
        (metrics.fpr_at_95_tpr, (np.zeros(2, F32), np.zeros((1, 1), F32)), "`scores_out`"),
        (metrics.detection_error, (np.zeros(2, bool), np.zeros(2, F32)), "real"),
        (metrics.fpr_at_tpr, (np.zeros(2, F32), np.zeros(2, F32), 0.0), "`tpr`"),
        (metrics.fpr_at_tpr, (np.zeros(2, F32), np.zeros(2, F32), 1.5), "`tpr`"),
    ],
)
def test_bad_input_raises(fn, args, match):
    with pytest.raises(ValueError, match=match):
        fn(*args)
