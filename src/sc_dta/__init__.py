"""Dynamic token adaptation (Bio-DTA) for single-cell foundation models on AnnData."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from . import datasets, genome, models, pl, pp, tl
from ._settings import settings

try:
    __version__ = version("sc-dta")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

__all__ = ["datasets", "genome", "models", "pl", "pp", "settings", "tl", "__version__"]
