"""What network is trained: backbone, attention, input windows and the volume head."""

from __future__ import annotations

from dataclasses import dataclass

from ctplatform.config.options import option

MODELS = ("resnet50", "resnet101", "efficientnet_b0")  # torchvision's; any timm name is accepted too
ATTENTIONS = ("none", "se", "cbam")
AGGREGATIONS = ("mean", "max", "topk")
INPUT_WINDOWS = ("single", "three")
HEADS = ("slice", "attention-mil")
MIL_POOLINGS = ("per-class", "shared")


@dataclass
class ModelConfig:
    """Model: backbone, attention and the head that turns slices into a volume prediction"""

    model: str = option("resnet50", f"backbone: {', '.join(MODELS)} (torchvision) or any timm architecture "
                                    "(vit_small_patch14_dinov2, vit_base_patch14_dinov2, convnext_tiny, ...)",
                        aliases=("--model-name",), metavar="NAME")
    weights: str = option("none", "initial backbone weights: imagenet (timm: its pretrained tag, from the local "
                                  "Hugging Face cache) | none | PATH (.safetensors, .pth, or a hub cache folder)")
    use_attention: str = option("none", "channel attention after the backbone", choices=ATTENTIONS)
    use_multiscale: bool = option(False, "fuse the last three backbone stages")
    input_windows: str = option("three", "one HU window or three (lung, mediastinum, bone) as input channels",
                                choices=INPUT_WINDOWS)
    head: str = option("slice", "slice: slices trained on volume labels, then --aggregation; attention-mil: gated "
                                "attention over a volume's slices, trained on volume labels", choices=HEADS)
    aggregation: str = option("mean", "slice head: slice -> volume probability", choices=AGGREGATIONS)
    topk: int = option(3, "slices averaged by --aggregation topk")


@dataclass
class LoraConfig:
    """LoRA: low-rank adapters on a frozen backbone (peft); the exported bundle has them merged into the weights"""

    lora_rank: int = option(0, "adapter rank r (0: no LoRA, the backbone trains as usual)")
    lora_alpha: float = option(16.0, "adapter scale alpha (the update is alpha / r * B A x)")
    lora_dropout: float = option(0.0, "dropout on the adapters' input")
    lora_targets: str = option("auto", "modules to adapt: auto (ViT: patch embedding and attention projections; "
                                       "CNN: every ungrouped convolution) or a regex on module names")
    grad_checkpoint: bool = option(False, "recompute a timm backbone's blocks in the backward pass (less memory)")


def check_model_name(name: str) -> None:
    """ValueError unless ``name`` is one of MODELS or an architecture timm knows."""
    if name in MODELS:
        return
    import timm  # only for names outside MODELS: keeps the CLI's start fast

    if not timm.is_model(name):
        raise ValueError(f"invalid model {name!r}: choose one of {', '.join(MODELS)} or any architecture timm "
                         "knows (e.g. vit_small_patch14_dinov2, convnext_tiny; see timm.list_models())")


@dataclass
class MilConfig:
    """Attention-MIL head (--head attention-mil); a batch holds max(1, --batch-size // K) volumes of K slices"""

    mil_pooling: str = option("per-class", "one attention distribution over slices per class, or one shared",
                              choices=MIL_POOLINGS)
    mil_hidden: int = option(128, "width of the gated attention's projections")
    mil_slices: int | None = option(None, "K slices per volume in training, evenly spread (default: all cached)")
    mil_grad_checkpoint: bool = option(False, "gradient checkpointing of the slice encoder (less memory, more "
                                              "compute)")
    mil_chunk_slices: int | None = option(None, "at most this many slices per encoder call")
    mil_frozen_encoder: bool = option(False, "keep the slice encoder fixed and train the pooling on cached slice "
                                             "features (fast sweeps; use with --weights imagenet or PATH)")
    mil_feature_dir: str | None = option(None, "cached feature folder (default <slice-dir>/mil_features)")
