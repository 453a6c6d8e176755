"""DeLong's variance of AUROC and the paired test of two AUROCs on the same cases.

DeLong, DeLong & Clarke-Pearson (1988), "Comparing the areas under two or more correlated receiver operating
characteristic curves: a nonparametric approach", Biometrics 44(3). Computed with the fast midrank algorithm of
Sun & Xu (2014), "Fast implementation of DeLong's algorithm for comparing the areas under correlated receiver
operating characteristic curves", IEEE Signal Processing Letters 21(11): O(N log N) per score vector instead of
DeLong's O(m·n) pairs.

For m positives X and n negatives Y, ψ(x, y) = 1 if x > y, ½ if equal, else 0; the structural components are
V10(Xᵢ) = mean_j ψ(Xᵢ, Yⱼ) and V01(Yⱼ) = mean_i ψ(Xᵢ, Yⱼ), AUROC = mean V10 = mean V01, and the covariance of K
AUROCs is S10/m + S01/n (S10, S01 the sample covariances of the components).

Clustered cases (CT-RATE's volumes of one patient share labels and look alike) are not independent. The same
components give each case its influence on the AUROC, ψₖ = (V10ₖ − A)/m for a positive, (V01ₖ − A)/n for a
negative; summing the influences within each patient and taking P/(P−1)·Σ_p (Σ_{k∈p} ψₖ)² is the cluster-robust
(sandwich) version of DeLong's variance (as Obuchowski 1997 for clustered ROC data). With one case per patient it
is DeLong's variance up to the factors (m−1)/m and N/(N−1). The macro AUROC, a mean over classes, has as influence
the mean of the classes' influences, so the same sum gives its variance and the covariance of two models' macros.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.stats import norm, rankdata


def _labels(y_true: Any) -> np.ndarray:
    y_true = np.asarray(y_true)
    if y_true.ndim != 1:
        raise ValueError(f"labels must be 1-D (one per case), got shape {y_true.shape}")
    if not np.isin(y_true, (0, 1)).all():
        raise ValueError("labels must contain only 0 and 1")
    positives = int(y_true.sum())
    if positives == 0 or positives == y_true.size:
        raise ValueError("AUROC needs both label values (this class has one label value: no DeLong variance)")
    return y_true.astype(bool)


def structural_components(y_true: Any, scores: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(AUROCs (K,), V10 (K, m), V01 (K, n)) of K score vectors (K, N) on the same labels (N,), by midranks."""
    positive = _labels(y_true)
    scores = np.atleast_2d(np.asarray(scores, dtype=np.float64))
    if scores.shape[1] != positive.size:
        raise ValueError(f"scores have {scores.shape[1]} cases but labels {positive.size}")
    x, y = scores[:, positive], scores[:, ~positive]
    m, n = x.shape[1], y.shape[1]
    tx, ty = rankdata(x, axis=1), rankdata(y, axis=1)  # midranks within positives, within negatives
    tz = rankdata(np.concatenate([x, y], axis=1), axis=1)  # and among all cases
    aucs = (tz[:, :m].sum(axis=1) / m - (m + 1) / 2.0) / n
    v10 = (tz[:, :m] - tx) / n
    v01 = 1.0 - (tz[:, m:] - ty) / m
    return aucs, v10, v01


def delong_covariance(y_true: Any, scores: Any) -> tuple[np.ndarray, np.ndarray]:
    """(AUROCs (K,), DeLong covariance (K, K)) of K score vectors on the same independent cases."""
    aucs, v10, v01 = structural_components(y_true, scores)
    m, n = v10.shape[1], v01.shape[1]
    s10 = np.atleast_2d(np.cov(v10)) if m > 1 else np.zeros((len(aucs), len(aucs)))
    s01 = np.atleast_2d(np.cov(v01)) if n > 1 else np.zeros((len(aucs), len(aucs)))
    return aucs, s10 / m + s01 / n


def auroc_influence(y_true: Any, scores: Any) -> tuple[np.ndarray, np.ndarray]:
    """(AUROCs (K,), influence (K, N)): each case's first-order contribution to each AUROC's error."""
    positive = _labels(y_true)
    aucs, v10, v01 = structural_components(positive, scores)
    influence = np.empty((len(aucs), positive.size))
    influence[:, positive] = (v10 - aucs[:, None]) / v10.shape[1]
    influence[:, ~positive] = (v01 - aucs[:, None]) / v01.shape[1]
    return aucs, influence


def clustered_covariance(influence: np.ndarray, clusters: Sequence[Any]) -> np.ndarray:
    """(K, K) cluster-robust covariance from per-case influences (K, N): influences summed per cluster."""
    influence = np.atleast_2d(influence)
    _, codes = np.unique(np.asarray(clusters), return_inverse=True)
    num_clusters = int(codes.max()) + 1
    if num_clusters < 2:
        raise ValueError("a clustered variance needs at least two patients")
    sums = np.zeros((influence.shape[0], num_clusters))
    for row in range(influence.shape[0]):
        sums[row] = np.bincount(codes, weights=influence[row], minlength=num_clusters)
    return num_clusters / (num_clusters - 1) * (sums @ sums.T)


def paired_test(difference: float, variance: float) -> dict[str, float | None]:
    """Two-sided z test of a difference with its variance: ``{"difference", "se", "z", "p"}``."""
    se = float(np.sqrt(max(variance, 0.0)))
    if se == 0.0:
        # identical rankings (or no spread at all): no evidence of a difference unless it is non-zero
        return {"difference": float(difference), "se": 0.0, "z": None, "p": 1.0 if difference == 0 else 0.0}
    z = float(difference / se)
    return {"difference": float(difference), "se": se, "z": z, "p": float(2.0 * norm.sf(abs(z)))}


def delong_paired_test(y_true: Any, scores_a: Any, scores_b: Any,
                       clusters: Sequence[Any] | None = None) -> dict[str, float | None]:
    """AUROC A − AUROC B on the same cases, DeLong's test (cluster-robust when ``clusters`` is given).

    Returns ``{"auroc_a", "auroc_b", "difference", "se", "z", "p"}``.
    """
    scores = np.vstack([np.asarray(scores_a, dtype=np.float64), np.asarray(scores_b, dtype=np.float64)])
    if clusters is None:
        aucs, cov = delong_covariance(y_true, scores)
    else:
        aucs, influence = auroc_influence(y_true, scores)
        cov = clustered_covariance(influence, clusters)
    variance = cov[0, 0] + cov[1, 1] - 2.0 * cov[0, 1]
    return {"auroc_a": float(aucs[0]), "auroc_b": float(aucs[1]),
            **paired_test(float(aucs[0] - aucs[1]), float(variance))}


def macro_auroc_influence(y_true: np.ndarray, scores: np.ndarray) -> tuple[float | None, np.ndarray, list[int]]:
    """(macro AUROC, its per-case influence (N,), the classes in it) of (N, C) scores: the mean over the classes
    with both label values (the official rule), and the mean of their influences."""
    y_true, scores = np.asarray(y_true), np.asarray(scores, dtype=np.float64)
    used = [c for c in range(y_true.shape[1]) if 0 < y_true[:, c].sum() < y_true.shape[0]]
    if not used:
        return None, np.zeros(y_true.shape[0]), used
    aucs, influences = [], []
    for column in used:
        auc, influence = auroc_influence(y_true[:, column], scores[:, column][None])
        aucs.append(auc[0])
        influences.append(influence[0])
    return float(np.mean(aucs)), np.mean(influences, axis=0), used
