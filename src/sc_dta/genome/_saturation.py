"""Saturation mutagenesis: every single-nucleotide variant of a TSS-relative range."""

from __future__ import annotations

import numbers
from typing import TYPE_CHECKING

from sc_dta.genome._mutations import Variant

if TYPE_CHECKING:
    from sc_dta.genome._fasta import Genome

__all__ = ["saturation"]

_BASES = "ACGT"


def _as_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"saturation: {name} must be an integer, got {value!r}.")
    return int(value)


def saturation(genome: Genome, chrom: str, tss: int, strand: str, start: int, end: int) -> list[Variant]:
    """Every SNV of the bases ``start`` .. ``end`` (both inclusive) relative to a TSS.

    Positions are counted as in :class:`~sc_dta.genome.TSSDeletion`: in transcription orientation with the
    TSS base at 0, negative upstream, on either strand. Each position gets its three alternative bases (genomic
    plus strand, as in a VCF); positions whose reference base is ``N`` or outside the chromosome are skipped.
    The result is ordered by TSS-relative position, then alternative base, and every element is accepted by
    :func:`~sc_dta.tl.perturb_tss` and :func:`~sc_dta.tl.screen` as a mutation.

    Parameters
    ----------
    genome
        The :class:`~sc_dta.genome.Genome` the reference bases are read from.
    chrom, tss, strand
        The TSS (0-based first transcribed base, ``"+"``/``"-"``), e.g. from ``adata.var[['tss_chrom', 'tss_pos',
        'tss_strand']]`` after :func:`sc_dta.pp.annotate_tss`.
    start, end
        The TSS-relative range, e.g. ``-50, 10``.

    Returns
    -------
    ``3 × (end - start + 1)`` :class:`~sc_dta.genome.Variant` objects (fewer where the reference is ``N``).

    Examples
    --------
    >>> snvs = dta.genome.saturation(genome, "chr8", 11_676_958, "-", -50, 10)  # doctest: +SKIP
    >>> dta.tl.screen(adata, [("GATA4", v) for v in snvs], model=model, genome=genome, encoder=enc)  # doctest: +SKIP
    """
    start, end, tss = _as_int("start", start), _as_int("end", end), _as_int("tss", tss)
    if start > end:
        raise ValueError(f"saturation: start ({start}) must not be after end ({end}).")
    if strand not in ("+", "-"):
        raise ValueError(f"saturation: strand must be '+' or '-', got {strand!r}.")
    name = genome.resolve_chrom(chrom)
    length = genome.chrom_length(name)
    out = []
    for offset in range(start, end + 1):
        pos0 = tss + offset if strand == "+" else tss - offset
        if pos0 < 0 or pos0 >= length:
            continue
        ref = genome.fetch(name, pos0, pos0 + 1)
        if ref not in _BASES:
            continue
        out += [Variant(name, pos0 + 1, ref, alt) for alt in _BASES if alt != ref]
    return out
