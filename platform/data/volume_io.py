"""Read CT volumes (.nii, .nii.gz, .mha) into Hounsfield units, safely and in one canonical orientation.

One reader serves `prepare` (trusted files on disk) and the HTTP service (untrusted uploads), so it is written for
the second: the header is parsed first, the voxel count it declares is checked against a cap before anything is
decompressed, and exactly the declared number of bytes is decompressed (a gzip bomb's tail is never inflated).

Hounsfield conversion never applies a rescale twice (DESIGN.md §3): CT-RATE's original volumes store raw values
with a blank header and the rescale in the metadata CSV; the `_fixed` re-upload stores int16 with scl_slope /
scl_inter in the header, while the CSV still lists the intercept. The header wins; the CSV's rescale is applied
only when the header has none and the values are not already in HU. Read without metadata (predict, serve), raw
values (nothing below -200) get CT-RATE's rescale, x - 1024, so an original volume is never taken as HU.

Output arrays are (slices, rows, cols) = (S, A, R) order: axial slices along axis 0, reoriented from the file's
affine to RAS so that NIfTI training data and `.mha` challenge inputs (LPS, ITK) look the same to the model.
"""

from __future__ import annotations

import io
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import nibabel as nib
import numpy as np
from isal import igzip, isal_zlib
from nibabel import orientations

from ctplatform.data.errors import VolumeReadError
from ctplatform.data.metadata import DEFAULT_Z_SPACING_MM, VolumeMetadata

# 1024 x 1024 x 600: above any CT-RATE volume (at most 1024^2 x ~330 slices), far below a memory-exhausting one.
DEFAULT_MAX_VOXELS = 1024 * 1024 * 600
HU_MIN, HU_MAX = -1024, 3071  # the 12-bit CT range; everything is clipped to it
# Raw scanner values with no rescale anywhere (a CT-RATE original volume read without its metadata CSV: predict,
# serve) get CT-RATE's metadata rescale, the DICOM CT convention: HU = 1 * x - 1024.
RAW_RESCALE_SLOPE, RAW_RESCALE_INTERCEPT = 1.0, -1024.0
_GZIP_MAGIC = b"\x1f\x8b"
_MHA_TYPES = {
    "MET_CHAR": np.int8, "MET_UCHAR": np.uint8, "MET_SHORT": np.int16, "MET_USHORT": np.uint16,
    "MET_INT": np.int32, "MET_UINT": np.uint32, "MET_FLOAT": np.float32, "MET_DOUBLE": np.float64,
}
_MAX_MHA_HEADER = 64 * 1024


@dataclass
class Volume:
    hu: np.ndarray  # float32 (slices, rows, cols), Hounsfield units, axial slices along axis 0
    spacing: tuple[float, float, float]  # mm, (slice, row, col)
    hu_source: str  # "header", "metadata" or "as-stored": where the rescale came from
    notes: list[str] = field(default_factory=list)  # problems found and handled (NaN affine, non-axial, ...)


@dataclass
class RawVolume:
    """A checked volume in stored values, canonically oriented, with the one rescale to HU not yet applied.

    `prepare` converts only the slices it keeps (`hu(positions)`), which saves converting whole volumes."""

    data: np.ndarray  # stored values (slices, rows, cols), (S, A, R) order; may be a strided view
    slope: float
    intercept: float
    spacing: tuple[float, float, float]
    hu_source: str
    notes: list[str] = field(default_factory=list)

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.data.shape  # type: ignore[return-value]

    def hu(self, index=slice(None)) -> np.ndarray:
        """float32 HU of `data[index]` (clipped to the CT range): all of it by default."""
        return _rescaled(self.data[index], self.slope, self.intercept)

    def hu_sample(self, step: int = 4) -> np.ndarray:
        """HU of every slice on a coarse in-plane grid: enough for body extents and lung checks."""
        return self.hu((slice(None), slice(None, None, step), slice(None, None, step)))


@dataclass
class _Raw:
    data: np.ndarray  # (slices, rows, cols) in the file's voxel order
    affine: np.ndarray | None  # 4x4 voxel -> RAS mm
    zooms: tuple[float, float, float]  # voxel sizes along file axes x, y, z
    slope: float | None
    intercept: float | None


def read_volume(
    source: str | Path | bytes,
    *,
    name: str | None = None,
    metadata: VolumeMetadata | None = None,
    max_voxels: int = DEFAULT_MAX_VOXELS,
) -> Volume:
    """Read a volume from a path or from the bytes of an upload (`name` then gives the file name), in HU."""
    raw = read_raw_volume(source, name=name, metadata=metadata, max_voxels=max_voxels)
    return Volume(hu=raw.hu(), spacing=raw.spacing, hu_source=raw.hu_source, notes=raw.notes)


def read_raw_volume(
    source: str | Path | bytes,
    *,
    name: str | None = None,
    metadata: VolumeMetadata | None = None,
    max_voxels: int = DEFAULT_MAX_VOXELS,
) -> RawVolume:
    """As `read_volume`, with the HU conversion left to the caller (`RawVolume.hu`)."""
    label = str(name if name is not None else source if not isinstance(source, bytes) else "<upload>")
    if isinstance(source, bytes):
        if not source:
            raise VolumeReadError(label, "empty file")
        raw = _read_any(io.BytesIO(source), label, max_voxels)
    else:
        path = Path(source)
        if not path.is_file():
            raise VolumeReadError(path, "file not found")
        with open(path, "rb") as handle:
            raw = _read_any(handle, label, max_voxels)
    return _to_volume(raw, metadata, label)


def _read_any(handle: BinaryIO, label: str, max_voxels: int) -> _Raw:
    head = handle.read(4)
    handle.seek(0)
    if len(head) < 4:
        raise VolumeReadError(label, "empty or truncated file")
    if head[:2] == _GZIP_MAGIC:
        # ISA-L's inflate (python-isal) is ~2x zlib's on CT volumes, and reads as GzipFile does: only what is
        # asked for is inflated, so the header check below still comes before any image data.
        return _read_nifti(igzip.GzipFile(fileobj=handle, mode="rb"), label, max_voxels)
    if head in (b"\x5c\x01\x00\x00", b"\x00\x00\x01\x5c", b"\x1c\x02\x00\x00", b"\x00\x00\x02\x1c"):
        return _read_nifti(handle, label, max_voxels)  # sizeof_hdr 348 (NIfTI-1) or 540 (NIfTI-2)
    if label.lower().endswith(".mha") or head[:4].lower() in (b"obje", b"ndim"):
        return _read_mha(handle, label, max_voxels)
    raise VolumeReadError(label, "not a NIfTI (.nii, .nii.gz) or MetaImage (.mha) file")


def _read_exact(stream: BinaryIO, count: int, label: str) -> bytes:
    try:
        data = stream.read(count)
    except (EOFError, OSError, zlib.error, isal_zlib.error) as exc:  # truncated or corrupt gzip stream
        raise VolumeReadError(label, f"corrupt or truncated compressed data ({exc})") from exc
    if len(data) != count:
        raise VolumeReadError(label, f"truncated: expected {count} bytes of image data, got {len(data)}")
    return data


def _check_shape(shape: tuple[int, ...], label: str, max_voxels: int) -> tuple[int, int, int]:
    dims = tuple(int(d) for d in shape)
    while len(dims) > 3 and dims[-1] == 1:
        dims = dims[:-1]
    if len(dims) != 3:
        raise VolumeReadError(label, f"a CT volume needs 3 dimensions, this image has shape {dims}")
    if min(dims) < 1:
        raise VolumeReadError(label, f"empty image (shape {dims})")
    voxels = dims[0] * dims[1] * dims[2]
    if voxels > max_voxels:
        raise VolumeReadError(label, f"image declares {voxels:,} voxels {dims}, above the limit of {max_voxels:,}")
    return dims  # type: ignore[return-value]


def _read_nifti(stream: BinaryIO, label: str, max_voxels: int) -> _Raw:
    first = _read_exact(stream, 4, label)
    sizeof = int.from_bytes(first, "little")
    if sizeof not in (348, 540):
        sizeof = int.from_bytes(first, "big")
    header_class = nib.Nifti1Header if sizeof == 348 else nib.Nifti2Header
    if sizeof not in (348, 540):
        raise VolumeReadError(label, "not a NIfTI file (bad header size)")
    header_bytes = first + _read_exact(stream, sizeof - 4, label)
    try:
        header = header_class.from_fileobj(io.BytesIO(header_bytes), check=True)
        dtype = header.get_data_dtype()
    except Exception as exc:  # nibabel raises several types for a malformed header
        raise VolumeReadError(label, f"malformed NIfTI header ({exc})") from exc
    if dtype.fields is not None or dtype.kind not in "iuf":
        raise VolumeReadError(label, f"unsupported voxel type {dtype}")
    dims = _check_shape(header.get_data_shape(), label, max_voxels)
    offset = int(header.get_data_offset())
    if offset < sizeof:
        offset = sizeof + 4 if sizeof == 348 else sizeof  # NIfTI-1 single file: data after the 4 extension bytes
    _read_exact(stream, offset - sizeof, label)  # extensions: skipped, never interpreted
    count = dims[0] * dims[1] * dims[2]
    data = np.frombuffer(_read_exact(stream, count * dtype.itemsize, label), dtype=dtype)
    # NIfTI stores x fastest (Fortran order): the C-order reshape of (z, y, x) is the same memory.
    data = data.reshape(dims[2], dims[1], dims[0])
    slope, intercept = header.get_slope_inter()
    affine = header.get_best_affine() if header.get_sform(coded=True)[1] or header.get_qform(coded=True)[1] else None
    zooms = tuple(float(z) for z in header.get_zooms()[:3])
    return _Raw(data, affine, zooms, slope, intercept)  # type: ignore[arg-type]


def _read_mha(stream: BinaryIO, label: str, max_voxels: int) -> _Raw:
    fields: dict[str, str] = {}
    consumed = 0
    while True:
        line = stream.readline(_MAX_MHA_HEADER)
        consumed += len(line)
        if not line or consumed > _MAX_MHA_HEADER:
            raise VolumeReadError(label, "MetaImage header has no ElementDataFile line")
        key, sep, value = line.decode("latin-1").partition("=")
        if not sep:
            raise VolumeReadError(label, f"malformed MetaImage header line {line[:60]!r}")
        key, value = key.strip(), value.strip()
        fields[key] = value
        if key == "ElementDataFile":
            break
    if fields["ElementDataFile"] != "LOCAL":
        raise VolumeReadError(label, "MetaImage with an external data file is not supported; use a single .mha")
    try:
        dims_xyz = [int(v) for v in fields.get("DimSize", "").split()]
        if int(fields.get("ElementNumberOfChannels", "1")) != 1:
            raise VolumeReadError(label, "multi-channel MetaImage: a CT volume has one channel")
        element = fields.get("ElementType", "")
        if element not in _MHA_TYPES:
            raise VolumeReadError(label, f"unsupported MetaImage ElementType {element!r}")
        dtype = np.dtype(_MHA_TYPES[element])
        big_endian = (fields.get("ElementByteOrderMSB") or fields.get("BinaryDataByteOrderMSB", "False")) == "True"
        dtype = dtype.newbyteorder(">" if big_endian else "<")
        spacing = [float(v) for v in fields.get("ElementSpacing", fields.get("ElementSize", "1 1 1")).split()]
        origin = [float(v) for v in fields.get("Offset", fields.get("Origin", "0 0 0")).split()]
        matrix = [float(v) for v in fields.get("TransformMatrix", "1 0 0 0 1 0 0 0 1").split()]
    except ValueError as exc:
        raise VolumeReadError(label, f"malformed MetaImage header ({exc})") from exc
    dims = _check_shape(tuple(dims_xyz), label, max_voxels)
    if len(spacing) < 3 or len(origin) < 3 or len(matrix) < 9:
        raise VolumeReadError(label, "MetaImage header lacks 3-D spacing, offset or TransformMatrix")
    count = dims[0] * dims[1] * dims[2]
    nbytes = count * dtype.itemsize
    if fields.get("CompressedData", "False") == "True":
        payload = _inflate_capped(stream, nbytes, label)
    else:
        payload = _read_exact(stream, nbytes, label)
    data = np.frombuffer(payload, dtype=dtype).reshape(dims[2], dims[1], dims[0])
    # MetaIO's TransformMatrix lists the direction cosines of each voxel axis in turn (ITK's direction matrix,
    # transposed); ITK's world is LPS, NIfTI's is RAS: flip x and y.
    direction = np.array(matrix[:9], dtype=np.float64).reshape(3, 3).T
    affine = np.eye(4)
    lps_to_ras = np.diag([-1.0, -1.0, 1.0])
    affine[:3, :3] = lps_to_ras @ direction @ np.diag(spacing[:3])
    affine[:3, 3] = lps_to_ras @ np.asarray(origin[:3])
    return _Raw(data, affine, (spacing[0], spacing[1], spacing[2]), None, None)


def _inflate_capped(stream: BinaryIO, nbytes: int, label: str) -> bytes:
    """Inflate a zlib/gzip stream to exactly `nbytes`, never producing more (bomb-safe)."""
    inflater = zlib.decompressobj(wbits=47)  # 32 + 15: accept zlib or gzip headers
    chunks: list[bytes] = []
    produced = 0
    try:
        while produced < nbytes:
            pending = inflater.unconsumed_tail or stream.read(1 << 20)
            if not pending:
                break
            out = inflater.decompress(pending, nbytes - produced)
            chunks.append(out)
            produced += len(out)
            if inflater.eof:
                break
    except zlib.error as exc:
        raise VolumeReadError(label, f"corrupt compressed data ({exc})") from exc
    if produced != nbytes:
        raise VolumeReadError(label, f"truncated: expected {nbytes} bytes of image data, got {produced}")
    return b"".join(chunks)


def hounsfield_rescale(
    data: np.ndarray,
    header_slope: float | None,
    header_intercept: float | None,
    metadata: VolumeMetadata | None,
) -> tuple[float, float, str, list[str]]:
    """Decide the one rescale that turns stored values into HU: (slope, intercept, source, notes)."""
    notes: list[str] = []
    header_scaled = header_slope is not None and (header_slope, header_intercept or 0.0) != (1.0, 0.0)
    if header_scaled:
        if metadata is not None and metadata.has_rescale and metadata.rescale_intercept != 0:
            notes.append("the header's scl_slope/scl_inter already give HU: the metadata CSV's rescale was not applied")
        return float(header_slope), float(header_intercept or 0.0), "header", notes
    # Air is about -1000 HU; raw scanner values are non-negative. A minimum far below zero means HU already. A
    # strided sample decides it (air fills every CT's corners), saving a full pass over the volume.
    already_hu = float(data[::2, ::4, ::4].min()) < -200.0
    if metadata is not None and metadata.has_rescale:
        if already_hu and (metadata.rescale_intercept or 0.0) < -200.0:
            notes.append("values are already in HU: the metadata CSV's rescale was not applied a second time")
            return 1.0, 0.0, "as-stored", notes
        return float(metadata.rescale_slope), float(metadata.rescale_intercept), "metadata", notes
    if not already_hu:
        # A chest CT in HU has air at -1000; stored values with nothing below -200 are raw scanner values. Taking
        # them as HU would shift the whole volume by +1024 (lungs read as soft tissue) and predict on garbage.
        notes.append(f"no rescale in the header or metadata and no negative values: raw scanner values, HU = "
                     f"{RAW_RESCALE_SLOPE:g} * x {RAW_RESCALE_INTERCEPT:+g} assumed (CT-RATE's rescale; give the "
                     "metadata CSV if this scanner's differs)")
        return RAW_RESCALE_SLOPE, RAW_RESCALE_INTERCEPT, "default-rescale", notes
    return 1.0, 0.0, "as-stored", notes


def to_hounsfield(data, header_slope, header_intercept, metadata) -> tuple[np.ndarray, str, list[str]]:
    """Stored values -> (HU float32 clipped to the CT range, source, notes), applying exactly one rescale."""
    slope, intercept, source, notes = hounsfield_rescale(data, header_slope, header_intercept, metadata)
    return _rescaled(data, slope, intercept), source, notes


def _rescaled(data: np.ndarray, slope: float, intercept: float) -> np.ndarray:
    """float32 copy of slope * data + intercept, clipped to the CT range, in as few passes as numpy allows."""
    hu = data.astype(np.float32, copy=True)
    if slope != 1.0:
        np.multiply(hu, np.float32(slope), out=hu)
    if intercept != 0.0:
        np.add(hu, np.float32(intercept), out=hu)
    return np.clip(hu, HU_MIN, HU_MAX, out=hu)


def _canonical(data: np.ndarray, affine: np.ndarray | None, zooms, label: str, notes: list[str]):
    """Reorient (slices, rows, cols) data to (S, A, R); returns (data, spacing (slice,row,col))."""
    spacing_xyz = list(zooms)
    if affine is None or not np.all(np.isfinite(affine)):
        notes.append("affine is missing or NaN: orientation unknown, stored axis order taken as axial")
        return data, (spacing_xyz[2], spacing_xyz[1], spacing_xyz[0])
    ornt = orientations.io_orientation(affine)
    if np.isnan(ornt).any():
        notes.append("affine is degenerate: orientation unknown, stored axis order taken as axial")
        return data, (spacing_xyz[2], spacing_xyz[1], spacing_xyz[0])
    if int(ornt[2, 0]) != 2:
        axis = "LR" if int(ornt[2, 0]) == 0 else "AP"
        notes.append(f"non-axial acquisition (slices along the {axis} axis): reoriented to axial")
    transform = orientations.ornt_transform(ornt, orientations.axcodes2ornt(("R", "A", "S")))
    xyz = orientations.apply_orientation(data.transpose(2, 1, 0), transform)
    voxel_sizes = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    reordered = [float(voxel_sizes[int(np.flatnonzero(transform[:, 0] == k)[0])]) for k in range(3)]
    return xyz.transpose(2, 1, 0), (reordered[2], reordered[1], reordered[0])


def _to_volume(raw: _Raw, metadata: VolumeMetadata | None, label: str) -> RawVolume:
    if raw.data.dtype.kind == "f" and not np.isfinite(raw.data).all():
        raise VolumeReadError(label, "image contains NaN or infinite values")
    slope, intercept, source, notes = hounsfield_rescale(raw.data, raw.slope, raw.intercept, metadata)
    data, spacing = _canonical(raw.data, raw.affine, raw.zooms, label, notes)
    if metadata is not None:
        if metadata.z_spacing is not None:
            spacing = (metadata.z_spacing, spacing[1], spacing[2])
        elif not spacing[0] > 0:
            notes.append(f"ZSpacing missing in metadata and header: assuming {DEFAULT_Z_SPACING_MM} mm")
            spacing = (DEFAULT_Z_SPACING_MM, spacing[1], spacing[2])
    volume = RawVolume(data, slope, intercept, spacing, source, notes)
    sample = volume.hu_sample()
    if float(sample.max()) == float(sample.min()) and float(data.max()) == float(data.min()):
        raise VolumeReadError(label, "image is constant (blank)")
    notes.extend(chest_check(sample, step=1))
    return volume


def chest_check(hu: np.ndarray, step: int = 4) -> list[str]:
    """Flag volumes that do not look like a chest CT (head CTs are in CT-RATE): no lung field found."""
    sample = hu[hu.shape[0] // 4 : max(hu.shape[0] * 3 // 4, hu.shape[0] // 4 + 1), ::step, ::step]
    body = sample > -500
    lung = (sample > -950) & (sample < -600)
    inside = body.sum() + lung.sum()
    if inside == 0 or lung.sum() / inside < 0.03:
        return ["no lung field found: not a chest CT (head CT?)"]
    return []


NON_CHEST_NOTE = "no lung field found"
