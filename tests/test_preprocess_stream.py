"""The service's plane-by-plane preparation against the whole-volume path (`read_raw_volume` +
`preprocess_raw_volume`, what `prepare` uses): the same slices, positions, spacing, notes and errors for every
format and orientation, in memory bounded by the model's input rather than by the volume."""

import gzip
import tracemalloc

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from ctplatform.data import ReadLimits, read_raw_volume
from ctplatform.data.errors import DataFormatError
from ctplatform.data.preprocess import PreprocessSettings, preprocess_raw_volume
from ctplatform.data.preprocess_stream import HeldVolume, ScannedVolume, open_for_preprocessing

SETTINGS = PreprocessSettings(image_size=24, num_slices=6)
MiB = 1 << 20


def chest(shape=(30, 40, 36), seed=0, air=-1000.0):
    """(z, y, x) HU: air, an off-centre elliptic body with two lungs and noise (asymmetric, so a flip shows)."""
    rng = np.random.default_rng(seed)
    z, y, x = np.indices(shape)
    hu = np.full(shape, air, np.float32)
    body = ((y - shape[1] * 0.55) / (shape[1] * 0.4)) ** 2 + ((x - shape[2] * 0.45) / (shape[2] * 0.4)) ** 2 < 1
    body &= (z > 4) & (z < shape[0] - 3)
    hu[body] = 40
    hu[body & (np.abs(x - shape[2] * 0.45) > 3) & (np.abs(y - shape[1] * 0.55) < shape[1] * 0.2)] = -850
    return hu + rng.normal(0, 20, shape).astype(np.float32)


def nifti(hu_zyx, affine, dtype=np.int16, slope=None, inter=None, compress=True):
    image = nib.Nifti1Image(np.ascontiguousarray(hu_zyx.transpose(2, 1, 0)).astype(dtype), affine)
    if slope is not None:
        image.header.set_slope_inter(slope, inter)
    data = image.to_bytes()
    return (gzip.compress(data, 1) if compress else data), "v.nii.gz" if compress else "v.nii"


def mha(hu_zyx, tmp_path, compress, direction=(1, 0, 0, 0, 1, 0, 0, 0, 1)):
    image = sitk.GetImageFromArray(hu_zyx.astype(np.int16))
    image.SetSpacing((0.8, 0.7, 2.5))
    image.SetDirection(direction)
    path = tmp_path / "v.mha"
    sitk.WriteImage(image, str(path), useCompression=compress)
    return path.read_bytes(), "v.mha"


def whole(data, name, settings=SETTINGS):
    raw = read_raw_volume(data, name=name)
    return raw, preprocess_raw_volume(raw, settings)


LPS = np.diag([-0.7, -0.8, 2.0, 1.0])
CASES = {
    "nii.gz, LPS (rows and cols flipped)": lambda tmp: nifti(chest(), LPS),
    "nii.gz, RAS": lambda tmp: nifti(chest(), np.diag([0.7, 0.8, 2.0, 1.0])),
    "nii.gz, z flipped": lambda tmp: nifti(chest(), np.diag([0.7, 0.8, -2.0, 1.0])),
    "nii, float32 HU": lambda tmp: nifti(chest(), LPS, np.float32, compress=False),
    "nii.gz, raw values (rescale assumed)": lambda tmp: nifti(chest() + 1024, LPS, np.uint16),
    "nii.gz, scl_slope": lambda tmp: nifti((chest() + 1024) * 2, LPS, np.int16, slope=0.5, inter=-1024.0),
    "nii.gz, head CT (no lungs)": lambda tmp: nifti(np.where(chest() < -500, 60.0, chest()), LPS),
    "nii.gz, one slice": lambda tmp: nifti(chest((1, 40, 36)), LPS),
    "mha, compressed": lambda tmp: mha(chest(), tmp, True),
    "mha, uncompressed, flipped direction": lambda tmp: mha(chest(), tmp, False, (-1, 0, 0, 0, -1, 0, 0, 0, 1)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_scanned_volume_prepares_what_the_whole_volume_path_prepares(case, tmp_path):
    data, name = CASES[case](tmp_path)
    raw, (slices, positions) = whole(data, name)
    volume = open_for_preprocessing(data, name=name)
    assert isinstance(volume, ScannedVolume)
    assert_prepares_as_whole(volume, raw)


def assert_prepares_as_whole(volume, raw):
    """A streamed volume has the whole-volume path's geometry, HU source and notes, and prepares its slices."""
    assert volume.shape == raw.shape and volume.spacing == pytest.approx(raw.spacing)
    assert (volume.hu_source, volume.notes) == (raw.hu_source, raw.notes)
    for settings in (SETTINGS, PreprocessSettings(image_size=16, selection="stride", stride=3)):
        got_slices, got_positions = volume.prepare(settings)
        want_slices, want_positions = preprocess_raw_volume(raw, settings)
        np.testing.assert_array_equal(got_positions, want_positions)
        np.testing.assert_array_equal(got_slices, want_slices)
        assert got_slices.dtype == np.int16


def test_non_axial_volumes_are_held_whole_and_prepare_the_same():
    """(A zipped DICOM series is scanned too: tests/test_preprocess_stream_dicom.py.)"""
    sagittal = np.array([[0, 0, 2.0, 0], [0.8, 0, 0, 0], [0, 0.7, 0, 0], [0, 0, 0, 1]])  # slices along x
    data, name = nifti(chest(), sagittal)
    raw, (slices, _) = whole(data, name)
    volume = open_for_preprocessing(data, name=name)
    assert isinstance(volume, HeldVolume) and any("non-axial" in note for note in volume.notes)
    np.testing.assert_array_equal(volume.prepare(SETTINGS)[0], slices)


@pytest.mark.parametrize("make", [
    lambda: nifti(np.where(chest() > 0, np.nan, chest()), LPS, np.float32),
    lambda: nifti(np.full((20, 30, 30), 40.0), LPS),
    lambda: nifti(chest(), LPS)[0][:4000],
    lambda: (nifti(chest((40, 64, 64)), LPS)[0][:-3000], "v.nii.gz"),
], ids=["nan", "constant", "header-only", "truncated"])
def test_bad_volumes_get_the_whole_volume_path_s_error(make):
    data, name = (make(), "v.nii.gz") if isinstance(make(), bytes) else make()
    with pytest.raises(DataFormatError) as expected:
        read_raw_volume(data, name=name)
    with pytest.raises(type(expected.value)) as got:
        open_for_preprocessing(data, name=name)
    assert str(got.value) == str(expected.value)


def test_memory_stays_bounded_by_the_model_input_not_the_volume():
    """A 512 x 512 x 384 int16 volume (192 MiB of voxels, 2 MiB as .nii.gz): the whole-volume path holds all of
    it, the scanned one a few planes and its samples."""
    shape = (384, 512, 512)
    y, x = np.ogrid[: shape[1], : shape[2]]
    body = ((y - 256) / 230.0) ** 2 + ((x - 256) / 200.0) ** 2 < 1
    plane = np.where(body, 40, -1000).astype(np.int16)
    plane[200:300, 100:220] = -850
    image = nib.Nifti1Image(np.broadcast_to(plane.T[:, :, None], (512, 512, shape[0])).copy(), LPS)
    data = gzip.compress(image.to_bytes(), 1)
    del image, y, x, body
    settings = PreprocessSettings(image_size=224, num_slices=32)
    limits = ReadLimits()

    def peak(work) -> tuple[float, object]:
        tracemalloc.start()
        try:
            result = work()
            return tracemalloc.get_traced_memory()[1] / MiB, result
        finally:
            tracemalloc.stop()

    whole_peak, (want, _) = peak(lambda: preprocess_raw_volume(read_raw_volume(data, name="big.nii.gz",
                                                                               limits=limits), settings))
    streamed_peak, (got, _) = peak(lambda: open_for_preprocessing(data, name="big.nii.gz", limits=limits)
                                   .prepare(settings))
    print(f"upload {len(data) / MiB:.1f} MiB; peak traced memory: whole volume {whole_peak:.0f} MiB, "
          f"plane by plane {streamed_peak:.0f} MiB")
    np.testing.assert_array_equal(got, want)
    assert whole_peak > 192
    assert streamed_peak < 64
