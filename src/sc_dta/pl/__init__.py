"""Plotting."""

from __future__ import annotations

from sc_dta._lazy import lazy_exports

_EXPORTS = {
    "target_shift": "._target_shift",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
