"""DeLong's AUROC covariance: the fast midrank algorithm against the textbook O(m·n) formula on small cases, and the
(cluster-robust) variance of a paired difference against bootstrap estimates on large ones."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from ctplatform.evaluation.bootstrap import patient_resample_weights, weighted_auroc
from ctplatform.evaluation.delong import (
    auroc_influence,
    clustered_covariance,
    delong_covariance,
    delong_paired_test,
    macro_auroc_influence,
)

pytestmark = pytest.mark.timeout(120)


def plain_delong(labels, models):
    """DeLong et al. (1988) written out: psi over every (positive, negative) pair, components, covariances."""
    pos = [i for i, label in enumerate(labels) if label == 1]
    neg = [j for j, label in enumerate(labels) if label == 0]
    m, n = len(pos), len(neg)

    def psi(x, y):
        return 1.0 if x > y else (0.5 if x == y else 0.0)

    v10 = [[sum(psi(s[i], s[j]) for j in neg) / n for i in pos] for s in models]
    v01 = [[sum(psi(s[i], s[j]) for i in pos) / m for j in neg] for s in models]
    aucs = [sum(row) / m for row in v10]
    k = len(models)
    cov = [[0.0] * k for _ in range(k)]
    for a, b in itertools.product(range(k), repeat=2):
        s10 = sum((v10[a][i] - aucs[a]) * (v10[b][i] - aucs[b]) for i in range(m)) / (m - 1)
        s01 = sum((v01[a][j] - aucs[a]) * (v01[b][j] - aucs[b]) for j in range(n)) / (n - 1)
        cov[a][b] = s10 / m + s01 / n
    return aucs, cov


@pytest.mark.parametrize("seed,size,decimals", [(0, 12, 1), (1, 30, 2), (2, 45, 6), (3, 9, 0)])
def test_fast_delong_equals_the_textbook_formula(seed, size, decimals):
    rng = np.random.default_rng(seed)
    labels = np.r_[1, 0, (rng.random(size - 2) < 0.4).astype(int)]
    models = [np.round(rng.random(size) + 0.5 * labels * k, decimals) for k in (1, 2, 0)]  # ties when rounded
    aucs, cov = delong_covariance(labels, np.array(models))
    expected_aucs, expected_cov = plain_delong(labels.tolist(), [m.tolist() for m in models])
    np.testing.assert_allclose(aucs, expected_aucs, rtol=0, atol=1e-12)
    np.testing.assert_allclose(aucs, [roc_auc_score(labels, m) for m in models], rtol=0, atol=1e-12)
    np.testing.assert_allclose(cov, expected_cov, rtol=1e-10, atol=1e-14)


def _two_correlated_models(rng, patients, per_patient, volume_noise):
    """Two models whose errors are mostly per patient (correlated between the models), plus `volume_noise` of their
    own per volume: with two reconstructions per patient and little volume noise, they are near duplicates."""
    y = (rng.random(patients) < 0.3).astype(int)
    shared = rng.normal(size=patients)

    def model(strength):
        patient_part = strength * y + np.sqrt(0.5) * shared + np.sqrt(0.5) * rng.normal(size=patients)
        return np.repeat(patient_part, per_patient) + volume_noise * rng.normal(size=patients * per_patient)

    return np.repeat(y, per_patient), model(1.0), model(0.8), np.repeat(np.arange(patients), per_patient)


def _bootstrap_variance_of_difference(labels, a, b, clusters, resamples=600):
    weights = patient_resample_weights(clusters, resamples, seed=1)
    aucs = weighted_auroc(np.stack([labels, labels], 1), np.stack([a, b], 1), weights)
    return float(np.var(aucs[:, 0] - aucs[:, 1], ddof=1))


def test_delong_variance_of_a_paired_difference_agrees_with_the_bootstrap():
    rng = np.random.default_rng(10)
    labels, a, b, clusters = _two_correlated_models(rng, 2000, 1, volume_noise=1.0)
    test = delong_paired_test(labels, a, b)
    bootstrap = _bootstrap_variance_of_difference(labels, a, b, clusters)
    assert test["se"] ** 2 == pytest.approx(bootstrap, rel=0.15)
    clustered = delong_paired_test(labels, a, b, clusters=clusters)  # one case per patient: the same variance
    assert clustered["se"] == pytest.approx(test["se"], rel=0.01)


def test_clustered_delong_accounts_for_correlated_reconstructions():
    """Two reconstructions per patient that look alike: plain DeLong treats them as independent and understates the
    variance; the cluster-robust version agrees with the patient-level bootstrap."""
    rng = np.random.default_rng(11)
    labels, a, b, clusters = _two_correlated_models(rng, 1000, 2, volume_noise=0.2)
    bootstrap = _bootstrap_variance_of_difference(labels, a, b, clusters)
    clustered = delong_paired_test(labels, a, b, clusters=clusters)
    naive = delong_paired_test(labels, a, b)
    assert clustered["se"] ** 2 == pytest.approx(bootstrap, rel=0.2)
    assert naive["se"] ** 2 < 0.8 * bootstrap
    assert clustered["difference"] == pytest.approx(roc_auc_score(labels, a) - roc_auc_score(labels, b))


def test_macro_influence_is_the_mean_over_classes_with_both_labels():
    rng = np.random.default_rng(12)
    y = (rng.random((300, 3)) < 0.3).astype(int)
    y[:, 1] = 0
    scores = rng.random((300, 3)) + 0.4 * y
    macro, influence, used = macro_auroc_influence(y, scores)
    assert used == [0, 2]
    assert macro == pytest.approx(np.mean([roc_auc_score(y[:, c], scores[:, c]) for c in (0, 2)]))
    expected = np.mean([auroc_influence(y[:, c], scores[:, c][None])[1][0] for c in (0, 2)], axis=0)
    np.testing.assert_allclose(influence, expected)
    assert clustered_covariance(influence, np.arange(300)).shape == (1, 1)


def test_bad_input_and_identical_models():
    with pytest.raises(ValueError, match="one label value"):
        delong_paired_test([0, 0, 0], [0.1, 0.2, 0.3], [0.3, 0.2, 0.1])
    with pytest.raises(ValueError, match="only 0 and 1"):
        delong_covariance([0, 2, 1], [[0.1, 0.2, 0.3]])
    same = delong_paired_test([0, 1, 0, 1], [0.1, 0.7, 0.3, 0.6], [0.1, 0.7, 0.3, 0.6])
    assert same["difference"] == 0 and same["p"] == 1.0
