"""``pp.annotate_tss``: transcription start sites of the genes in ``adata.var``."""

from __future__ import annotations

import logging
import os
import re
import warnings
from typing import TYPE_CHECKING

from sc_dta._utils import get_anndata

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd
    from anndata import AnnData
    from mudata import MuData

logger = logging.getLogger(__name__)

_PRIMARY = re.compile(r"^(chr)?([0-9]+|X|Y|M|MT)$")
_REQUIRED = ("chrom", "tss", "strand")
#: Below this fraction of matched genes, annotate_tss warns (and at zero it raises).
_MIN_MATCHED_FRACTION = 0.5


def _tss_table(gtf: str | os.PathLike | pd.DataFrame) -> tuple[pd.DataFrame, str]:
    import pandas as pd

    from sc_dta.genome import read_tss

    if isinstance(gtf, pd.DataFrame):
        missing = [c for c in _REQUIRED if c not in gtf.columns]
        if missing:
            raise ValueError(
                f"annotate_tss: the gtf DataFrame lacks columns {missing}; pass a path or the output of "
                "sc_dta.genome.read_tss (columns gene_name, chrom, tss, strand)."
            )
        if not gtf.index.is_unique:
            dup = gtf.index[gtf.index.duplicated()][:5].tolist()
            raise ValueError(f"annotate_tss: the gtf DataFrame index (gene ids) has duplicates, e.g. {dup}.")
        bad = ~gtf["strand"].isin(["+", "-"])
        if bad.any():
            raise ValueError(
                f"annotate_tss: the gtf DataFrame has strand values other than '+'/'-': "
                f"{sorted(map(str, gtf.loc[bad, 'strand'].unique()))[:5]}."
            )
        return gtf, "DataFrame"
    if not isinstance(gtf, str | os.PathLike):
        raise TypeError(f"annotate_tss: gtf must be a path or a DataFrame from read_tss, got {type(gtf).__name__}.")
    return read_tss(gtf), str(gtf)


def _strip_version(ids: pd.Index) -> pd.Index:
    return ids.str.replace(r"_PAR_Y$", "", regex=True).str.replace(r"\.\d+$", "", regex=True)


def _match(table: pd.DataFrame, candidates: list[pd.Index]) -> tuple[np.ndarray, int, int]:
    """Row of ``table`` for each gene (-1: unmatched), and the numbers matched by id and by symbol.

    ``candidates[0]`` is matched by Ensembl id (version ignored), then every candidate in turn by symbol.
    """
    import numpy as np
    import pandas as pd

    keys = candidates[0]
    row = pd.Index(table.index.astype(str)).get_indexer(_strip_version(keys))
    n_by_id = int((row >= 0).sum())
    n_by_symbol = 0
    if "gene_name" in table.columns and (row < 0).any():
        symbols = pd.DataFrame(
            {
                "symbol": table["gene_name"].astype(str).str.upper().to_numpy(),
                "secondary": ~table["chrom"].astype(str).str.match(_PRIMARY.pattern).to_numpy(),
                "gene_id": table.index.astype(str),
                "row": np.arange(len(table)),
            }
        )
        symbols = symbols.sort_values(["symbol", "secondary", "gene_id"], kind="stable").drop_duplicates("symbol")
        by_symbol = pd.Index(symbols["symbol"])
        for cand in candidates:
            todo = row < 0
            if not todo.any():
                break
            hit = by_symbol.get_indexer(cand.astype(str).str.upper())
            fill = todo & (hit >= 0)
            row[fill] = symbols["row"].to_numpy()[hit[fill]]
            n_by_symbol += int(fill.sum())
    return row, n_by_id, n_by_symbol


def _examples(values: pd.Index | pd.Series, n: int = 3) -> str:
    return ", ".join(repr(str(v)) for v in list(values[:n]))


def _match_hint(var: pd.DataFrame, table: pd.DataFrame, keys: pd.Index, gene_id_key: str | None, n_matched: int) -> str:
    """Explain how genes are matched, show what was compared, and name a ``gene_id_key`` that would match more."""
    import pandas as pd

    used = "adata.var_names" if gene_id_key is None else f"adata.var[{gene_id_key!r}]"
    parts = [
        f"{used} look like {_examples(keys)}; the GTF's gene ids like {_examples(table.index)}"
        + (f" and its gene_name symbols like {_examples(table['gene_name'])}." if "gene_name" in table else ".")
    ]
    parts.append(
        "Genes are matched by Ensembl gene id (a version suffix such as '.19' on the adata side is ignored), "
        "then by symbol (GTF gene_name, case-insensitive)."
    )
    if pd.Index(table.index.astype(str)).str.contains(r"\.\d+$", regex=True).any():
        parts.append(
            "The GTF table's gene ids carry versions: strip them (or read the GTF with sc_dta.genome.read_tss)."
        )
    best: tuple[int, str | None] = (n_matched, None)
    textual = [c for c in var.columns if var[c].dtype.kind in "OSU" or str(var[c].dtype) in ("category", "string")]
    columns = [c for c in textual if c != gene_id_key]
    for column in ([None] if gene_id_key is not None else []) + columns:
        cand = pd.Index(var.index if column is None else var[column].astype(str), dtype=object)
        row, _, _ = _match(table, [cand])
        if int((row >= 0).sum()) > best[0]:
            best = (int((row >= 0).sum()), column)
    if best[1] is not None:
        parts.append(
            f"adata.var[{best[1]!r}] would match {best[0]} of {len(keys)} genes: pass gene_id_key={best[1]!r}."
        )
    elif gene_id_key is not None and best[0] > n_matched:
        parts.append(f"adata.var_names would match {best[0]} of {len(keys)} genes: leave gene_id_key=None.")
    else:
        parts.append(
            "Pass gene_id_key= naming the adata.var column that holds Ensembl ids or symbols (e.g. 'gene_ids', "
            "'gene_symbols'), and check that the GTF is for the same species."
        )
    return " ".join(parts)


def annotate_tss(
    adata: AnnData | MuData,
    gtf: str | os.PathLike | pd.DataFrame,
    *,
    gene_id_key: str | None = None,
    mod: str = "rna",
    copy: bool = False,
) -> AnnData | MuData | None:
    """Annotate each gene with its transcription start site.

    Genes are matched by Ensembl gene id without version (``ENSG00000136574.19`` matches
    ``ENSG00000136574``), taken from ``adata.var_names`` or ``adata.var[gene_id_key]``; the genes
    that do not match an id are then matched by symbol (the GTF ``gene_name``, case-insensitive),
    using the same values and, when ``gene_id_key`` is given, the var names too. A symbol shared by
    several genes resolves to the gene on a primary chromosome (``chr1``-``chr22``, ``X``, ``Y``,
    ``M``), then to the smallest gene id. Unmatched genes get missing values; their count is logged.
    When no gene matches, this is an error; when fewer than half match, a :class:`UserWarning` gives
    the count. Both messages show what was compared and name a ``gene_id_key`` that would match more.

    Parameters
    ----------
    adata
        Annotated data matrix, or a MuData (the ``mod`` modality is annotated).
    gtf
        GTF file (``.gtf``/``.gtf.gz``), or a TSS table from :func:`sc_dta.genome.read_tss`.
    gene_id_key
        Column of ``adata.var`` holding Ensembl gene ids (or symbols); default: ``var_names``.
    mod
        Modality to use when ``adata`` is a MuData.
    copy
        Return an annotated copy instead of writing into ``adata``.

    Returns
    -------
    ``None``, or the annotated copy when ``copy=True``. Sets

    ``adata.var['tss_chrom']``
        Chromosome (categorical; missing = NaN).
    ``adata.var['tss_pos']``
        0-based position of the first transcribed base (nullable ``Int64``; missing = ``<NA>``).
    ``adata.var['tss_strand']``
        ``"+"`` or ``"-"`` (categorical; missing = NaN).
    ``adata.uns['tss']['params']``
        The GTF source, ``gene_id_key`` and the numbers matched by id, by symbol and unmatched.

    Raises
    ------
    ValueError
        No gene of ``adata`` matches a gene of the GTF (e.g. symbols vs. Ensembl ids of another species,
        or ids of the wrong column); ``adata`` is left unchanged.

    Warns
    -----
    UserWarning
        Fewer than half of the genes match.

    Examples
    --------
    >>> import sc_dta as dta
    >>> dta.pp.annotate_tss(adata, "gencode.v44.basic.annotation.gtf.gz")  # doctest: +SKIP
    >>> adata.var[["tss_chrom", "tss_pos", "tss_strand"]]  # doctest: +SKIP
    """
    import numpy as np
    import pandas as pd

    ad = get_anndata(adata, mod)
    if gene_id_key is not None and gene_id_key not in ad.var.columns:
        raise KeyError(
            f"annotate_tss: gene_id_key={gene_id_key!r} is not a column of adata.var; columns: {list(ad.var.columns)}."
        )
    table, source = _tss_table(gtf)

    keys = pd.Index(ad.var_names if gene_id_key is None else ad.var[gene_id_key].astype(str), dtype=object)
    candidates = [keys] if gene_id_key is None else [keys, pd.Index(ad.var_names, dtype=object)]
    row, n_by_id, n_by_symbol = _match(table, candidates)

    matched = row >= 0
    n_unmatched = int((~matched).sum())
    n_matched = int(matched.sum())
    if len(keys) and n_matched == 0:
        raise ValueError(
            f"annotate_tss: none of the {len(keys)} genes matched a gene of {source} ({len(table)} genes), so no "
            f"gene would get a TSS. {_match_hint(ad.var, table, keys, gene_id_key, n_matched)}"
        )
    take = np.where(matched, row, 0)
    chrom_values = table["chrom"].astype(str).to_numpy()[take].astype(object)
    strand_values = table["strand"].astype(str).to_numpy()[take].astype(object)
    chrom_values[~matched] = None
    strand_values[~matched] = None
    chrom_order = list(dict.fromkeys(table["chrom"].astype(str)))
    used = set(chrom_values[matched])
    tss_chrom = pd.Categorical(chrom_values, categories=[c for c in chrom_order if c in used])
    tss_strand = pd.Categorical(strand_values, categories=["+", "-"])
    tss_pos = pd.array(np.asarray(table["tss"], dtype=np.int64)[take], dtype="Int64")
    tss_pos[~matched] = pd.NA

    params = {
        "gtf": source,
        "n_genes": int(len(keys)),
        "n_matched": int(matched.sum()),
        "n_matched_by_id": n_by_id,
        "n_matched_by_symbol": n_by_symbol,
        "n_unmatched": n_unmatched,
    }
    if gene_id_key is not None:
        params["gene_id_key"] = gene_id_key
    msg = "annotate_tss: %d of %d genes have no TSS in %s (matched %d by Ensembl id, %d by symbol)."
    args = (n_unmatched, len(keys), source, n_by_id, n_by_symbol)
    if n_matched < _MIN_MATCHED_FRACTION * len(keys):
        warnings.warn(
            f"annotate_tss: only {n_matched} of {len(keys)} genes ({n_matched / len(keys):.0%}) matched a gene of "
            f"{source}; the other {n_unmatched} get no TSS and no DNA embedding. "
            + _match_hint(ad.var, table, keys, gene_id_key, n_matched),
            UserWarning,
            stacklevel=2,
        )
    elif n_unmatched:
        logger.warning(msg, *args)
    else:
        logger.info(msg, *args)

    # everything computed: write (into a copy when asked)
    if copy:
        adata = adata.copy()
        ad = get_anndata(adata, mod)
    ad.var["tss_chrom"] = tss_chrom
    ad.var["tss_pos"] = tss_pos
    ad.var["tss_strand"] = tss_strand
    ad.uns["tss"] = {"params": params}
    return adata if copy else None
