"""Slice -> volume aggregation (mean, max, top-k mean) against a per-volume, per-class reference in plain Python."""

import numpy as np
import pytest

from ctplatform.evaluation.aggregate import aggregate_by_volume, aggregate_slices, probabilities


def reference(values: list[float], method: str, k: int) -> float:
    if method == "mean":
        return sum(values) / len(values)
    if method == "max":
        return max(values)
    top = sorted(values, reverse=True)[: min(k, len(values))]
    return sum(top) / len(top)


@pytest.mark.parametrize("method", ["mean", "max", "topk"])
def test_volumes_of_any_slice_count_in_any_order(method):
    rng = np.random.default_rng(0)
    counts = {7: 5, 3: 1, 11: 2, 2: 9}  # volume id -> slices (fewer slices than k included)
    ids = np.array([v for v, n in counts.items() for _ in range(n)])
    order = rng.permutation(len(ids))  # slices of a volume need not be contiguous
    ids = ids[order]
    probs = rng.random((len(ids), 4))
    got_ids, got = aggregate_by_volume(probs, ids, method, k=3)
    assert got_ids.tolist() == sorted(counts)
    for row, volume in enumerate(got_ids):
        for j in range(4):
            expected = reference(probs[ids == volume, j].tolist(), method, 3)
            assert got[row, j] == pytest.approx(expected, abs=1e-12)


def test_topk_lies_between_mean_and_max_and_k_one_is_max():
    probs = np.array([[0.1, 0.9], [0.8, 0.2], [0.4, 0.3], [0.7, 0.1]])
    assert aggregate_slices(probs, "topk", k=2).tolist() == pytest.approx([0.75, 0.6])
    assert aggregate_slices(probs, "topk", k=1).tolist() == aggregate_slices(probs, "max").tolist()
    assert aggregate_slices(probs, "topk", k=4).tolist() == pytest.approx(aggregate_slices(probs, "mean").tolist())


def test_invalid_input_is_refused():
    with pytest.raises(ValueError, match="mean, max, topk"):
        aggregate_slices(np.ones((2, 3)), "median")
    with pytest.raises(ValueError, match="at least one slice"):
        aggregate_slices(np.ones((0, 3)))


def test_probabilities_are_the_logistic_function_in_float64_for_any_logit():
    logits = np.array([[-1000.0, -30.0, -1.5, 0.0, 2.0, 40.0, 1000.0]], dtype=np.float32)
    with np.errstate(over="raise", invalid="raise"):  # no overflow anywhere (underflow to 0 is exact enough)
        got = probabilities(logits)
    assert got.dtype == np.float64
    expected = [1.0 / (1.0 + np.exp(np.float64(-x))) if x > -700 else 0.0 for x in logits[0]]
    np.testing.assert_allclose(got[0], expected, rtol=1e-14, atol=0)
    assert (np.diff(got[0, 1:-2]) > 0).all()  # strictly increasing where float64 resolves it
