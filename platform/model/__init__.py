"""Slice-level model components: HU windowing, backbones, attention layers, fusion, losses and augmentation.

Plain ``nn.Module`` building blocks (no Lightning, no Ray). Each concept lives in its own file and is built by name
through a small factory that rejects unknown names with the list of valid ones.
"""

from ctplatform.model.attention import ATTENTIONS, build_attention
from ctplatform.model.backbones import BACKBONES, Backbone, WeightsUnavailableError, build_backbone
from ctplatform.model.classifier import SliceClassifier, build_classifier
from ctplatform.model.losses import LOSSES, build_loss, class_pos_weights
from ctplatform.model.windows import WINDOWS, hu_to_input

__all__ = [
    "ATTENTIONS",
    "BACKBONES",
    "LOSSES",
    "WINDOWS",
    "Backbone",
    "SliceClassifier",
    "WeightsUnavailableError",
    "build_attention",
    "build_backbone",
    "build_classifier",
    "build_loss",
    "class_pos_weights",
    "hu_to_input",
]
