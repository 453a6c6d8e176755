"""The service's upload parsing and validation, without Ray: multipart, volumes and their caps, .npy slices,
thumbnails."""

import dataclasses
import gzip
import io
import pickle
import re
import time

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from serve_payloads import MiB, gzip_bomb, npy

from ctplatform.data.readers.file_range import FileRange
from ctplatform.serve import inputs
from ctplatform.serve.inputs import (
    InputError,
    ServeLimits,
    Upload,
    decode_slices,
    decode_volume,
    parse_multipart,
    read_npy,
    uploads_from_body,
)
from ctplatform.serve.thumbnails import png_gray8, slice_thumbnail

LIMITS = ServeLimits(max_body_bytes=1 << 20, max_voxels=64 * 64 * 64, max_decompressed_bytes=64 * 64 * 64 * 2,
                     max_files=4, max_slices=8)


def chest(shape=(16, 32, 28), seed=0):
    """(slices, rows, cols) HU: air, an elliptic body with two lungs, noise."""
    z, y, x = np.indices(shape)
    hu = np.full(shape, -1000.0, np.float32)
    body = ((y - shape[1] / 2) / (shape[1] * 0.45)) ** 2 + ((x - shape[2] / 2) / (shape[2] * 0.45)) ** 2 < 1
    hu[body] = 40
    hu[body & (np.abs(x - shape[2] / 2) > 2) & (np.abs(y - shape[1] / 2) < shape[1] * 0.25)] = -850
    return hu + np.random.default_rng(seed).normal(0, 20, shape).astype(np.float32)


def nifti(hu_zyx, dtype=np.float32, zooms=None):
    img = nib.Nifti1Image(np.ascontiguousarray(hu_zyx.transpose(2, 1, 0)).astype(dtype), np.diag([0.7, 0.7, 2, 1.0]))
    if zooms is not None:
        img.header.set_zooms(zooms)
    return img.to_bytes()


def upload(data, name="v.nii.gz"):
    return Upload(name, data)


def status_of(fn, *args):
    with pytest.raises(InputError) as info:
        fn(*args)
    assert info.value.reason
    return info.value.status, info.value.reason


# ----------------------------------------------------------------------------------------------- body and multipart
def multipart(parts, boundary="XyZ"):
    body = b""
    for field, filename, data in parts:
        disposition = f'form-data; name="{field}"' + (f'; filename="{filename}"' if filename is not None else "")
        body += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + data + b"\r\n"
    return body + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def test_multipart_files_in_order_fields_skipped_names_cleaned():
    body, ctype = multipart([("files", "../../etc/a.npy", b"A" * 10), ("note", None, b"hi"), ("files", "b.npy", b"BB")])
    uploads = uploads_from_body(body, ctype, None, LIMITS)
    assert [(u.filename, u.content.read_bytes()) for u in uploads] == [("a.npy", b"A" * 10), ("b.npy", b"BB")]


@pytest.mark.parametrize("mutate, status", [
    (lambda b, c: (b[: len(b) // 2], c), 400),  # truncated: no closing boundary
    (lambda b, c: (b, "multipart/form-data"), 400),  # no boundary parameter
    (lambda b, c: (b"", c), 400),  # empty body
    (lambda b, c: (b, "application/x-www-form-urlencoded"), 415),
])
def test_multipart_errors(mutate, status):
    body, ctype = mutate(*multipart([("file", "v.nii.gz", b"x" * 100)]))
    assert status_of(uploads_from_body, body, ctype, None, LIMITS)[0] == status


def test_multipart_part_count_cap_and_no_file_part():
    body, ctype = multipart([("files", f"{i}.npy", b"x") for i in range(5)])
    assert status_of(parse_multipart, body, ctype, LIMITS)[0] == 413
    body, ctype = multipart([("note", None, b"hi")])
    assert status_of(uploads_from_body, body, ctype, None, LIMITS)[0] == 400


def test_raw_body_is_one_file():
    (only,) = uploads_from_body(b"data", "application/octet-stream", "dir/scan.nii.gz", LIMITS)
    assert only.filename == "scan.nii.gz" and only.content.read_bytes() == b"data"


@pytest.mark.parametrize("chunk", [1, 7, 61, 1 << 20])
def test_multipart_parts_of_a_spooled_body_are_windows_with_the_bytes_sent(tmp_path, monkeypatch, chunk):
    """Parts read back from a body on disk, parsed a chunk at a time, hold exactly what was sent, whatever falls on a
    chunk's edge: data that starts or ends like the boundary, a one-byte part, an empty one."""
    monkeypatch.setattr(inputs, "MULTIPART_CHUNK", chunk)
    rng = np.random.default_rng(chunk)
    tricky = [b"\r\n--XyZ" + rng.bytes(50) + b"\r\n--Xy", b"\r", b"", b"\r\n-", rng.bytes(3000) + b"\r\n--XyZ-",
              b"--XyZ\r\n" + rng.bytes(20), b"-", b"\r\n--Xy"]
    body, ctype = multipart([("files", f"{k}.bin", data) for k, data in enumerate(tricky)])
    (tmp_path / "body").write_bytes(body)
    spooled = FileRange(tmp_path / "body")
    limits = dataclasses.replace(LIMITS, max_files=16)
    uploads = uploads_from_body(spooled, ctype, None, limits)
    assert [u.content.read_bytes() for u in uploads] == tricky
    assert [u.content.read_bytes() for u in uploads_from_body(body, ctype, None, limits)] == tricky
    long_part = uploads[4].content
    assert long_part.backing == tmp_path / "body" and long_part.size == 3008  # a window of the file, not a copy


# ----------------------------------------------------------------------------------------------- volumes
def test_good_volumes_nii_gz_nii_mha(tmp_path):
    hu = chest()
    for data, name in ((gzip.compress(nifti(hu)), "a.nii.gz"), (nifti(hu, np.int16), "a.nii")):
        volume = decode_volume(upload(data, name), LIMITS)
        assert volume.shape == hu.shape and volume.spacing == pytest.approx((2.0, 0.7, 0.7))
    image = sitk.GetImageFromArray(hu.astype(np.int16))
    image.SetSpacing((0.7, 0.7, 2.0))
    sitk.WriteImage(image, str(tmp_path / "a.mha"), useCompression=True)
    volume = decode_volume(upload((tmp_path / "a.mha").read_bytes(), "a.mha"), LIMITS)
    assert volume.shape == hu.shape


def test_a_volume_in_a_spooled_multipart_body_prepares_what_its_bytes_prepare(tmp_path):
    from ctplatform.data.preprocess import PreprocessSettings

    settings = PreprocessSettings(image_size=32, num_slices=8)
    data = gzip.compress(nifti(chest(seed=4)))
    body, ctype = multipart([("note", None, b"\r\n" * 5000), ("file", "v.nii.gz", data)])
    (tmp_path / "body").write_bytes(body)
    (spooled,) = uploads_from_body(FileRange(tmp_path / "body"), ctype, None, LIMITS)
    assert isinstance(spooled.content.backing, type(tmp_path)) and spooled.content.start > 10_000
    from_file = decode_volume(spooled, LIMITS)
    from_bytes = decode_volume(upload(data), LIMITS)
    assert (from_file.shape, from_file.spacing, from_file.notes) == (from_bytes.shape, from_bytes.spacing,
                                                                     from_bytes.notes)
    for got, want in zip(from_file.prepare(settings), from_bytes.prepare(settings), strict=True):
        np.testing.assert_array_equal(got, want)


def test_header_is_read_without_inflating_the_image():
    from ctplatform.data import read_header

    data = gzip.compress(nifti(chest(), np.int16))
    declared = read_header(data, name="a.nii.gz")
    assert declared.shape == (28, 32, 16) and declared.itemsize == 2 and declared.compressed
    data = gzip_bomb((512, 512, 256), zeros=256 << 20)  # inflates to 256 MiB
    started = time.perf_counter()
    declared = read_header(data, name="bomb.nii.gz")
    assert declared.shape == (512, 512, 256) and time.perf_counter() - started < 0.5


def test_gzip_bomb_refused_from_its_header_before_inflating():
    data = gzip_bomb((512, 512, 256), zeros=64 * MiB)  # declares 64 Mi voxels; the limit is 256 Ki
    assert len(data) < 1 << 20
    started = time.perf_counter()
    status, reason = status_of(decode_volume, upload(data, "bomb.nii.gz"), LIMITS)
    assert status == 413 and "voxels" in reason and time.perf_counter() - started < 0.5


def test_decompressed_bytes_cap_separate_from_voxels():
    # 64^3 voxels is allowed, but as float64 they are 4x the 2-byte-per-voxel budget
    data = gzip_bomb((64, 64, 64), np.float64, zeros=1 << 22)
    status, reason = status_of(decode_volume, upload(data, "f64.nii.gz"), LIMITS)
    assert status == 413 and "bytes" in reason


def test_header_declaring_terabytes():
    header = nib.Nifti1Header()
    header.set_data_shape((30000, 30000, 30000))
    header.set_data_dtype(np.int16)
    data = gzip.compress(header.binaryblock + b"\x00" * 4)
    assert status_of(decode_volume, upload(data, "huge.nii.gz"), LIMITS)[0] == 413


@pytest.mark.parametrize("make, status, match", [
    (lambda: gzip.compress(nifti(chest()))[:3000], 422, "truncated|corrupt"),
    (lambda: gzip_bomb((8, 8, 4), zeros=1 << 22), 422, "constant"),  # a bomb's tail is never inflated: 256 zero voxels
    (lambda: nifti(chest(), zooms=(np.nan, 0.7, 2.0)), 422, "spacing"),
    (lambda: nib.Nifti1Image(np.zeros((16, 16), np.int16), np.eye(4)).to_bytes(), 422, "3 dimensions"),
    (lambda: nib.Nifti1Image(np.zeros((8, 8, 4), np.complex64), np.eye(4)).to_bytes(), 422, "voxel type"),
    (lambda: nifti(np.where(chest() > 0, np.nan, chest())), 422, "NaN"),
    (lambda: b"this is a text file, not a volume\n" * 3, 415, "not a NIfTI"),
    (lambda: b"", 400, "empty"),
    (lambda: (lambda b: (np.save(b, np.zeros((4, 8, 8))), b.getvalue())[1])(io.BytesIO()), 415, "npy"),
], ids=["truncated-gzip", "bomb-tail", "nan-spacing", "2d", "complex-dtype", "nan-values", "text", "empty", "npy"])
def test_bad_volumes(make, status, match):
    got, reason = status_of(decode_volume, upload(make(), "bad.nii.gz"), LIMITS)
    assert got == status and re.search(match, reason), reason


def test_unexpected_reader_failure_is_a_422(monkeypatch):
    import ctplatform.serve.inputs as inputs

    def boom(*args, **kwargs):
        raise IndexError("reader bug")

    monkeypatch.setattr(inputs, "open_for_preprocessing", boom)
    status, reason = status_of(decode_volume, upload(gzip.compress(nifti(chest())), "a.nii.gz"), LIMITS)
    assert status == 422 and "IndexError" in reason


# ----------------------------------------------------------------------------------------------- .npy slices
def test_slices_2d_and_stacks():
    hu = chest()
    slices = decode_slices([Upload("a.npy", npy(hu[3].astype(np.int16))), Upload("s.npy", npy(hu[4:7]))], LIMITS)
    assert [s.name for s in slices] == ["a.npy", "s.npy[0]", "s.npy[1]", "s.npy[2]"]
    assert all(s.hu.dtype == np.float32 and s.hu.shape == hu.shape[1:] for s in slices)
    np.testing.assert_array_equal(slices[2].hu, hu[5])


def test_normalised_values_get_a_note():
    (item,) = decode_slices([Upload("n.npy", npy(np.random.default_rng(0).random((16, 16))))], LIMITS)
    assert "normalised" in item.notes[0]


@pytest.mark.parametrize("data, status, match", [
    (npy(np.array([{"a": 1}, None], dtype=object), allow_pickle=True), 422, "pickle"),
    (pickle.dumps(np.zeros((8, 8))), 415, "pickle"),
    (b"hello world, not numpy", 415, "not a .npy"),
    (npy(np.zeros((8, 8), bool)), 422, "dtype"),
    (npy(np.zeros((8, 8), np.complex64)), 422, "dtype"),
    (npy(np.zeros(64)), 422, "2-D"),
    (npy(np.zeros((2, 2, 8, 8))), 422, "2-D"),
    (npy(np.zeros((0, 8))), 422, "empty"),
    (npy(np.full((8, 8), np.nan)), 422, "NaN"),
    (npy(np.zeros((16, 16)))[:-10], 422, "truncated"),
    (npy(np.zeros((4, 4))), 422, "size"),
    (npy(np.zeros((9, 16, 16))), 413, "more than 8"),
    (b"", 400, "empty"),
], ids=["object-pickle", "raw-pickle", "text", "bool", "complex", "1d", "4d", "empty-array", "nan", "truncated",
        "too-small", "too-many", "empty-file"])
def test_bad_slices(data, status, match):
    got, reason = status_of(decode_slices, [Upload("bad.npy", data)], LIMITS)
    assert got == status and re.search(match, reason), reason


def test_npy_never_unpickles(monkeypatch):
    monkeypatch.setattr(pickle, "loads", lambda *a, **k: pytest.fail("pickle.loads called"))
    with pytest.raises(InputError):
        read_npy(npy(np.array([object()], dtype=object), allow_pickle=True), "p.npy", LIMITS)


# ----------------------------------------------------------------------------------------------- thumbnails
def test_png_thumbnail_decodes_to_the_windowed_slice():
    from PIL import Image

    image = np.arange(12 * 20, dtype=np.uint8).reshape(12, 20)
    decoded = np.asarray(Image.open(io.BytesIO(png_gray8(image))))
    np.testing.assert_array_equal(decoded, image)
    url = slice_thumbnail(np.full((256, 256), -600, np.int16), size=64)
    assert url.startswith("data:image/png;base64,")
    import base64

    thumb = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert thumb.size == (64, 64) and np.asarray(thumb).mean() == pytest.approx(127.5, abs=1)  # lung window centre


