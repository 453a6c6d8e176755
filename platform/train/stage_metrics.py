"""Training and validation metrics as torchmetrics objects: one ``MetricCollection`` per stage.

Validation scores follow the official VLM3D Task 2 rules on volume-level probabilities: AUROC per class, left out
where a class has only one label value (macro = mean over the classes that have both), average precision likewise,
and F1 of the decisions ``p >= 0.5``. :class:`ValidationScores` keeps every validation item's probabilities (a
slice's, or a volume's for a volume-level head) with its volume and item number; at the end of the epoch it gathers
them from every process, drops the duplicates that ``DistributedSampler`` pads ranks with, aggregates slices into
volumes with :func:`ctplatform.evaluation.aggregate.aggregate_by_volume` (the aggregation prediction uses) and scores.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torchmetrics import MeanMetric, Metric, MetricCollection
from torchmetrics.functional.classification import multilabel_average_precision, multilabel_f1_score
from torchmetrics.utilities import dim_zero_cat

from ctplatform.evaluation.aggregate import aggregate_by_volume, probabilities
from ctplatform.evaluation.decision import decide
from ctplatform.evaluation.metrics import auroc_per_class
from ctplatform.labels import CLASS_NAMES


def multilabel_scores(probs: torch.Tensor | np.ndarray, targets: torch.Tensor | np.ndarray,
                      class_names: Sequence[str] | None = None) -> dict[str, float]:
    """Macro AUROC, AP and F1 at p >= 0.5 (the official decision rule); classes with one label value are left out
    of AUROC/AP (as the official scoring does) instead of counting as 0. AUROC and the decisions are the evaluation
    package's own (what a bundle's report computes), AP and F1 torchmetrics'. With `class_names`, also each class's
    score as ``"{metric}/{class name}"`` (AUROC and AP only where the class has both labels)."""
    probs = torch.as_tensor(probs).cpu().double()
    targets = torch.as_tensor(targets).cpu().round().int()
    num_labels = probs.shape[1]
    varied = (targets.min(dim=0).values != targets.max(dim=0).values).numpy()
    # integer predictions are taken as decisions: torchmetrics' own threshold would test p > 0.5
    decisions = torch.from_numpy(decide(probs.numpy())).int()
    f1 = multilabel_f1_score(decisions, targets, num_labels=num_labels, average=None).numpy()
    scores = {"f1": float(np.mean(f1))}
    per_class = {"f1": f1}
    if varied.any():
        per_class["auroc"] = auroc_per_class(targets.numpy(), probs.numpy())
        per_class["ap"] = multilabel_average_precision(probs, targets, num_labels=num_labels, average=None).numpy()
        scores["auroc"] = float(np.mean(per_class["auroc"][varied]))
        scores["ap"] = float(np.mean(per_class["ap"][varied]))
    if class_names is not None:
        for metric, values in per_class.items():
            scores.update({f"{metric}/{name}": float(values[j]) for j, name in enumerate(class_names)
                           if metric == "f1" or varied[j]})
    return scores


class ValidationScores(Metric):
    """Official-rule scores of one validation epoch, from per-item logits.

    ``update(logits (N, C), targets (N, C), volumes (N,), items (N,))``: an item is a slice (``aggregation`` names
    how a volume's slice probabilities become its probability: ``mean``, ``max`` or ``topk``) or a whole volume
    (``aggregation=None``: one item per volume). ``compute()`` returns ``{"volume_auroc": ..., "volume_ap": ...,
    "volume_f1": ..., "volume_{metric}/{class}": ...}`` and, with ``slice_level``, the macro scores of the items
    themselves as ``slice_{metric}``.
    """

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    def __init__(self, aggregation: str | None, topk: int = 3, slice_level: bool = False,
                 class_names: Sequence[str] = CLASS_NAMES, **kwargs) -> None:
        super().__init__(**kwargs)
        if slice_level and aggregation is None:
            raise ValueError("slice-level scores need slice items, which need an aggregation into volumes")
        self.aggregation, self.topk, self.slice_level = aggregation, topk, slice_level
        self.class_names = tuple(class_names)
        self.last_volume_predictions: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        for name in ("logits", "targets", "volumes", "items"):
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(self, logits: torch.Tensor, targets: torch.Tensor, volumes: torch.Tensor, items: torch.Tensor) -> None:
        self.logits.append(logits.detach().float())
        self.targets.append(targets.detach())
        self.volumes.append(volumes.detach())
        self.items.append(items.detach())

    def _unique_items(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(probabilities, targets, volumes) once per item, in item order (on the CPU). The probabilities come from
        the logits through the one sigmoid prediction uses (float64), so validation and a bundle's evaluation agree."""
        logits, targets, volumes, items = (dim_zero_cat(state).cpu() for state in
                                           (self.logits, self.targets, self.volumes, self.items))
        _, first = np.unique(items.numpy(), return_index=True)
        keep = torch.from_numpy(first)
        return probabilities(logits[keep].numpy()), targets[keep].float().numpy(), volumes[keep].numpy()

    def volume_probabilities(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(volume rows (V,) ascending, probabilities (V, C), targets (V, C)) of the items seen so far."""
        probs, targets, volumes = self._unique_items()
        return self._volumes(probs, targets, volumes)

    def _volumes(self, probs: np.ndarray, targets: np.ndarray,
                 volumes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self.aggregation is None:
            ids, first = np.unique(volumes, return_index=True)
            if len(ids) != len(volumes):
                raise ValueError("a volume-level head gave more than one item for a volume: set an aggregation")
            return ids, probs[first], targets[first]
        ids, volume_probs = aggregate_by_volume(probs, volumes, self.aggregation, self.topk)
        _, first = np.unique(volumes, return_index=True)  # sorted like ids; a volume's slices share its labels
        return ids, volume_probs, targets[first]

    def compute(self) -> dict[str, float]:
        probs, targets, volumes = self._unique_items()
        scores: dict[str, float] = {}
        if self.slice_level:
            slice_scores = multilabel_scores(torch.from_numpy(probs), torch.from_numpy(targets))
            scores.update({f"slice_{name}": value for name, value in slice_scores.items()})
        ids, volume_probs, volume_targets = self._volumes(probs, targets, volumes)
        # what was just scored, gathered from every process (compute() runs on the synced state): the module
        # keeps it in the epoch's checkpoint, where a sweep's tie test finds it
        self.last_volume_predictions = (ids, volume_probs, volume_targets)
        volume_scores = multilabel_scores(torch.from_numpy(volume_probs), torch.from_numpy(volume_targets),
                                          self.class_names)
        scores.update({f"volume_{name}": value for name, value in volume_scores.items()})
        return scores


def stage_metrics(scores: ValidationScores | None = None) -> MetricCollection:
    """One stage's metrics: ``"loss"`` (the batch-size weighted mean of the loss) and, for validation, ``"scores"``.

    The loss skips torchmetrics' NaN check, which would read a value back from the GPU every step.
    """
    metrics: dict[str, Metric] = {"loss": MeanMetric(nan_strategy="disable")}
    if scores is not None:
        metrics["scores"] = scores
    return MetricCollection(metrics, compute_groups=False)
