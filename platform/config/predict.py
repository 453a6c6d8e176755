"""Prediction, evaluation and scoring settings: what a trained model is asked and where answers go."""

from __future__ import annotations

from dataclasses import dataclass

from ctplatform.config.options import option
from ctplatform.storage import user_paths

MODES = ("train", "evaluate", "both", "predict")
PREDICT_TYPES = ("slices", "volumes")


@dataclass
class ModeConfig:
    """Mode"""

    mode: str = option("both", "train, evaluate (the validation split), both, or predict files", choices=MODES)


@dataclass
class ModelSourceConfig:
    """Model to evaluate or predict with"""

    checkpoint: str | None = option(None, "bundle folder or Lightning checkpoint (default: this run's best)",
                                       path="read")


@dataclass
class EvaluateConfig(ModelSourceConfig):
    """Evaluation"""

    report_dir: str | None = option(None, "evaluation report folder (default <run>/report)", path="write")
    subgroup_metadata: str | None = option(None, "CT-RATE metadata CSV of the evaluated split (PatientSex, PatientAge, "
                                                 "Manufacturer): adds metrics per sex, age band and scanner maker "
                                                 "to the report", metavar="CSV", path="read")
    bootstrap_resamples: int = option(1000, "patient-bootstrap resamples for the report's 95%% confidence intervals "
                                            "(0: none)")
    bootstrap_seed: int = option(0, "seed of the bootstrap resamples (recorded in metrics.json)")
    min_group_patients: int = option(30, "subgroups with fewer patients are reported as too small")


@dataclass
class PredictConfig(ModelSourceConfig):
    """Prediction"""

    predict_input: list[str] = option(default_factory=list, help="files to predict (volumes: .nii, .nii.gz, .mha, a "
                                      "DICOM series folder or .zip, an Enhanced CT .dcm)", metavar="FILE",
                                      path="read", parse=user_paths)
    predict_type: str = option("slices", "what the files are: .npy slices or volumes", choices=PREDICT_TYPES)
    predict_metadata: str | None = option(None, "CT-RATE metadata CSV giving each volume's rescale (default: the "
                                                "header's, else x - 1024)", metavar="CSV",
                                                path="read")
    output: str | None = option(None, "predictions file (CSV; a JSON beside it)", path="write")


@dataclass
class ScoreConfig:
    """Scoring"""

    labels: str | None = option(None, "ground-truth labels CSV", required=True, path="read")
    predictions: str | None = option(None, "predictions CSV or the challenge's results.json", required=True,
                                      path="read")
    out: str | None = option(None, "folder for metrics.json", path="write")
    bootstrap_resamples: int = option(1000, "patient-bootstrap resamples for 95%% confidence intervals (0: none)")
    bootstrap_seed: int = option(0, "seed of the bootstrap resamples (recorded in metrics.json)")

