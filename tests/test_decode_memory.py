"""The decode-memory estimate the service reserves per volume request, against the traced peak of the decode and
preparation it stands for (the service's own path, `open_for_preprocessing(...).prepare`), for every decode path:
never below it, and within a small factor of it."""

import gzip
import io
import tracemalloc
import zipfile

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from dicom_series import write_enhanced, write_series
from serve_payloads import gzip_bomb
from test_preprocess_stream import chest

from ctplatform.data.decode_memory import FLOOR_BYTES, decode_estimate
from ctplatform.data.preprocess import PreprocessSettings
from ctplatform.data.preprocess_stream import HeldVolume, ScannedVolume, open_for_preprocessing

SETTINGS = PreprocessSettings(image_size=64, num_slices=8)
MiB = 1 << 20
pytestmark = pytest.mark.timeout(120)
SHAPE = (40, 192, 176)  # (z, y, x): large enough that planes, not fixed costs, make the peak


def nifti(affine, dtype=np.int16):
    image = nib.Nifti1Image(np.ascontiguousarray(np.round(chest(SHAPE)).transpose(2, 1, 0)).astype(dtype), affine)
    return gzip.compress(image.to_bytes(), 1), "v.nii.gz"


def mha(tmp_path):
    path = tmp_path / "v.mha"
    sitk.WriteImage(sitk.GetImageFromArray(np.round(chest(SHAPE)).astype(np.int16)), str(path), useCompression=True)
    return path.read_bytes(), "v.mha"


def dicom_zip(tmp_path, sagittal=False):
    paths = write_series(tmp_path / "s", np.round(chest(SHAPE)))
    if sagittal:
        import pydicom

        for path in paths:
            ds = pydicom.dcmread(path)
            ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
            ds.ImagePositionPatient = list(ds.ImagePositionPatient)[::-1]
            ds.save_as(path, enforce_file_format=True)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(paths):
            archive.write(path, path.name)
    return buffer.getvalue(), "s.zip"


def enhanced(tmp_path):
    return write_enhanced(tmp_path / "e.dcm", np.round(chest(SHAPE))).read_bytes(), "e.dcm"


SAGITTAL = np.array([[0, 0, 2.0, 0], [0.8, 0, 0, 0], [0, 0.7, 0, 0], [0, 0, 0, 1]])
CASES = {
    "nii.gz axial (streamed)": (lambda tmp: nifti(np.diag([-0.7, -0.8, 2.0, 1.0])), ScannedVolume),
    "nii.gz float32 axial (streamed)": (lambda tmp: nifti(np.diag([0.7, 0.8, 2.0, 1.0]), np.float32), ScannedVolume),
    "nii.gz sagittal (held)": (lambda tmp: nifti(SAGITTAL), HeldVolume),
    "mha (streamed)": (mha, ScannedVolume),
    "DICOM zip axial (streamed)": (dicom_zip, ScannedVolume),
    "DICOM zip sagittal (held)": (lambda tmp: dicom_zip(tmp, sagittal=True), HeldVolume),
    "Enhanced CT .dcm (held)": (enhanced, HeldVolume),
}


@pytest.mark.parametrize("case", list(CASES))
def test_the_estimate_covers_the_traced_peak_within_a_small_factor(case, tmp_path):
    make, kind = CASES[case]
    data, name = make(tmp_path)
    estimate = decode_estimate(data, name, SETTINGS)
    tracemalloc.start()
    try:
        volume = open_for_preprocessing(data, name=name)
        volume.prepare(SETTINGS)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert isinstance(volume, kind)
    print(f"{case}: traced peak {peak / MiB:.1f} MiB, estimate {estimate / MiB:.1f} MiB "
          f"({FLOOR_BYTES / MiB:.0f} MiB of it fixed)")
    assert peak <= estimate <= 4 * peak + FLOOR_BYTES


def test_unreadable_or_refused_uploads_get_the_floor():
    assert decode_estimate(b"not a volume at all", "x.nii.gz", SETTINGS) == FLOOR_BYTES
    # a header alone is estimated by what it declares (512 x 512 x 256 int16, no orientation: held whole), and the
    # decode then refuses it within that share
    assert decode_estimate(gzip_bomb((512, 512, 256))[:200], "cut.nii.gz", SETTINGS) > 2 * 512 * 512 * 256 * 2
    bomb = io.BytesIO()
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as archive:
        for k in range(3):
            archive.writestr(f"{k}.dcm", b"\0" * (64 * MiB))
    assert decode_estimate(bomb.getvalue(), "bomb.zip", SETTINGS) == FLOOR_BYTES  # refused as a zip bomb (> 100x)


def test_the_estimate_grows_with_what_the_header_declares_not_with_the_upload():
    """A held volume's estimate follows its declared voxels; a streamed one's its plane size, not its slice count."""
    small, large = (nib.Nifti1Image(np.zeros((64, 64, n), np.int16), SAGITTAL).to_bytes() for n in (10, 1000))
    assert decode_estimate(large, "l.nii", SETTINGS) - decode_estimate(small, "s.nii", SETTINGS) > 990 * 64 * 64 * 2
    axial = np.diag([0.7, 0.7, 2.0, 1.0])
    few, many = (nib.Nifti1Image(np.zeros((512, 512, n), np.int16), axial).to_bytes()[:400] for n in (10, 1000))
    grown = decode_estimate(many, "m.nii", SETTINGS) - decode_estimate(few, "f.nii", SETTINGS)
    assert 0 < grown < 990 * 64 * 64 * 4 * 2 + 1  # only the coarse sample of the extra slices


def test_the_default_limits_take_the_largest_axial_volumes_the_other_caps_allow_and_refuse_large_held_ones(tmp_path):
    """The service's default per-request decode limit (256 MiB) against its other default caps, with the default
    preprocessing and the densest slice choice (stride 8): a 1024 x 1024 x 400 float32 axial volume (the voxel cap,
    1.6 GiB declared) and a zip of 400 axial 1024 x 1024 slices fit under it; a 512 x 512 x 300 sagittal volume,
    read whole, does not (the service answers 413 and names the limit)."""
    from ctplatform.serve.inputs import ServeLimits

    limits = ServeLimits()
    settings = [PreprocessSettings(), PreprocessSettings(selection="stride", stride=8)]

    def header_only(shape, dtype, affine):  # what the estimate reads of a .nii.gz: its header
        header = nib.Nifti1Header()
        header.set_data_shape(shape)
        header.set_data_dtype(dtype)
        header.set_qform(affine, code=1)
        header.set_sform(affine, code=1)
        return gzip.compress(header.binaryblock + b"\0" * 4 + bytes(4096), 1)

    largest = header_only((1024, 1024, 400), np.float32, np.diag([0.7, 0.7, 1.0, 1.0]))
    assert limits.max_voxels >= 1024 * 1024 * 400 and limits.max_decompressed_bytes >= 1024 * 1024 * 400 * 4
    plane = np.full((1, 1024, 1024), -1000.0)
    plane[0, :24] = np.random.default_rng(0).integers(-1000, 1000, (24, 1024))  # enough not to look like a zip bomb
    member = write_series(tmp_path / "one", plane)[0].read_bytes()
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as series:
        for k in range(400):
            series.writestr(f"IM{k:04d}.dcm", member)
    sagittal = header_only((300, 512, 512), np.int16, SAGITTAL)
    for setting in settings:
        streamed = {"nii.gz": decode_estimate(largest, "v.nii.gz", setting, limits.read_limits),
                    "zip": decode_estimate(archive.getvalue(), "s.zip", setting, limits.read_limits)}
        held = decode_estimate(sagittal, "sagittal.nii.gz", setting, limits.read_limits)
        print(f"{setting.selection}: streamed {({k: round(v / MiB) for k, v in streamed.items()})} MiB, "
              f"sagittal 512 x 512 x 300 held {held / MiB:.0f} MiB, limit {limits.max_request_decode_bytes / MiB:.0f}")
        assert all(FLOOR_BYTES < v <= limits.max_request_decode_bytes for v in streamed.values()), streamed
        assert held > limits.max_request_decode_bytes
