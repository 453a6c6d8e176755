"""The synthetic data set's presets: the easy one (what the demo learns from) against the realistic default."""

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from ctplatform.config.prepare import PRESETS as CLI_PRESETS
from ctplatform.data.synthetic import generate_dataset
from ctplatform.data.synthetic.presets import EASY_HU, PRESETS, get_preset
from ctplatform.labels import CLASS_NAMES


@pytest.fixture(scope="module")
def easy(tmp_path_factory):
    out = tmp_path_factory.mktemp("easy")
    return generate_dataset(out, num_volumes=36, size=(32, 32, 16), seed=2, preset="easy")


def test_presets_are_the_cli_choices_and_unknown_ones_are_refused(tmp_path):
    assert set(CLI_PRESETS) == set(PRESETS)
    assert set(EASY_HU) == set(CLASS_NAMES)
    with pytest.raises(ValueError, match=r"unknown synthetic preset 'hard'.*realistic, easy"):
        generate_dataset(tmp_path, num_volumes=6, size=(16, 16, 8), preset="hard")
    assert get_preset("realistic").extrude is False


def test_easy_findings_run_through_every_slice_at_their_own_density(easy):
    present = 0
    for name, extents in easy.finding_slices.items():
        for finding, (first, last) in extents.items():
            assert (first, last) == (0, 15), (name, finding)  # volume labels are slice labels
            present += 1
    assert present > 0
    # a volume with a finding holds voxels near its density in every slice (kernel blur and noise aside)
    name, extents = next((n, e) for n, e in easy.finding_slices.items() if "Pleural effusion" in e)
    hu = np.asarray(nib.load(easy.volume_paths[name]).dataobj, dtype=np.float32)
    if not easy.volume_paths[name].parent.parent.parent.name.endswith("_fixed"):
        hu = hu - 1024  # original volumes hold raw values; the metadata's intercept is -1024 (test_synthetic)
    near = np.abs(hu - EASY_HU["Pleural effusion"]) < 120
    assert near.sum(axis=(0, 1)).min() >= 3


def test_easy_labels_have_a_quarter_positive_per_class(easy):
    frame = pd.concat([pd.read_csv(p) for p in easy.labels_csv.values()])
    rates = frame[list(CLASS_NAMES)].mean()
    assert ((rates > 0.1) & (rates < 0.45)).all(), rates.to_dict()
