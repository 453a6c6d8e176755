"""The JSON bodies of the prediction routes, built from a model replica's reply (no Ray, no web framework)."""

from __future__ import annotations

from ctplatform.evaluation.decision import DECISION_THRESHOLD, decide
from ctplatform.labels import CLASS_NAMES
from ctplatform.serve.inputs import SliceInput
from ctplatform.serve.preprocessing import VolumeUpload


def volume_response(reply: dict, volume: VolumeUpload, slices_used: int) -> dict:
    """/v1/predict/volume: the prediction, its findings (positive classes, most probable first, with the key slices
    and, for an attention-MIL model, their attention weights) and what was read."""
    prediction = reply["prediction"]
    prediction.notes = volume.notes
    result = {"model_version": reply["model_version"], **prediction.to_dict()}
    result["findings"] = sorted(
        ({"class": name, "probability": result["probabilities"][name], "key_slices": result["key_slices"][name]}
         for name in result["key_slices"]), key=lambda f: -f["probability"])
    if "slice_attention" in result:  # attention-MIL: the weight of each key slice for its finding
        where = {int(p): k for k, p in enumerate(result["slice_positions"])}
        for finding in result["findings"]:
            weights = result["slice_attention"][finding["class"]]
            finding["key_slice_attention"] = [weights[where[p]] for p in finding["key_slices"]]
    result["volume"] = volume.describe(slices_used)
    result["decision_threshold"] = DECISION_THRESHOLD
    return result


def slices_response(reply: dict, slices: list[SliceInput]) -> dict:
    """/v1/predict/slices: calibrated and raw probabilities and decisions of each slice."""
    raw, calibrated = reply["raw"], reply["calibrated"]
    out = []
    for k, item in enumerate(slices):
        decisions = decide(calibrated[k])
        out.append({
            "name": item.name,
            "shape": list(item.hu.shape),
            "probabilities": dict(zip(CLASS_NAMES, map(float, calibrated[k]), strict=True)),
            "raw_probabilities": dict(zip(CLASS_NAMES, map(float, raw[k]), strict=True)),
            "decisions": dict(zip(CLASS_NAMES, map(bool, decisions), strict=True)),
            "positive": [name for name, d in zip(CLASS_NAMES, decisions, strict=True) if d],
            "notes": item.notes,
        })
    return {"model_version": reply["model_version"], "decision_threshold": DECISION_THRESHOLD, "slices": out}
