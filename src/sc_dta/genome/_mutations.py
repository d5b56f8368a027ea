"""Mutation specs: explicit variants, TSS-relative deletions, seeded random substitutions, VCF input.

Every mutation object turns into plain :class:`Variant` objects on the genomic plus strand with
``to_variants(genome, chrom, tss, strand, seed=...)``; :meth:`sc_dta.genome.Genome.mutated_window`
applies those to a window. ``str(mutation)`` gives the spec text back, and
:func:`parse_mutation` reads it again.
"""

from __future__ import annotations

import gzip
import logging
import numbers
import re
from collections.abc import Iterable
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING, Union

if TYPE_CHECKING:
    from ._fasta import Genome

logger = logging.getLogger(__name__)

_BASES = "ACGT"
_ALLELE = re.compile(r"^[ACGTN]+$")
_VARIANT_RE = re.compile(r"^\s*(?P<chrom>[^:\s]+):(?P<pos>[0-9][0-9,_]*):(?P<ref>[A-Za-z]+)>(?P<alt>[A-Za-z]+)\s*$")
_DELETE_RE = re.compile(r"^\s*delete:(?P<start>[+-]?\d+):(?P<end>[+-]?\d+)\s*$", re.IGNORECASE)
_RANDOM_RE = re.compile(r"^\s*random:(?P<n>\d+)(?::(?P<radius>\d+))?(?::(?P<seed>\d+))?\s*$", re.IGNORECASE)
_COMPLEMENT = str.maketrans("ACGTN", "TGCAN")


@dataclass(frozen=True)
class Variant:
    """A sequence variant in VCF convention.

    Parameters
    ----------
    chrom
        Chromosome name as in the genome FASTA (``chr`` prefixes are matched leniently by
        :class:`~sc_dta.genome.Genome`).
    pos
        1-based position of the first base of ``ref`` (as in a VCF ``POS`` column).
    ref
        Reference allele on the genomic plus strand (``A``/``C``/``G``/``T``/``N``); it is checked
        against the genome when the variant is applied.
    alt
        Alternative allele. SNVs (``C>T``), MNVs (``AC>GT``), insertions (``A>AT``, the first base is
        the VCF anchor base) and deletions (``AT>A``) are supported; symbolic alleles are not.

    Examples
    --------
    >>> Variant.parse("chr8:11676959:C>T")
    Variant(chrom='chr8', pos=11676959, ref='C', alt='T')
    """

    chrom: str
    pos: int
    ref: str
    alt: str

    def __post_init__(self) -> None:
        label = f"{self.chrom}:{self.pos}:{self.ref}>{self.alt}"
        if not isinstance(self.chrom, str) or not self.chrom or any(c.isspace() for c in self.chrom):
            raise ValueError(f"Variant {label!r}: chrom must be a non-empty chromosome name, got {self.chrom!r}.")
        if isinstance(self.pos, bool) or not isinstance(self.pos, numbers.Integral):
            raise ValueError(f"Variant {label!r}: pos must be an integer, got {self.pos!r}.")
        object.__setattr__(self, "pos", int(self.pos))
        if self.pos < 1:
            raise ValueError(f"Variant {label!r}: pos is 1-based and must be >= 1, got {self.pos}.")
        for field in ("ref", "alt"):
            allele = getattr(self, field)
            if not isinstance(allele, str):
                raise ValueError(f"Variant {label!r}: {field} must be a string, got {allele!r}.")
            allele = allele.upper()
            if not _ALLELE.match(allele):
                raise ValueError(
                    f"Variant {label!r}: {field} allele {getattr(self, field)!r} must be made of A, C, G, T, N "
                    "(symbolic alleles such as <DEL> or * are not supported)."
                )
            object.__setattr__(self, field, allele)
        if self.ref == self.alt:
            raise ValueError(f"Variant {label!r}: ref and alt alleles are identical.")

    @classmethod
    def parse(cls, spec: str) -> Variant:
        """Parse ``"chrom:pos:ref>alt"`` (1-based ``pos``), e.g. ``"chr8:11676959:C>T"`` or ``"chr1:100:AT>A"``."""
        if not isinstance(spec, str):
            raise ValueError(f"Variant spec must be a string like 'chr8:11676959:C>T', got {spec!r}.")
        m = _VARIANT_RE.match(spec)
        if m is None:
            raise ValueError(
                f"Cannot parse variant {spec!r}: expected 'chrom:pos:ref>alt' with a 1-based position, "
                "e.g. 'chr8:11676959:C>T', 'chr1:100:A>AT' (insertion) or 'chr1:100:AT>A' (deletion)."
            )
        try:
            return cls(m["chrom"], int(m["pos"].replace(",", "").replace("_", "")), m["ref"], m["alt"])
        except ValueError as e:
            raise ValueError(f"Cannot parse variant {spec!r}: {e}") from None

    def __str__(self) -> str:
        return f"{self.chrom}:{self.pos}:{self.ref}>{self.alt}"

    @property
    def kind(self) -> str:
        """``"SNV"``, ``"MNV"``, ``"insertion"``, ``"deletion"`` or ``"complex"``."""
        start, end, alt = _trim(self)
        if end - start == len(alt):
            return "SNV" if len(alt) == 1 else "MNV"
        if end == start:
            return "insertion"
        if not alt:
            return "deletion"
        return "complex"

    def to_variants(self, genome: Genome, chrom: str, tss: int, strand: str, *, seed: int = 0) -> list[Variant]:
        """Return ``[self]`` (the other arguments are ignored)."""
        return [self]


@dataclass(frozen=True)
class TSSDeletion:
    """Delete the bases from ``start`` to ``end`` (both inclusive) relative to the TSS.

    Positions are counted in transcription orientation with the TSS base at 0, so negative
    positions are upstream (promoter) and positive ones downstream, on either strand.
    ``TSSDeletion(-100, 50)`` (spec ``"delete:-100:+50"``) deletes 151 bp: 100 upstream bases,
    the TSS base and 50 downstream bases.

    When the deletion covers the TSS, the mutated window is centred on the first base after the
    deletion in transcription orientation.
    """

    start: int
    end: int

    def __post_init__(self) -> None:
        for field in ("start", "end"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise ValueError(f"TSSDeletion: {field} must be an integer, got {value!r}.")
            object.__setattr__(self, field, int(value))
        if self.start > self.end:
            raise ValueError(f"TSSDeletion: start ({self.start}) must not be after end ({self.end}).")

    @classmethod
    def parse(cls, spec: str) -> TSSDeletion:
        """Parse ``"delete:START:END"``, e.g. ``"delete:-100:+50"``."""
        m = _DELETE_RE.match(spec) if isinstance(spec, str) else None
        if m is None:
            raise ValueError(
                f"Cannot parse TSS deletion {spec!r}: expected 'delete:START:END' with positions relative to the "
                "TSS in transcription orientation, e.g. 'delete:-100:+50'."
            )
        try:
            return cls(int(m["start"]), int(m["end"]))
        except ValueError as e:
            raise ValueError(f"Cannot parse TSS deletion {spec!r}: {e}") from None

    def __str__(self) -> str:
        return f"delete:{self.start:+d}:{self.end:+d}"

    def to_variants(self, genome: Genome, chrom: str, tss: int, strand: str, *, seed: int = 0) -> list[Variant]:
        """Return the deletion as one VCF-style :class:`Variant` (with its anchor base) on the plus strand."""
        _check_strand(strand)
        if strand == "+":
            first, last = tss + self.start, tss + self.end
        else:
            first, last = tss - self.end, tss - self.start
        length = genome.chrom_length(chrom)
        if first < 0 or last >= length:
            raise ValueError(
                f"Mutation {str(self)!r} around the TSS {chrom}:{tss} ({strand}) reaches {chrom}:{first}-{last} "
                f"(0-based), beyond the chromosome (length {length})."
            )
        if first > 0:  # anchor base before the deletion, as in VCF
            seq = genome.fetch(chrom, first - 1, last + 1)
            return [Variant(genome.resolve_chrom(chrom), first, seq, seq[0])]
        seq = genome.fetch(chrom, first, last + 2)  # deletion at the chromosome start: anchor after it
        return [Variant(genome.resolve_chrom(chrom), first + 1, seq, seq[-1])]


@dataclass(frozen=True)
class RandomSubstitutions:
    """``n`` random single-base substitutions within ``radius`` bp of the TSS.

    Positions are drawn without replacement among the A/C/G/T bases at relative positions
    ``-radius .. +radius`` (TSS included) that lie on the chromosome; each chosen base is
    replaced by one of the three other bases. The draw is deterministic given the seed (this
    object's ``seed``, else the ``seed`` passed to :meth:`to_variants`), and the same seed gives
    the same relative positions and base changes (in transcription orientation) on either strand.

    Spec text: ``"random:N"`` (default radius), ``"random:N:R"`` or ``"random:N:R:SEED"``.
    """

    n: int
    radius: int = 200
    seed: int | None = None

    def __post_init__(self) -> None:
        for field in ("n", "radius", "seed"):
            value = getattr(self, field)
            if field == "seed" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
                raise ValueError(f"RandomSubstitutions: {field} must be a non-negative integer, got {value!r}.")
            object.__setattr__(self, field, int(value))
        if self.n < 1:
            raise ValueError(f"RandomSubstitutions: n must be at least 1, got {self.n}.")

    @classmethod
    def parse(cls, spec: str) -> RandomSubstitutions:
        """Parse ``"random:N"``, ``"random:N:R"`` or ``"random:N:R:SEED"``."""
        m = _RANDOM_RE.match(spec) if isinstance(spec, str) else None
        if m is None:
            raise ValueError(
                f"Cannot parse random substitutions {spec!r}: expected 'random:N', 'random:N:RADIUS' or "
                "'random:N:RADIUS:SEED', e.g. 'random:10:200'."
            )
        kwargs: dict[str, int] = {"n": int(m["n"])}
        if m["radius"] is not None:
            kwargs["radius"] = int(m["radius"])
        if m["seed"] is not None:
            kwargs["seed"] = int(m["seed"])
        try:
            return cls(**kwargs)
        except ValueError as e:
            raise ValueError(f"Cannot parse random substitutions {spec!r}: {e}") from None

    def __str__(self) -> str:
        return f"random:{self.n}:{self.radius}" + (f":{self.seed}" if self.seed is not None else "")

    def to_variants(self, genome: Genome, chrom: str, tss: int, strand: str, *, seed: int = 0) -> list[Variant]:
        """Draw the substitutions around ``tss`` (0-based) as SNV :class:`Variant` objects."""
        import numpy as np

        _check_strand(strand)
        length = genome.chrom_length(chrom)
        lo, hi = max(tss - self.radius, 0), min(tss + self.radius + 1, length)
        region = genome.fetch(chrom, lo, hi) if hi > lo else ""
        offsets = np.arange(-self.radius, self.radius + 1)
        genomic = tss + offsets if strand == "+" else tss - offsets
        on_chrom = (genomic >= lo) & (genomic < hi)
        offsets, genomic = offsets[on_chrom], genomic[on_chrom]
        bases = np.array(list(region), dtype="<U1")[genomic - lo] if len(genomic) else np.array([], dtype="<U1")
        usable = np.isin(bases, list(_BASES))
        offsets, genomic, bases = offsets[usable], genomic[usable], bases[usable]
        if len(offsets) < self.n:
            raise ValueError(
                f"Mutation {str(self)!r}: only {len(offsets)} A/C/G/T bases within {self.radius} bp of the TSS "
                f"{chrom}:{tss}, cannot place {self.n} substitutions."
            )
        rng = np.random.default_rng(self.seed if self.seed is not None else seed)
        chosen = np.sort(rng.choice(len(offsets), size=self.n, replace=False))
        picks = rng.integers(0, 3, size=self.n)
        chrom_name = genome.resolve_chrom(chrom)
        variants = []
        for i, k in zip(chosen, picks, strict=True):
            ref = str(bases[i])
            oriented = ref if strand == "+" else ref.translate(_COMPLEMENT)
            alt = [b for b in _BASES if b != oriented][int(k)]
            if strand == "-":
                alt = alt.translate(_COMPLEMENT)
            variants.append(Variant(chrom_name, int(genomic[i]) + 1, ref, alt))
        return sorted(variants, key=lambda v: v.pos)


Mutation = Union[Variant, TSSDeletion, RandomSubstitutions]  # noqa: UP007


def parse_mutation(spec: str | Mutation) -> Mutation:
    """Turn a mutation spec into a mutation object.

    Parameters
    ----------
    spec
        ``"chrom:pos:ref>alt"`` (a :class:`Variant`, 1-based), ``"delete:START:END"`` (a
        :class:`TSSDeletion` relative to the TSS, both ends inclusive), ``"random:N[:RADIUS[:SEED]]"``
        (:class:`RandomSubstitutions`), or a mutation object (returned unchanged).

    Returns
    -------
    The mutation object; ``str()`` of it gives the spec back.
    """
    if isinstance(spec, Variant | TSSDeletion | RandomSubstitutions):
        return spec
    if not isinstance(spec, str):
        raise ValueError(
            f"Mutation spec must be a string or a Variant/TSSDeletion/RandomSubstitutions, got {type(spec).__name__}: "
            f"{spec!r}."
        )
    head = spec.strip().split(":", 1)[0].lower()
    if head == "delete":
        return TSSDeletion.parse(spec)
    if head == "random":
        return RandomSubstitutions.parse(spec)
    if _VARIANT_RE.match(spec):
        return Variant.parse(spec)
    raise ValueError(
        f"Cannot parse mutation {spec!r}: expected a variant 'chrom:pos:ref>alt' (e.g. 'chr8:11676959:C>T'), "
        "a TSS deletion 'delete:-100:+50' or random substitutions 'random:N' / 'random:N:RADIUS'."
    )


def parse_mutations(mutations: str | Mutation | Iterable[str | Mutation]) -> list[Mutation]:
    """:func:`parse_mutation` over one spec or a list of specs."""
    if isinstance(mutations, str | Variant | TSSDeletion | RandomSubstitutions):
        return [parse_mutation(mutations)]
    return [parse_mutation(m) for m in mutations]


# ----------------------------------------------------------------------------------------------------
# VCF


def _open_text(path: Path):
    with open(path, "rb") as fh:
        magic = fh.read(2)
    if magic == b"\x1f\x8b":
        return gzip.open(path, "rt")
    return open(path)


def read_vcf(path: str | PathLike, sample: str | None = None) -> list[Variant]:
    """Read variants from a VCF file (plain or gzip/bgzip compressed).

    Parameters
    ----------
    path
        VCF file.
    sample
        A sample column. When given, only the alternative alleles that this sample's ``GT``
        carries (on either haplotype, e.g. ``0|1``, ``1/1``, ``1``) are returned, so applying them
        gives a sequence holding every alt allele of the sample. When None, every alternative
        allele of every record is returned; the alleles of a multi-allelic record overlap, so apply
        them one at a time (e.g. as separate mutations of :func:`sc_dta.tl.perturb_tss`), not together.

    Returns
    -------
    :class:`Variant` objects in file order, one per (record, alt allele). Symbolic alleles
    (``<DEL>``, ``*``, ``.``) are skipped with a warning.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"read_vcf: VCF file {str(path)!r} does not exist.")
    variants: list[Variant] = []
    samples: list[str] = []
    sample_col: int | None = None
    n_symbolic = 0
    with _open_text(path) as fh:
        for lineno, line in enumerate(fh, start=1):
            if line.startswith("##"):
                continue
            if line.startswith("#"):
                header = line.rstrip("\n").split("\t")
                samples = header[9:]
                if sample is not None:
                    if sample not in samples:
                        raise KeyError(f"read_vcf: sample {sample!r} is not in {str(path)!r}; samples: {samples}.")
                    sample_col = 9 + samples.index(sample)
                continue
            if not line.strip():
                continue
            fields = line.rstrip("\n").split("\t")
            if len(fields) < 8:
                raise ValueError(f"read_vcf: {str(path)!r} line {lineno} has {len(fields)} columns, expected >= 8.")
            chrom, pos, _id, ref, alts = fields[:5]
            alt_list = alts.split(",")
            keep = set(range(1, len(alt_list) + 1))
            if sample is not None:
                if sample_col is None:
                    raise ValueError(f"read_vcf: {str(path)!r} has no #CHROM header line with sample columns.")
                if len(fields) <= sample_col:
                    raise ValueError(f"read_vcf: {str(path)!r} line {lineno} has no column for sample {sample!r}.")
                fmt = fields[8].split(":")
                if "GT" not in fmt:
                    raise ValueError(f"read_vcf: {str(path)!r} line {lineno} has no GT field for sample {sample!r}.")
                values = fields[sample_col].split(":")
                gt = values[fmt.index("GT")] if fmt.index("GT") < len(values) else "."
                keep = {int(a) for a in re.split(r"[/|]", gt) if a.isdigit() and int(a) > 0}
            for i, alt in enumerate(alt_list, start=1):
                if i not in keep:
                    continue
                if not _ALLELE.match(alt.upper()) or not _ALLELE.match(ref.upper()):
                    n_symbolic += 1
                    continue
                try:
                    variants.append(Variant(chrom, int(pos), ref, alt))
                except ValueError as e:
                    raise ValueError(f"read_vcf: {str(path)!r} line {lineno}: {e}") from None
    if n_symbolic:
        logger.warning("read_vcf: skipped %d symbolic or missing alleles in %s.", n_symbolic, path)
    return variants


# ----------------------------------------------------------------------------------------------------
# applying variants


def _check_strand(strand: str) -> None:
    if strand not in ("+", "-"):
        raise ValueError(f"strand must be '+' or '-', got {strand!r}.")


def _trim(v: Variant) -> tuple[int, int, str]:
    """Minimal edit of ``v``: replace 0-based ``[start, end)`` of the plus strand by ``alt``."""
    ref, alt, start = v.ref, v.alt, v.pos - 1
    k = 0
    while k < min(len(ref), len(alt)) and ref[k] == alt[k]:
        k += 1
    ref, alt, start = ref[k:], alt[k:], start + k
    j = 0
    while j < min(len(ref), len(alt)) and ref[-1 - j] == alt[-1 - j]:
        j += 1
    if j:
        ref, alt = ref[:-j], alt[:-j]
    return start, start + len(ref), alt


def _apply(
    genome: Genome, chrom: str, center: int, length: int, strand: str, variants: list[Variant]
) -> tuple[str, int]:
    """Apply ``variants`` around ``center``; return (plus-strand window, new centre coordinate).

    The window is not yet reverse-complemented for the minus strand. The second value is the
    coordinate of the centre base on the mutated chromosome.
    """
    up, down = length // 2, length - 1 - length // 2
    ws, we = (center - up, center + down + 1) if strand == "+" else (center - down, center + up + 1)
    chrom_len = genome.chrom_length(chrom)
    edits = []
    for v in variants:
        if v.chrom not in genome or genome.resolve_chrom(v.chrom) != chrom:
            raise ValueError(
                f"Mutation {str(v)!r} is outside the window: it is on {v.chrom!r} but the window is on "
                f"{chrom}:{ws + 1}-{we} (1-based, inclusive)."
            )
        ref_start, ref_end = v.pos - 1, v.pos - 1 + len(v.ref)
        if ref_end > chrom_len:
            raise ValueError(f"Mutation {str(v)!r} reaches beyond the end of {chrom} (length {chrom_len}).")
        start, end, alt = _trim(v)
        if start < ws or end > we:
            raise ValueError(
                f"Mutation {str(v)!r} is outside the window {chrom}:{ws + 1}-{we} (1-based, inclusive) of "
                f"{length} bp around {chrom}:{center + 1} ({strand})."
            )
        found = genome.fetch(chrom, ref_start, ref_end)
        if found != v.ref:
            raise ValueError(
                f"Reference allele mismatch for {str(v)!r} at {chrom}:{v.pos}: the variant expects {v.ref!r} but "
                f"genome {genome.name!r} has {found!r}."
            )
        edits.append((start, end, alt, v))
    edits.sort(key=lambda e: (e[0], e[1]))
    for (s0, e0, _, v0), (s1, _e1, _, v1) in zip(edits, edits[1:], strict=False):
        if s1 < e0 or s1 == s0:
            raise ValueError(f"Mutations {str(v0)!r} and {str(v1)!r} overlap; apply them as one variant.")

    pad = sum(max(0, (e - s) - len(a)) for s, e, a, _ in edits) + 1
    es = ws - pad
    seq = genome.fetch(chrom, es, we + pad)
    # new coordinate (in the coordinates of the mutated chromosome) of the TSS / centre base
    shift, new_center = 0, None
    for s, e, alt, _ in edits:
        if e <= center:
            shift += len(alt) - (e - s)
        elif s <= center < e:
            s_new = s + shift
            if strand == "+":
                off = center - s
                new_center = s_new + off if off < len(alt) else s_new + len(alt)
            else:
                off = e - 1 - center
                new_center = s_new + len(alt) - 1 - off if off < len(alt) else s_new - 1
            break
        else:
            break
    if new_center is None:
        new_center = center + shift
    parts, last = [], 0
    for s, e, alt, _ in edits:
        parts.append(seq[last : s - es])
        parts.append(alt)
        last = e - es
    parts.append(seq[last:])
    mutated = "".join(parts)
    t = new_center - es
    lo = t - (up if strand == "+" else down)
    window = mutated[lo : lo + length]
    if lo < 0 or len(window) != length:  # pragma: no cover - guaranteed by the padding
        raise RuntimeError(f"internal error: mutated window has {len(window)} bp instead of {length}.")
    return window, new_center
