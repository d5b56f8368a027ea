"""GTF annotation -> one transcription start site per gene."""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd

logger = logging.getLogger(__name__)

_KEY = b"\ttranscript\t"
_BLOCK = 32 * 1024 * 1024
_CACHE: dict[tuple, pd.DataFrame] = {}
_COLUMNS = ["gene_name", "chrom", "tss", "strand", "transcript_id"]


def _transcript_lines(path: Path) -> bytes:
    """Return the lines of a (gzipped) GTF that contain a ``transcript`` field, read in blocks.

    The search runs on bytes with :meth:`bytes.find` (C speed, one step per transcript line, not per
    line of the file); the feature column is checked again after parsing.
    """
    with open(path, "rb") as fh:
        gz = fh.read(2) == b"\x1f\x8b"
    opener = gzip.open if gz else open
    chunks: list[bytes] = []
    rest = b""
    with opener(path, "rb") as fh:
        while True:
            data = fh.read(_BLOCK)
            if data:
                block = rest + data
                cut = block.rfind(b"\n") + 1
                block, rest = block[:cut], block[cut:]
            else:  # end of file: the last line may lack its newline
                block, rest = rest + b"\n", b""
            find, rfind = block.find, block.rfind
            i = find(_KEY)
            while i >= 0:
                start = rfind(b"\n", 0, i) + 1
                end = find(b"\n", i) + 1
                chunks.append(block[start:end])
                i = find(_KEY, end)
            if not data:
                break
    return b"".join(chunks)


def _disk_cache_path(path: Path, key: tuple) -> Path | None:
    from sc_dta._settings import settings

    digest = hashlib.sha1("|".join(map(str, key)).encode()).hexdigest()[:16]
    name = path.name.removesuffix(".gz").removesuffix(".gtf")
    return Path(settings.cache_dir) / "tss" / f"{name}-{digest}.v1.tsv"


def _read_cached(disk: Path) -> pd.DataFrame:
    import pandas as pd

    table = pd.read_csv(
        disk,
        sep="\t",
        index_col="gene_id",
        dtype={"gene_id": str, "gene_name": str, "chrom": str, "tss": "int64", "strand": str, "transcript_id": str},
        keep_default_na=False,
        quoting=csv.QUOTE_NONE,
    )
    if list(table.columns) != _COLUMNS:
        raise ValueError(f"unexpected columns {list(table.columns)}")
    return table


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
    memory and under ``settings.cache_dir / "tss"``, keyed by the file's path, size and modification
    time; a copy is returned.
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
    disk = _disk_cache_path(path, key)
    if disk is not None and disk.exists():
        try:
            table = _read_cached(disk)
        except (OSError, ValueError, KeyError) as e:  # a broken cache file is rebuilt
            logger.debug("read_tss: ignoring unreadable cache %s (%s).", disk, e)
        else:
            _CACHE.clear()
            _CACHE[key] = table
            return table.copy()

    text = _transcript_lines(path)
    if not text:
        raise ValueError(f"read_tss: no 'transcript' rows in {str(path)!r}; is it a GTF file (GFF3 is not supported)?")
    df = pd.read_csv(
        io.BytesIO(text),
        sep="\t",
        header=None,
        usecols=[0, 2, 3, 4, 6, 8],
        names=["chrom", "source", "feature", "start", "end", "score", "strand", "frame", "attributes"],
        dtype={"chrom": str, "feature": str, "start": "int64", "end": "int64", "strand": str, "attributes": str},
        quoting=csv.QUOTE_NONE,
        engine="c",
    )
    df = df[df["feature"].to_numpy() == "transcript"].reset_index(drop=True)
    if df.empty:
        raise ValueError(f"read_tss: no 'transcript' rows in {str(path)!r}; is it a GTF file?")
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
    if disk is not None:
        try:
            disk.parent.mkdir(parents=True, exist_ok=True)
            tmp = disk.with_name(f"{disk.name}.{os.getpid()}.tmp")
            table.to_csv(tmp, sep="\t")
            os.replace(tmp, disk)
        except OSError as e:  # caching is an optimisation only
            logger.debug("read_tss: could not write cache %s (%s).", disk, e)
    return table.copy()
