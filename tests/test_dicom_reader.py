"""DICOM through the one reader chain: series the tests write with pydicom from the synthetic CT, pydicom's own
CT files, and SimpleITK's ImageSeriesReader as the independent reference."""

import io
import logging
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from dicom_series import PATIENT, write_enhanced, write_scout, write_series
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate
from pydicom.uid import ImplicitVRLittleEndian, JPEG2000Lossless, RLELossless, generate_uid

from ctplatform.data import ReadLimits, read_header, read_raw_volume, read_volume
from ctplatform.data.errors import (
    CorruptDataError,
    DataTooLargeError,
    UnsupportedFormatError,
    UnusableContentError,
    http_status,
)
from ctplatform.data.hounsfield import HU_MAX, HU_MIN
from ctplatform.data.synthetic.anatomy import synthesize_scan
from ctplatform.labels import NUM_CLASSES

pytestmark = pytest.mark.timeout(120)
SPACING = (2.0, 0.75, 0.75)


@pytest.fixture(scope="module")
def chest() -> np.ndarray:
    """A synthetic chest CT in HU, (slices, rows, cols), inferior first, with findings."""
    scan, _ = synthesize_scan(11, 3, 0, (48, 40, 14), [1] * NUM_CLASSES)
    return np.round(scan.transpose(2, 0, 1)).astype(np.float32)


def canonical(hu_zyx: np.ndarray) -> np.ndarray:
    """What the chain returns for a standard axial LPS stack: rows to anterior, columns to the right."""
    return np.clip(hu_zyx[:, ::-1, ::-1], HU_MIN, HU_MAX)


def sitk_series(folder: Path, float_output: bool = False) -> np.ndarray:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder)))
    if float_output:
        reader.SetOutputPixelType(sitk.sitkFloat32)
    image = reader.Execute()
    assert image.GetDirection() == (1, 0, 0, 0, 1, 0, 0, 0, 1)
    return canonical(sitk.GetArrayFromImage(image).astype(np.float32))


def zip_folder(folder: Path, out: Path) -> Path:
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(folder.rglob("*")):
            archive.write(path, path.relative_to(folder).as_posix())
    return out


@pytest.mark.parametrize("syntax, compress", [(None, None), (ImplicitVRLittleEndian, None), (None, RLELossless),
                                              (None, JPEG2000Lossless)])
def test_series_equals_simpleitk_and_the_truth(tmp_path, chest, syntax, compress):
    kwargs = {"syntax": syntax} if syntax else {}
    write_series(tmp_path / "s", chest, spacing=SPACING, compress=compress, seed=5, **kwargs)
    volume = read_volume(tmp_path / "s")
    assert volume.hu.shape == chest.shape and volume.spacing == SPACING
    assert volume.hu_source == "header"
    np.testing.assert_array_equal(volume.hu, canonical(chest))
    np.testing.assert_array_equal(volume.hu, sitk_series(tmp_path / "s"))


def test_whole_volume_read_decodes_straight_to_hu_with_the_values_of_the_stored_value_path(tmp_path, chest):
    """read_volume converts each slice to canonical float32 HU in its decode thread; the values equal those of the
    general path (stored values, reoriented, then converted), which prepare uses."""
    write_series(tmp_path / "s", chest, spacing=SPACING, slope=0.5, intercept=-1024.0, seed=4)
    volume, raw = read_volume(tmp_path / "s"), read_raw_volume(tmp_path / "s")
    assert raw.data.dtype == np.int16 and raw.slope == 0.5
    np.testing.assert_array_equal(volume.hu, raw.to_volume().hu)
    assert volume.hu.dtype == np.float32 and volume.hu.flags.c_contiguous and volume.hu.flags.writeable
    assert volume.spacing == raw.spacing == SPACING and volume.notes == raw.notes


def test_per_slice_rescale_equals_simpleitk(tmp_path, chest):
    rescales = [(1.0, -1024.0), (0.5, -1024.0), (2.0, -2048.0), (1.0, -1000.0)] * 4
    write_series(tmp_path / "s", chest, spacing=SPACING, rescales=rescales[: len(chest)], seed=2)
    volume = read_volume(tmp_path / "s")
    stored_back = [np.round((chest[k] - b) / a) * a + b for k, (a, b) in enumerate(rescales[: len(chest)])]
    np.testing.assert_array_equal(volume.hu, canonical(np.array(stored_back, np.float32)))
    np.testing.assert_array_equal(volume.hu, sitk_series(tmp_path / "s", float_output=True))


def test_scout_second_series_and_other_files_are_left_out(tmp_path, chest):
    study = generate_uid()
    series = generate_uid()
    write_series(tmp_path / "s", chest, spacing=SPACING, series_uid=series, study_uid=study)
    write_scout(tmp_path / "s", series_uid=series, study_uid=study)
    write_series(tmp_path / "s" / "thick", chest[::2], spacing=(4.0, 0.75, 0.75), study_uid=study, seed=9,
                 description="CHEST 4.0")
    (tmp_path / "s" / "README.txt").write_text("exported by a PACS")
    volume = read_volume(tmp_path / "s")
    np.testing.assert_array_equal(volume.hu, canonical(chest))
    notes = " ".join(volume.notes)
    assert "1 localizer" in notes and "2 CT series" in notes and "'CHEST 4.0' with 7 slice(s)" in notes
    assert series[-8:] in notes


def test_two_series_of_equal_length_or_two_studies_are_refused_with_a_listing(tmp_path, chest):
    study = generate_uid()
    write_series(tmp_path / "tie", chest, description="LUNG", study_uid=study)
    write_series(tmp_path / "tie", chest, description="SOFT", seed=3, study_uid=study)
    with pytest.raises(UnusableContentError, match=r"no single longest one.*'LUNG'.*14 slice"):
        read_volume(tmp_path / "tie")
    write_series(tmp_path / "studies", chest)
    write_series(tmp_path / "studies", chest[:5], seed=4)
    with pytest.raises(UnusableContentError, match="2 different studies"):
        read_volume(tmp_path / "studies")


def test_uneven_spacing_and_a_missing_slice_are_resampled_onto_a_uniform_grid(tmp_path, chest):
    keep = [k for k in range(len(chest)) if k != 6]  # slice 6 missing: one 4 mm gap among 2 mm ones
    z = -300.0 + 2.0 * np.array(keep, dtype=np.float64)
    write_series(tmp_path / "s", chest[keep], spacing=SPACING, z=z)
    volume = read_volume(tmp_path / "s")
    assert volume.hu.shape == chest.shape and volume.spacing == SPACING
    assert any("uneven slice spacing" in n and "13 -> 14 slices" in n for n in volume.notes)
    expected = canonical(chest)
    others = [k for k in range(len(chest)) if k != 6]
    np.testing.assert_array_equal(volume.hu[others], expected[others])  # source slices kept exactly
    np.testing.assert_allclose(volume.hu[6], (expected[5] + expected[7]) / 2, atol=1e-3)


def test_a_large_gap_or_duplicate_positions_are_refused(tmp_path, chest):
    z = -300.0 + 2.0 * np.arange(len(chest))
    z[8:] += 20.0
    write_series(tmp_path / "gap", chest, z=z)
    with pytest.raises(UnusableContentError, match=r"slices missing: a gap of 22.00 mm"):
        read_volume(tmp_path / "gap")
    z = -300.0 + 2.0 * np.arange(len(chest))
    z[3] = z[4]
    write_series(tmp_path / "dup", chest, z=z)
    with pytest.raises(UnusableContentError, match="share one position"):
        read_volume(tmp_path / "dup")


def test_gantry_tilt_is_corrected_onto_an_orthogonal_grid(tmp_path, chest):
    # Slice k of a tilted acquisition starts k * 0.75 mm (one row) further along y: it shows truth rows k.. .
    air = np.full_like(chest, -1000.0)
    tilted = air.copy()
    for k in range(len(chest)):
        tilted[k, : chest.shape[1] - k] = chest[k, k:]
    write_series(tmp_path / "s", tilted, spacing=SPACING, tilt_mm=0.75)
    volume = read_volume(tmp_path / "s")
    assert any("gantry tilt" in n and "20.6 degrees" in n for n in volume.notes)
    expected = canonical(chest)
    for k in range(len(chest)):  # canonical rows are reversed: the truth's first k rows are at the end
        rows = slice(0, chest.shape[1] - k)
        np.testing.assert_array_equal(volume.hu[k, rows], expected[k, rows])


def test_enhanced_ct_multiframe_with_per_frame_rescale(tmp_path, chest):
    rescales = [(1.0, -1024.0), (0.5, -1000.0)] * 7
    path = write_enhanced(tmp_path / "enhanced.dcm", chest, spacing=SPACING, rescales=rescales, seed=4)
    volume = read_volume(path)
    assert volume.spacing == SPACING
    stored_back = [np.round((chest[k] - b) / a) * a + b for k, (a, b) in enumerate(rescales)]
    np.testing.assert_array_equal(volume.hu, canonical(np.array(stored_back, np.float32)))
    assert read_volume(path.read_bytes(), name="enhanced.dcm").hu.tobytes() == volume.hu.tobytes()


def test_folder_zip_bytes_and_nifti_read_the_same(tmp_path, chest):
    import nibabel as nib

    write_series(tmp_path / "s" / "nested" / "deeper", chest, spacing=SPACING)
    archive = zip_folder(tmp_path / "s", tmp_path / "s.zip")
    nifti = tmp_path / "s.nii.gz"
    nib.save(nib.Nifti1Image(chest.transpose(2, 1, 0).astype(np.int16), np.diag([-0.75, -0.75, 2.0, 1.0])), nifti)
    from_folder, from_zip = read_volume(tmp_path / "s"), read_volume(archive)
    from_bytes = read_volume(archive.read_bytes(), name="s.zip")
    from_nifti = read_volume(nifti)
    for other in (from_zip, from_bytes, from_nifti):
        np.testing.assert_array_equal(other.hu, from_folder.hu)
        assert other.spacing == from_folder.spacing
    header = read_header(archive)
    assert header.format == "dicom" and header.shape == (40, 48, 14)


def test_pydicoms_real_ct_files(tmp_path):
    """CT_small (explicit VR) and 693_J2KI (JPEG 2000), each copied to a short series; SimpleITK reads the same."""
    for name in ("CT_small.dcm", "693_J2KI.dcm"):
        source = pydicom.dcmread(get_testdata_file(name))
        folder = tmp_path / name
        folder.mkdir()
        for k in range(3):
            ds = pydicom.dcmread(get_testdata_file(name))
            ds.SOPInstanceUID = generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            position = [float(v) for v in source.ImagePositionPatient]
            position[2] += 5.0 * (2 - k)
            ds.ImagePositionPatient = position
            ds.save_as(folder / f"{k}.dcm")
        volume = read_volume(folder)
        assert volume.hu.shape == (3, source.Rows, source.Columns)
        assert volume.spacing[0] == pytest.approx(5.0)
        reference = sitk.GetArrayFromImage(sitk.ReadImage(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder))))
        direction = np.array(sitk.ReadImage(str(folder / "0.dcm")).GetDirection()).reshape(3, 3)
        assert np.allclose(np.abs(np.diag(direction)), 1)  # both files are axial
        flips = tuple(slice(None, None, -1) if d > 0 else slice(None) for d in (direction[1, 1], direction[0, 0]))
        np.testing.assert_array_equal(volume.hu, np.clip(reference[(slice(None), *flips)], HU_MIN, HU_MAX))


def test_unused_high_bits_are_ignored_as_pydicom_does(tmp_path, chest):
    """12 bits stored in 16, with junk in the 4 high bits (allowed: PS3.5 8.1.1): signed and unsigned."""
    for signed in (True, False):
        folder = tmp_path / f"signed{signed}"
        paths = write_series(folder, chest[:4], intercept=-1024.0)
        for path in paths:
            ds = pydicom.dcmread(path)
            stored = ds.pixel_array.astype(np.int32) - (2048 if signed else 0)  # 0..4095 -> signed 12-bit range
            junk = (np.arange(stored.size).reshape(stored.shape) % 16) << 12
            raw = ((stored & 0xFFF) | junk).astype(np.uint16)
            ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 12, 11, int(signed)
            ds.RescaleIntercept = -1024 + 2048 if signed else -1024
            ds.PixelData = raw.view(np.int16 if signed else np.uint16).tobytes()
            ds.save_as(path)
        volume = read_volume(folder)
        reference = [pydicom.dcmread(p) for p in paths]
        reference.sort(key=lambda ds: float(ds.ImagePositionPatient[2]))
        expected = np.array([ds.pixel_array * 1.0 + float(ds.RescaleIntercept) for ds in reference], np.float32)
        np.testing.assert_array_equal(volume.hu, canonical(expected))
        np.testing.assert_array_equal(volume.hu, canonical(chest[:4]))


# ----------------------------------------------------------------------------------------------- bad input
def test_one_slice_truncated_no_pixels_and_mr_are_refused(tmp_path, chest):
    one = tmp_path / "one"
    write_series(one, chest[:1])
    with pytest.raises(UnusableContentError, match="one slice"):
        read_volume(one)
    with pytest.raises(UnusableContentError, match="one slice"):
        read_volume(get_testdata_file("CT_small.dcm"))
    truncated = tmp_path / "truncated"
    paths = write_series(truncated, chest)
    paths[3].write_bytes(paths[3].read_bytes()[:-500])
    with pytest.raises(CorruptDataError, match=rf"truncated/{paths[3].name}: unreadable pixel data"):
        read_volume(truncated)
    paths[3].write_bytes(paths[3].read_bytes()[:300])  # cut inside the header
    with pytest.raises(CorruptDataError, match=paths[3].name):
        read_volume(truncated)
    no_pixels = tmp_path / "no_pixels"
    no_pixels.mkdir()
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    del ds.PixelData
    ds.save_as(no_pixels / "a.dcm")
    with pytest.raises(CorruptDataError, match=r"a.dcm: a CT image without pixel data"):
        read_volume(no_pixels)
    (no_pixels / "a.dcm").unlink()
    pydicom.dcmread(get_testdata_file("rtplan.dcm")).save_as(no_pixels / "plan.dcm")
    with pytest.raises(UnusableContentError, match="hold no pixel data"):
        read_volume(no_pixels)
    mr = tmp_path / "mr"
    write_series(mr, chest, modality="MR")
    with pytest.raises(UnusableContentError, match="modality MR: only CT"):
        read_volume(mr)
    with pytest.raises(UnsupportedFormatError, match="no DICOM file"):
        (tmp_path / "text").mkdir()
        (tmp_path / "text" / "a.txt").write_text("hello")
        read_volume(tmp_path / "text")


def test_zip_traps_are_refused_before_extraction(tmp_path, chest):
    write_series(tmp_path / "s", chest)
    good = zip_folder(tmp_path / "s", tmp_path / "good.zip").read_bytes()
    with pytest.raises(DataTooLargeError, match="holds 14 files, above the limit of 5"):
        read_volume(good, name="good.zip", limits=ReadLimits(max_series_files=5))

    def archive(entries) -> bytes:
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as out:
            for info, data in entries:
                out.writestr(info, data)
        return buffer.getvalue()

    bomb = archive([(f"{k}.dcm", b"\0" * (64 << 20)) for k in range(3)])  # 192 MiB in ~200 KiB
    assert len(bomb) < 1 << 20
    with pytest.raises(DataTooLargeError, match=r"declares 201,326,592 uncompressed bytes"):
        read_volume(bomb, name="bomb.zip", limits=ReadLimits(max_series_bytes=100 << 20))
    with pytest.raises(UnsupportedFormatError, match=r"'../evil.dcm' points outside"):
        read_volume(archive([("../evil.dcm", b"x")]), name="evil.zip")
    with pytest.raises(UnsupportedFormatError, match="nested archives"):
        read_volume(archive([("inner.zip", good)]), name="nested.zip")
    with pytest.raises(UnsupportedFormatError, match="nested archives"):
        read_volume(archive([("inner.bin", good)]), name="nested.zip")
    link = zipfile.ZipInfo("link.dcm")
    link.external_attr = (0o120777 << 16)
    with pytest.raises(UnsupportedFormatError, match="symbolic links"):
        read_volume(archive([(link, "/etc/passwd")]), name="link.zip")
    with pytest.raises(CorruptDataError) as error:
        read_volume(good[: len(good) // 2], name="cut.zip")
    assert http_status(error.value) == 422


def test_unsupported_compression_names_the_transfer_syntax(tmp_path, chest):
    folder = tmp_path / "s"
    paths = write_series(folder, chest[:3])
    ds = pydicom.dcmread(paths[0])
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2: no decoder
    ds.PixelData = encapsulate([ds.PixelData])
    ds.save_as(paths[0])
    with pytest.raises(UnsupportedFormatError, match=r"MPEG2.*no decoder"):
        read_volume(folder)


def test_no_patient_identifier_in_any_message_note_log_or_warning(tmp_path, chest, caplog, recwarn):
    caplog.set_level(logging.DEBUG)
    secrets = [*PATIENT.values(), "Zyxwvut", "Qwertyuiop"]
    messages = []
    folder, study = tmp_path / "s", generate_uid()
    write_series(folder, chest, description="CHEST", study_uid=study)
    write_scout(folder, study_uid=study)
    write_series(folder / "b", chest[:7], study_uid=study)
    messages += read_volume(folder).notes
    write_series(folder / "c", chest, description="LUNG", seed=8, study_uid=study)
    for bad in (folder, tmp_path / "mr"):
        if bad.name == "mr":
            write_series(bad, chest, modality="MR")
        with pytest.raises(UnusableContentError) as error:
            read_volume(bad)
        messages.append(str(error.value))
    shutil.rmtree(folder / "c")
    paths = sorted(folder.glob("*.dcm"))
    paths[0].write_bytes(paths[0].read_bytes()[:-100])
    with pytest.raises(CorruptDataError) as error:
        read_volume(folder)
    messages.append(str(error.value))
    assert len(messages) >= 4
    messages += [record.getMessage() for record in caplog.records] + [str(w.message) for w in recwarn]
    for message in messages:
        for secret in secrets:
            assert secret.lower() not in message.lower(), message


def test_an_archive_of_countless_entries_is_refused_from_its_end_record_before_its_directory_is_read():
    """60,000 empty entries (a 6 MB upload; millions fit the body cap): zipfile would build an object for each
    before the count could be checked, so the end record's count and directory size are checked first."""
    import tracemalloc

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as out:
        for k in range(60_000):
            out.writestr(f"{k:06d}.dcm", b"")
    data = buffer.getvalue()
    tracemalloc.start()
    try:
        with pytest.raises(DataTooLargeError, match="holds 60,000 files, above the limit of 2,048"):
            read_volume(data, name="many.zip", limits=ReadLimits(max_series_files=2048))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < len(data)  # the upload's tail is read, not 60,000 ZipInfo objects (~25 MB)
    end = data.rfind(b"PK\x05\x06")
    lying = bytearray(data)
    lying[end + 8:end + 12] = (1).to_bytes(2, "little") * 2  # the end record claims one entry
    with pytest.raises(DataTooLargeError, match="directory takes"):
        read_volume(bytes(lying), name="liar.zip", limits=ReadLimits(max_series_files=2048))
