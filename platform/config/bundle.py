"""Settings of `ctplatform bundle check BUNDLE`: validate a model bundle without deploying it."""

from __future__ import annotations

from dataclasses import dataclass

from ctplatform.config.options import option


@dataclass
class BundleCommandConfig:
    """Bundle"""

    action: str = option("check", "what to do: check (the validation `serve` runs before deploying)",
                         positional=True, choices=("check",), metavar="ACTION")
    bundle: str | None = option(None, "the bundle folder (model.safetensors + metadata.json) or its metadata.json",
                                positional=True, metavar="BUNDLE", path="read")
