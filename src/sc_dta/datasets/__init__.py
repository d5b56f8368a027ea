"""Data sets and model weights: registry, downloads, offline prefetch and simulated data."""

from __future__ import annotations

from sc_dta._lazy import lazy_exports

_EXPORTS = {
    "fetch": "._fetch",
    "prefetch": "._fetch",
    "hf_snapshot": "._fetch",
    "registry": "._registry",
    "simulated_grn": "._simulated",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
