"""Deprecated alias of `lenslab.zoo.train_saes` (the zoo SAEs' recipes and corpora), kept for one
release: importing it warns, and `build_zoo_sae` / `rebuild_zoo_saes` (and any other public name)
are those of `lenslab.zoo.train_saes`."""

from __future__ import annotations

import warnings

from lenslab.zoo import train_saes  # the deprecated alias's target
from lenslab.zoo.train_saes import build_zoo_sae, rebuild_zoo_saes  # the deprecated alias's names

__all__ = ["build_zoo_sae", "rebuild_zoo_saes"]

warnings.warn("lenslab.probes.zoo_saes is deprecated; use lenslab.zoo.train_saes", DeprecationWarning, stacklevel=2)


def __getattr__(name: str):
    """The other public names of `lenslab.zoo.train_saes` (`recipe`, `RECIPES`, `corpus`, ...)."""
    if not name.startswith("_") and hasattr(train_saes, name):
        return getattr(train_saes, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
