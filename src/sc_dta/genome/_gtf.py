"""GTF annotation -> one transcription start site per gene."""

from __future__ import annotations

import csv
import gzip
import io
import logging
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd

logger = logging.getLogger(__name__)

# a GTF line whose third column is "transcript" (scanned in C by `re`, block by block)
_TRANSCRIPT_LINE = re.compile(rb"^[^\t\n]*\t[^\t\n]*\ttranscript\t[^\n]*\n?", re.MULTILINE)
_BLOCK = 32 * 1024 * 1024
_CACHE: dict[tuple, pd.DataFrame] = {}
_COLUMNS = ["gene_name", "chrom", "tss", "strand", "transcript_id"]


def _transcript_lines(path: Path) -> bytes:
    """Return the transcript lines of a (gzipped) GTF, read in blocks so memory stays bounded."""
    with open(path, "rb") as fh:
        gz = fh.read(2) == b"\x1f\x8b"
    opener = gzip.open if gz else open
    chunks: list[bytes] = []
    rest = b""
    with opener(path, "rb") as fh:
        while True:
            block = fh.read(_BLOCK)
            if not block:
                break
            block = rest + block
            cut = block.rfind(b"\n") + 1
            block, rest = block[:cut], block[cut:]
            chunks.extend(_TRANSCRIPT_LINE.findall(block))
    if rest:
        chunks.extend(_TRANSCRIPT_LINE.findall(rest + b"\n"))
    return b"".join(chunks)


def _attribute(attrs: pd.Series, key: str) -> pd.Series:
    return attrs.str.extract(rf'(?:^|;)\s*{key} "([^"]*)"', expand=False)


def read_tss(gtf: str | os.PathLike) -> pd.DataFrame:
    """Read one transcription start site per gene from a GTF annotation.

    Parameters
    ----------
    gtf
        GTF file (``.gtf`` or ``.gtf.gz``), e.g. GENCODE's ``gencode.v44.basic.annotation.gtf.gz``.
        Only its ``transcript`` rows are used.

    Returns
    -------
    DataFrame indexed by Ensembl gene id without version (``gene_id``) with columns

    - ``gene_name``: gene symbol (the GTF ``gene_name``, else the gene id),
    - ``chrom``: chromosome,
    - ``tss``: 0-based position of the first transcribed base (transcript start - 1 on ``+``,
      transcript end - 1 on ``-``, in GTF's 1-based inclusive coordinates),
    - ``strand``: ``"+"`` or ``"-"``,
    - ``transcript_id``: the transcript that gave the TSS.

    Notes
    -----
    The transcript tagged ``Ensembl_canonical`` is used when a gene has one; otherwise the most
    5' transcript start (smallest start on ``+``, largest end on ``-``). GENCODE's ``_PAR_Y``
    copies of pseudoautosomal genes are dropped in favour of the chrX copy. Results are cached in
    memory per file (path, size and modification time); a copy is returned.
    """
    import pandas as pd

    path = Path(gtf)
    if not path.exists():
        raise FileNotFoundError(f"read_tss: GTF file {str(path)!r} does not exist.")
    if not path.is_file():
        raise ValueError(f"read_tss: GTF path {str(path)!r} is not a file.")
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key in _CACHE:
        return _CACHE[key].copy()

    text = _transcript_lines(path)
    if not text:
        raise ValueError(
            f"read_tss: no 'transcript' rows in {str(path)!r}; is it a GTF file (GFF3 is not supported)?"
        )
    df = pd.read_csv(
        io.BytesIO(text),
        sep="\t",
        header=None,
        usecols=[0, 3, 4, 6, 8],
        names=["chrom", "source", "feature", "start", "end", "score", "strand", "frame", "attributes"],
        dtype={"chrom": str, "start": "int64", "end": "int64", "strand": str, "attributes": str},
        quoting=csv.QUOTE_NONE,
        engine="c",
    )
    attrs = df["attributes"]
    gene_id = _attribute(attrs, "gene_id")
    if gene_id.isna().any():
        bad = int(gene_id.isna().sum())
        raise ValueError(f"read_tss: {bad} transcript rows of {str(path)!r} have no gene_id attribute.")
    transcript_id = _attribute(attrs, "transcript_id")
    gene_name = _attribute(attrs, "gene_name")
    canonical = attrs.str.contains('tag "Ensembl_canonical"', regex=False)
    par_y = gene_id.str.endswith("_PAR_Y")
    bad_strand = ~df["strand"].isin(["+", "-"])
    if bad_strand.any():
        logger.warning("read_tss: ignoring %d transcripts without a +/- strand in %s.", int(bad_strand.sum()), path)

    plus = df["strand"].to_numpy() == "+"
    stripped = gene_id.str.replace(r"_PAR_Y$", "", regex=True).str.replace(r"\.\d+$", "", regex=True)
    table = pd.DataFrame(
        {
            "gene_id": stripped,
            "gene_name": gene_name.fillna(stripped),
            "chrom": df["chrom"],
            "tss": df["start"].where(plus, df["end"]) - 1,
            "strand": df["strand"],
            "transcript_id": transcript_id,
            "_not_canonical": ~canonical,
            "_par_y": par_y,
            # most 5' first: smallest start on +, largest end on -
            "_five_prime": df["start"].where(plus, -df["end"]),
        }
    )[~bad_strand.to_numpy()]
    table = table.sort_values(["gene_id", "_par_y", "_not_canonical", "_five_prime", "transcript_id"], kind="stable")
    table = table.drop_duplicates("gene_id", keep="first").set_index("gene_id")[_COLUMNS]
    table["tss"] = table["tss"].astype("int64")
    logger.info("read_tss: %d genes from %s.", len(table), path)
    _CACHE.clear()  # keep only the latest annotation in memory
    _CACHE[key] = table
    return table.copy()
