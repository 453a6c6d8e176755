"""Weights for timm backbones from local files only: a checkpoint path, or timm's pretrained tag in the local cache.

``--weights PATH`` accepts a ``.safetensors`` file, a ``.pth``/``.pt``/``.bin`` state dict (read with
``weights_only=True``: no code in it runs), or a Hugging Face hub folder as timm writes it (``models--timm--NAME``,
one of its ``snapshots/<rev>/`` folders, or any folder holding ``model.safetensors`` / ``pytorch_model.bin``). Keys
may carry a prefix (``module.``, ``model.``, a ctplatform checkpoint's ``model.encoder.backbone.model.``): the
prefix under which most keys match the architecture is stripped. The architecture's own ``checkpoint_filter_fn``
then converts original formats (e.g. Meta's DINOv2 release) and resizes position embeddings; a first convolution
with another number of input channels (a one-channel CT checkpoint) is adapted to the three windowed channels
(timm's ``adapt_input_conv``); the classifier is dropped. Loading is by name and shape; what did not fit is
reported in one line (:class:`LoadReport`), and a file of which nothing fits is refused.

``--weights imagenet`` looks the model's pretrained tag (``timm/<name>.<tag>`` on the hub) up in the local
Hugging Face cache without any network access; absent, :class:`WeightsUnavailableError` says what to download.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch
from torch import Tensor, nn

from ctplatform.model.backbones import WeightsUnavailableError

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")


@dataclass(frozen=True)
class LoadReport:
    """How a checkpoint fitted a model: loaded, missing (kept random), unexpected (ignored), wrong shape (ignored)."""

    source: str
    loaded: int
    missing: list[str]
    unexpected: list[str]
    mismatched: list[str]
    dropped: list[str]  # the checkpoint's classifier, which a backbone has no use for

    def line(self) -> str:
        def few(keys: list[str]) -> str:
            return f" {keys[:3]}{' ...' if len(keys) > 3 else ''}" if keys else ""

        return (f"weights {self.source}: {self.loaded} tensors loaded, {len(self.missing)} missing{few(self.missing)}, "
                f"{len(self.unexpected)} unexpected{few(self.unexpected)}, {len(self.mismatched)} of another "
                f"shape{few(self.mismatched)}; classifier dropped ({len(self.dropped)} tensors)")


def resolve_weights_file(path: str | os.PathLike[str]) -> Path:
    """The weights file that ``path`` names: the file itself, or the one inside a hub cache or model folder."""
    path = Path(path).expanduser()
    if path.is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"weights {path} does not exist (expected `--weights none|imagenet|PATH`)")
    candidates = [path]
    snapshots = path / "snapshots"
    if snapshots.is_dir():  # a hub cache repo folder: the revision refs/main points to, else every snapshot
        ref = path / "refs" / "main"
        main = snapshots / ref.read_text().strip() if ref.is_file() else None
        candidates = ([main] if main is not None and main.is_dir() else []) + sorted(
            (p for p in snapshots.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime, reverse=True)
    for folder in candidates:
        for name in WEIGHT_FILES:
            if (folder / name).is_file():
                return folder / name
    raise FileNotFoundError(f"weights folder {path} holds none of {', '.join(WEIGHT_FILES)} (nor a hub snapshot "
                            "with one)")


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """The tensors of a weights file or folder (see the module docstring); ValueError naming the file otherwise."""
    where = resolve_weights_file(path)
    try:
        if where.suffix == ".safetensors":
            state = safetensors.torch.load_file(str(where))
        else:
            state = torch.load(where, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, ValueError, OSError) as exc:
        raise ValueError(f"could not read weights file {where}: {str(exc).splitlines()[0] if str(exc) else exc}") \
            from exc
    except Exception as exc:  # safetensors' own error types for a corrupt header
        raise ValueError(f"could not read weights file {where}: {exc}") from exc
    for wrapper in ("state_dict", "model", "module"):  # training checkpoints nest the weights
        if isinstance(state, Mapping) and isinstance(state.get(wrapper), Mapping):
            state = state[wrapper]
    if not isinstance(state, Mapping) or not state or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"weights file {where} does not hold a state dict (a mapping of names to tensors)")
    return dict(state)


def _strip_prefix(state: dict[str, Tensor], expected: set[str]) -> dict[str, Tensor]:
    """``state`` with the key prefix removed under which most keys are the model's own."""
    counts: dict[str, int] = {}
    for key in state:
        names = [n for n in expected if key.endswith(n) and (len(key) == len(n) or key[-len(n) - 1] == ".")]
        if names:  # the longest model key that this key ends with
            prefix = key[: len(key) - len(max(names, key=len))]
            counts[prefix] = counts.get(prefix, 0) + 1
    if not counts:
        return state
    best = max(counts, key=lambda p: (counts[p], -len(p)))
    return {k[len(best):]: v for k, v in state.items() if k.startswith(best)}


def load_timm_weights(model: nn.Module, path: str | os.PathLike[str], *, source: str | None = None) -> LoadReport:
    """Load a checkpoint into the timm ``model`` by name and shape; ValueError when nothing in it fits."""
    where = resolve_weights_file(path)
    state = read_state_dict(where)
    expected = model.state_dict()
    state = _strip_prefix(state, set(expected))
    filter_fn = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if filter_fn is not None:  # original formats (DINOv2 release), position-embedding and patch resizing
        with contextlib.suppress(Exception):  # a filter written for another layout: load by name what fits
            state = filter_fn(state, model)
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    first_conv = cfg.get("first_conv")
    for conv in [first_conv] if isinstance(first_conv, str) else list(first_conv or ()):
        key = f"{conv}.weight"
        if key in state and key in expected and state[key].dim() == 4 and state[key].shape[1] != expected[key].shape[1]:
            state[key] = adapt_input_channels(state[key], int(expected[key].shape[1]))
    classifier = cfg.get("classifier")
    heads = tuple(f"{c}." for c in ([classifier] if isinstance(classifier, str) else list(classifier or ())))
    dropped = sorted(k for k in state if heads and k.startswith(heads) and k not in expected)
    state = {k: v for k, v in state.items() if k not in dropped}
    mismatched = sorted(k for k, v in state.items() if k in expected and tuple(v.shape) != tuple(expected[k].shape))
    fitting = {k: v for k, v in state.items() if k in expected and k not in mismatched}
    label = source or str(where)
    if not fitting:
        raise ValueError(f"weights file {where} holds no tensor of {type(model).__name__} "
                         f"{cfg.get('architecture', '')} (was it saved from another architecture?)")
    missing, _ = model.load_state_dict(fitting, strict=False)
    return LoadReport(label, len(fitting), sorted(missing), sorted(k for k in state if k not in expected), mismatched,
                      dropped)


def adapt_input_channels(weight: Tensor, channels: int) -> Tensor:
    """A first convolution's kernel ``(O, I, kh, kw)`` for ``channels`` inputs, its response to a gray image kept.

    An RGB kernel goes through timm's ``adapt_input_conv`` (summed for one channel, cycled beyond three); any other
    (a one-channel CT encoder) is repeated over the new channels and scaled by ``I / channels``."""
    source = int(weight.shape[1])
    if source == channels:
        return weight
    if source == 3:
        from timm.models import adapt_input_conv

        return adapt_input_conv(channels, weight)
    repeats = -(-channels // source)
    return weight.repeat(1, repeats, 1, 1)[:, :channels] * (source / channels)


def pretrained_file(name: str) -> Path:
    """The cached file of timm's pretrained weights for ``name`` (``arch`` or ``arch.tag``), never downloading."""
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.constants import HF_HUB_CACHE
    from timm.models import get_pretrained_cfg

    cache = Path(os.environ.get("HF_HUB_CACHE") or HF_HUB_CACHE)  # read now: the constant is fixed at import
    cfg = get_pretrained_cfg(name)
    if cfg is None:
        raise WeightsUnavailableError(f"timm has no pretrained weights for {name}: use --weights none or PATH")
    hub_id = cfg.hf_hub_id
    if hub_id:
        repo_id, _, revision = hub_id.partition("@")
        for filename in ([cfg.hf_hub_filename] if cfg.hf_hub_filename else list(WEIGHT_FILES)):
            found = try_to_load_from_cache(repo_id, filename, cache_dir=cache, revision=revision or None)
            if isinstance(found, str):
                return Path(found)
        raise WeightsUnavailableError(
            f"pretrained weights for {name} ({repo_id}) are not in the local Hugging Face cache ({cache}) and "
            f"this platform never downloads at run time. On a machine with network access run `hf download "
            f"{repo_id}` (or `huggingface-cli download {repo_id}`) and copy its models--{repo_id.replace('/', '--')} "
            f"folder into {cache} here (or set HF_HUB_CACHE), or pass that folder with --weights PATH")
    if cfg.url:
        cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(cfg.url)
        if cached.is_file():
            return cached
        raise WeightsUnavailableError(
            f"pretrained weights for {name} are not cached: download {cfg.url} on a machine with network access and "
            f"copy it to {cached}, or pass it with --weights PATH")
    raise WeightsUnavailableError(f"timm has no pretrained weights for {name}: use --weights none or PATH")
