"""CT-RATE readers against real files written here: label/metadata CSVs, NIfTI and MetaImage volumes."""

import gzip

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from ctplatform.data import ReadLimits, read_header, read_volume
from ctplatform.data.errors import (
    CorruptDataError,
    DataFormatError,
    DataNotFoundError,
    DataTooLargeError,
    UnsupportedFormatError,
    UnusableContentError,
    http_status,
)
from ctplatform.data.labels_csv import read_labels_csv
from ctplatform.data.metadata import read_metadata_csv
from ctplatform.data.paths import find_volume, parse_volume_name
from ctplatform.data.splits import patient_split
from ctplatform.labels import CLASS_NAMES


# ----------------------------------------------------------------------------------------------- labels CSV
def write_labels(path, header, rows):
    path.write_text("\n".join([",".join(header), *[",".join(map(str, r)) for r in rows]]) + "\n")
    return path


def good_rows(n=3):
    rng = np.random.default_rng(0)
    return [[f"train_{i}_a_1.nii.gz", *rng.integers(0, 2, 18)] for i in range(1, n + 1)]


def test_labels_aligned_by_name_not_position(tmp_path):
    rows = good_rows()
    order = list(reversed(range(18)))
    header = ["VolumeName", *[CLASS_NAMES[j] for j in order]]
    permuted = [[r[0], *[r[1 + j] for j in order]] for r in rows]
    frame = read_labels_csv(write_labels(tmp_path / "l.csv", header, permuted))
    assert list(frame.columns) == list(CLASS_NAMES)
    assert frame.to_numpy().tolist() == [list(map(int, r[1:])) for r in rows]


@pytest.mark.parametrize(
    "mutate, column, row",
    [
        (lambda h, r: (h[:-1], [x[:-1] for x in r]), CLASS_NAMES[-1], None),  # missing class column
        (lambda h, r: (h + [h[1]], [x + [x[1]] for x in r]), CLASS_NAMES[0], None),  # duplicated column
        (lambda h, r: (h + ["Pneumothorax"], [x + [0] for x in r]), "Pneumothorax", None),  # unknown column
        (lambda h, r: (h, [r[0], [r[1][0], 2, *r[1][2:]], r[2]]), CLASS_NAMES[0], 3),  # value not 0/1
        (lambda h, r: (h, [r[0], r[1], [r[0][0], *r[2][1:]]]), "VolumeName", 4),  # duplicate VolumeName
    ],
    ids=["missing", "duplicated", "unknown", "bad-value", "duplicate-volume"],
)
def test_labels_errors_name_file_column_row(tmp_path, mutate, column, row):
    header, rows = mutate(["VolumeName", *CLASS_NAMES], good_rows())
    path = write_labels(tmp_path / "bad.csv", header, rows)
    with pytest.raises(DataFormatError) as info:
        read_labels_csv(path)
    message = str(info.value)
    assert str(path) in message and repr(column) in message
    if row is not None:
        assert f"row {row}" in message


# ----------------------------------------------------------------------------------------------- metadata
def test_metadata_spacing_and_nan_z(tmp_path):
    path = tmp_path / "m.csv"
    pd.DataFrame(
        {
            "VolumeName": ["train_1_a_1.nii.gz", "train_1_a_2.nii.gz"],
            "RescaleSlope": [1, 1],
            "RescaleIntercept": [-1024, -1024],
            "XYSpacing": ["[0.341796875, 0.341796875]", "[0.7, 0.75]"],
            "ZSpacing": [1.5, float("nan")],
            "ImageOrientationPatient": ["[1, 0, 0, 0, 1, 0]", "[1, 0, 0, 0, 1, 0]"],
        }
    ).to_csv(path, index=False)
    meta = read_metadata_csv(path)
    assert meta["train_1_a_1"].xy_spacing == (0.341796875, 0.341796875)
    assert meta["train_1_a_1"].z_spacing == 1.5 and meta["train_1_a_2"].z_spacing is None
    assert meta["train_1_a_2"].rescale_intercept == -1024 and meta["train_1_a_1"].orientation[:3] == (1, 0, 0)


def test_metadata_bad_value_names_column_and_row(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("VolumeName,RescaleSlope,RescaleIntercept,XYSpacing,ZSpacing\na.nii.gz,1,-1024,\"[0.5]\",1\n")
    with pytest.raises(DataFormatError, match=r"'XYSpacing', row 2"):
        read_metadata_csv(path)


# ----------------------------------------------------------------------------------------------- paths, splits
def test_paths_nested_fixed_and_flat(tmp_path):
    nested = tmp_path / "dataset" / "train" / "train_3" / "train_3_a" / "train_3_a_1.nii.gz"
    fixed = tmp_path / "dataset" / "valid_fixed" / "valid_7" / "valid_7_b" / "valid_7_b_2.nii.gz"
    flat = tmp_path / "dataset" / "5f0c.mha"
    for p in (nested, fixed, flat):
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")
    root = tmp_path / "dataset"
    assert find_volume(root, "train_3_a_1.nii.gz") == nested
    assert find_volume(root, "valid_7_b_2") == fixed
    assert find_volume(root, "5f0c") == flat
    assert find_volume(root, "train_9_a_1.nii.gz") is None
    assert parse_volume_name("train_12_b_2.nii.gz").patient == "train_12"


def test_patient_split_keeps_patients_together():
    names = [f"train_{p}_{s}_{r}.nii.gz" for p in range(1, 41) for s in "ab" for r in (1, 2)]
    split = patient_split(names, valid_fraction=0.25, seed=3)
    by_patient = {}
    for name, side in split.items():
        by_patient.setdefault(parse_volume_name(name).patient, set()).add(side)
    assert all(len(sides) == 1 for sides in by_patient.values())
    assert sum("valid" in s for s in by_patient.values()) == 10
    assert split == patient_split(names, valid_fraction=0.25, seed=3)


# ----------------------------------------------------------------------------------------------- volumes
def phantom(shape=(12, 20, 16)):
    """(slices, rows, cols) HU: air, a body with two lungs and an asymmetric marker to check orientation."""
    z, y, x = np.indices(shape)
    hu = np.full(shape, -1000.0, dtype=np.float32)
    body = ((y - shape[1] / 2) / (shape[1] * 0.45)) ** 2 + ((x - shape[2] / 2) / (shape[2] * 0.45)) ** 2 < 1
    hu[body] = 40
    lung = body & (np.abs(x - shape[2] / 2) > 2) & (np.abs(y - shape[1] / 2) < shape[1] * 0.25)
    hu[lung] = -850
    hu[2, 3, 4] = 1500  # marker: slice 2, row 3, col 4
    return hu


def write_nifti(path, hu_zyx, affine=None, dtype=np.float32, slope=None, inter=None):
    data = np.ascontiguousarray(hu_zyx.transpose(2, 1, 0)).astype(dtype)  # NIfTI voxel axes (x, y, z)
    if affine is not None and np.isnan(affine).any():
        img = nib.Nifti1Image(data, None)  # as in some CT-RATE files: a NaN sform and no qform
        img.header.set_sform(affine, code=1)
        img.header.set_qform(None, code=0)
    else:
        img = nib.Nifti1Image(data, np.diag([1.0, 1.0, 2.0, 1.0]) if affine is None else affine)
    if slope is not None:
        img.header.set_slope_inter(slope, inter)
    nib.save(img, path)
    return path


def meta_for(name, intercept=-1024.0):
    from ctplatform.data.metadata import VolumeMetadata

    return VolumeMetadata(name, 1.0, intercept, (1.0, 1.0), 2.0, None)


def test_original_style_float_gets_metadata_rescale(tmp_path):
    hu = phantom()
    path = write_nifti(tmp_path / "train_1_a_1.nii.gz", hu + 1024)  # raw values, blank header
    volume = read_volume(path, metadata=meta_for("train_1_a_1.nii.gz"))
    assert volume.hu_source == "metadata"
    np.testing.assert_allclose(volume.hu, hu, atol=1e-3)


def test_original_style_without_metadata_gets_ct_rates_rescale(tmp_path):
    """predict and serve read an original CT-RATE volume with no metadata CSV: the raw values (air at 0) must not be
    taken as HU (the lungs would read as soft tissue); they get CT-RATE's rescale, and the note says so."""
    hu = phantom()
    path = write_nifti(tmp_path / "valid_1_a_1.nii.gz", hu + 1024)  # raw values, blank header
    volume = read_volume(path)
    assert volume.hu_source == "default-rescale"
    np.testing.assert_allclose(volume.hu, read_volume(path, metadata=meta_for("valid_1_a_1.nii.gz")).hu)
    np.testing.assert_allclose(volume.hu, hu, atol=1e-3)
    assert any("x -1024 assumed" in note for note in volume.notes)
    assert not any("no lung field" in note for note in volume.notes)
    # a scanner whose metadata says otherwise: the CSV's rescale wins over the default
    other = read_volume(path, metadata=meta_for("valid_1_a_1.nii.gz", intercept=-1000.0))
    assert other.hu_source == "metadata"
    np.testing.assert_allclose(other.hu, np.clip(hu + 24, None, 3071), atol=1e-3)


def test_fixed_style_int16_header_rescale_is_not_applied_twice(tmp_path):
    hu = phantom()
    path = tmp_path / "train_1_a_1.nii.gz"
    write_nifti(path, hu + 1024, dtype=np.int16, slope=1.0, inter=-1024.0)
    assert nib.load(path).dataobj.slope == 1.0  # the header really carries the rescale
    volume = read_volume(path, metadata=meta_for("train_1_a_1.nii.gz"))
    assert volume.hu_source == "header"
    np.testing.assert_allclose(volume.hu, hu, atol=1e-3)  # not shifted by another -1024
    assert any("not applied" in note for note in volume.notes)


def test_values_already_in_hu_skip_metadata_rescale(tmp_path):
    hu = phantom()
    path = write_nifti(tmp_path / "v.nii", hu)
    volume = read_volume(path, metadata=meta_for("v.nii"))
    np.testing.assert_allclose(volume.hu, hu, atol=1e-3)
    assert volume.hu_source == "as-stored"


def test_mha_and_nifti_of_the_same_anatomy_agree(tmp_path):
    """SimpleITK writes the .mha (LPS, ITK); the NIfTI is RAS: both must come out in the same orientation."""
    hu = phantom()
    nifti = write_nifti(tmp_path / "a.nii.gz", hu, affine=np.diag([-0.7, -0.7, 2.0, 1.0]))
    image = sitk.GetImageFromArray(hu.astype(np.int16))  # sitk arrays are (z, y, x)
    image.SetSpacing((0.7, 0.7, 2.0))
    image.SetDirection((1, 0, 0, 0, 1, 0, 0, 0, 1))  # LPS +x,+y == RAS -x,-y: same voxels as the NIfTI affine
    mha = tmp_path / "b.mha"
    sitk.WriteImage(image, str(mha), useCompression=True)
    a, b = read_volume(nifti), read_volume(mha)
    np.testing.assert_allclose(a.hu, b.hu, atol=1e-3)
    assert b.spacing == pytest.approx((2.0, 0.7, 0.7))
    # and the marker moved where a RAS reorientation puts it (x and y flipped)
    assert b.hu[2, hu.shape[1] - 1 - 3, hu.shape[2] - 1 - 4] == 1500


def test_mha_uncompressed_with_direction(tmp_path):
    hu = phantom()
    image = sitk.GetImageFromArray(hu.astype(np.float32))
    image.SetDirection((-1, 0, 0, 0, -1, 0, 0, 0, 1))  # LPS -x,-y == RAS +x,+y: stored order is already RAS
    path = tmp_path / "c.mha"
    sitk.WriteImage(image, str(path), useCompression=False)
    np.testing.assert_allclose(read_volume(path).hu, hu, atol=1e-3)


def test_nan_affine_and_non_axial_are_reported(tmp_path):
    hu = phantom()
    nan_affine = np.full((4, 4), np.nan)
    volume = read_volume(write_nifti(tmp_path / "nan.nii.gz", hu, affine=nan_affine))
    assert any("NaN" in n for n in volume.notes)
    np.testing.assert_allclose(volume.hu, hu, atol=1e-3)
    # slices acquired along y (coronal): voxel axis z maps to world A
    coronal = np.array([[1.0, 0, 0, 0], [0, 0, 2.0, 0], [0, 1.0, 0, 0], [0, 0, 0, 1]])
    volume = read_volume(write_nifti(tmp_path / "cor.nii.gz", hu, affine=coronal))
    assert any("non-axial" in n for n in volume.notes)
    assert volume.hu.shape == (hu.shape[1], hu.shape[0], hu.shape[2])


def test_head_ct_is_reported(tmp_path):
    head = np.full((10, 16, 16), -1000.0, dtype=np.float32)
    head[:, 3:13, 3:13] = 40
    head[:, 5:11, 5:11] = 30  # brain: no lung anywhere
    volume = read_volume(write_nifti(tmp_path / "head.nii.gz", head))
    assert any("no lung field" in n for n in volume.notes)


# ----------------------------------------------------------------------------------------------- bad input
def nifti_bytes(shape_xyz, dtype=np.int16):
    img = nib.Nifti1Image(np.zeros(shape_xyz, dtype=dtype), np.eye(4))
    return img.to_bytes()


def test_truncated_gzip(tmp_path):
    data = gzip.compress(nifti_bytes((16, 16, 8)) )
    with pytest.raises(CorruptDataError, match=r"truncated|corrupt"):
        read_volume(data[: len(data) // 2], name="t.nii.gz")


def test_gzip_bomb_tail_is_never_inflated():
    # A valid small volume followed by 1 GiB of zeros inside the same gzip member: compressed it is ~1 MB.
    header_and_data = nifti_bytes((8, 8, 4))
    compressor = gzip.zlib.compressobj(9, gzip.zlib.DEFLATED, 31)
    parts = [compressor.compress(header_and_data)]
    chunk = bytes(1 << 24)
    for _ in range(64):
        parts.append(compressor.compress(chunk))
    parts.append(compressor.flush())
    bomb = b"".join(parts)
    assert len(bomb) < 4 << 20
    with pytest.raises(UnusableContentError, match="constant"):  # read exactly the declared 8x8x4 voxels, then stop
        read_volume(bomb, name="bomb.nii.gz")


def test_header_declaring_terabytes_is_refused_before_decompression():
    header = nib.Nifti1Header()
    header.set_data_shape((30000, 30000, 30000))
    header.set_data_dtype(np.int16)
    data = gzip.compress(header.binaryblock + b"\x00" * 4)
    with pytest.raises(DataTooLargeError, match="above the limit"):
        read_volume(data, name="huge.nii.gz")


def _with_vox_offset(shape_xyz, offset: int) -> bytes:
    """A NIfTI-1 whose header puts the image `offset` bytes in (zeros in between, as a bomb's filler would be)."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape_xyz)
    header.set_data_dtype(np.int16)
    header.set_data_offset(offset)
    image = np.arange(int(np.prod(shape_xyz)), dtype=np.int16).tobytes()
    return header.binaryblock + bytes(offset - 348) + image


def test_a_vox_offset_far_beyond_the_header_is_refused_before_inflating():
    """200 MB of filler between header and image, ~200 KB gzip-compressed: refused from the header, holding
    nothing (before, the filler was inflated into one 200 MB buffer and the read went on)."""
    import tracemalloc

    bomb = gzip.compress(_with_vox_offset((8, 8, 4), 200 << 20), compresslevel=1)
    assert len(bomb) < 2 << 20
    tracemalloc.start()
    try:
        with pytest.raises(DataTooLargeError, match=r"vox_offset.*above the limit of 16,777,216") as refused:
            read_volume(bomb, name="offset.nii.gz")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    print(f"vox_offset bomb ({len(bomb):,} bytes uploaded): refused with a peak of {peak / 2**20:.1f} MiB held")
    assert peak < 16 << 20 and http_status(refused.value) == 413


def test_extensions_within_the_limit_are_passed_over_chunk_by_chunk():
    data = gzip.compress(_with_vox_offset((8, 8, 4), 3 << 20))  # 3 MB of extensions: more than one skip chunk
    volume = read_volume(data, name="ext.nii.gz", limits=ReadLimits())
    stored = np.arange(8 * 8 * 4, dtype=np.int16).reshape(4, 8, 8)  # (z, y, x) of what _with_vox_offset wrote
    assert volume.hu.shape == (4, 8, 8) and volume.hu.std() > 0
    assert sorted(volume.hu.ravel() - volume.hu.min()) == sorted((stored - stored.min()).ravel())
    tight = ReadLimits(max_header_skip=1 << 20)
    with pytest.raises(DataTooLargeError, match="vox_offset"):
        read_volume(data, name="ext.nii.gz", limits=tight)


def test_an_uncompressed_file_shorter_than_its_header_declares_is_refused_before_reading():
    header = nib.Nifti1Header()
    header.set_data_shape((512, 512, 300))
    header.set_data_dtype(np.int16)
    short = header.binaryblock + bytes(4) + bytes(1000)
    with pytest.raises(CorruptDataError, match=r"declares 157,286,404 bytes after it, the file holds 1,004"):
        read_volume(short, name="short.nii")


def test_a_long_gzip_file_name_does_not_skip_the_header_check():
    """A gzip member whose FNAME field is 100 KiB: the header after it is still read and checked (fail closed)."""
    header = nib.Nifti1Header()
    header.set_data_shape((30000, 30000, 3000))
    header.set_data_dtype(np.int16)
    member = gzip.compress(header.binaryblock + bytes(4))
    flags = member[3] | 0x08  # FNAME: a zero-terminated name follows the 10-byte fixed header
    named = member[:3] + bytes([flags]) + member[4:10] + b"n" * (100 << 10) + b"\0" + member[10:]
    assert gzip.decompress(named) == header.binaryblock + bytes(4)  # a valid gzip file
    with pytest.raises(DataTooLargeError, match="above the limit"):
        read_volume(named, name="named.nii.gz")


def test_mha_header_size_and_external_data_are_refused(tmp_path):
    text = (b"ObjectType = Image\nNDims = 3\nDimSize = 4 4 4\nElementType = MET_SHORT\nHeaderSize = 1000000000\n"
            b"ElementDataFile = LOCAL\n") + bytes(128)
    with pytest.raises(UnusableContentError, match="HeaderSize = 1000000000 is not supported"):
        read_volume(text, name="skip.mha")
    external = text.replace(b"HeaderSize = 1000000000\n", b"").replace(b"LOCAL", b"/etc/passwd")
    with pytest.raises(UnusableContentError, match="external data file"):
        read_volume(external, name="external.mha")


@pytest.mark.parametrize(
    "payload, error, match",
    [
        (b"", CorruptDataError, "empty"),
        (b"this is a text file, not a volume\n" * 3, UnsupportedFormatError, "not a NIfTI"),
    ],
)
def test_non_image_input(payload, error, match):
    with pytest.raises(error, match=match):
        read_volume(payload, name="upload.bin")


def test_two_dimensional_image_and_nan_values(tmp_path):
    with pytest.raises(UnusableContentError, match="3 dimensions"):
        read_volume(nib.Nifti1Image(np.zeros((16, 16), np.int16), np.eye(4)).to_bytes(), name="flat.nii")
    values = np.zeros((8, 8, 4), np.float32)
    values[1, 2, 3] = np.nan
    with pytest.raises(UnusableContentError, match="NaN"):
        read_volume(nib.Nifti1Image(values, np.eye(4)).to_bytes(), name="nan.nii")


# ----------------------------------------------------------------------------------------------- the reader chain
def test_path_bytes_and_stream_read_the_same(tmp_path):
    import io

    path = write_nifti(tmp_path / "a.nii.gz", phantom())
    from_path = read_volume(path)
    from_bytes = read_volume(path.read_bytes(), name="a.nii.gz")
    with open(path, "rb") as handle:
        from_stream = read_volume(handle)
    from_buffer = read_volume(io.BytesIO(path.read_bytes()), name="a.nii.gz")
    for other in (from_bytes, from_stream, from_buffer):
        np.testing.assert_array_equal(other.hu, from_path.hu)
        assert other.spacing == from_path.spacing and other.notes == from_path.notes


def test_missing_file_is_not_found(tmp_path):
    with pytest.raises(DataNotFoundError, match="file not found") as info:
        read_volume(tmp_path / "absent.nii.gz")
    assert http_status(info.value) == 404


def test_read_header_reports_what_the_file_declares():
    header = read_header(gzip.compress(nifti_bytes((28, 32, 16))), name="a.nii.gz")
    assert header.format == "nifti" and header.compressed and header.shape == (28, 32, 16)
    assert header.itemsize == 2 and header.nbytes == 28 * 32 * 16 * 2


def test_limits_are_checked_from_the_header_before_the_data():
    data = nifti_bytes((16, 16, 8))[:600]  # the header, and a little of the image
    with pytest.raises(DataTooLargeError, match="voxels"):
        read_volume(data, name="a.nii", limits=ReadLimits(max_voxels=16 * 16 * 8 - 1))
    with pytest.raises(DataTooLargeError, match="bytes of image data"):
        read_volume(data, name="a.nii", limits=ReadLimits(max_decompressed_bytes=16 * 16 * 8 * 2 - 1))
    with pytest.raises(CorruptDataError, match="truncated"):  # within the limits: the data is read, and is short
        read_volume(data, name="a.nii", limits=ReadLimits(max_decompressed_bytes=16 * 16 * 8 * 2))


def test_require_spacing_refuses_nan_spacing(tmp_path):
    image = nib.Nifti1Image(np.ascontiguousarray(phantom().transpose(2, 1, 0)), np.diag([0.7, 0.7, 2.0, 1.0]))
    image.header.set_zooms((np.nan, 0.7, 2.0))
    data = image.to_bytes()
    assert read_volume(data, name="a.nii").spacing == pytest.approx((2.0, 0.7, 0.7))  # the affine gives one
    with pytest.raises(UnusableContentError, match="spacing"):
        read_volume(data, name="a.nii", limits=ReadLimits(require_spacing=True))


def test_metaimage_is_recognised_by_its_header_not_its_name(tmp_path):
    image = sitk.GetImageFromArray(phantom().astype(np.int16))
    path = tmp_path / "scan.mha"
    sitk.WriteImage(image, str(path))
    assert read_volume(path.read_bytes(), name="upload.bin").hu.shape == phantom().shape
    with pytest.raises(UnsupportedFormatError):  # a text file named .mha is not taken for a MetaImage
        read_volume(b"Hello = world\n" * 4, name="notes.mha")
    with pytest.raises(CorruptDataError, match="ElementDataFile"):
        read_volume(b"ObjectType = Image\nNDims = 3\n", name="cut.mha")


@pytest.mark.parametrize("error, status, prefix", [
    (DataNotFoundError, 404, "not found"),
    (UnsupportedFormatError, 415, "unsupported format"),
    (DataTooLargeError, 413, "too large"),
    (CorruptDataError, 422, "corrupt file"),
    (UnusableContentError, 422, "unusable content"),
    (DataFormatError, 422, "bad data"),
])
def test_each_error_kind_has_one_status_and_prefix(error, status, prefix):
    from ctplatform.data.errors import cli_prefix

    exc = error("f.nii.gz", "problem")
    assert isinstance(exc, DataFormatError) and isinstance(exc, ValueError)
    assert http_status(exc) == status and cli_prefix(exc) == prefix and str(exc) == "f.nii.gz: problem"
