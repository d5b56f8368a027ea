"""Data sets and model weights: registry, downloads, offline prefetch, known TF targets and simulated data."""

from __future__ import annotations

from sc_dta._lazy import lazy_exports

_EXPORTS = {
    "fetch": "._fetch",
    "prefetch": "._fetch",
    "hf_snapshot": "._fetch",
    "known_targets": "._known_targets",
    "registry": "._registry",
    "sergio_grn": "._sergio",
    "simulated_grn": "._simulated",
    "targets_from_table": "._known_targets",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
