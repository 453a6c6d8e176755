"""The predictor: a bundle (or checkpoint) in, calibrated per-class probabilities and decisions out.

Used by `predict`, evaluation and the HTTP service, so all three apply exactly the training preprocessing
(`ctplatform.data.preprocess`), the same HU windows, aggregation and calibration. No training code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ctplatform.data.preprocess import PreprocessSettings, preprocess_volume, resize_slices
from ctplatform.evaluation.aggregate import aggregate_slices, probabilities
from ctplatform.evaluation.decision import decide
from ctplatform.labels import CLASS_NAMES
from ctplatform.model.bundle import ModelSpec, load_bundle
from ctplatform.model.windows import hu_to_input


@dataclass
class VolumePrediction:
    probabilities: np.ndarray  # (C,) calibrated (raw when the bundle has no calibration)
    raw_probabilities: np.ndarray  # (C,)
    slice_probabilities: np.ndarray  # (K, C) raw, per slice
    slice_positions: np.ndarray  # (K,) index of each slice in the source volume
    slice_weights: np.ndarray | None = None  # (K, C) attention weights (attention-MIL head)
    notes: list[str] = field(default_factory=list)

    @property
    def decisions(self) -> np.ndarray:
        return decide(self.probabilities)

    def key_slices(self, top: int = 3) -> dict[str, list[int]]:
        """Per class, the source slice positions that drove the prediction most (attention, else slice probability)."""
        evidence = self.slice_weights if self.slice_weights is not None else self.slice_probabilities
        order = np.argsort(-evidence, axis=0, kind="stable")[:top]
        return {name: [int(self.slice_positions[k]) for k in order[:, j]] for j, name in enumerate(CLASS_NAMES)}

    def slice_attention(self) -> dict[str, list[float]] | None:
        """Per class, the attention weight of each slice (in `slice_positions` order; sums to one), or None for a
        slice head. Which slices drove each finding."""
        if self.slice_weights is None:
            return None
        return {name: [round(float(w), 6) for w in self.slice_weights[:, j]] for j, name in enumerate(CLASS_NAMES)}

    def to_dict(self) -> dict:
        out = {
            "probabilities": dict(zip(CLASS_NAMES, map(float, self.probabilities), strict=True)),
            "raw_probabilities": dict(zip(CLASS_NAMES, map(float, self.raw_probabilities), strict=True)),
            "decisions": dict(zip(CLASS_NAMES, map(bool, self.decisions), strict=True)),
            "key_slices": {name: positions for name, positions in self.key_slices().items()
                           if self.decisions[CLASS_NAMES.index(name)]},
            "slice_positions": [int(p) for p in self.slice_positions],
            "notes": self.notes,
        }
        attention = self.slice_attention()
        if attention is not None:
            out["slice_attention"] = attention
        return out


class Predictor:
    """Builds every prediction from a bundle: preprocessing -> logits -> sigmoid -> aggregation (or the
    attention-MIL head's own pooling) -> calibration; decisions at p >= 0.5 on the calibrated probabilities."""

    def __init__(self, model: torch.nn.Module, spec: ModelSpec, device: str | torch.device | None = None,
                 batch_size: int = 64):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        # NHWC model and input on every device, as in training (CPU too: resnet50 at 224² infers 24 vs 17 img/s)
        self.model = model.to(self.device).eval().to(memory_format=torch.channels_last)
        self.spec = spec
        self.settings = PreprocessSettings.from_dict(spec.preprocess)
        self.batch_size = batch_size
        self.is_mil = spec.architecture.get("head") == "attention-mil"
        if self.is_mil:  # a whole volume in one call: bound the slices per encoder forward
            self.model.chunk_slices = batch_size

    @classmethod
    def from_path(cls, path: str | Path, device: str | None = None, batch_size: int = 64) -> Predictor:
        model, spec = load_bundle(path)
        return cls(model, spec, device=device, batch_size=batch_size)

    # ------------------------------------------------------------------ tensors
    def _inputs(self, hu: np.ndarray | torch.Tensor) -> torch.Tensor:
        if isinstance(hu, np.ndarray) and not hu.flags.writeable:
            hu = hu.copy()  # memory-mapped cache arrays are read-only; torch wants writable memory
        tensor = torch.as_tensor(hu).to(self.device, non_blocking=True)
        x = hu_to_input(tensor, self.spec.input_windows)
        return x.contiguous(memory_format=torch.channels_last)

    @torch.inference_mode()
    def slice_logits(self, hu_slices: np.ndarray | torch.Tensor) -> np.ndarray:
        """(N, S, S) HU slices at the training size -> (N, C) logits of the slice head."""
        outputs = []
        for start in range(0, len(hu_slices), self.batch_size):
            x = self._inputs(hu_slices[start : start + self.batch_size])
            model = self.model.encoder if self.is_mil else self.model
            outputs.append(model(x).float().cpu())
        return torch.cat(outputs).numpy() if outputs else np.zeros((0, len(CLASS_NAMES)), np.float32)

    def calibrate(self, probs: np.ndarray) -> np.ndarray:
        """Raw probabilities (..., C) -> the bundle's calibrated ones (unchanged when it has no calibration)."""
        return self.spec.calibration.apply(probs) if self.spec.calibration is not None else probs

    def volume_from_slice_logits(self, slice_logits: np.ndarray, positions: np.ndarray) -> VolumePrediction:
        """(K, C) slice-head logits of one volume's slices -> VolumePrediction: sigmoid, the bundle's slice ->
        volume aggregation, then its calibration. (The service computes the logits batched across requests.)"""
        slice_probs = probabilities(slice_logits)
        raw = aggregate_slices(slice_probs, self.spec.aggregation, self.spec.topk)
        return VolumePrediction(
            probabilities=self.calibrate(raw[None])[0],
            raw_probabilities=raw,
            slice_probabilities=slice_probs,
            slice_positions=np.asarray(positions),
        )

    def slices_from_logits(self, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(N, C) logits of independent slices -> (raw, calibrated) (N, C) probabilities.

        The calibration was fitted on volume probabilities; applied to single slices it is the best available map.
        """
        raw = probabilities(logits)
        return raw, self.calibrate(raw)

    # ------------------------------------------------------------------ public
    def predict_prepared(self, slices: np.ndarray, positions: np.ndarray | None = None) -> VolumePrediction:
        """Prepared (K, S, S) int16 HU slices of one volume (as in the cache) -> VolumePrediction."""
        positions = np.arange(len(slices)) if positions is None else np.asarray(positions)
        if not self.is_mil:
            return self.volume_from_slice_logits(self.slice_logits(slices), positions)
        with torch.inference_mode():
            x = self._inputs(slices).unsqueeze(0)
            logits, weights, slice_logits = self.model(x, return_details=True)
        raw = probabilities(logits.float().cpu().numpy()[0])
        return VolumePrediction(
            probabilities=self.calibrate(raw[None])[0],
            raw_probabilities=raw,
            slice_probabilities=probabilities(slice_logits.float().cpu().numpy()[0]),
            slice_positions=positions,
            slice_weights=weights.float().cpu().numpy()[0],
        )

    def predict_volume(self, hu_volume: np.ndarray, notes: list[str] | None = None) -> VolumePrediction:
        """A whole HU volume (slices, rows, cols), as `read_volume` returns it -> VolumePrediction."""
        slices, positions = preprocess_volume(hu_volume, self.settings)
        prediction = self.predict_prepared(slices, positions)
        prediction.notes = list(notes or [])
        return prediction

    def predict_slices(self, hu_slices: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Independent 2-D HU slices of any size -> (raw (N, C), calibrated (N, C)) probabilities per slice."""
        size = self.settings.image_size
        resized = np.concatenate([resize_slices(np.asarray(s, np.float32)[None], size) for s in hu_slices])
        return self.slices_from_logits(self.slice_logits(resized))
