"""A zipped DICOM series prepared as the service prepares it (members inflated and decoded one at a time, twice)
against the whole-volume path (`read_raw_volume` + `preprocess_raw_volume`): the same slices, positions, spacing,
notes and errors for every kind of series the reader takes, in memory bounded by the model input."""

import io
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicom_series import write_scout, write_series
from pydicom.data import get_testdata_file
from pydicom.uid import RLELossless, generate_uid
from test_preprocess_stream import assert_prepares_as_whole, chest

from ctplatform.data import read_raw_volume
from ctplatform.data.errors import DataFormatError
from ctplatform.data.preprocess import PreprocessSettings, preprocess_raw_volume
from ctplatform.data.preprocess_stream import HeldVolume, ScannedSeries, open_for_preprocessing

SETTINGS = PreprocessSettings(image_size=24, num_slices=6)
MiB = 1 << 20
pytestmark = pytest.mark.timeout(120)


def zipped(folder: Path, method=zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", method) as archive:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                archive.write(path, str(path.relative_to(folder)))
    return buffer.getvalue()


def series(**kwargs):
    def make(tmp: Path, hu=None) -> bytes:
        write_series(tmp / "s", np.round(chest((14, 30, 26)) if hu is None else hu), spacing=(2.0, 0.7, 0.8),
                     **kwargs)
        return zipped(tmp / "s")
    return make


def oriented(orientation, sagittal=False):
    """A series whose ImageOrientationPatient is rewritten (write_series writes the standard axial one); sagittal:
    the slices' positions moved from along z to along x."""
    def make(tmp: Path) -> bytes:
        for path in write_series(tmp / "s", np.round(chest((12, 28, 24)))):
            ds = pydicom.dcmread(path)
            ds.ImageOrientationPatient = list(orientation)
            if sagittal:
                ds.ImagePositionPatient = list(ds.ImagePositionPatient)[::-1]
            ds.save_as(path, enforce_file_format=True)
        return zipped(tmp / "s")
    return make


def with_scout_and_second_series(tmp: Path) -> bytes:
    write_series(tmp / "s" / "a", np.round(chest((14, 30, 26))), study_uid="1.2.3", seed=1)
    write_series(tmp / "s" / "b", np.round(chest((6, 30, 26))), study_uid="1.2.3", seed=2)
    write_scout(tmp / "s")
    (tmp / "s" / "README.txt").write_text("not DICOM")
    return zipped(tmp / "s")


def pydicom_file(name: str):
    """One of pydicom's real CT test files copied to a 4-slice series (a real scanner's header and pixels)."""
    def make(tmp: Path) -> bytes:
        folder = tmp / "s"
        folder.mkdir()
        source = pydicom.dcmread(get_testdata_file(name))
        for k in range(4):
            ds = pydicom.dcmread(get_testdata_file(name))
            ds.SOPInstanceUID = generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            position = [float(v) for v in source.ImagePositionPatient]
            position[2] += 5.0 * (3 - k)
            ds.ImagePositionPatient = position
            ds.save_as(folder / f"{k}.dcm")
        return zipped(folder, zipfile.ZIP_STORED)
    return make


CASES = {
    "axial, one rescale (stored values)": series(),
    "per-slice rescale (float HU)": series(rescales=[(1.0, -1024.0), (2.0, -2048.0)] * 7),
    "uneven spacing and a missing slice (interpolated)": series(z=np.cumsum([0] + [2.0] * 6 + [4.0] + [2.0] * 3
                                                                            + [1.5, 2.5, 2.0])),
    "gantry tilt (shifted in-plane)": series(tilt_mm=0.4),
    "RLE compressed": series(compress=RLELossless),
    "feet-first (z flipped)": oriented((1, 0, 0, 0, -1, 0)),
    "rows flipped": oriented((-1, 0, 0, 0, 1, 0)),
    "head CT (no lungs)": lambda tmp: series()(tmp, np.where(np.round(chest((14, 30, 26))) < -500, 60.0,
                                                             np.round(chest((14, 30, 26))))),
    "scout, second series and a text file": with_scout_and_second_series,
    "pydicom CT_small.dcm": pydicom_file("CT_small.dcm"),
    "pydicom 693_J2KI.dcm (JPEG 2000)": pydicom_file("693_J2KI.dcm"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_zipped_series_prepares_what_the_whole_volume_path_prepares(case, tmp_path):
    data = CASES[case](tmp_path)
    raw = read_raw_volume(data, name="s.zip")
    volume = open_for_preprocessing(data, name="s.zip")
    assert isinstance(volume, ScannedSeries)
    assert_prepares_as_whole(volume, raw)


def test_a_non_axial_series_is_held_whole_and_prepares_the_same(tmp_path):
    data = oriented((0, 1, 0, 0, 0, -1), sagittal=True)(tmp_path)
    volume = open_for_preprocessing(data, name="s.zip")
    assert isinstance(volume, HeldVolume)
    want = preprocess_raw_volume(read_raw_volume(data, name="s.zip"), SETTINGS)[0]
    np.testing.assert_array_equal(volume.prepare(SETTINGS)[0], want)


def _truncate_one(tmp: Path) -> bytes:
    paths = write_series(tmp / "s", np.round(chest((10, 30, 26))))
    ds = pydicom.dcmread(paths[3])
    ds.PixelData = ds.PixelData[:100]
    ds.save_as(paths[3], enforce_file_format=True)
    return zipped(tmp / "s")


def _corrupt_member(tmp: Path) -> bytes:
    data = bytearray(series()(tmp))
    data[len(data) // 2: len(data) // 2 + 64] = bytes(64)  # inside a deflated member: its CRC fails
    return bytes(data)


@pytest.mark.parametrize("make", [
    lambda tmp: series()(tmp, np.full((8, 30, 26), 40.0)),
    _truncate_one,
    _corrupt_member,
    lambda tmp: series()(tmp)[:-200],
], ids=["constant", "truncated slice", "corrupt member", "truncated archive"])
def test_bad_series_get_the_whole_volume_path_s_error(make, tmp_path):
    data = make(tmp_path)
    with pytest.raises(DataFormatError) as expected:
        read_raw_volume(data, name="s.zip")
    with pytest.raises(type(expected.value)) as got:
        open_for_preprocessing(data, name="s.zip").prepare(SETTINGS)
    assert str(got.value) == str(expected.value)


def test_memory_for_a_zipped_series_is_bounded_by_the_model_input_not_the_volume(tmp_path):
    """64 slices of 384 x 384 int16 (18 MiB of pixels): the whole-volume path holds all of them, the streamed one
    a few members, a resize batch of planes, the headers and the coarse sample."""
    plane = np.where(np.hypot(*np.ogrid[-192:192, -192:192]) < 165, 40, -1000).astype(np.float32)
    plane[120:225, 60:150] = -850
    write_series(tmp_path / "s", np.broadcast_to(plane, (64, 384, 384)))
    data = zipped(tmp_path / "s")
    settings = PreprocessSettings(image_size=64, num_slices=16)

    def peak(work) -> tuple[float, object]:
        tracemalloc.start()
        try:
            result = work()
            return tracemalloc.get_traced_memory()[1] / MiB, result
        finally:
            tracemalloc.stop()

    whole_peak, (want, _) = peak(lambda: preprocess_raw_volume(read_raw_volume(data, name="big.zip"), settings))
    streamed_peak, (got, _) = peak(lambda: open_for_preprocessing(data, name="big.zip").prepare(settings))
    print(f"zip of 64 x 384 x 384 int16 (18 MiB of pixels, {len(data) / MiB:.1f} MiB zipped); peak traced memory: "
          f"whole volume {whole_peak:.1f} MiB, member by member {streamed_peak:.1f} MiB")
    np.testing.assert_array_equal(got, want)
    assert whole_peak > 18
    assert streamed_peak < whole_peak / 2 and streamed_peak < 14  # a resize batch of 8 planes (~14 MiB at most)
