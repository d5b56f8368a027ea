"""FASTA access, TSS tables, genome windows and mutation specs."""

from __future__ import annotations

from sc_dta._lazy import lazy_exports

_EXPORTS = {
    "Genome": "._fasta",
    "read_tss": "._gtf",
    "Variant": "._mutations",
    "TSSDeletion": "._mutations",
    "RandomSubstitutions": "._mutations",
    "parse_mutation": "._mutations",
    "read_vcf": "._mutations",
    "saturation": "._saturation",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
