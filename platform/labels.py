"""The one ordered list of CT-RATE (VLM3D Task 2) abnormality classes.

Every array with a class axis in this project is in this order. Sources whose columns come in another order
(the original guide lists the same 18 names differently) are aligned onto it by name, never by position:
see :func:`ctplatform.data.labels_csv.read_labels_csv`.
"""

from __future__ import annotations

from pathlib import PurePath

# Order of CT-RATE's `multi_abnormality_labels/*_predicted_labels.csv` header (after VolumeName).
CLASS_NAMES: tuple[str, ...] = (
    "Medical material",
    "Arterial wall calcification",
    "Cardiomegaly",
    "Pericardial effusion",
    "Coronary artery wall calcification",
    "Hiatal hernia",
    "Lymphadenopathy",
    "Emphysema",
    "Atelectasis",
    "Lung nodule",
    "Lung opacity",
    "Pulmonary fibrotic sequela",
    "Pleural effusion",
    "Mosaic attenuation pattern",
    "Peribronchial thickening",
    "Consolidation",
    "Bronchiectasis",
    "Interlobular septal thickening",
)
NUM_CLASSES = len(CLASS_NAMES)
VOLUME_COLUMN = "VolumeName"

# Validation-set prevalence published with CT-RATE (n=3,039), used by the synthetic data generator.
VALID_PREVALENCE: dict[str, float] = {
    "Medical material": 0.103,
    "Arterial wall calcification": 0.285,
    "Cardiomegaly": 0.107,
    "Pericardial effusion": 0.074,
    "Coronary artery wall calcification": 0.252,
    "Hiatal hernia": 0.137,
    "Lymphadenopathy": 0.260,
    "Emphysema": 0.197,
    "Atelectasis": 0.235,
    "Lung nodule": 0.448,
    "Lung opacity": 0.390,
    "Pulmonary fibrotic sequela": 0.273,
    "Pleural effusion": 0.124,
    "Mosaic attenuation pattern": 0.083,
    "Peribronchial thickening": 0.117,
    "Consolidation": 0.191,
    "Bronchiectasis": 0.109,
    "Interlobular septal thickening": 0.082,
}


VOLUME_EXTENSIONS = (".nii.gz", ".nii", ".mha", ".npy", ".zip", ".dcm")  # .zip: a DICOM series; .dcm: Enhanced CT


def volume_stem(volume_name: str) -> str:
    """`train_1_a_1.nii.gz` -> `train_1_a_1` (also `.nii`, `.mha`, `.npy`, `.zip`, `.dcm`; a DICOM series folder is
    its own name): the key that matches a case across
    label CSVs, metadata, predictions and the challenge's results.json (which names cases without extension)."""
    name = PurePath(str(volume_name)).name
    for suffix in VOLUME_EXTENSIONS:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name
