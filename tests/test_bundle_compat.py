"""Bundles written before the code was split by concern still load and predict what they predicted then.

tests/data/bundles_v1 holds, for a slice-head bundle (SE attention, per-class calibration) and an attention-MIL
bundle: the metadata.json the earlier version wrote, the names and shapes of its weights, and the probabilities
the earlier version's predictor gave on fixed slices with deterministic weights (tests/compat_bundles.py).
"""

import json

import numpy as np
import pytest
from compat_bundles import FIXTURES, build_bundle, probe_slices

from ctplatform.evaluation.predictor import Predictor

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize("name", ["slice", "mil"])
def test_a_bundle_from_the_earlier_version_predicts_as_it_did(name, tmp_path):
    bundle = build_bundle(name, tmp_path)
    expected = json.loads((FIXTURES / name / "expected_prediction.json").read_text())
    predictor = Predictor.from_path(bundle, device="cpu")
    slices, positions = probe_slices()
    prediction = predictor.predict_prepared(slices, positions)
    np.testing.assert_allclose(prediction.raw_probabilities, expected["raw_probabilities"], atol=1e-5)
    np.testing.assert_allclose(prediction.probabilities, expected["probabilities"], atol=1e-5)
    np.testing.assert_allclose(prediction.slice_probabilities, expected["slice_probabilities"], atol=1e-5)
    if "slice_weights" in expected:
        np.testing.assert_allclose(prediction.slice_weights, expected["slice_weights"], atol=1e-5)
    # the weights' names are the model's: nothing missing, nothing left over
    stored = set(json.loads((FIXTURES / name / "tensors.json").read_text()))
    assert stored == set(predictor.model.state_dict())
