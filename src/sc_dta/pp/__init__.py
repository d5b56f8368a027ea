"""Preprocessing: TSS annotation and Geneformer tokenization."""

from __future__ import annotations

from sc_dta._lazy import lazy_exports

_EXPORTS = {
    "annotate_tss": "._annotate_tss",
    "tokenize": "._tokenize",
    "TokenizedCells": "._tokenize",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
