"""Matched control mutations: same kind and size as a TSS mutation, elsewhere in the window, motifs kept."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from sc_dta.genome import Genome
    from sc_dta.models.dna import DNAEncoder

logger = logging.getLogger(__name__)

__all__ = ["control_mutations"]

_BASES = "ACGT"


def _relative_span(variant: Any, tss: int, strand: str) -> tuple[int, int]:
    """TSS-relative (transcription orientation) first and last base touched by a plus-strand variant."""
    first = int(variant.pos) - 1
    last = first + max(len(variant.ref), 1) - 1
    if strand == "+":
        return first - tss, last - tss
    return tss - last, tss - first


def _protected_spans(encoder: DNAEncoder, reference: str, mutated: str, offset: int) -> list[tuple[int, int]]:
    """Window spans (TSS-relative) of motif sites the mutation destroys, when the encoder can find motifs."""
    hits = getattr(encoder, "hits", None)
    if hits is None:
        return []
    before, after = hits(reference), hits(mutated)
    lost = set(before["motif_id"]) - set(after["motif_id"]) if len(before) else set()
    if not lost:
        # motifs whose number of sites dropped
        counts_b = before["motif_id"].value_counts() if len(before) else {}
        counts_a = after["motif_id"].value_counts() if len(after) else {}
        lost = {m for m, c in dict(counts_b).items() if c > dict(counts_a).get(m, 0)}
    keep = before[before["motif_id"].isin(lost)] if len(before) else before
    return [(int(s) - offset, int(e) - 1 - offset) for s, e in zip(keep["start"], keep["end"], strict=True)]


def control_mutations(
    genome: Genome,
    chrom: str,
    tss: int,
    strand: str,
    mutation: Sequence[Any],
    encoder: DNAEncoder,
    *,
    n: int = 10,
    seed: int = 0,
) -> list[list[Any]]:
    """Draw ``n`` control mutations matched to ``mutation`` within the encoder's window around a TSS.

    A control has the same kind and size as the mutation but lies elsewhere in the window: it never overlaps
    the bases the mutation touches and, when the encoder can locate motifs (a ``hits`` method, as
    :class:`~sc_dta.models.MotifEncoder`), none of the motif sites the mutation destroys. A deletion of ``L``
    bp gets deletions of ``L`` bp; substitutions get as many substitutions at random positions (each base
    replaced by another); insertions get random insertions of the same length. A large effect of the
    mutation that its controls share says only that the window changed, not what changed in it.

    Parameters
    ----------
    genome
        The :class:`~sc_dta.genome.Genome`.
    chrom, tss, strand
        The gene's TSS (0-based) and strand.
    mutation
        The mutation group (mutation objects or spec strings), as given to :func:`sc_dta.tl.perturb_tss`.
    encoder
        The DNA encoder (its ``window`` and ``center_shift`` bound the placement).
    n
        Number of controls.
    seed
        Seed of the placement.

    Returns
    -------
    Up to ``n`` distinct mutation groups (a warning says when the window leaves room for fewer) (lists of :class:`~sc_dta.genome.Variant` / :class:`~sc_dta.genome.TSSDeletion`).
    """
    from sc_dta.genome import TSSDeletion, Variant
    from sc_dta.genome._mutations import parse_mutations
    from sc_dta.tl._dna_cache import tss_window

    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
        raise ValueError(f"n_controls: must be a positive integer, got {n!r}.")
    muts = parse_mutations(list(mutation))
    variants = [v for m in muts for v in m.to_variants(genome, chrom, tss, strand, seed=seed)]
    if not variants:
        raise ValueError(f"mutation {mutation!r} changes no base: no control can be matched to it.")
    window, shift = int(encoder.window), int(encoder.center_shift)
    lo = -(window // 2 - shift) + 1  # first TSS-relative position of the window (leave one base of margin)
    hi = lo + window - 3
    spans = [_relative_span(v, tss, strand) for v in variants]
    reference = tss_window(genome, chrom, tss, strand, encoder)
    mutated = tss_window(genome, chrom, tss, strand, encoder, mutations=list(mutation), seed=seed)
    offset = window // 2 - shift  # window index of the TSS
    blocked = spans + _protected_spans(encoder, reference, mutated, offset)
    free = np.ones(hi - lo + 1, dtype=bool)
    for a, b in blocked:
        free[max(a, lo) - lo : min(b, hi) - lo + 1] = False
    rng = np.random.default_rng([seed, 11])

    def place(length: int) -> int | None:
        """Draw a random TSS-relative start whose ``length`` bases are all free."""
        ok = np.convolve(free.astype(int), np.ones(length, dtype=int), mode="valid") == length
        starts = np.flatnonzero(ok)
        return None if starts.size == 0 else int(starts[rng.integers(starts.size)]) + lo

    def genomic(rel: int) -> int:
        return tss + rel if strand == "+" else tss - rel

    controls: list[list[Any]] = []
    seen: set[str] = set()
    for _ in range(50 * n):
        if len(controls) == n:
            break
        group: list[Any] = []
        for v, (a, b) in zip(variants, spans, strict=True):
            ref, alt = v.ref, v.alt
            if len(ref) > len(alt):  # deletion (VCF anchor base kept)
                length = len(ref) - len(alt)
                start = place(length)
                if start is None:
                    raise ValueError(
                        f"No room for a {length} bp control deletion in the {window} bp window outside the mutation "
                        "and its motifs; use an encoder with a longer window."
                    )
                group.append(TSSDeletion(start, start + length - 1))
                free[start - lo : start - lo + length] = False
            else:
                length = max(1, len(alt) - len(ref) + 1) if len(alt) > len(ref) else len(ref)
                start = place(1 if len(alt) > len(ref) else length)
                if start is None:
                    raise ValueError(f"No free position for a control of {v} in the {window} bp window.")
                pos0 = genomic(start)
                if len(alt) > len(ref):  # insertion after an anchor base
                    base = genome.fetch(chrom, pos0, pos0 + 1).upper()
                    insert = "".join(rng.choice(list(_BASES), size=len(alt) - len(ref)))
                    group.append(Variant(genome.resolve_chrom(chrom), pos0 + 1, base, base + insert))
                else:  # substitutions: each base replaced by another
                    first = pos0 if strand == "+" else pos0 - length + 1
                    ref_seq = genome.fetch(chrom, first, first + length).upper()
                    alt_seq = "".join(rng.choice([c for c in _BASES if c != r]) for r in ref_seq)
                    group.append(Variant(genome.resolve_chrom(chrom), first + 1, ref_seq, alt_seq))
                free[max(0, start - lo) : start - lo + length] = False
            del a, b
        text = ";".join(str(g) for g in group)
        if text not in seen:  # distinct controls only
            seen.add(text)
            controls.append(group)
        # the next control may reuse positions of this one, not of the mutation
        free[:] = True
        for a, b in blocked:
            free[max(a, lo) - lo : min(b, hi) - lo + 1] = False
    if len(controls) < n:
        warnings.warn(
            f"control_mutations: only {len(controls)} distinct controls of {mutation!r} fit in the {window} bp window "
            f"outside the mutation and its motifs ({n} asked); a longer encoder window leaves more room.",
            UserWarning,
            stacklevel=2,
        )
    return controls
