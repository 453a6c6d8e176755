"""One number: the macro AUROC that training logs for an epoch is the one its bundle's evaluation reports.

The LightningModule is trained with a plain Lightning Trainer on CPU (no Ray); each epoch's weights are exported as
a bundle and evaluated on the same validation split through the evaluation entry point. The report's files, scored
the way the `score` command scores them, give the same AUROC, F1 and CRG again.
"""

import copy
import json

import pandas as pd
import pytest

from ctplatform.config import TrainConfig
from ctplatform.data.datasets import load_cache_index
from ctplatform.evaluation.evaluate import evaluate, score_files
from ctplatform.labels import CLASS_NAMES
from ctplatform.model.bundle import ModelSpec, export_bundle
from ctplatform.train.datamodule import CTDataModule
from ctplatform.train.lightning_import import pl
from ctplatform.train.module import CTClassifierModule
from ctplatform.train.trainer import build_trainer

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


class RecordEpochs(pl.Callback):
    """After each validation (the module has logged its metrics by then): the logged volume AUROC and the weights."""

    def __init__(self):
        self.epochs = []

    def on_validation_end(self, trainer, module):
        logged = float(trainer.callback_metrics["val/volume_auroc"])
        self.epochs.append((logged, copy.deepcopy(module.model.state_dict())))


def write_labels_csv(cache, split: str, path) -> None:
    """The split's labels as a CT-RATE labels CSV (VolumeName + the class columns), from the cache's index."""
    index = load_cache_index(cache)
    volumes = index.volumes[index.volumes["split"] == split]
    volumes[["VolumeName", *CLASS_NAMES]].to_csv(path, index=False)


def test_logged_validation_auroc_is_the_bundle_evaluation_auroc(tiny_cache, tmp_path):
    # resnet50: a randomly initialised efficientnet_b0 gives constant outputs in eval mode after a few steps, which
    # would make every AUROC 0.5 and the comparison vacuous.
    cfg = TrainConfig(slice_dir=str(tiny_cache), model="resnet50", batch_size=16, epochs=2, num_workers=0,
                      learning_rate=1e-3, loss_type="bce", limit_train_batches=3, seed=0,
                      guide_checkpoints=False).validate()
    pl.seed_everything(0)
    module = CTClassifierModule(cfg.to_dict())
    recorder = RecordEpochs()
    trainer = build_trainer(cfg, tmp_path / "run", extra_callbacks=[recorder], enable_progress_bar=False,
                            accelerator="cpu")
    trainer.fit(module, datamodule=CTDataModule(cfg.slice_dir, cfg.batch_size, 0))
    assert len(recorder.epochs) == 2

    settings = load_cache_index(tiny_cache).settings
    labels_csv = tmp_path / "valid_labels.csv"
    write_labels_csv(tiny_cache, "valid", labels_csv)
    for epoch, (logged_auroc, weights) in enumerate(recorder.epochs):
        model = copy.deepcopy(module.model)
        model.load_state_dict(weights)
        spec = ModelSpec(architecture={"head": "slice", **model.architecture()}, input_windows=cfg.input_windows,
                         preprocess=settings.to_dict(), aggregation=cfg.aggregation, topk=cfg.topk)
        export_bundle(tmp_path / f"bundle{epoch}", model.eval(), spec)

        report = tmp_path / f"report{epoch}"
        metrics = evaluate(tmp_path / f"bundle{epoch}", tiny_cache, report, device="cpu")
        predicted = pd.read_csv(report / "predictions.csv")[list(CLASS_NAMES)]
        assert (predicted.nunique() > 1).all(), "the model's outputs are constant: nothing to compare"
        assert metrics["macro"]["auroc"] == pytest.approx(logged_auroc, abs=1e-6), epoch
        assert metrics["uncalibrated"]["macro"]["auroc"] == metrics["macro"]["auroc"]
        # the calibration was fitted here (the bundle had none): its held-out estimate ranks with the same AUROC
        assert metrics["held_out_calibration"]["macro"]["auroc"] == metrics["macro"]["auroc"]

        # `score` on the report's submission: the same AUROC, F1 and CRG (the calibration kept every case apart)
        for name in ("results.json", "predictions.csv"):
            rescored = score_files(labels_csv, report / name)
            assert rescored["macro"]["auroc"] == pytest.approx(metrics["macro"]["auroc"], abs=1e-12), name
            assert rescored["macro"]["f1"] == pytest.approx(metrics["macro"]["f1"], abs=1e-12), name
            assert rescored["crg"]["crg"] == pytest.approx(metrics["crg"]["crg"], abs=1e-12), name
        written = json.loads((report / "metrics.json").read_text())
        assert written["macro"]["auroc"] == metrics["macro"]["auroc"]

