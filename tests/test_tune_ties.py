"""The sweep summary marks the trials statistically tied with the best, from the validation predictions each
trial's checkpoint keeps (no trial is predicted again)."""

from __future__ import annotations

import types

import numpy as np
import pandas as pd
import pytest
import torch

from ctplatform.config import TrainConfig
from ctplatform.evaluation.compare import macro_auroc_test
from ctplatform.train.module import VALIDATION_PREDICTIONS_KEY
from ctplatform.tune.space import SearchSpace
from ctplatform.tune.summary import read_validation_predictions, write_summary

pytestmark = pytest.mark.timeout(300)
CLASSES = 18


def _trial(root, name, probs, y, names, patients, aurocs):
    """A finished trial as Tune returns it: a metrics history whose epochs point at Ray checkpoint folders."""
    folder = root / name / "checkpoint_000001"
    folder.mkdir(parents=True)
    if probs is not None:
        torch.save({"state_dict": {}, VALIDATION_PREDICTIONS_KEY: {
            "epoch": 1, "volume_names": names, "patients": patients, "probs": torch.from_numpy(probs),
            "targets": torch.from_numpy(y).to(torch.uint8)}}, folder / "checkpoint.ckpt")
    history = pd.DataFrame({"val/volume_auroc": aurocs, "training_iteration": range(1, len(aurocs) + 1),
                            "checkpoint_path": [str(root / name / "gone"), str(folder)][-len(aurocs):]})
    return types.SimpleNamespace(metrics_dataframe=history, metrics={"trial_id": name}, path=str(root / name),
                                 config={"loss_type": "bce"}, error=None)


def test_summary_marks_trials_tied_with_the_best(tmp_path):
    rng = np.random.default_rng(0)
    patients = [f"valid_{p}" for p in range(300) for _ in (1, 2)]
    names = [f"{p}_a_{r}.nii.gz" for p in patients[::2] for r in (1, 2)]
    y = (rng.random((300, CLASSES)) < 0.3).astype(int).repeat(2, axis=0)
    noise = rng.normal(size=y.shape)
    best = 1 / (1 + np.exp(-(1.5 * y + noise)))
    close = 1 / (1 + np.exp(-(1.5 * y + rng.normal(size=y.shape))))  # as good, but a different model
    worse = 1 / (1 + np.exp(-(0.3 * y + rng.normal(size=y.shape))))
    order = rng.permutation(len(names))  # a trial's volumes may come in another order
    results = [
        _trial(tmp_path, "t_best", best, y, names, patients, [0.70, 0.80]),
        _trial(tmp_path, "t_close", close[order], y[order], [names[i] for i in order],
               [patients[i] for i in order], [0.60, 0.79]),
        _trial(tmp_path, "t_worse", worse, y, names, patients, [0.55, 0.58]),
        _trial(tmp_path, "t_old", None, y, names, patients, [0.5, 0.6]),  # an old checkpoint: nothing kept
    ]
    space = SearchSpace(metric="val/volume_auroc", mode="max", params={"loss_type": {"type": "categorical",
                                                                                     "choices": ["bce"]}})
    summary = write_summary(results, space, 2, str(tmp_path), types.SimpleNamespace(name="s"))
    table = pd.read_csv(tmp_path / "summary" / "trials.csv", keep_default_na=False).set_index("trial_id")
    assert table["tied_with_best"].to_dict() == {"t_best": "best", "t_close": "yes", "t_worse": "no",
                                                 "t_old": "n/a"}
    assert summary["tied_with_best"] == ["t_close"]
    expected = macro_auroc_test(y, best, worse, patients)
    assert float(table.loc["t_worse", "p_vs_best"]) == pytest.approx(expected["p"], rel=1e-9)
    assert expected["p"] < 0.05 < float(table.loc["t_close", "p_vs_best"])


def test_a_trial_checkpoint_without_predictions_reads_as_none(tmp_path):
    torch.save({"state_dict": {}}, tmp_path / "checkpoint.ckpt")
    assert read_validation_predictions(str(tmp_path)) is None
    assert read_validation_predictions(str(tmp_path / "missing")) is None
    assert read_validation_predictions("s3://bucket/ckpt") is None


@pytest.mark.slow
def test_each_checkpoint_keeps_the_validation_predictions_it_was_scored_on(tiny_cache, tmp_path):
    from ctplatform.evaluation.metrics import macro_auroc
    from ctplatform.train.datamodule import build_datamodule
    from ctplatform.train.module import CTClassifierModule
    from ctplatform.train.trainer import build_trainer

    cfg = TrainConfig(slice_dir=str(tiny_cache), model="efficientnet_b0", batch_size=16, epochs=1, num_workers=0,
                      seed=0, limit_train_batches=2, loss_type="bce").validate()
    datamodule = build_datamodule(cfg)
    datamodule.setup()
    module = CTClassifierModule(cfg.to_dict(), preprocess=datamodule.index.settings.to_dict())
    trainer = build_trainer(cfg, tmp_path, enable_progress_bar=False, accelerator="cpu")
    trainer.fit(module, datamodule=datamodule)
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    saved = checkpoint[VALIDATION_PREDICTIONS_KEY]
    valid = datamodule.index.volumes.iloc[datamodule.index.split_volumes("valid")]
    assert saved["volume_names"] == list(valid["VolumeName"]) and saved["patients"] == list(valid["patient"])
    assert float(trainer.callback_metrics["val/volume_auroc"]) == pytest.approx(
        macro_auroc(saved["targets"].numpy(), saved["probs"].numpy()), abs=1e-6)


def test_trials_scored_on_other_cases_or_labels_are_not_tested():
    from ctplatform.evaluation.compare import ties_with_best

    rng = np.random.default_rng(1)
    y = (rng.random((40, CLASSES)) < 0.4).astype(int)
    names = [f"valid_{i}_a_1" for i in range(40)]
    entry = {"volume_names": names, "patients": [n[:-4] for n in names], "probs": rng.random(y.shape), "targets": y}
    flipped = y.copy()
    flipped[0, 0] = 1 - flipped[0, 0]
    marks = ties_with_best({"best": entry, "fewer": {**entry, "volume_names": names[:-1] + ["valid_99_a_1"]},
                            "relabelled": {**entry, "targets": flipped}, "same": dict(entry)}, "best")
    assert marks["fewer"]["tied"] is None and marks["fewer"]["note"] == "other validation cases"
    assert marks["relabelled"]["tied"] is None and marks["relabelled"]["note"] == "other validation labels"
    assert marks["same"]["tied"] is True and marks["same"]["p"] == 1.0
