"""Model bundles: round trip, refusal of pickled code, and one preprocessing for predict and the cache."""

import pickle

import nibabel as nib
import numpy as np
import pytest
import torch

from ctplatform.data.preprocess import PreprocessSettings, preprocess_volume
from ctplatform.data.volume_io import read_volume
from ctplatform.model.bundle import BundleError, ModelSpec, export_bundle, load_bundle
from ctplatform.model.calibration import Calibration
from ctplatform.model.classifier import build_classifier
from ctplatform.model.inference import Predictor


def make_bundle(path, calibration=None):
    torch.manual_seed(0)
    model = build_classifier("efficientnet_b0", use_attention="se")
    spec = ModelSpec(architecture={"head": "slice", **model.architecture()}, input_windows="three",
                     preprocess=PreprocessSettings(image_size=32, num_slices=6).to_dict(), aggregation="topk",
                     topk=2, calibration=calibration)
    export_bundle(path, model.eval(), spec)
    return model.eval()


def test_bundle_round_trip_gives_identical_outputs(tmp_path):
    calibration = Calibration(np.full(18, 1.5), np.linspace(-1, 1, 18), "test")
    original = make_bundle(tmp_path / "b", calibration)
    loaded, spec = load_bundle(tmp_path / "b")
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), original(x))
    assert spec.aggregation == "topk" and spec.topk == 2
    np.testing.assert_allclose(spec.calibration.intercept, calibration.intercept)
    metadata = (tmp_path / "b" / "metadata.json").read_text()
    assert "Interlobular septal thickening" in metadata and "window_table" in metadata


def test_tampered_pickle_checkpoint_is_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "evil.ckpt"
    with open(path, "wb") as handle:
        pickle.dump({"state_dict": {}, "hyper_parameters": {"config": Exploit()}}, handle)
    with pytest.raises(BundleError, match="refused"):
        load_bundle(path)
    assert not marker.exists()


def test_tampered_weights_file_is_refused(tmp_path):
    make_bundle(tmp_path / "b")
    (tmp_path / "b" / "model.safetensors").write_bytes(b"\x80\x04not safetensors")
    with pytest.raises(BundleError, match="unreadable weights"):
        load_bundle(tmp_path / "b")


def test_predict_volume_applies_the_cache_preprocessing(tmp_path):
    make_bundle(tmp_path / "b")
    predictor = Predictor.from_path(tmp_path / "b", device="cpu")
    hu = np.full((20, 40, 40), -1000, np.float32)
    hu[2:18, 5:35, 5:35] = 40
    hu[2:18, 10:30, 8:18] = -850
    path = tmp_path / "v.nii.gz"
    nib.save(nib.Nifti1Image(hu.transpose(2, 1, 0).copy(), np.eye(4)), path)
    volume = read_volume(path)
    prediction = predictor.predict_volume(volume.hu)
    slices, positions = preprocess_volume(volume.hu, predictor.settings)
    direct = predictor.predict_prepared(slices, positions)
    np.testing.assert_allclose(prediction.probabilities, direct.probabilities, atol=1e-6)
    assert prediction.slice_probabilities.shape == (6, 18)
    assert set(prediction.key_slices()) == set(prediction.to_dict()["probabilities"])
