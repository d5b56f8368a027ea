"""Genome FASTA access (pyfaidx), transcription-oriented windows and mutated windows."""

from __future__ import annotations

import gzip
import hashlib
import logging
import numbers
import os
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from sc_dta._settings import settings

if TYPE_CHECKING:
    from ._mutations import Mutation

logger = logging.getLogger(__name__)

# IUPAC complement; lower case never reaches here (sequences are upper-cased on read).
_COMPLEMENT = str.maketrans("ACGTNRYKMSWBDHV", "TGCANYRMKSWVHDB")
_FASTA_SUFFIXES = (".gz", ".bgz", ".fa", ".fasta", ".fna", ".fas")


def reverse_complement(seq: str) -> str:
    """Reverse complement of an upper-case DNA sequence (IUPAC codes and ``N`` allowed)."""
    return seq.translate(_COMPLEMENT)[::-1]


def _gzip_kind(path: Path) -> str:
    """``"plain"``, ``"gzip"`` (plain gzip) or ``"bgzip"`` (BGZF: gzip with a ``BC`` extra subfield)."""
    with open(path, "rb") as fh:
        head = fh.read(18)
    if head[:2] != b"\x1f\x8b":
        return "plain"
    if len(head) >= 16 and head[3] & 4 and head[12:14] == b"BC":
        return "bgzip"
    return "gzip"


def _has_bgzf_support() -> bool:
    try:
        import Bio.bgzf  # noqa: F401  (pyfaidx reads BGZF through Biopython)
    except ImportError:
        return False
    return True


def _strip_suffixes(name: str) -> str:
    changed = True
    while changed:
        changed = False
        for suffix in _FASTA_SUFFIXES:
            if name.lower().endswith(suffix) and len(name) > len(suffix):
                name = name[: -len(suffix)]
                changed = True
    return name


def _decompressed_copy(path: Path) -> Path:
    """Decompress a gzip FASTA once into ``settings.cache_dir / "genomes"`` and return the plain copy.

    The copy is keyed by the source's absolute path, size and modification time, so an updated
    source is decompressed again and an unchanged one is reused across sessions.
    """
    stat = path.stat()
    key = hashlib.sha1(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target_dir = Path(settings.cache_dir) / "genomes"
    target = target_dir / f"{_strip_suffixes(path.name)}-{key}.fa"
    if target.exists():
        return target
    try:
        target_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OSError(
            f"Cannot create {str(target_dir)!r} to decompress the gzip FASTA {str(path)!r}; set "
            "sc_dta.settings.cache_dir (or SC_DTA_CACHE_DIR) to a writable directory."
        ) from e
    logger.info("Decompressing %s once into %s (gzip FASTA files cannot be indexed in place).", path, target)
    tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    try:
        with gzip.open(path, "rb") as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, length=16 * 1024 * 1024)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target


def _as_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}.")
    return int(value)


class Genome:
    """A reference genome read from one or several FASTA files with :mod:`pyfaidx`.

    Parameters
    ----------
    fasta
        One FASTA file, or several (e.g. UCSC's per-chromosome ``chr1.fa.gz``, ``chr2.fa.gz``...).
        Plain FASTA files are indexed in place (a ``.fai`` next to the file, or in the cache when
        that directory is read-only). Plain-gzip files (as UCSC ships them) cannot be indexed, so
        they are decompressed once into ``settings.cache_dir / "genomes"`` (keyed by path, size and
        modification time) and the copy is indexed. BGZF files are read in place when Biopython
        is installed, else decompressed like plain gzip.
    name
        Build label recorded with embeddings (e.g. ``"hg38"``). Default: the file name without
        FASTA/gzip suffixes, or the parent folder's name for several files.

    Notes
    -----
    Coordinates are 0-based and half-open. Sequences come back upper-case (soft-masked repeats
    lose their case). Chromosome names are matched exactly, else with the ``chr`` prefix added
    or removed (``"8"`` finds ``"chr8"``, ``"MT"`` finds ``"chrM"``).

    Examples
    --------
    >>> genome = Genome(["chr8.fa.gz", "chr14.fa.gz"], name="hg38")  # doctest: +SKIP
    >>> genome.window("chr8", 11_676_958, 196_608, strand="+")  # doctest: +SKIP
    """

    def __init__(self, fasta: str | os.PathLike | Sequence[str | os.PathLike], *, name: str | None = None) -> None:
        import pyfaidx

        if isinstance(fasta, str | os.PathLike):
            paths = [Path(fasta)]
        else:
            paths = [Path(p) for p in fasta]
        if not paths:
            raise ValueError("Genome: fasta is an empty list; give at least one FASTA file.")
        for p in paths:
            if not p.exists():
                raise FileNotFoundError(f"Genome: FASTA file {str(p)!r} does not exist.")
            if not p.is_file():
                raise ValueError(f"Genome: FASTA path {str(p)!r} is not a file.")
        self.paths = paths
        if name is None:
            if len(paths) == 1:
                name = _strip_suffixes(paths[0].name)
            else:
                parent = paths[0].resolve().parent.name
                name = parent or _strip_suffixes(paths[0].name)
        self.name = str(name)
        self._files: list = []
        self._records: dict[str, tuple] = {}  # chrom -> (Faidx, length)
        for p in paths:
            kind = _gzip_kind(p)
            source = p
            if kind == "gzip" or (kind == "bgzip" and not _has_bgzf_support()):
                source = _decompressed_copy(p)
            indexname = None
            if not os.access(source.parent, os.W_OK) and not Path(f"{source}.fai").exists():
                index_dir = Path(settings.cache_dir) / "genomes"
                index_dir.mkdir(parents=True, exist_ok=True)
                key = hashlib.sha1(str(source.resolve()).encode()).hexdigest()[:16]
                indexname = str(index_dir / f"{source.name}-{key}.fai")
            try:
                fa = pyfaidx.Fasta(
                    str(source), indexname=indexname, as_raw=True, sequence_always_upper=True, rebuild=True
                )
            except pyfaidx.FastaIndexingError as e:
                raise ValueError(f"Genome: cannot index FASTA {str(p)!r}: {e}") from e
            self._files.append(fa)
            for chrom in fa.keys():
                if chrom in self._records:
                    raise ValueError(f"Genome: chromosome {chrom!r} appears in more than one FASTA file ({str(p)!r}).")
                self._records[chrom] = (fa.faidx, len(fa[chrom]))

    # ------------------------------------------------------------------------------------------------
    @property
    def chromosomes(self) -> list[str]:
        """Chromosome names, in file order."""
        return list(self._records)

    def __contains__(self, chrom: object) -> bool:
        try:
            self.resolve_chrom(chrom)  # type: ignore[arg-type]
        except (KeyError, TypeError):
            return False
        return True

    def __repr__(self) -> str:
        return f"Genome(name={self.name!r}, n_chromosomes={len(self._records)}, files={len(self.paths)})"

    def close(self) -> None:
        """Close the FASTA file handles."""
        for fa in self._files:
            fa.close()

    def __enter__(self) -> Genome:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def resolve_chrom(self, chrom: str) -> str:
        """Return the genome's name for ``chrom`` (exact, else with the ``chr`` prefix added/removed).

        Raises
        ------
        KeyError
            When no such chromosome exists; the message lists the available ones.
        """
        if chrom in self._records:
            return chrom
        chrom = str(chrom)
        candidates = []
        if chrom.startswith("chr"):
            candidates.append(chrom[3:])
            if chrom == "chrM":
                candidates.append("MT")
        else:
            candidates.append(f"chr{chrom}")
            if chrom == "MT":
                candidates.append("chrM")
        for c in candidates:
            if c in self._records:
                return c
        shown = self.chromosomes[:30]
        more = f" ... ({len(self._records)} in all)" if len(self._records) > len(shown) else ""
        raise KeyError(f"Chromosome {chrom!r} is not in genome {self.name!r}; available: {shown}{more}.")

    def chrom_length(self, chrom: str) -> int:
        """Length of ``chrom`` in bp."""
        return self._records[self.resolve_chrom(chrom)][1]

    @property
    def chrom_sizes(self) -> dict[str, int]:
        """``{chromosome: length}``."""
        return {c: n for c, (_, n) in self._records.items()}

    # ------------------------------------------------------------------------------------------------
    def fetch(self, chrom: str, start: int, end: int) -> str:
        """Sequence of ``chrom`` over ``[start, end)`` (0-based, half-open), upper-case.

        Positions outside the chromosome (negative, or past its end) come back as ``N``, so the
        result always has ``end - start`` characters.
        """
        start, end = _as_int("start", start), _as_int("end", end)
        if end < start:
            raise ValueError(f"fetch: end ({end}) is before start ({start}).")
        key = self.resolve_chrom(chrom)
        faidx, length = self._records[key]
        lo, hi = max(start, 0), min(end, length)
        seq = faidx.fetch(key, lo + 1, hi) if hi > lo else ""
        if lo != start or hi != end:
            left = min(lo, end) - start
            seq = "N" * left + seq + "N" * (end - start - left - len(seq))
        return seq

    def _span(self, center: int, length: int, strand: str) -> tuple[int, int]:
        up, down = length // 2, length - 1 - length // 2
        return (center - up, center + down + 1) if strand == "+" else (center - down, center + up + 1)

    def _check_window_args(self, chrom: str, center: int, length: int, strand: str) -> tuple[str, int, int]:
        center, length = _as_int("center", center), _as_int("length", length)
        if length < 1:
            raise ValueError(f"length must be a positive number of bp, got {length}.")
        if strand not in ("+", "-"):
            raise ValueError(f"strand must be '+' or '-', got {strand!r}.")
        key = self.resolve_chrom(chrom)
        n = self._records[key][1]
        if not 0 <= center < n:
            raise ValueError(f"center {center} is outside chromosome {key!r} (0-based, length {n}).")
        return key, center, length

    def window(self, chrom: str, center: int, length: int, strand: str = "+") -> str:
        """Return the transcription-oriented window of ``length`` bp centred on genomic base ``center``.

        Parameters
        ----------
        chrom
            Chromosome.
        center
            0-based genomic position (e.g. a TSS) that lands at index ``length // 2`` of the
            returned window, on both strands.
        length
            Window length in bp.
        strand
            ``"+"``: the plus-strand sequence ``[center - length // 2, center - length // 2 + length)``.
            ``"-"``: the reverse complement of the plus-strand sequence
            ``[center - (length - 1 - length // 2), center + length // 2 + 1)``, so the window reads
            5'→3' along the transcript and ``center`` is again at index ``length // 2``.

        Returns
        -------
        Upper-case sequence of exactly ``length`` characters, ``N``-padded beyond the chromosome ends.
        """
        key, center, length = self._check_window_args(chrom, center, length, strand)
        start, end = self._span(center, length, strand)
        seq = self.fetch(key, start, end)
        return seq if strand == "+" else reverse_complement(seq)

    def mutated_window(
        self,
        chrom: str,
        center: int,
        length: int,
        strand: str,
        mutations: str | Mutation | Iterable[str | Mutation],
        *,
        seed: int = 0,
        tss: int | None = None,
    ) -> str:
        """Return :meth:`window` after applying ``mutations``.

        Parameters
        ----------
        chrom, center, length, strand
            As in :meth:`window`; ``center`` is normally the TSS.
        mutations
            One mutation or a list: :class:`~sc_dta.genome.Variant` objects or spec strings
            (``"chr8:11676959:C>T"``, ``"chr1:100:A>AT"``, ``"delete:-100:+50"``, ``"random:10"``;
            see :func:`~sc_dta.genome.parse_mutation`).
        seed
            Seed for :class:`~sc_dta.genome.RandomSubstitutions` without their own seed.
        tss
            0-based TSS that relative specs (``delete:...``, ``random:...``) refer to, when the window
            is not centred on the TSS itself (e.g. a DNA encoder's ``center_shift``); default ``center``.

        Returns
        -------
        The mutated, transcription-oriented window, exactly ``length`` bp, with the (possibly
        shifted) ``center`` base at index ``length // 2``.

        Notes
        -----
        Variants are applied on the genomic plus strand over a region extended by the total
        deleted length, so deletions pull in flanking sequence and the result keeps ``length`` bp.
        The centre coordinate moves with indels before it (in genomic coordinates). When a deletion
        removes the centre base, the window is centred on the first retained base after the deletion
        in transcription orientation; when a substitution or complex variant replaces it, on the
        corresponding base of the new allele. Every variant must lie inside the reference window
        and every reference allele must match the genome, else :class:`ValueError`; overlapping
        variants are refused.
        """
        from ._mutations import RandomSubstitutions, _apply, parse_mutations

        key, center, length = self._check_window_args(chrom, center, length, strand)
        seed = _as_int("seed", seed)
        anchor = center if tss is None else _as_int("tss", tss)
        start, end = self._span(center, length, strand)
        parsed = parse_mutations(mutations)
        variants = []
        for m in parsed:
            if isinstance(m, RandomSubstitutions) and (anchor - m.radius < start or anchor + m.radius >= end):
                raise ValueError(
                    f"Mutation {str(m)!r} is outside the window: {m.radius} bp around the TSS {key}:{anchor} "
                    f"(0-based) do not fit in the {length} bp window {key}:{start}-{end} (0-based, half-open)."
                )
            variants.extend(m.to_variants(self, key, anchor, strand, seed=seed))
        if not variants:
            return self.window(key, center, length, strand)
        seq, _ = _apply(self, key, center, length, strand, variants)
        return seq if strand == "+" else reverse_complement(seq)
