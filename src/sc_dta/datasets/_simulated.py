"""A simulated gene regulatory network with a synthetic genome, for demos and tests (no downloads)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from sc_dta._settings import settings

if TYPE_CHECKING:
    from anndata import AnnData

logger = logging.getLogger(__name__)

__all__ = ["SimulatedGRN", "simulated_grn"]

CELL_TYPE_NAMES = (
    "cardiomyocyte",
    "fibroblast",
    "endothelial",
    "smooth_muscle",
    "epicardial",
    "immune",
    "neural_crest",
    "erythroid",
)
#: Default binding motif of the simulated transcription factor (GATA-like core, 12 bp, not a palindrome).
DEFAULT_MOTIF = "TCAGATAAGGCA"
#: Motif start positions in the TF promoter, relative to its TSS in transcription orientation (TSS base = 0).
TF_MOTIF_POSITIONS = (-92, -71, -50, -29)
#: Motif start positions planted in direct-target promoters.
TARGET_MOTIF_POSITIONS = (-80, -45)
#: A TSS mutation that removes every planted motif from the TF promoter.
TF_MUTATION = "delete:-150:+50"
_BASES = np.array(list("ACGT"))
_GC_PROBS = (0.3, 0.2, 0.2, 0.3)  # A, C, G, T: GC content 40 %
_FASTA_LINE = 60
_VERSION = 1  # bump when the generative model changes (part of the cache key)


@dataclass
class SimulatedGRN:
    """Result of :func:`simulated_grn`.

    Attributes
    ----------
    adata
        Cells × genes, raw integer counts in ``X`` (CSR). ``var_names`` are Ensembl-like ids
        (``ENSSIM00000000001``), ``var['gene_symbol']``, ``var['gene_id_version']``, ``var['sim_role']`` (the
        planted role of each gene), ``obs['cell_type']``, ``obs['tf_activity']`` (latent TF activity) and
        ``obs['n_counts']``. ``uns['simulated_grn']`` records the parameters and the truth.
    fasta
        Path of the synthetic genome (plain FASTA, ``.fai`` index built on first use).
    gtf
        Path of the GENCODE-like annotation (gene, transcript and exon rows).
    truth
        Gene id lists: ``'tf'`` (one id), ``'direct'``, ``'indirect'``, ``'housekeeping'``, ``'marker'`` and
        ``'unrelated'``; pairwise disjoint and together covering all genes.
    tf
        Ensembl-like id of the transcription factor.
    tf_symbol
        Its symbol (``'SIMTF1'``).
    tf_motif
        The planted binding motif (as read on the transcribed strand).
    motif_positions
        Start of each motif copy in the TF promoter, relative to the TSS in transcription orientation
        (TSS base = 0, upstream negative); each copy spans ``[p, p + len(tf_motif))``.
    mutation
        A mutation spec for :func:`sc_dta.tl.perturb_tss` that removes all motif copies.
    params
        Parameters used.
    """

    adata: AnnData
    fasta: Path
    gtf: Path
    truth: dict[str, list[str]]
    tf: str
    tf_symbol: str
    tf_motif: str
    motif_positions: tuple[int, ...]
    mutation: str = TF_MUTATION
    params: dict = field(default_factory=dict)

    def __repr__(self) -> str:
        sizes = ", ".join(f"{k}={len(v)}" for k, v in self.truth.items())
        return (
            f"SimulatedGRN(n_obs={self.adata.n_obs}, n_vars={self.adata.n_vars}, tf={self.tf!r} ({self.tf_symbol}), "
            f"{sizes}, fasta={str(self.fasta)!r}, gtf={str(self.gtf)!r})"
        )


def simulated_grn(
    n_cells: int = 3000,
    n_genes: int = 300,
    *,
    n_cell_types: int = 3,
    n_direct: int = 20,
    n_indirect: int = 20,
    n_housekeeping: int = 30,
    n_markers: int = 15,
    n_chromosomes: int = 3,
    gene_spacing: int = 4000,
    tf_motif: str = DEFAULT_MOTIF,
    dispersion: float = 20.0,
    umis_per_cell: float | None = None,
    seed: int = 0,
    out_dir: str | os.PathLike | None = None,
) -> SimulatedGRN:
    r"""Simulate single-cell counts from a planted gene regulatory network, with its genome and annotation.

    Everything is generated from ``seed`` (no downloads, well under a second for the defaults) so that
    the whole Bio-DTA pipeline can be run and scored against a known truth.

    **Genome.** ``n_chromosomes`` chromosomes (``chr1`` …) of i.i.d. random sequence with 40 % GC. Each
    gene sits in its own slot of ``gene_spacing`` bp (its TSS in the middle of the slot, genes on both
    strands), so DNA windows of up to ``gene_spacing`` bp centred on different TSSs never overlap. Each
    gene has a canonical transcript (tag ``Ensembl_canonical``) of two or three exons starting at the TSS;
    about a third of the genes also have a shorter, non-canonical transcript starting 200 bp downstream.
    Chance copies of the motif (either strand) are removed from the whole genome; then the motif is
    planted, on the transcribed strand, at ``TF_MOTIF_POSITIONS`` (four copies within 100 bp upstream of
    the TSS) in the TF promoter and at two positions in each direct-target promoter. The TSS mutation
    ``"delete:-150:+50"`` therefore removes every motif from the TF promoter.

    **Regulatory network.** Gene roles are assigned at random to the genes: one transcription factor
    (``SIMTF1``), ``n_direct`` direct targets, ``n_indirect`` indirect targets, ``n_housekeeping``
    housekeeping genes, ``n_markers`` marker genes per cell type, and the rest unrelated. The latent TF
    activity :math:`a_c \in [0, 1]` of cell :math:`c` is :math:`\mathrm{Uniform}(0.2, 1)` in 70 % of the
    ``cardiomyocyte`` cells and 0 in the others, :math:`\mathrm{Uniform}(0.1, 0.6)` in 30 % of the cells of the
    second cell type (0 in the others) and 0 in all other types, so that the network varies within cell types
    and is not confounded with them. Expected expression (before library size) is

    - TF: :math:`\mu = 0.2 + 40\,a_c`;
    - direct target :math:`g` (base :math:`b_g`, gain :math:`w_g \in [4, 10]`):
      :math:`\mu = b_g (0.05 + w_g a_c^{h_g}) \epsilon_{cg}`, with Hill-like exponents :math:`h_g \in [1, 2]`
      and cell-gene log-normal noise :math:`\epsilon_{cg}` (σ = 0.25);
    - indirect target: driven by one or two direct targets ("parents"):
      :math:`\mu = b_g (0.05 + w_g \bar r_{c})`, where :math:`\bar r_c` is the mean over parents of the
      parent's normalised regulatory input :math:`a_c^{h_p} \epsilon_{cp}` (so indirect targets follow the
      TF only through their parents, with their parents' noise);
    - housekeeping: high, constant :math:`\mu = b_g` with :math:`b_g` in [20, 60];
    - markers of cell type :math:`t`: :math:`\mu = b_g` in cells of type :math:`t`, :math:`0.03\,b_g` elsewhere;
    - unrelated: constant :math:`\mu = b_g`, log-normal bases (median 1.5), plus half of them following a
      random cell-type-independent programme :math:`z_c \sim \mathrm{Uniform}(0, 1)`: :math:`\mu = b_g (0.2 + 1.6 z_c)`.

    Counts are negative binomial (gamma–Poisson) with mean :math:`s_c \mu` and dispersion ``dispersion``
    (variance :math:`m + m^2/\theta`), with library-size factors :math:`s_c` log-normal (σ = 0.35).

    Parameters
    ----------
    n_cells
        Number of cells (split as evenly as possible between the cell types).
    n_genes
        Number of genes; must exceed the planted genes (1 + ``n_direct`` + ``n_indirect`` +
        ``n_housekeeping`` + ``n_cell_types`` × ``n_markers``).
    n_cell_types
        Number of cell types (2 to 8); the first is ``'cardiomyocyte'`` where the TF is active.
    n_direct, n_indirect, n_housekeeping, n_markers
        Sizes of the gene groups (``n_markers`` per cell type).
    n_chromosomes
        Number of synthetic chromosomes.
    gene_spacing
        Bp between consecutive TSSs; DNA windows up to this length do not overlap.
    tf_motif
        The TF binding motif (A/C/G/T, 6–30 bp, not its own reverse complement).
    dispersion
        Negative-binomial dispersion θ (larger = less noise).
    umis_per_cell
        Sparse 10x-like data: the counts are thinned binomially so that each cell keeps about this many UMIs on
        average (each count kept with probability ``min(1, umis_per_cell / total)``); None keeps the full counts.
    seed
        Random seed; the same seed and parameters give identical counts, FASTA and GTF.
    out_dir
        Where ``genome.fa`` and ``genes.gtf`` are written. Default:
        ``settings.cache_dir / "simulated" / <hash of the parameters>``.

    Returns
    -------
    :class:`SimulatedGRN` with the AnnData, the FASTA and GTF paths, the truth gene lists and the motif
    positions.

    Examples
    --------
    >>> import sc_dta as dta
    >>> sim = dta.datasets.simulated_grn(n_cells=500, seed=1)
    >>> sim.adata
    >>> dta.pp.annotate_tss(sim.adata, sim.gtf)
    """
    params = {
        "n_cells": n_cells,
        "n_genes": n_genes,
        "n_cell_types": n_cell_types,
        "n_direct": n_direct,
        "n_indirect": n_indirect,
        "n_housekeeping": n_housekeeping,
        "n_markers": n_markers,
        "n_chromosomes": n_chromosomes,
        "gene_spacing": gene_spacing,
        "tf_motif": tf_motif,
        "dispersion": dispersion,
        "seed": seed,
    }
    if umis_per_cell is not None:
        params["umis_per_cell"] = float(umis_per_cell)
    _validate(params)
    tf_motif = tf_motif.upper()
    params["tf_motif"] = tf_motif
    rng = np.random.default_rng(seed)

    # ---- gene roles and layout ------------------------------------------------------------------
    types = list(CELL_TYPE_NAMES[:n_cell_types])
    roles = np.array(
        ["tf"]
        + ["direct"] * n_direct
        + ["indirect"] * n_indirect
        + ["housekeeping"] * n_housekeeping
        + ["marker"] * (n_markers * n_cell_types)
        + ["unrelated"] * (n_genes - 1 - n_direct - n_indirect - n_housekeeping - n_markers * n_cell_types),
        dtype=object,
    )
    marker_type = np.array([""] * (1 + n_direct + n_indirect + n_housekeeping), dtype=object)
    marker_type = np.concatenate(
        [
            marker_type,
            np.repeat(np.array(types, dtype=object), n_markers),
            np.array([""] * (n_genes - len(marker_type) - n_markers * n_cell_types), dtype=object),
        ]
    )
    order = rng.permutation(n_genes)  # genome position of each role slot
    role = np.empty(n_genes, dtype=object)
    mtype = np.empty(n_genes, dtype=object)
    role[order] = roles
    mtype[order] = marker_type
    gene_ids = np.array([f"ENSSIM{i + 1:011d}" for i in range(n_genes)], dtype=object)
    symbols = _symbols(role, mtype)

    # ---- genome ---------------------------------------------------------------------------------
    seqs, chrom_of, tss, strands = synthetic_genome(rng, role, n_chromosomes, gene_spacing, tf_motif)

    # ---- transcripts ----------------------------------------------------------------------------
    gtf_lines = _gtf_lines(rng, gene_ids, symbols, role, chrom_of, tss, strands, gene_spacing)

    # ---- expression -----------------------------------------------------------------------------
    counts, obs = _simulate_counts(rng, n_cells, types, role, mtype, dispersion)
    if umis_per_cell is not None:
        if not umis_per_cell > 0:
            raise ValueError(f"umis_per_cell must be positive or None, got {umis_per_cell!r}.")
        totals = counts.sum(axis=1, keepdims=True)
        keep = np.minimum(1.0, float(umis_per_cell) / np.maximum(totals, 1))
        counts = np.random.default_rng([seed, 100]).binomial(counts, keep).astype(np.int32)
        obs["n_counts"] = counts.sum(axis=1)

    # ---- assemble -------------------------------------------------------------------------------
    import anndata as ad
    import pandas as pd
    from scipy import sparse

    truth = {r: [str(x) for x in gene_ids[role == r]] for r in ("tf", "direct", "indirect", "housekeeping")}
    truth["marker"] = [str(x) for x in gene_ids[role == "marker"]]
    truth["unrelated"] = [str(x) for x in gene_ids[role == "unrelated"]]
    var = pd.DataFrame(
        {
            "gene_symbol": symbols.astype(str),
            "gene_id_version": [f"{g}.1" for g in gene_ids],
            "sim_role": pd.Categorical(role.astype(str)),
            "sim_marker_of": mtype.astype(str),
        },
        index=pd.Index(gene_ids.astype(str)),
    )
    obs.index = pd.Index([f"cell{i:05d}" for i in range(n_cells)])
    adata = ad.AnnData(X=sparse.csr_matrix(counts), obs=obs, var=var)
    tf_id = truth["tf"][0]
    adata.uns["simulated_grn"] = {
        "params": dict(params),
        "tf": tf_id,
        "tf_motif": tf_motif,
        "motif_positions": list(TF_MOTIF_POSITIONS),
        "mutation": TF_MUTATION,
        "version": _VERSION,
    }

    out = Path(out_dir) if out_dir is not None else _default_dir(params)
    out.mkdir(parents=True, exist_ok=True)
    fasta = out / "genome.fa"
    gtf = out / "genes.gtf"
    _write_if_changed(fasta, _fasta_text(seqs))
    _write_if_changed(gtf, "".join(gtf_lines))
    logger.info("simulated %d cells x %d genes; genome and annotation in %s", n_cells, n_genes, out)
    return SimulatedGRN(
        adata=adata,
        fasta=fasta,
        gtf=gtf,
        truth=truth,
        tf=tf_id,
        tf_symbol=str(symbols[gene_ids == tf_id][0]),
        tf_motif=tf_motif,
        motif_positions=TF_MOTIF_POSITIONS,
        mutation=TF_MUTATION,
        params=params,
    )


# ------------------------------------------------------------------------------------------------
def synthetic_genome(
    rng: np.random.Generator, role: np.ndarray, n_chromosomes: int, gene_spacing: int, motif: str
) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, np.ndarray]:
    """Random chromosomes with one gene per ``gene_spacing`` slot and the TF motif planted by role.

    Returns the sequences (uint8 per chromosome), and per gene its chromosome, 0-based TSS and strand. The motif is
    removed from the background, then planted at :data:`TF_MOTIF_POSITIONS` in the TF's promoter and at
    :data:`TARGET_MOTIF_POSITIONS` in each direct target's promoter.
    """
    n_genes = len(role)
    strands = rng.choice(np.array(["+", "-"]), size=n_genes)
    chrom_of = np.empty(n_genes, dtype=object)
    tss = np.zeros(n_genes, dtype=np.int64)  # 0-based first transcribed base
    lengths = {}
    for ci, genes in enumerate(np.array_split(np.arange(n_genes), n_chromosomes)):
        name = f"chr{ci + 1}"
        for j, g in enumerate(genes):
            chrom_of[g] = name
            tss[g] = gene_spacing // 2 + j * gene_spacing + gene_spacing // 2
        lengths[name] = (len(genes) + 1) * gene_spacing
    seqs = {c: _random_sequence(rng, n) for c, n in lengths.items()}
    for c in seqs:
        _remove_motif(seqs[c], motif, rng)
    motif_arr = np.frombuffer(motif.encode(), dtype=np.uint8)
    for g in range(n_genes):
        for rel in {"tf": TF_MOTIF_POSITIONS, "direct": TARGET_MOTIF_POSITIONS}.get(role[g], ()):
            _plant(seqs[chrom_of[g]], motif_arr, int(tss[g]), strands[g], rel)
    return seqs, chrom_of, tss, strands


def _validate(p: dict) -> None:
    for name in ("n_cells", "n_genes", "n_cell_types", "n_chromosomes", "gene_spacing", "n_markers"):
        v = p[name]
        if isinstance(v, bool) or not isinstance(v, int | np.integer) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}.")
    for name in ("n_direct", "n_indirect", "n_housekeeping"):
        v = p[name]
        if isinstance(v, bool) or not isinstance(v, int | np.integer) or v < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {v!r}.")
    if not 2 <= p["n_cell_types"] <= len(CELL_TYPE_NAMES):
        raise ValueError(f"n_cell_types must be between 2 and {len(CELL_TYPE_NAMES)}, got {p['n_cell_types']!r}.")
    if p["n_indirect"] > 0 and p["n_direct"] == 0:
        raise ValueError("n_indirect > 0 needs at least one direct target (n_direct >= 1).")
    planted = 1 + p["n_direct"] + p["n_indirect"] + p["n_housekeeping"] + p["n_markers"] * p["n_cell_types"]
    if p["n_genes"] <= planted:
        raise ValueError(
            f"n_genes={p['n_genes']} must exceed the {planted} planted genes (1 TF + n_direct + n_indirect + "
            "n_housekeeping + n_cell_types * n_markers) so that some genes are unrelated."
        )
    if p["n_chromosomes"] > p["n_genes"]:
        raise ValueError(f"n_chromosomes={p['n_chromosomes']} exceeds n_genes={p['n_genes']}.")
    if p["gene_spacing"] < 1000:
        raise ValueError(f"gene_spacing must be at least 1000 bp, got {p['gene_spacing']!r}.")
    motif = p["tf_motif"]
    if not isinstance(motif, str) or not 6 <= len(motif) <= 30 or set(motif.upper()) - set("ACGT"):
        raise ValueError(f"tf_motif must be 6-30 bases of A/C/G/T, got {motif!r}.")
    if motif.upper() == _revcomp(motif.upper()):
        raise ValueError(f"tf_motif={motif!r} is its own reverse complement; choose a non-palindromic motif.")
    if not float(p["dispersion"]) > 0:
        raise ValueError(f"dispersion must be positive, got {p['dispersion']!r}.")
    if not isinstance(p["seed"], int | np.integer) or isinstance(p["seed"], bool):
        raise ValueError(f"seed must be an integer, got {p['seed']!r}.")


def _default_dir(params: dict) -> Path:
    key = json.dumps({**params, "version": _VERSION}, sort_keys=True, default=str)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return settings.cache_dir / "simulated" / digest


def _symbols(role: np.ndarray, mtype: np.ndarray) -> np.ndarray:
    out = np.empty(len(role), dtype=object)
    counters: dict[str, int] = {}
    prefix = {"tf": "SIMTF", "direct": "DIR", "indirect": "IND", "housekeeping": "HK", "unrelated": "UNR"}
    for i, (r, t) in enumerate(zip(role, mtype, strict=True)):
        key = f"MK_{t}" if r == "marker" else r
        counters[key] = counters.get(key, 0) + 1
        if r == "marker":
            out[i] = f"{t[:4].upper()}MK{counters[key]}"
        else:
            out[i] = f"{prefix[r]}{counters[key]}"
    return out


_COMP = bytes.maketrans(b"ACGTN", b"TGCAN")


def _revcomp(s: str) -> str:
    return s.encode().translate(_COMP)[::-1].decode()


def _random_sequence(rng: np.random.Generator, n: int) -> np.ndarray:
    codes = np.frombuffer(b"ACGT", dtype=np.uint8)
    return codes[rng.choice(4, size=n, p=_GC_PROBS)].copy()


def _find_all(seq: np.ndarray, motif: bytes) -> list[int]:
    text = seq.tobytes()
    hits, start = [], text.find(motif)
    while start != -1:
        hits.append(start)
        start = text.find(motif, start + 1)
    return hits


def _remove_motif(seq: np.ndarray, motif: str, rng: np.random.Generator) -> None:
    """Mutate chance occurrences of ``motif`` (both strands) until none is left."""
    codes = np.frombuffer(b"ACGT", dtype=np.uint8)
    for pattern in {motif.encode(), _revcomp(motif).encode()}:
        for _ in range(100):
            hits = _find_all(seq, pattern)
            if not hits:
                break
            for h in hits:
                k = h + len(pattern) // 2
                seq[k] = codes[(np.searchsorted(codes, seq[k]) + rng.integers(1, 4)) % 4]


def _plant(seq: np.ndarray, motif: np.ndarray, tss: int, strand: str, rel: int) -> None:
    """Write ``motif`` (read on the transcribed strand) starting ``rel`` bp from the TSS."""
    m = len(motif)
    if strand == "+":
        start = tss + rel
        seq[start : start + m] = motif
    else:
        # transcription-oriented position p maps to genomic tss - p; the motif's first base is at tss - rel
        end = tss - rel + 1
        rc = np.frombuffer(_revcomp(motif.tobytes().decode()).encode(), dtype=np.uint8)
        seq[end - m : end] = rc


def _fasta_text(seqs: dict[str, np.ndarray]) -> str:
    parts = []
    for name, s in seqs.items():
        parts.append(f">{name} simulated\n")
        text = s.tobytes().decode()
        parts.append("\n".join(text[i : i + _FASTA_LINE] for i in range(0, len(text), _FASTA_LINE)))
        parts.append("\n")
    return "".join(parts)


def _gtf_lines(
    rng: np.random.Generator,
    gene_ids: np.ndarray,
    symbols: np.ndarray,
    role: np.ndarray,
    chrom_of: np.ndarray,
    tss: np.ndarray,
    strands: np.ndarray,
    spacing: int,
) -> list[str]:
    lines = ["##description: sc_dta simulated genome annotation (GENCODE-like)\n", "##provider: sc_dta\n"]
    max_len = spacing // 2 - 100
    tx_counter = 0

    def row(chrom, feature, start0, end0, strand, attrs):
        attr = " ".join(f'{k} "{v}";' for k, v in attrs)
        return f"{chrom}\tSIMULATED\t{feature}\t{start0 + 1}\t{end0}\t.\t{strand}\t.\t{attr}\n"

    for g in range(len(gene_ids)):
        chrom, strand, t = chrom_of[g], strands[g], int(tss[g])
        length = int(rng.integers(max_len // 2, max_len))
        n_exons = int(rng.integers(2, 4))
        # exon boundaries in transcript coordinates (0 = TSS), introns between exons
        cuts = np.sort(rng.choice(np.arange(100, length - 100), size=2 * (n_exons - 1), replace=False))
        exons_rel = [(0, int(cuts[0]))] if n_exons > 1 else [(0, length)]
        for k in range(1, n_exons - 1):
            exons_rel.append((int(cuts[2 * k - 1]), int(cuts[2 * k])))
        if n_exons > 1:
            exons_rel.append((int(cuts[-1]), length))
        transcripts = [(exons_rel, True)]
        if rng.random() < 1 / 3:  # an alternative, non-canonical transcript starting 200 bp downstream
            first_end = exons_rel[0][1]
            alt = [(min(200, first_end - 10), first_end), *exons_rel[1:]]
            transcripts.append((alt, False))

        def genomic(a: int, b: int, t: int = t, strand: str = strand) -> tuple[int, int]:
            # transcript-relative [a, b) to genomic 0-based half-open
            if strand == "+":
                return t + a, t + b
            return t - b + 1, t - a + 1

        gstart, gend = genomic(0, length)
        gid = f"{gene_ids[g]}.1"
        base = [("gene_id", gid), ("gene_type", "protein_coding"), ("gene_name", symbols[g]), ("level", "2")]
        lines.append(row(chrom, "gene", gstart, gend, strand, base))
        for exons, canonical in transcripts:
            tx_counter += 1
            tid = f"ENSSIMT{tx_counter:011d}.1"
            tattrs = [
                *base[:3],
                ("transcript_id", tid),
                ("transcript_type", "protein_coding"),
                ("transcript_name", f"{symbols[g]}-{201 if canonical else 202}"),
                ("level", "2"),
            ]
            if canonical:
                tattrs.append(("tag", "Ensembl_canonical"))
            ts, te = genomic(exons[0][0], exons[-1][1])
            lines.append(row(chrom, "transcript", ts, te, strand, tattrs))
            for k, (a, b) in enumerate(exons):
                es, ee = genomic(a, b)
                lines.append(row(chrom, "exon", es, ee, strand, [*tattrs[:4], ("exon_number", str(k + 1))]))
    return lines


def _simulate_counts(
    rng: np.random.Generator,
    n_cells: int,
    types: list[str],
    role: np.ndarray,
    mtype: np.ndarray,
    dispersion: float,
):
    import pandas as pd

    n_genes = len(role)
    n_types = len(types)
    cell_type = np.repeat(np.arange(n_types), int(np.ceil(n_cells / n_types)))[:n_cells]
    cell_type = rng.permutation(cell_type)

    # latent TF activity: on in most cardiomyocytes and some cells of the second type, varying within types
    a = np.zeros(n_cells)
    for t, (p_on, low, high) in ((0, (0.7, 0.2, 1.0)), (1, (0.3, 0.1, 0.6))):
        members = np.flatnonzero(cell_type == t)
        on = members[rng.random(len(members)) < p_on]
        a[on] = rng.uniform(low, high, len(on))
    # an unrelated, cell-type-independent programme
    z = rng.uniform(0.0, 1.0, n_cells)

    mu = np.zeros((n_cells, n_genes))
    idx = {r: np.flatnonzero(role == r) for r in ("tf", "direct", "indirect", "housekeeping", "marker", "unrelated")}
    mu[:, idx["tf"]] = (0.2 + 40.0 * a)[:, None]

    d = idx["direct"]
    reg_input = np.zeros((n_cells, len(d)))
    if len(d):
        base = rng.uniform(1.0, 4.0, len(d))
        gain = rng.uniform(4.0, 10.0, len(d))
        hill = rng.uniform(1.0, 2.0, len(d))
        noise = rng.lognormal(0.0, 0.25, (n_cells, len(d)))
        reg_input = a[:, None] ** hill[None, :] * noise
        mu[:, d] = base * (0.05 + gain * reg_input)

    ind = idx["indirect"]
    if len(ind):
        base = rng.uniform(1.0, 4.0, len(ind))
        gain = rng.uniform(4.0, 10.0, len(ind))
        for j, g in enumerate(ind):
            parents = rng.choice(len(d), size=min(len(d), int(rng.integers(1, 3))), replace=False)
            mu[:, g] = base[j] * (0.05 + gain[j] * reg_input[:, parents].mean(axis=1))

    hk = idx["housekeeping"]
    mu[:, hk] = rng.uniform(20.0, 60.0, len(hk))

    mk = idx["marker"]
    if len(mk):
        base = rng.uniform(4.0, 15.0, len(mk))
        own = np.array([types.index(t) for t in mtype[mk]])
        mu[:, mk] = base * np.where(cell_type[:, None] == own[None, :], 1.0, 0.03)

    un = idx["unrelated"]
    if len(un):
        base = rng.lognormal(np.log(1.5), 0.8, len(un))
        programme = rng.random(len(un)) < 0.5
        factor = np.where(programme[None, :], 0.2 + 1.6 * z[:, None], 1.0)
        mu[:, un] = base * factor

    size_factor = rng.lognormal(0.0, 0.35, n_cells)
    mean = mu * size_factor[:, None]
    lam = rng.gamma(shape=dispersion, scale=mean / dispersion)
    counts = rng.poisson(lam).astype(np.int32)

    obs = pd.DataFrame(
        {
            "cell_type": pd.Categorical(np.array(types, dtype=object)[cell_type].astype(str), categories=types),
            "tf_activity": a.astype(np.float32),
            "size_factor": size_factor.astype(np.float32),
            "n_counts": counts.sum(axis=1).astype(np.int64),
        }
    )
    return counts, obs


def _write_if_changed(path: Path, text: str) -> None:
    data = text.encode()
    if path.exists() and path.stat().st_size == len(data) and path.read_bytes() == data:
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    fai = path.with_name(path.name + ".fai")
    if fai.exists():  # a stale index from an earlier, different file
        fai.unlink()
