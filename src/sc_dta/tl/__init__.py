"""Tools: DNA embeddings, adapter training, in-silico perturbation and target ranking."""

from __future__ import annotations

from sc_dta._lazy import lazy_exports

_EXPORTS = {
    "embed_dna": "._embed_dna",
    "train_adapter": "._train",
    "perturb_gene": "._perturb",
    "perturb_tss": "._perturb",
    "rank_targets": "._rank",
    "control_mutations": "._controls",
    "coexpression": "._coexpression",
    "screen": "._screen",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
