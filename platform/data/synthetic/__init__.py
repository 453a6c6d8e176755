"""Deterministic synthetic CT-RATE: the same tree, CSVs and file quirks, with volumes small enough for a laptop.

The platform must run and be tested offline, so this package writes a data set shaped like a CT-RATE download
(``layout``), with the traps of the real files: original volumes hold float raw values with the rescale only in
the metadata CSV, `_fixed` volumes hold int16 with the rescale in the header while the CSV still lists it; one
train volume has an all-NaN affine; ~5% of rows have no ZSpacing; both reconstructions of a scan share one label
row.

Volumes are drawn from a simple chest phantom in plausible Hounsfield units (``anatomy``, ``lungs``) with large
nuisance variation between healthy volumes. Each of the 18 findings (``findings``) is local and placed where it
occurs in real scans, spanning a contiguous range of slices, so a slice classifier can learn it while global
intensity statistics (a histogram) reveal little: the realism check in ``tests/test_synthetic.py``. Which
patients, scans and findings a data set holds is ``cohort``; what the scanner adds (kernel, noise, geometry,
DICOM metadata) is ``scanner``; ``generate`` puts them together, deterministically (``streams``).
"""

from ctplatform.data.synthetic.generate import SyntheticSummary, generate_dataset
from ctplatform.data.synthetic.layout import METADATA_COLUMNS
from ctplatform.data.synthetic.size import parse_size

__all__ = ["METADATA_COLUMNS", "SyntheticSummary", "generate_dataset", "parse_size"]
