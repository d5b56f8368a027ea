"""``tl.coexpression``: the simplest baseline a user tries first, correlation with the perturbed gene across cells."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np

from sc_dta._utils import get_anndata

if TYPE_CHECKING:
    from anndata import AnnData
    from mudata import MuData

logger = logging.getLogger(__name__)

__all__ = ["coexpression"]


def _counts(adata: AnnData, layer: str | None):
    if layer is None:
        return adata.X
    if layer not in adata.layers:
        raise KeyError(f"layer={layer!r} is not in adata.layers (layers: {list(adata.layers.keys())}).")
    return adata.layers[layer]


def _check_key(ad: AnnData, key: str) -> None:
    """Refuse a key whose slots hold something other than a previous co-expression result."""
    from sc_dta.tl._perturb import _refuse_foreign_slots

    taken = [f"var[{key + s!r}]" for s in ("_mean", "_n") if key + s in ad.var]
    taken += [f"uns[{key!r}]"] if key in ad.uns else []
    _refuse_foreign_slots(ad, key, taken, ("coexpression",), "coexpression")


def coexpression(
    adata: AnnData | MuData,
    gene: str,
    *,
    layer: str | None = None,
    method: Literal["spearman", "pearson"] = "spearman",
    cells: Sequence[str] | np.ndarray | None = None,
    normalize: bool = True,
    key_added: str | None = None,
    mod: str = "rna",
) -> None:
    """Correlate every gene with ``gene`` across cells: the co-expression baseline of a perturbation ranking.

    Counts are normalised to the median library size and log1p-transformed (``normalize=True``) before
    Spearman (rank) or Pearson correlation. The result is stored like a perturbation result, so
    :func:`sc_dta.tl.rank_targets` and :func:`sc_dta.pl.target_shift` read it alike: ``var[key + '_mean']`` is
    the signed correlation (ranked by magnitude), ``var[key + '_n']`` the number of cells, ``uns[key]['params']``.

    Parameters
    ----------
    adata
        AnnData (or MuData, modality ``mod``) with counts in ``X`` or ``layer``.
    gene
        A var name or a symbol in ``var['gene_symbol'|'gene_name'|...]``.
    layer
        Layer with the counts (default ``X``).
    method
        ``"spearman"`` or ``"pearson"``.
    cells
        Boolean mask over ``obs`` or obs names (default all cells).
    normalize
        Normalise to the median library size and log1p first (set False for already normalised data).
    key_added
        Result key (default ``f"coexpression_{gene}"``).
    mod
        Modality of a MuData.
    """
    from scipy import sparse
    from scipy.stats import rankdata

    from sc_dta._chunks import cells_mask
    from sc_dta.tl._perturb import _var_by_symbol

    ad = get_anndata(adata, mod)
    if method not in ("spearman", "pearson"):
        raise ValueError(f"method: expected 'spearman' or 'pearson', got {method!r}.")
    if not isinstance(gene, str):
        raise TypeError(f"gene: expected a gene name (str), got {type(gene).__name__}.")
    pos = int(ad.var_names.get_loc(gene)) if gene in ad.var_names else _var_by_symbol(ad, gene)
    if pos is None:
        raise KeyError(f"gene: {gene!r} is neither in adata.var_names nor a symbol in adata.var.")
    key = key_added or f"coexpression_{gene}"
    _check_key(ad, key)
    mask = cells_mask(ad, cells)
    X = _counts(ad, layer)
    X = X[np.flatnonzero(mask)]
    X = sparse.csr_matrix(X, dtype=np.float64) if sparse.issparse(X) else sparse.csr_matrix(np.asarray(X, float))
    if X.shape[0] < 3:
        raise ValueError(f"coexpression needs at least 3 cells, got {X.shape[0]}.")
    if normalize:
        lib = np.asarray(X.sum(axis=1)).ravel()
        scale = np.median(lib[lib > 0]) if (lib > 0).any() else 1.0
        X = sparse.diags(np.where(lib > 0, scale / np.maximum(lib, 1e-12), 0.0)) @ X
        X.data = np.log1p(X.data)
    dense = X.toarray()
    if method == "spearman":
        dense = np.apply_along_axis(rankdata, 0, dense)
    centred = dense - dense.mean(axis=0)
    norms = np.sqrt((centred**2).sum(axis=0))
    target = centred[:, pos]
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = (centred.T @ target) / (norms * norms[pos])
    rho[norms == 0] = np.nan
    rho[pos] = np.nan
    ad.var[key + "_mean"] = rho.astype(np.float32)
    ad.var[key + "_n"] = np.where(np.isfinite(rho), X.shape[0], 0).astype(np.int64)
    ad.uns[key] = {
        "params": {
            "gene": gene,
            "kind": "coexpression",
            "method": method,
            "layer": "X" if layer is None else layer,
            "normalize": bool(normalize),
            "cells": int(mask.sum()),
            "readout": "correlation",
        }
    }
