"""Preprocess a volume a z plane at a time: the HTTP service's path, in memory bounded whatever the upload declares.

`preprocess_raw_volume(read_raw_volume(...))` holds the whole stored volume: 800 MB for the 400 Mi voxels of int16
the service's default caps accept. Here a NIfTI or MetaImage volume is read as a stream of planes, twice. The first
pass (:func:`scan_volume`) keeps only what the reader's checks and the slice choice look at: the minimum of the
rescale sample, the value range, the chest check's counts and a coarse sample of every slice (1/64 of a side). The
second (:meth:`ScannedVolume.prepare`) keeps only the chosen slices, each converted to HU and resized to the
model's size as it arrives. What is held: a plane or two, the coarse sample and the chosen slices at model size.
Slices, positions, notes and errors are those of the whole-volume path (tests compare them).

A DICOM series in a `.zip` goes the same two ways (:func:`scan_series`): its members are inflated and decoded one at
a time (:func:`~ctplatform.data.readers.dicom.stream_grid`), in the first pass every slice of its grid for the
checks and the coarse sample, in the second only the chosen ones. A DICOM folder or Enhanced CT file, a multi-frame
series and a volume whose canonical order needs an axis swap (a non-axial acquisition) are read whole, as
:class:`HeldVolume`.
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
from ctplatform.data.readers.chain import VolumeSource, dicom_series, plane_stream
from ctplatform.data.readers.dicom import DicomHeader, stream_grid
from ctplatform.data.readers.orientation import canonical_flips

CHECK_STEP = 4  # RawVolume.hu_sample's in-plane step: what the blank and chest checks look at
RESIZE_BATCH = 8  # chosen planes resized together (at most RESIZE_BATCH_BYTES of float32 HU held for it)
RESIZE_BATCH_BYTES = 8 << 20  # 2 planes of 1024^2 (0.70 ms a plane resized to 224; 0.63-0.80 ms in batches of 4 or 8)


@dataclass
class HeldVolume:
    """A volume read whole (non-axial, a DICOM folder or Enhanced CT file): prepared by `preprocess_raw_volume`."""

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
        chosen = self._chosen(settings)
        with plane_stream(self.source, name=self.name, limits=self.limits) as planes:
            assert planes is not None
            for k, plane in enumerate(planes.planes):
                if chosen.add(self._index(k), plane):
                    break  # the rest of the stream is not needed
        return chosen.result()

    def _index(self, k: int) -> int:
        """The canonical slice index of stored plane `k`."""
        return self.shape[0] - 1 - k if self.flips[0] else k

    def _chosen(self, settings: PreprocessSettings) -> _ChosenSlices:
        first, last = body_extent(self.body_sample, settings, step=1)
        return _ChosenSlices(slice_positions(first, last, settings), settings, self)


class ScannedSeries(ScannedVolume):
    """A zipped DICOM series' first pass (`source` is read again, one member at a time, to prepare it)."""

    def prepare(self, settings: PreprocessSettings) -> tuple[np.ndarray, np.ndarray]:
        chosen = self._chosen(settings)
        with dicom_series(self.source, name=self.name, limits=self.limits) as series:
            assert series is not None
            header, label = series
            stream_grid(header, label, lambda g, plane: chosen.add(self._index(g), plane),
                        wanted={self._index(int(p)) for p in chosen.positions})
        return chosen.result()


class _ChosenSlices:
    """The chosen slices of a volume, converted to HU and resized to the model's size a few at a time as their planes
    arrive (in any order)."""

    def __init__(self, positions: np.ndarray, settings: PreprocessSettings, volume: ScannedVolume):
        self.positions, self.settings, self.volume = positions, settings, volume
        self.needed = set(positions.tolist())
        self.in_plane = _in_plane(volume.flips)
        # one antialiased resize per plane costs ~10x its share of a batched one
        self.batch = max(1, min(RESIZE_BATCH, RESIZE_BATCH_BYTES // (4 * volume.shape[1] * volume.shape[2])))
        self.pending: dict[int, np.ndarray] = {}
        self.resized: dict[int, np.ndarray] = {}

    def add(self, index: int, plane: np.ndarray) -> bool:
        """Take canonical slice `index` (stored values) if it is chosen; True once every chosen slice is in."""
        if index in self.needed and index not in self.pending and index not in self.resized:
            self.pending[index] = rescaled_to_hu(plane[self.in_plane], self.volume.slope, self.volume.intercept)
            if len(self.pending) == self.batch:
                self._resize_pending()
        return len(self.resized) + len(self.pending) == len(self.needed)

    def _resize_pending(self) -> None:
        resized = resize_slices(np.stack(list(self.pending.values())), self.settings.image_size)
        self.resized.update(zip(self.pending, resized, strict=True))
        self.pending.clear()

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        if self.pending:
            self._resize_pending()
        return np.stack([self.resized[int(p)] for p in self.positions]), self.positions


def open_for_preprocessing(source: VolumeSource, *, name: str | None = None,
                           limits: ReadLimits | None = None) -> ScannedVolume | HeldVolume:
    """A checked volume ready to `prepare`: scanned plane by plane where its format and orientation allow, else held
    whole. Raises the reader's DataFormatError subclasses, as `read_raw_volume` does."""
    limits = limits or ReadLimits()
    with plane_stream(source, name=name, limits=limits) as planes:
        canonical = canonical_flips(planes.header.affine) if planes is not None else None
        if planes is not None and canonical is not None:
            return scan_volume(planes, canonical, source, name, limits)
        dicom = planes is None
    if dicom:
        with dicom_series(source, name=name, limits=limits) as series:
            if series is not None and series[0].open_member is not None \
                    and streams_series(series[0].affine, all(image.frame is None for image in series[0].images)):
                return scan_series(*series, canonical_flips(series[0].affine), source, name, limits)
    return HeldVolume(read_raw_volume(source, name=name, limits=limits))


def streams_series(affine: np.ndarray | None, single_frame: bool) -> bool:
    """Whether a zipped DICOM series is scanned member by member: single-frame images on a grid whose canonical order
    needs only flips (an axial series); else it is held whole. `open_for_preprocessing` decides with it, and
    `ctplatform.data.decode_memory` reckons a series' memory with it, so the estimate follows the path taken."""
    return single_frame and canonical_flips(affine) is not None


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


def scan_series(header: DicomHeader, label: str, canonical, source: VolumeSource, name: str | None,
                limits: ReadLimits) -> ScannedSeries:
    """The first pass over a DICOM series whose grid needs only flips (`canonical`): every grid slice decoded once, for
    the checks of `read_raw_volume` and the coarse sample, and let go."""
    flips, spacing = canonical
    num_slices = header.plan.num_slices
    rows, cols = header.images[0].geometry.shape
    slope, intercept = float(header.slope or 1.0), float(header.intercept or 0.0)  # the file's own rescale
    chest_first, chest_stop = chest_slices(num_slices)
    body_step = max(1, min(rows, cols) // 64)  # preprocess_raw_volume's sample step
    in_plane = _in_plane(flips)
    # Per canonical slice (slices arrive from two decode threads, in about grid order): written once each.
    stored = np.empty((num_slices, 2))
    checked = np.empty((num_slices, 2))
    counts = np.zeros((num_slices, 2), np.int64)
    body: list[np.ndarray] = [np.empty(0)] * num_slices
    finite = np.ones(num_slices, bool)

    def emit(g: int, plane: np.ndarray) -> None:
        index = num_slices - 1 - g if flips[0] else g
        finite[index] = plane.dtype.kind != "f" or bool(np.isfinite(plane).all())
        stored[index] = plane.min(), plane.max()
        canonical_plane = plane[in_plane]
        hu = rescaled_to_hu(canonical_plane[::CHECK_STEP, ::CHECK_STEP], slope, intercept)
        checked[index] = hu.min(), hu.max()
        if chest_first <= index < chest_stop:
            counts[index] = chest_counts(hu)
        body[index] = rescaled_to_hu(canonical_plane[::body_step, ::body_step], slope, intercept)

    stream_grid(header, label, emit)
    if not finite.all():  # the whole-volume path's checks, in its order
        raise UnusableContentError(label, "image contains NaN or infinite values")
    if checked[:, 0].min() == checked[:, 1].max() and stored[:, 0].min() == stored[:, 1].max():
        raise UnusableContentError(label, "image is constant (blank)")
    if limits.require_spacing and not all(np.isfinite(s) and s > 0 for s in spacing):
        raise UnusableContentError(label, f"voxel spacing {tuple(float(s) for s in spacing)} mm is not finite and "
                                          "positive (NaN or zero pixdim in the header)")
    notes = list(header.notes) + chest_note(*(int(c) for c in counts.sum(axis=0)))
    return ScannedSeries(source, name, limits, (num_slices, rows, cols), spacing, "header", slope, intercept, flips,
                         np.stack(body), notes)
