"""A small, hand-checkable genome (FASTA + GTF) for the tests.

Other test files use it like this (``tests/`` is not a package and pytest runs with
``--import-mode=importlib``, so put the folder on ``sys.path`` first)::

    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from _genome_data import write_test_genome, expected_window, make_test_adata

    fasta, gtf, expected = write_test_genome(tmp_path)

Stable API
----------
``write_test_genome(directory, *, fasta_format="plain") -> (fasta, gtf, expected)``
    ``fasta_format``: ``"plain"`` (``genome.fa``), ``"gzip"`` (plain gzip ``genome.fa.gz``, as UCSC
    ships them) or ``"split"`` (per-chromosome plain-gzip ``chr1.fa.gz``, ``chr2.fa.gz``: ``fasta`` is
    then a list of two paths). ``gtf`` is ``genes.gtf`` (``gtf_gz=True``: ``genes.gtf.gz``).
    ``expected`` is a dict:

    - ``"sequences"``: ``{chrom: upper-case sequence}`` (the FASTA holds some lower-case bases),
    - ``"lengths"``: ``{chrom: length}``,
    - ``"genes"``: ``{gene_id (no version): {"gene_name", "chrom", "tss" (0-based first transcribed
      base), "strand", "transcript_id", "versioned_id"}}`` — hand-computed from the transcript
      coordinates below, not by parsing the GTF,
    - ``"gene_ids"``: the gene ids in a fixed order.
``expected_window(sequences, chrom, center, length, strand="+")``
    An independent implementation of the transcription-oriented, N-padded window.
``revcomp(seq)``
    Reverse complement (A/C/G/T/N).
``make_test_adata(expected, *, n_obs=30, extra_genes=("ENSG00000999999",), seed=0)``
    Raw-count AnnData whose var_names are the test gene ids (plus genes absent from the GTF),
    ``var["gene_symbols"]`` holding their symbols.

Gene layout (1-based GTF coordinates, chr1 = 12,000 bp, chr2 = 6,100 bp):

======================  =====  ======  ================================================  ===========
gene                    chrom  strand  transcripts                                       TSS (0-b)
======================  =====  ======  ================================================  ===========
ENSG00000000419 DPM1    chr1   \\+      1501-2500 canonical; 1401-2400                     1500
ENSG00000000003 TSPAN6  chr1   \\-      3001-5500 canonical; 3201-5800                     5499
ENSG00000000005 TNMD    chr1   \\+      7001-9000; 6801-8500 (no tag: most 5' start)       6800
ENSG00000000460 FIRRM   chr2   \\+      41-2000 (near the chromosome start)                40
ENSG00000000938 FGR     chr2   \\-      2501-3500; 2601-3800 (no tag: largest end)         3799
ENSG00000000457 SCYL3   chr2   \\-      4001-6080 (near the chromosome end)                6079
======================  =====  ======  ================================================  ===========
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

CHROM_LENGTHS = {"chr1": 12_000, "chr2": 6_100}
LINE_WIDTH = 60

# gene_id (versioned), gene_name, chrom, strand, [(transcript_id, start, end, canonical)], 0-based TSS
GENES = [
    (
        "ENSG00000000419.14",
        "DPM1",
        "chr1",
        "+",
        [("ENST00000371588.10", 1501, 2500, True), ("ENST00000466152.5", 1401, 2400, False)],
        1500,
        "ENST00000371588.10",
    ),
    (
        "ENSG00000000003.15",
        "TSPAN6",
        "chr1",
        "-",
        [("ENST00000373020.9", 3001, 5500, True), ("ENST00000494424.1", 3201, 5800, False)],
        5499,
        "ENST00000373020.9",
    ),
    (
        "ENSG00000000005.6",
        "TNMD",
        "chr1",
        "+",
        [("ENST00000373031.5", 7001, 9000, False), ("ENST00000485971.1", 6801, 8500, False)],
        6800,
        "ENST00000485971.1",
    ),
    (
        "ENSG00000000460.17",
        "FIRRM",
        "chr2",
        "+",
        [("ENST00000359326.9", 41, 2000, True)],
        40,
        "ENST00000359326.9",
    ),
    (
        "ENSG00000000938.13",
        "FGR",
        "chr2",
        "-",
        [("ENST00000374005.8", 2501, 3500, False), ("ENST00000399173.5", 2601, 3800, False)],
        3799,
        "ENST00000399173.5",
    ),
    (
        "ENSG00000000457.14",
        "SCYL3",
        "chr2",
        "-",
        [("ENST00000367771.11", 4001, 6080, True)],
        6079,
        "ENST00000367771.11",
    ),
]

_COMPLEMENT = str.maketrans("ACGTNacgtn", "TGCANtgcan")


def revcomp(seq: str) -> str:
    """Reverse complement of ``seq``."""
    return seq.translate(_COMPLEMENT)[::-1]


def _chromosome_sequences(seed: int = 7) -> dict[str, str]:
    """Random sequences with a soft-masked (lower-case) stretch and a run of N on chr1."""
    rng = np.random.default_rng(seed)
    seqs = {}
    for chrom, length in CHROM_LENGTHS.items():
        seqs[chrom] = "".join(np.array(list("ACGT"))[rng.integers(0, 4, size=length)])
    chr1 = list(seqs["chr1"])
    for i in range(100, 300):  # soft-masked repeat, must come back upper-case
        chr1[i] = chr1[i].lower()
    for i in range(10_000, 10_100):  # assembly gap
        chr1[i] = "N"
    seqs["chr1"] = "".join(chr1)
    return seqs


def _fasta_text(seqs: dict[str, str]) -> str:
    lines = []
    for chrom, seq in seqs.items():
        lines.append(f">{chrom} test chromosome")
        lines.extend(seq[i : i + LINE_WIDTH] for i in range(0, len(seq), LINE_WIDTH))
    return "\n".join(lines) + "\n"


def _gtf_text() -> str:
    lines = [
        "##description: small test annotation in GENCODE style",
        "##provider: sc_dta tests",
        "##format: gtf",
    ]
    for gene_id, name, chrom, strand, transcripts, _tss, _tx in GENES:
        g_start = min(t[1] for t in transcripts)
        g_end = max(t[2] for t in transcripts)
        gattr = f'gene_id "{gene_id}"; gene_type "protein_coding"; gene_name "{name}"; level 2;'
        lines.append(f"{chrom}\tHAVANA\tgene\t{g_start}\t{g_end}\t.\t{strand}\t.\t{gattr}")
        for tx_id, start, end, canonical in transcripts:
            tags = ' tag "basic";' + (' tag "Ensembl_canonical"; tag "MANE_Select";' if canonical else "")
            tattr = (
                f'gene_id "{gene_id}"; transcript_id "{tx_id}"; gene_type "protein_coding"; gene_name "{name}"; '
                f'transcript_type "protein_coding"; transcript_name "{name}-201"; level 2;{tags}'
            )
            lines.append(f"{chrom}\tHAVANA\ttranscript\t{start}\t{end}\t.\t{strand}\t.\t{tattr}")
            # two exons per transcript, at its ends
            for exon_number, (e_start, e_end) in enumerate([(start, start + 99), (end - 99, end)], start=1):
                eattr = f'{tattr} exon_number {exon_number}; exon_id "ENSE{exon_number:011d}.1";'
                lines.append(f"{chrom}\tHAVANA\texon\t{e_start}\t{e_end}\t.\t{strand}\t.\t{eattr}")
    return "\n".join(lines) + "\n"


def write_test_genome(
    directory: str | Path, *, fasta_format: str = "plain", gtf_gz: bool = False
) -> tuple[Path | list[Path], Path, dict]:
    """Write the test FASTA and GTF into ``directory``; return ``(fasta, gtf, expected)``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    seqs = _chromosome_sequences()
    if fasta_format == "plain":
        fasta: Path | list[Path] = directory / "genome.fa"
        fasta.write_text(_fasta_text(seqs))
    elif fasta_format == "gzip":
        fasta = directory / "genome.fa.gz"
        with gzip.open(fasta, "wt") as fh:
            fh.write(_fasta_text(seqs))
    elif fasta_format == "split":
        fasta = []
        for chrom, seq in seqs.items():
            path = directory / f"{chrom}.fa.gz"
            with gzip.open(path, "wt") as fh:
                fh.write(_fasta_text({chrom: seq}))
            fasta.append(path)
    else:
        raise ValueError(f"fasta_format must be 'plain', 'gzip' or 'split', got {fasta_format!r}")

    text = _gtf_text()
    if gtf_gz:
        gtf = directory / "genes.gtf.gz"
        with gzip.open(gtf, "wt") as fh:
            fh.write(text)
    else:
        gtf = directory / "genes.gtf"
        gtf.write_text(text)

    genes = {}
    for gene_id, name, chrom, strand, _transcripts, tss, tx in GENES:
        genes[gene_id.split(".")[0]] = {
            "gene_name": name,
            "chrom": chrom,
            "tss": tss,
            "strand": strand,
            "transcript_id": tx,
            "versioned_id": gene_id,
        }
    expected = {
        "sequences": {c: s.upper() for c, s in seqs.items()},
        "lengths": dict(CHROM_LENGTHS),
        "genes": genes,
        "gene_ids": list(genes),
    }
    return fasta, gtf, expected


def expected_window(sequences: dict[str, str], chrom: str, center: int, length: int, strand: str = "+") -> str:
    """Independent reference: ``length`` bp, genomic base ``center`` at index ``length // 2``, N-padded."""
    seq = sequences[chrom]
    if strand == "+":
        start = center - length // 2
    else:
        start = center - (length - 1 - length // 2)
    out = "".join(seq[i] if 0 <= i < len(seq) else "N" for i in range(start, start + length))
    return out if strand == "+" else revcomp(out)


def make_test_adata(
    expected: dict, *, n_obs: int = 30, extra_genes: tuple[str, ...] = ("ENSG00000999999",), seed: int = 0
):
    """Raw-count AnnData over the test genes (var_names = Ensembl ids) plus ``extra_genes`` (not in the GTF)."""
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    ids = list(expected["gene_ids"]) + list(extra_genes)
    symbols = [expected["genes"][g]["gene_name"] for g in expected["gene_ids"]] + [
        f"GENE{i}" for i in range(len(extra_genes))
    ]
    rng = np.random.default_rng(seed)
    counts = rng.poisson(2.0, size=(n_obs, len(ids))).astype(np.float32)
    adata = ad.AnnData(
        X=sp.csr_matrix(counts),
        obs=pd.DataFrame(index=[f"cell{i}" for i in range(n_obs)]),
        var=pd.DataFrame({"gene_symbols": symbols}, index=ids),
    )
    adata.obs["n_counts"] = counts.sum(1)
    return adata
