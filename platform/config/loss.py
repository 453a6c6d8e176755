"""The training loss and its parameters."""

from __future__ import annotations

from dataclasses import dataclass

from ctplatform.config.options import option

LOSSES = ("focal", "bce", "asl")


@dataclass
class LossConfig:
    """Loss: focal (Lin et al. 2017), BCE with class weights, or asymmetric (Ridnik et al. 2021)"""

    loss_type: str = option("focal", "training loss", choices=LOSSES)
    focal_alpha: float = option(0.85, "focal loss: weight of the positive class")
    focal_gamma: float = option(4.0, "focal loss: focusing exponent")
    asl_gamma_neg: float = option(6.0, "asymmetric loss: focusing exponent of negatives")
    asl_gamma_pos: float = option(1.0, "asymmetric loss: focusing exponent of positives")
    asl_clip: float = option(0.05, "asymmetric loss: probability margin shifted off easy negatives")
