"""Models: DNA encoders (Enformer, k-mer, JASPAR motifs), Geneformer vocabularies and checkpoints, adapter, BioDTA."""

from __future__ import annotations

from sc_dta._lazy import lazy_exports

_EXPORTS = {
    "DNAEncoder": ".dna",
    "EnformerEncoder": ".dna",
    "KmerEncoder": ".dna",
    "MotifEncoder": ".motif",
    "Motif": ".motif",
    "load_jaspar": ".motif",
    "encoder_from_name": ".encoders",
    "GeneformerVocab": ".vocab",
    "load_geneformer": ".cell",
    "Adapter": ".adapter",
    "DynamicTokenEmbedding": ".adapter",
    "BioDTA": ".biodta",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
