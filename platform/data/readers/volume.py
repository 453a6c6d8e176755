"""What a volume read returns: `Volume` in Hounsfield units, or `RawVolume` with the one rescale still to apply.

Arrays are (slices, rows, cols) in (S, A, R) order: axial slices along axis 0, inferior to superior; spacing is
(slice, row, col) = (z, y, x) in mm.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ctplatform.data.hounsfield import rescaled_to_hu


@dataclass
class Volume:
    hu: np.ndarray  # float32 (slices, rows, cols), Hounsfield units, axial slices along axis 0
    spacing: tuple[float, float, float]  # mm, (slice, row, col)
    hu_source: str  # "header", "metadata", "default-rescale" or "as-stored": where the rescale came from
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
    # HU samples already converted, by in-plane step: the reader's checks and the slice choice share one
    _samples: dict[int, np.ndarray] = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.data.shape  # type: ignore[return-value]

    def hu(self, index=slice(None)) -> np.ndarray:
        """float32 HU of `data[index]` (clipped to the CT range): all of it by default."""
        return rescaled_to_hu(self.data[index], self.slope, self.intercept)

    def hu_sample(self, step: int = 4) -> np.ndarray:
        """HU of every slice on a coarse in-plane grid: enough for body extents and lung checks. Converted once: a
        later call for the same step, or a multiple of a step already converted, takes its (strided) view of that."""
        for have, sample in self._samples.items():
            if step % have == 0:
                return sample[:, :: step // have, :: step // have]
        sample = self._samples[step] = self.hu((slice(None), slice(None, None, step), slice(None, None, step)))
        return sample

    def to_volume(self) -> Volume:
        """The whole volume in HU."""
        return Volume(hu=self.hu(), spacing=self.spacing, hu_source=self.hu_source, notes=self.notes)
