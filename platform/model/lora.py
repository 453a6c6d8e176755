"""LoRA adapters on a backbone (Hu et al. 2021, arXiv:2106.09685), injected by peft and merged back for export.

A LoRA layer adds ``(alpha / r) * B A x`` to a frozen linear or convolution ``W x``, with ``A`` (r x in) and ``B``
(out x r, zero at the start, so training starts from the pretrained function). Only ``A`` and ``B`` train: for
DINOv2 ViT-S/14 with r=8 on the patch embedding and every attention projection that is about 2% of the backbone.

Default targets (``--lora-targets auto``):

* vision transformers: the patch embedding (``patch_embed.proj``) and every linear layer inside an attention
  block (timm's ``attn.qkv`` and ``attn.proj``; ``q_proj``/``k_proj``/``v_proj`` where a model splits them), as in
  AnyMC3D (Liu et al., arXiv:2512.12887);
* CNNs: every ungrouped ``Conv2d`` (1x1 and full 3x3 convolutions; depthwise convolutions keep their weights).

``--lora-targets REGEX`` instead adapts the modules whose full name (as in the backbone's ``named_modules``)
matches the regular expression.

:func:`merge_lora` folds every adapter into its base weight and puts the plain layer back, so a merged model's state
dict has exactly the keys of the model without LoRA: bundles and serving need neither peft nor any change.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

AUTO = "auto"


@dataclass(frozen=True)
class LoraSettings:
    """``--lora-rank`` (0: no LoRA), ``--lora-alpha``, ``--lora-dropout`` and ``--lora-targets``."""

    rank: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    targets: str = AUTO

    def __post_init__(self) -> None:
        if self.rank < 0:
            raise ValueError(f"--lora-rank must be 0 (off) or positive, got {self.rank}")
        if self.alpha <= 0:
            raise ValueError(f"--lora-alpha must be positive, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"--lora-dropout must be in [0, 1), got {self.dropout}")

    @property
    def enabled(self) -> bool:
        return self.rank > 0


def default_targets(module: nn.Module, vit: bool) -> list[str]:
    """Names of the modules that ``--lora-targets auto`` adapts in ``module`` (see the module docstring)."""
    names = []
    for name, child in module.named_modules():
        if vit:
            in_attention = ".attn." in f".{name}" and isinstance(child, nn.Linear)
            if in_attention or (name.endswith("patch_embed.proj") and isinstance(child, nn.Conv2d | nn.Linear)):
                names.append(name)
        elif isinstance(child, nn.Conv2d) and child.groups == 1:
            names.append(name)
    return names


def target_names(module: nn.Module, settings: LoraSettings, vit: bool) -> list[str]:
    """The module names LoRA adapts; ValueError when the targets name nothing adaptable."""
    if settings.targets == AUTO:
        names = default_targets(module, vit)
    else:
        try:
            pattern = re.compile(settings.targets)
        except re.error as exc:
            raise ValueError(f"--lora-targets {settings.targets!r} is not a regular expression ({exc})") from exc
        names = [n for n, m in module.named_modules()
                 if n and pattern.fullmatch(n) and isinstance(m, nn.Linear | nn.Conv2d)]
    if not names:
        raise ValueError(f"--lora-targets {settings.targets!r} matches no linear or convolution layer of the backbone")
    return names


def apply_lora(module: nn.Module, settings: LoraSettings, vit: bool) -> list[str]:
    """Inject LoRA adapters into ``module`` in place; only adapter weights stay trainable. Returns the targets."""
    from peft import LoraConfig, inject_adapter_in_model

    names = target_names(module, settings, vit)
    config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=names)
    inject_adapter_in_model(config, module)
    for name, p in module.named_parameters():
        p.requires_grad_(is_lora_parameter(name))
    return names


def is_lora_parameter(name: str) -> bool:
    return ".lora_" in f".{name}"


def has_lora(module: nn.Module) -> bool:
    return any(is_lora_parameter(name) for name, _ in module.named_parameters())


def lora_parameters(module: nn.Module) -> list[nn.Parameter]:
    return [p for name, p in module.named_parameters() if is_lora_parameter(name)]


def merge_lora(module: nn.Module) -> nn.Module:
    """Fold every LoRA adapter of ``module`` into its base layer and put the plain layer back (in place)."""
    from peft.tuners.lora import LoraLayer

    replaced = [(name, child) for name, child in module.named_modules() if isinstance(child, LoraLayer)]
    for name, child in replaced:
        child.merge()
        parent_name, _, attr = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, attr, child.get_base_layer())
    if hasattr(module, "peft_config"):
        del module.peft_config
    for p in module.parameters():
        p.requires_grad_(True)
    return module
