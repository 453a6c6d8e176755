"""Import Lightning the way `ray.train.lightning` does: `lightning.pytorch`, falling back to `pytorch_lightning`.

Where both packages are installed, Ray's strategy and callbacks are built on `lightning.pytorch`; a module built
on the other package is rejected by Ray's strategy, so everything here must come from this one import.
"""

try:
    import lightning.pytorch as pl
except ModuleNotFoundError:  # pragma: no cover - depends on the environment
    import pytorch_lightning as pl

__all__ = ["pl"]
