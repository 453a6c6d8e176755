"""A .nii.gz on disk is inflated whole by libdeflate (`readers/inflate.py`); whatever it cannot take whole is read as
a stream. Checked against nibabel's and SimpleITK's reads of the same files, and against the stream path's read of
the same bytes in memory."""

import gzip
import tracemalloc
import zlib

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from ctplatform.data import read_volume
from ctplatform.data.errors import CorruptDataError, UnusableContentError
from ctplatform.data.readers.file_range import FileRange
from ctplatform.data.readers.inflate import inflate_whole

pytestmark = pytest.mark.timeout(60)


def ct_like(shape_zyx=(12, 40, 48), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    hu = np.full(shape_zyx, -1000, dtype=np.int16)
    hu[:, 8:-8, 6:-6] = rng.integers(-900, 400, size=(shape_zyx[0], shape_zyx[1] - 16, shape_zyx[2] - 12))
    return hu


def nifti_image(hu_zyx: np.ndarray) -> nib.Nifti1Image:
    image = nib.Nifti1Image(np.ascontiguousarray(hu_zyx.transpose(2, 1, 0)), np.diag([0.8, 0.8, 2.0, 1.0]))
    image.header.set_slope_inter(1.0, 0.0)
    return image


def test_a_gzipped_file_on_disk_is_inflated_whole_and_read_as_the_references_read_it(tmp_path):
    path = tmp_path / "a.nii.gz"
    nib.save(nifti_image(ct_like()), path)
    plain = gzip.decompress(path.read_bytes())
    with open(path, "rb") as handle:
        assert inflate_whole(handle, 0, len(plain)) == plain  # the fast path takes this file
    with FileRange(path).open() as upload:  # the service's uploads stay on the stream path (its memory budget)
        assert inflate_whole(upload, 0, len(plain)) is None
    volume = read_volume(path)
    expected = sitk.GetArrayFromImage(sitk.ReadImage(str(path))).astype(np.float32)  # (z, y, x)
    np.testing.assert_array_equal(volume.hu, np.clip(expected, -1024, 3071))
    np.testing.assert_array_equal(volume.hu, read_volume(path.read_bytes(), name="a.nii.gz").hu)  # the stream path


def test_extensions_before_the_image_are_skipped_on_the_whole_path(tmp_path):
    image = nifti_image(ct_like())
    image.header.extensions.append(nib.nifti1.Nifti1Extension(6, b"comment " * 4000))  # 32 KB before the image
    path = tmp_path / "ext.nii.gz"
    nib.save(image, path)
    assert nib.load(path).dataobj.offset > 32_000
    np.testing.assert_array_equal(read_volume(path).hu, read_volume(path.read_bytes(), name="ext.nii.gz").hu)


def test_an_image_split_over_several_gzip_members_is_read_as_a_stream(tmp_path):
    plain = nifti_image(ct_like()).to_bytes()
    path = tmp_path / "members.nii.gz"
    path.write_bytes(gzip.compress(plain[:20_000]) + gzip.compress(plain[20_000:]))
    with open(path, "rb") as handle:
        assert inflate_whole(handle, 0, len(plain)) is None  # the first member is short: not taken whole
    np.testing.assert_array_equal(read_volume(path).hu, np.clip(ct_like(), -1024, 3071).astype(np.float32))


def test_a_corrupt_file_on_disk_gets_the_stream_paths_precise_error(tmp_path):
    data = gzip.compress(nifti_image(ct_like()).to_bytes())
    truncated = tmp_path / "t.nii.gz"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptDataError, match=r"truncated|corrupt") as refused:
        read_volume(truncated)
    assert str(truncated) in str(refused.value)
    flipped = bytearray(data)
    flipped[-8] ^= 0xFF  # the CRC-32 in the trailer
    bad_crc = tmp_path / "crc.nii.gz"
    bad_crc.write_bytes(bytes(flipped))
    with open(bad_crc, "rb") as handle:
        assert inflate_whole(handle, 0, len(gzip.decompress(data))) is None  # libdeflate checks the CRC
    with pytest.raises(CorruptDataError, match=r"corrupt|CRC"):
        read_volume(bad_crc)


def test_a_bomb_on_disk_inflates_no_more_than_the_header_declares(tmp_path):
    """A valid small volume followed by 1 GiB of zeros in the same gzip member, whose trailer says 1 GiB: the buffer
    is sized from the checked header, the tail is never inflated, and the read ends as the stream path's does."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)
    parts = [compressor.compress(nib.Nifti1Image(np.zeros((8, 8, 4), np.int16), np.eye(4)).to_bytes())]
    parts += [compressor.compress(bytes(1 << 24)) for _ in range(64)]
    parts.append(compressor.flush())
    path = tmp_path / "bomb.nii.gz"
    path.write_bytes(b"".join(parts))
    assert path.stat().st_size < 4 << 20
    tracemalloc.start()
    try:
        with pytest.raises(UnusableContentError, match="constant"):
            read_volume(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, f"{peak / 2**20:.0f} MiB held"
