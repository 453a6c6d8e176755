"""Model bundles: round trip, refusal of pickled code, and one preprocessing for predict and the cache."""

import pickle

import numpy as np
import pytest
import torch

from ctplatform.data.errors import DataFormatError
from ctplatform.data.preprocess import PreprocessSettings
from ctplatform.evaluation.predictor import Predictor
from ctplatform.labels import CLASS_NAMES
from ctplatform.model.bundle import BundleError, ModelSpec, export_bundle, load_bundle
from ctplatform.model.calibration import Calibration
from ctplatform.model.classifier import build_classifier


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


def test_predict_reads_ct_rate_files_as_prepare_cached_them(tiny_dataset, tiny_cache, tmp_path):
    """`predict --predict-type volumes` on CT-RATE files, both styles (original: raw values, blank header, rescale
    only in the metadata CSV; `_fixed`: int16 with the rescale in the header), gives what the same model gives on
    the slices `prepare` cached from them (read with the metadata CSV), with and without that CSV."""
    from ctplatform.data.datasets import load_cache_index
    from ctplatform.evaluation.predict_files import predict_files

    index = load_cache_index(tiny_cache)
    torch.manual_seed(0)
    model = build_classifier("resnet50").eval()
    spec = ModelSpec(architecture={"head": "slice", **model.architecture()}, input_windows="three",
                     preprocess=index.settings.to_dict(), aggregation="mean")
    export_bundle(tmp_path / "b", model, spec)
    predictor = Predictor.from_path(tmp_path / "b", device="cpu")
    records = index.volumes[index.volumes["split"] == "train"]
    paths = {p.name: p for p in (tiny_dataset / "dataset").rglob("train*/*/*/*.nii.gz")}  # <tree>/<p>/<scan>/
    original = next(n for n in records["VolumeName"] if paths[n].parts[-4] == "train")
    fixed = next(n for n in records["VolumeName"] if paths[n].parts[-4] == "train_fixed")
    inputs = [str(paths[original]), str(paths[fixed])]
    expected = []
    for name in (original, fixed):
        record = records[records["VolumeName"] == name].iloc[0]
        slices = np.load(tiny_cache / record["file"])
        expected.append(predictor.predict_prepared(slices, np.asarray(record["slice_positions"])).probabilities)
        # the comparison can fail: the same slices read 1024 HU too bright (raw values taken as HU) score otherwise
        shifted = predictor.predict_prepared(slices + 1024, np.asarray(record["slice_positions"])).probabilities
        assert np.abs(shifted - expected[-1]).max() > 1e-2
    metadata_csv = tiny_dataset / "dataset" / "metadata" / "train_metadata.csv"
    for csv in (str(metadata_csv), None):
        table = predict_files(str(tmp_path / "b"), inputs, "volumes", device="cpu", metadata_csv=csv)
        np.testing.assert_allclose(table[list(CLASS_NAMES)].to_numpy(), np.stack(expected), atol=2e-3)
    lacking = tmp_path / "other_metadata.csv"
    lacking.write_text("\n".join(metadata_csv.read_text().splitlines()[:1]) + "\n")
    with pytest.raises(DataFormatError, match=f"no row for {original}"):
        predict_files(str(tmp_path / "b"), inputs, "volumes", device="cpu", metadata_csv=str(lacking))


def test_volume_from_slice_logits_is_predict_prepared(tmp_path):
    """The service computes slice logits batched across requests and hands them to the predictor: the same
    prediction as the predictor's own path."""
    make_bundle(tmp_path / "b", Calibration(np.full(18, 1.5), np.linspace(-1, 1, 18), "test"))
    predictor = Predictor.from_path(tmp_path / "b", device="cpu")
    slices = np.random.default_rng(0).integers(-1000, 400, (5, 32, 32)).astype(np.int16)
    positions = np.array([3, 9, 14, 20, 27])
    direct = predictor.predict_prepared(slices, positions)
    via_logits = predictor.volume_from_slice_logits(predictor.slice_logits(slices), positions)
    for field in ("probabilities", "raw_probabilities", "slice_probabilities", "slice_positions"):
        np.testing.assert_array_equal(getattr(via_logits, field), getattr(direct, field))
    raw, calibrated = predictor.slices_from_logits(predictor.slice_logits(slices))
    np.testing.assert_array_equal(raw, direct.slice_probabilities)
    np.testing.assert_array_equal(calibrated, predictor.calibrate(raw))
