"""Hounsfield units: the one rescale from stored values to HU, the CT range, and the HU check for a chest CT.

A rescale is never applied twice: CT-RATE's original volumes store raw values with a blank header and the rescale
in the metadata CSV; the `_fixed` re-upload stores int16 with scl_slope / scl_inter in the header, while the CSV
still lists the intercept. The header wins; the CSV's rescale is applied only when the header has none and the
values are not already in HU. Read without metadata (predict, serve), raw values (nothing below -200) get
CT-RATE's rescale, x - 1024, so an original volume is never taken as HU.
"""

from __future__ import annotations

import numpy as np

from ctplatform.data.metadata import VolumeMetadata

HU_MIN, HU_MAX = -1024, 3071  # the 12-bit CT range; everything is clipped to it
# Raw scanner values with no rescale anywhere (a CT-RATE original volume read without its metadata CSV: predict,
# serve) get CT-RATE's metadata rescale, the DICOM CT convention: HU = 1 * x - 1024.
RAW_RESCALE_SLOPE, RAW_RESCALE_INTERCEPT = 1.0, -1024.0
NON_CHEST_NOTE = "no lung field found"
HU_BLOCK_SLICES = 8  # slices converted to HU at a time: 8 x 512 x 512 float32 (8 MiB) stays in a large cache


def rescale_sample(data: np.ndarray) -> np.ndarray:
    """The strided sample of stored (z, y, x) values whose minimum `hounsfield_rescale` looks at: air fills every
    CT's corners, so it sees air without a full pass over the volume."""
    return data[::2, ::4, ::4]


def hounsfield_rescale(
    sample_min: float,
    header_slope: float | None,
    header_intercept: float | None,
    metadata: VolumeMetadata | None,
) -> tuple[float, float, str, list[str]]:
    """Decide the one rescale that turns stored values into HU: (slope, intercept, source, notes). `sample_min` is
    the minimum of `rescale_sample(data)`."""
    notes: list[str] = []
    header_scaled = header_slope is not None and (header_slope, header_intercept or 0.0) != (1.0, 0.0)
    if header_scaled:
        if metadata is not None and metadata.has_rescale and metadata.rescale_intercept != 0:
            notes.append("the header's scl_slope/scl_inter already give HU: the metadata CSV's rescale was not applied")
        return float(header_slope), float(header_intercept or 0.0), "header", notes
    # Air is about -1000 HU; raw scanner values are non-negative. A minimum far below zero means HU already.
    already_hu = sample_min < -200.0
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


def rescaled_to_hu(data: np.ndarray, slope: float, intercept: float, out: np.ndarray | None = None) -> np.ndarray:
    """float32 copy of slope * data + intercept, clipped to the CT range (into `out` when given).

    Converted a few slices at a time, so each block is cast, scaled and clipped while it is still in cache: the same
    values as whole-array passes, with fewer trips through memory on a large volume."""
    hu = np.empty(data.shape, dtype=np.float32) if out is None else out
    blocks = [slice(k, k + HU_BLOCK_SLICES) for k in range(0, len(data), HU_BLOCK_SLICES)] if data.ndim == 3 else [...]
    # Stored types that float32 holds exactly (CT's int16 and uint16, float32) are cast inside the first operation
    # (one pass less, the same float32 arithmetic); others (float64, int32) are first rounded to float32 as before.
    exact = np.can_cast(data.dtype, np.float32, "safe")
    for block in blocks:
        part = hu[block]
        if exact:
            source = data[block]
        else:
            np.copyto(part, data[block], casting="unsafe")
            source = part
        if slope != 1.0:
            source = np.multiply(source, np.float32(slope), out=part, casting="unsafe")
        if intercept != 0.0:
            source = np.add(source, np.float32(intercept), out=part, casting="unsafe")
        if source is not part:
            np.copyto(part, source, casting="unsafe")
        np.clip(part, HU_MIN, HU_MAX, out=part)
    return hu


def chest_check(hu: np.ndarray, step: int = 4) -> list[str]:
    """Flag volumes that do not look like a chest CT (head CTs are in CT-RATE): no lung field found."""
    first, stop = chest_slices(len(hu))
    return chest_note(*chest_counts(hu[first:stop, ::step, ::step]))


def chest_slices(num_slices: int) -> tuple[int, int]:
    """The slices [first, stop) the chest check looks at: the middle half of the volume."""
    return num_slices // 4, max(num_slices * 3 // 4, num_slices // 4 + 1)


def chest_counts(hu: np.ndarray) -> tuple[int, int]:
    """(body, lung) voxel counts of an HU sample: additive, so a volume read plane by plane sums them."""
    return int((hu > -500).sum()), int(((hu > -950) & (hu < -600)).sum())


def chest_note(body: int, lung: int) -> list[str]:
    inside = body + lung
    if inside == 0 or lung / inside < 0.03:
        return [f"{NON_CHEST_NOTE}: not a chest CT (head CT?)"]
    return []
