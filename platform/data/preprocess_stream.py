"""Preprocess a volume a z plane at a time: the HTTP service's path, in memory bounded whatever the upload declares.

`preprocess_raw_volume(read_raw_volume(...))` holds the whole stored volume: 800 MB for the 400 Mi voxels of int16
the service's default caps accept. Here a NIfTI or MetaImage volume is read as a stream of planes, twice. The first
pass (:func:`scan_volume`) keeps only what the reader's checks and the slice choice look at: the minimum of the
rescale sample, the value range, the chest check's counts and a coarse sample of every slice (1/64 of a side). The
second (:meth:`ScannedVolume.prepare`) keeps only the chosen slices, each converted to HU and resized to the
model's size as it arrives. What is held: a plane or two, the coarse sample and the chosen slices at model size.
Slices, positions, notes and errors are those of the whole-volume path (tests compare them).

A DICOM series (separate files, already decoded one by one) and a volume whose canonical order needs an axis swap
(a non-axial acquisition) are read whole, as :class:`HeldVolume`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ctplatform.data import RawVolume, ReadLimits, read_raw_volume
from ctplatform.data.errors import UnusableContentError
from ctplatform.data.hounsfield import (
    chest_counts,
    chest_note,
    chest_slices,
    hounsfield_rescale,
    rescale_sample,
    rescaled_to_hu,
)
from ctplatform.data.preprocess import (
    PreprocessSettings,
    body_extent,
    preprocess_raw_volume,
    resize_slices,
    slice_positions,
)
from ctplatform.data.readers.chain import VolumeSource, plane_stream
from ctplatform.data.readers.orientation import canonical_flips

CHECK_STEP = 4  # RawVolume.hu_sample's in-plane step: what the blank and chest checks look at
RESIZE_BATCH = 8  # chosen planes resized together (at most RESIZE_BATCH_BYTES of float32 HU held for it)
RESIZE_BATCH_BYTES = 32 << 20


@dataclass
class HeldVolume:
    """A volume read whole (DICOM, non-axial): prepared by `preprocess_raw_volume`."""

    volume: RawVolume

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.volume.shape

    @property
    def spacing(self) -> tuple[float, float, float]:
        return self.volume.spacing

    @property
    def hu_source(self) -> str:
        return self.volume.hu_source

    @property
    def notes(self) -> list[str]:
        return self.volume.notes

    def prepare(self, settings: PreprocessSettings) -> tuple[np.ndarray, np.ndarray]:
        return preprocess_raw_volume(self.volume, settings)


@dataclass
class ScannedVolume:
    """What the first pass found: enough to report on the volume and to choose its slices, not its voxels."""

    source: VolumeSource
    name: str | None
    limits: ReadLimits
    shape: tuple[int, int, int]  # canonical (slices, rows, cols)
    spacing: tuple[float, float, float]
    hu_source: str
    slope: float
    intercept: float
    flips: tuple[bool, bool, bool]  # stored (z, y, x) -> canonical
    body_sample: np.ndarray  # HU of every slice on a coarse in-plane grid, canonical order
    notes: list[str] = field(default_factory=list)

    def prepare(self, settings: PreprocessSettings) -> tuple[np.ndarray, np.ndarray]:
        """(K, S, S) int16 HU slices and their positions: `preprocess_raw_volume`'s result, from a second pass that
        keeps only the chosen planes."""
        first, last = body_extent(self.body_sample, settings, step=1)
        positions = slice_positions(first, last, settings)
        wanted: dict[int, np.ndarray] = {}
        needed = set(positions.tolist())
        in_plane = _in_plane(self.flips)
        # resized a few planes at a time: one antialiased resize per plane costs ~10x its share of a batched one
        batch = max(1, min(RESIZE_BATCH, RESIZE_BATCH_BYTES // (4 * self.shape[1] * self.shape[2])))
        pending: dict[int, np.ndarray] = {}

        def resize_pending() -> None:
            resized = resize_slices(np.stack(list(pending.values())), settings.image_size)
            wanted.update(zip(pending, resized, strict=True))
            pending.clear()

        with plane_stream(self.source, name=self.name, limits=self.limits) as planes:
            assert planes is not None
            for k, plane in enumerate(planes.planes):
                index = self.shape[0] - 1 - k if self.flips[0] else k
                if index in needed:
                    pending[index] = rescaled_to_hu(plane[in_plane], self.slope, self.intercept)
                    if len(pending) == batch:
                        resize_pending()
                    if len(wanted) + len(pending) == len(needed):
                        break  # the rest of the stream is not needed
        if pending:
            resize_pending()
        return np.stack([wanted[int(p)] for p in positions]), positions


def open_for_preprocessing(source: VolumeSource, *, name: str | None = None,
                           limits: ReadLimits | None = None) -> ScannedVolume | HeldVolume:
    """A checked volume ready to `prepare`: scanned plane by plane where its format and orientation allow, else held
    whole. Raises the reader's DataFormatError subclasses, as `read_raw_volume` does."""
    limits = limits or ReadLimits()
    with plane_stream(source, name=name, limits=limits) as planes:
        canonical = canonical_flips(planes.header.affine) if planes is not None else None
        if planes is not None and canonical is not None:
            return scan_volume(planes, canonical, source, name, limits)
    return HeldVolume(read_raw_volume(source, name=name, limits=limits))


def scan_volume(planes, canonical, source: VolumeSource, name: str | None, limits: ReadLimits) -> ScannedVolume:
    """The first pass over a :class:`~ctplatform.data.readers.chain.PlaneStream` whose canonical order is `canonical`
    (flips, spacing): the checks of `read_raw_volume` and the coarse sample, one plane at a time."""
    header, label = planes.header, planes.label
    flips, spacing = canonical
    num_slices, rows, cols = planes.dims[2], planes.dims[1], planes.dims[0]
    # The rescale depends on the whole volume (its rescale sample's minimum); the checks' statistics are kept for
    # each rescale it can turn out to be, and the one it is picked at the end.
    candidates = {hounsfield_rescale(sample_min, header.slope, header.intercept, None)[:2] for sample_min in (-1e4, 0)}
    chest_first, chest_stop = chest_slices(num_slices)
    body_step = max(1, min(rows, cols) // 64)  # preprocess_raw_volume's sample step
    in_plane = _in_plane(flips)
    sample_min = np.inf
    stored_min, stored_max = np.inf, -np.inf
    check_range = {c: [np.inf, -np.inf] for c in candidates}
    counts = {c: [0, 0] for c in candidates}
    body: list[np.ndarray] = [np.empty(0)] * num_slices
    for k, plane in enumerate(planes.planes):
        if plane.dtype.kind == "f" and not np.isfinite(plane).all():
            raise UnusableContentError(label, "image contains NaN or infinite values")
        if k % 2 == 0:
            sample_min = min(sample_min, float(rescale_sample(plane[None]).min()))
        stored_min, stored_max = min(stored_min, float(plane.min())), max(stored_max, float(plane.max()))
        index = num_slices - 1 - k if flips[0] else k
        canonical_plane = plane[in_plane]
        checked = canonical_plane[::CHECK_STEP, ::CHECK_STEP]
        for candidate in candidates:
            hu = rescaled_to_hu(checked, *candidate)
            bounds = check_range[candidate]
            bounds[0], bounds[1] = min(bounds[0], float(hu.min())), max(bounds[1], float(hu.max()))
            if chest_first <= index < chest_stop:
                body_count, lung_count = chest_counts(hu)
                counts[candidate][0] += body_count
                counts[candidate][1] += lung_count
        body[index] = canonical_plane[::body_step, ::body_step].copy()
    slope, intercept, hu_source, notes = hounsfield_rescale(sample_min, header.slope, header.intercept, None)
    chosen = (slope, intercept)
    if check_range[chosen][0] == check_range[chosen][1] and stored_min == stored_max:
        raise UnusableContentError(label, "image is constant (blank)")
    if limits.require_spacing and not all(np.isfinite(s) and s > 0 for s in spacing):
        raise UnusableContentError(label, f"voxel spacing {tuple(float(s) for s in spacing)} mm is not finite and "
                                          "positive (NaN or zero pixdim in the header)")
    notes.extend(chest_note(*counts[chosen]))
    body_sample = rescaled_to_hu(np.stack(body), slope, intercept)
    return ScannedVolume(source, name, limits, (num_slices, rows, cols), spacing, hu_source, slope, intercept, flips,
                         body_sample, notes)


def _in_plane(flips: tuple[bool, bool, bool]) -> tuple[slice, slice]:
    return slice(None, None, -1 if flips[1] else 1), slice(None, None, -1 if flips[2] else 1)
