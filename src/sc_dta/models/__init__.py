"""Models: DNA encoders, Geneformer vocabularies and checkpoints, the adapter and BioDTA."""

from __future__ import annotations

from sc_dta._lazy import lazy_exports

_EXPORTS = {
    "DNAEncoder": ".dna",
    "EnformerEncoder": ".dna",
    "KmerEncoder": ".dna",
    "GeneformerVocab": ".vocab",
    "load_geneformer": ".cell",
    "Adapter": ".adapter",
    "DynamicTokenEmbedding": ".adapter",
    "BioDTA": ".biodta",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
