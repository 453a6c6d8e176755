"""Prediction, evaluation and scoring settings: what a trained model is asked and where answers go."""

from __future__ import annotations

from dataclasses import dataclass

from ctplatform.config.options import option

MODES = ("train", "evaluate", "both", "predict")
PREDICT_TYPES = ("slices", "volumes")


@dataclass
class ModeConfig:
    """Mode"""

    mode: str = option("both", "train, evaluate (the validation split), both, or predict files", choices=MODES)


@dataclass
class ModelSourceConfig:
    """Model to evaluate or predict with"""

    checkpoint: str | None = option(None, "bundle folder or Lightning checkpoint (default: this run's best)")


@dataclass
class EvaluateConfig(ModelSourceConfig):
    """Evaluation"""

    report_dir: str | None = option(None, "evaluation report folder (default <run>/report)")


@dataclass
class PredictConfig(ModelSourceConfig):
    """Prediction"""

    predict_input: list[str] = option(default_factory=list, help="files to predict (volumes: .nii, .nii.gz, .mha, a "
                                      "DICOM series folder or .zip, an Enhanced CT .dcm)", metavar="FILE")
    predict_type: str = option("slices", "what the files are: .npy slices or volumes", choices=PREDICT_TYPES)
    predict_metadata: str | None = option(None, "CT-RATE metadata CSV giving each volume's rescale (default: the "
                                                "header's, else x - 1024)", metavar="CSV")
    output: str | None = option(None, "predictions file (CSV; a JSON beside it)")


@dataclass
class ScoreConfig:
    """Scoring"""

    labels: str | None = option(None, "ground-truth labels CSV", required=True)
    predictions: str | None = option(None, "predictions CSV or the challenge's results.json", required=True)
    out: str | None = option(None, "folder for metrics.json")

