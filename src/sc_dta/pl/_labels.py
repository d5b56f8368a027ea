"""Readable labels for plots and tables: gene symbols, what a result is, what its values mean."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from anndata import AnnData

__all__ = [
    "SYMBOL_COLUMNS",
    "gene_labels",
    "is_signed",
    "result_params",
    "result_title",
    "symbol_column",
    "value_label",
]

#: ``var`` columns searched, in this order, for gene symbols when ``gene_symbols="auto"``.
SYMBOL_COLUMNS = ("gene_symbol", "gene_symbols", "gene_name", "feature_name")
#: Readouts whose values are signed (ranked and plotted by magnitude); ``"cosine"`` is a non-negative shift.
SIGNED_READOUTS = ("expression", "correlation")
_MAX_MUTATION_CHARS = 40


def symbol_column(adata: AnnData, gene_symbols: str | bool | None = "auto") -> str | None:
    """Return the ``var`` column with gene symbols that ``gene_symbols`` asks for (None: use ``var_names``).

    Parameters
    ----------
    adata
        The AnnData.
    gene_symbols
        ``"auto"`` or True: the first of :data:`SYMBOL_COLUMNS` present in ``adata.var`` (None when there is
        none); a column name: that column; None or False: no symbols.

    Raises
    ------
    KeyError
        A column name that is not in ``adata.var``.
    """
    if gene_symbols is None or gene_symbols is False:
        return None
    if gene_symbols is True or gene_symbols == "auto":
        return next((c for c in SYMBOL_COLUMNS if c in adata.var.columns), None)
    if not isinstance(gene_symbols, str):
        raise TypeError(f"gene_symbols: expected a var column name, 'auto' or None, got {type(gene_symbols).__name__}.")
    if gene_symbols not in adata.var.columns:
        raise KeyError(
            f"gene_symbols: {gene_symbols!r} is not a column of adata.var (columns: {list(adata.var.columns)}); "
            "pass 'auto' to detect one or None for var_names."
        )
    return gene_symbols


def gene_labels(adata: AnnData, gene_symbols: str | bool | None = "auto") -> np.ndarray:
    """Return a label per gene (object array over ``var``): its symbol, or its var name where it has none."""
    names = np.asarray(adata.var_names.astype(str), dtype=object)
    column = symbol_column(adata, gene_symbols)
    if column is None:
        return names
    values = adata.var[column]
    text = np.asarray(values.astype(str), dtype=object)
    missing = values.isna().to_numpy() | np.isin(text, ["", "nan", "None"])
    return np.where(missing, names, text)


def result_params(adata: AnnData, key: str) -> dict[str, Any]:
    """Return ``adata.uns[key]['params']`` as a dict (empty when absent)."""
    entry = adata.uns.get(key)
    params = entry.get("params") if isinstance(entry, Mapping) else None
    return dict(params) if isinstance(params, Mapping) else {}


def _perturbed_label(adata: AnnData, params: Mapping[str, Any], labels: np.ndarray) -> str:
    """Label (symbol when known) of the gene a result perturbed."""
    names = adata.var_names.astype(str)
    for value in (params.get("gene_id"), params.get("gene")):
        if value is None or str(value) == "":
            continue
        pos = np.flatnonzero(names == str(value))
        if pos.size:
            return str(labels[pos[0]])
    gene = params.get("gene")
    if gene is not None and str(gene):
        return str(gene)
    return str(params.get("gene_id", ""))


def _short(text: str) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= _MAX_MUTATION_CHARS else text[: _MAX_MUTATION_CHARS - 1] + "…"


def result_title(adata: AnnData, key: str, labels: np.ndarray | None = None) -> str:
    """Say what a result is, from ``adata.uns[key]['params']``; the key itself when that is unknown.

    ``"Bio-DTA: GATA4 delete:-150:+50"`` for a TSS mutation (:func:`~sc_dta.tl.perturb_tss`),
    ``"deletion: GATA4"`` / ``"overexpression: GATA4"`` for :func:`~sc_dta.tl.perturb_gene` and
    ``"co-expression with GATA4"`` for :func:`~sc_dta.tl.coexpression`. The gene is shown by its label in
    ``labels`` (see :func:`gene_labels`).
    """
    params = result_params(adata, key)
    if not params:
        return key
    labels = gene_labels(adata, None) if labels is None else labels
    gene = _perturbed_label(adata, params, labels)
    kind = params.get("kind")
    mutation = params.get("mutation")
    if kind == "delete":
        return f"deletion: {gene}" if gene else key
    if kind == "overexpress":
        return f"overexpression: {gene}" if gene else key
    if kind == "coexpression":
        return f"co-expression with {gene}" if gene else key
    if kind == "tss_mutation" or (kind is None and mutation not in (None, "", "delete", "overexpress")):
        if gene and mutation:
            return f"Bio-DTA: {gene} {_short(mutation)}"
        return f"Bio-DTA: {gene}" if gene else key
    return key


def value_label(adata: AnnData, key: str) -> str:
    """Axis label of a result's values, from its readout (``params['readout']``, default ``"cosine"``)."""
    readout = result_params(adata, key).get("readout", "cosine")
    if readout == "expression":
        return "expression change (log E perturbed − log E original)"
    if readout == "correlation":
        return "correlation"
    return "embedding shift (1 − cosine)"


def is_signed(adata: AnnData, key: str) -> bool:
    """Whether a result's values are signed (then genes are ranked by magnitude)."""
    return result_params(adata, key).get("readout", "cosine") in SIGNED_READOUTS
