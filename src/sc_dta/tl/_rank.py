"""Rank genes by their embedding shift after a perturbation and score known targets."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from sc_dta._utils import get_anndata

if TYPE_CHECKING:
    from anndata import AnnData
    from mudata import MuData

logger = logging.getLogger(__name__)

__all__ = ["rank_targets"]

#: var columns tried (after var_names) to match target gene names given as symbols or ids.
NAME_COLUMNS = (
    "gene_symbols",
    "gene_symbol",
    "gene_name",
    "gene_names",
    "feature_name",
    "symbol",
    "gene_ids",
    "gene_id",
)


def _check_key(adata: AnnData, key: str) -> None:
    missing = [f"var[{key + s!r}]" for s in ("_mean", "_n") if key + s not in adata.var]
    if missing:
        known = sorted(
            k[: -len("_mean")] for k in adata.var.columns if k.endswith("_mean") and k[:-5] + "_n" in adata.var
        )
        raise KeyError(
            f"key: {key!r} has no perturbation result ({', '.join(missing)} missing); "
            f"run sc_dta.tl.perturb_tss / perturb_gene first. Results present: {known}."
        )


def _target_sets(known_targets: Any) -> dict[str, list[str]]:
    if known_targets is None:
        return {}
    if isinstance(known_targets, str):
        raise TypeError("known_targets: expected a list of gene names or a dict of named lists, got a single string.")
    if isinstance(known_targets, Mapping):
        sets = {}
        for name, genes in known_targets.items():
            if isinstance(genes, str) or not isinstance(genes, Sequence | np.ndarray | pd.Index | set):
                raise TypeError(f"known_targets[{name!r}]: expected a list of gene names, got {type(genes).__name__}.")
            sets[str(name)] = [str(g) for g in genes]
        return sets
    return {"targets": [str(g) for g in known_targets]}


def _match_genes(adata: AnnData, genes: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    """Boolean var mask of ``genes`` (matched on var_names, then on symbol/id columns) and the unmatched."""
    mask = np.zeros(adata.n_vars, dtype=bool)
    names = adata.var_names.astype(str)
    upper = {}
    for col in [None, *[c for c in NAME_COLUMNS if c in adata.var.columns]]:
        values = names if col is None else adata.var[col].astype(str)
        upper[col] = pd.Index(np.char.upper(np.asarray(values, dtype=str)))
    missing = []
    for g in genes:
        found = False
        for idx in upper.values():
            hit = idx == g.upper()
            if hit.any():
                mask |= np.asarray(hit)
                found = True
                break
        if not found:
            missing.append(g)
    return mask, missing


def pooled_ranksum_pvalues(layer: Any) -> np.ndarray:
    """One-sided Mann–Whitney U p-value of each gene's shifts against all other genes' shifts.

    All stored shifts are ranked once (average ranks for ties); a gene's rank sum within that pool
    gives its U statistic against the rest; p-values from the normal approximation with tie and
    continuity correction (as :func:`scipy.stats.mannwhitneyu` with ``method="asymptotic"``).
    NaN for genes without shifts.
    """
    from scipy import sparse
    from scipy.stats import norm, rankdata

    csc = sparse.csc_matrix(layer)
    counts = np.diff(csc.indptr).astype(np.float64)
    data = csc.data.astype(np.float64)
    total = data.size
    out = np.full(csc.shape[1], np.nan)
    if total < 2:
        return out
    cols = np.repeat(np.arange(csc.shape[1]), np.diff(csc.indptr))
    rank_sum = np.bincount(cols, weights=rankdata(data), minlength=csc.shape[1])
    _, ties = np.unique(data, return_counts=True)
    tie_term = float((ties.astype(np.float64) ** 3 - ties).sum()) / (total * (total - 1))
    n1, n2 = counts, total - counts
    u = rank_sum - n1 * (n1 + 1) / 2
    with np.errstate(invalid="ignore", divide="ignore"):
        sigma = np.sqrt(n1 * n2 / 12 * ((total + 1) - tie_term))
        z = (u - n1 * n2 / 2 - 0.5) / sigma
    ok = (n1 > 0) & (n2 > 0) & (sigma > 0)
    out[ok] = norm.sf(z[ok])
    return out


def _bh(p: np.ndarray) -> np.ndarray:
    """Benjamini–Hochberg adjusted p-values (NaN kept)."""
    out = np.full(p.shape, np.nan)
    ok = np.isfinite(p)
    m = int(ok.sum())
    if m:
        q = p[ok]
        order = np.argsort(q)
        adj = q[order] * m / np.arange(1, m + 1)
        adj = np.minimum.accumulate(adj[::-1])[::-1]
        res = np.empty(m)
        res[order] = np.clip(adj, 0, 1)
        out[ok] = res
    return out


def auroc(scores_pos: np.ndarray, scores_neg: np.ndarray) -> float:
    """Area under the ROC curve of positives vs negatives (ties count one half), via ranks."""
    from scipy.stats import rankdata

    n1, n0 = len(scores_pos), len(scores_neg)
    if n1 == 0 or n0 == 0:
        return float("nan")
    ranks = rankdata(np.concatenate([scores_pos, scores_neg]))
    return float((ranks[:n1].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def _metrics(ranked: pd.DataFrame, is_target: np.ndarray, n_top: int, n_given: int, n_unmatched: int) -> dict:
    from scipy.stats import hypergeom, mannwhitneyu

    n = len(ranked)
    k = int(is_target.sum())
    top = min(n_top, n)
    hits = int(is_target[:top].sum())
    scores = ranked["mean_shift"].to_numpy(dtype=np.float64)
    pos, neg = scores[is_target], scores[~is_target]
    if k and len(neg):
        mw = float(mannwhitneyu(pos, neg, alternative="greater").pvalue)
    else:
        mw = float("nan")
    return {
        "n_genes": int(n),
        "n_targets": int(n_given),
        "n_targets_ranked": k,
        "n_targets_not_found": int(n_unmatched),
        "n_top": int(top),
        "hits": hits,
        "precision": float(hits / top) if top else float("nan"),
        "expected_hits": float(top * k / n) if n else float("nan"),
        "hypergeom_p": float(hypergeom.sf(hits - 1, n, k, top)) if n else float("nan"),
        "auroc": auroc(pos, neg),
        "mannwhitney_p": mw,
    }


def rank_targets(
    adata: AnnData | MuData,
    key: str = "dta_shift",
    *,
    known_targets: Sequence[str] | Mapping[str, Sequence[str]] | None = None,
    n_top: int = 50,
    min_cells: int = 1,
    mod: str = "rna",
) -> pd.DataFrame:
    """Rank genes by mean embedding shift and score known targets.

    Genes measured in at least ``min_cells`` evaluated cells are ranked by
    ``adata.var[key + '_mean']`` (descending, rank 1 = largest shift). With ``known_targets`` the
    ranking is scored as in the Geneformer paper: hits and precision among the top ``n_top``, the
    hypergeometric probability of at least that many hits, the AUROC of targets vs all other ranked
    genes, and the one-sided Mann–Whitney U p-value that targets shift more than the other genes.

    Parameters
    ----------
    adata
        AnnData (or MuData, modality ``mod``) with a result of :func:`~sc_dta.tl.perturb_tss` or
        :func:`~sc_dta.tl.perturb_gene`.
    key
        The result key (``key_added`` of the perturbation).
    known_targets
        Gene names (var names, symbols or Ensembl ids, matched case-insensitively on ``var_names`` and
        the ``var`` columns ``gene_symbols``/``gene_name``/``gene_ids``/...), or a dict of named lists
        (e.g. ``{"direct": [...], "indirect": [...]}``) scored separately.
    n_top
        Size of the top list for hits, precision and enrichment.
    min_cells
        Minimum number of evaluated cells in which a gene was measured to be ranked.
    mod
        Modality of a MuData.

    Returns
    -------
    DataFrame indexed by var name, best first, with columns ``gene``, ``mean_shift``, ``std_shift``
    (over cells), ``n_cells``, ``rank``, ``pval`` / ``pval_adj`` (one-sided Mann–Whitney U test of the
    gene's per-cell shifts against the pooled shifts of all other genes, as Geneformer's statistics,
    normal approximation; Benjamini–Hochberg over the ranked genes), ``is_target`` and, for a dict of target sets, one boolean
    column ``target_<name>`` per set. The metrics are in ``df.attrs["metrics"]`` (a dict per target
    set). Also stored, h5ad-serialisable, in ``adata.uns[key]['ranking']`` (``table`` DataFrame,
    ``metrics`` and ``params``).
    """
    ad = get_anndata(adata, mod)
    _check_key(ad, key)
    if isinstance(n_top, bool) or not isinstance(n_top, int | np.integer) or n_top < 1:
        raise ValueError(f"n_top: must be a positive integer, got {n_top!r}.")
    if isinstance(min_cells, bool) or not isinstance(min_cells, int | np.integer) or min_cells < 1:
        raise ValueError(f"min_cells: must be a positive integer, got {min_cells!r}.")
    sets = _target_sets(known_targets)

    n = ad.var[key + "_n"].to_numpy(dtype=np.int64)
    mean = ad.var[key + "_mean"].to_numpy(dtype=np.float64)
    std = np.full(ad.n_vars, np.nan)
    pval = np.full(ad.n_vars, np.nan)
    if key in ad.layers:
        from scipy import sparse

        layer = sparse.csc_matrix(ad.layers[key])
        sq = np.asarray(layer.multiply(layer).sum(axis=0)).ravel()
        with np.errstate(invalid="ignore", divide="ignore"):
            var = np.where(n > 1, (sq - n * mean**2) / np.maximum(n - 1, 1), np.nan)
        std = np.sqrt(np.clip(var, 0, None))
        pval = pooled_ranksum_pvalues(layer)
    keep = (n >= min_cells) & np.isfinite(mean)
    if not keep.any():
        raise ValueError(f"min_cells={min_cells}: no gene of {key!r} was measured in that many cells.")
    idx = np.flatnonzero(keep)
    order = idx[np.lexsort((np.arange(idx.size), -mean[idx]))]  # descending, stable on var order
    names = ad.var_names[order].astype(str)
    df = pd.DataFrame(
        {
            "gene": np.asarray(names, dtype=object),
            "mean_shift": mean[order].astype(np.float64),
            "std_shift": std[order].astype(np.float64),
            "n_cells": n[order],
            "rank": np.arange(1, order.size + 1, dtype=np.int64),
            "pval": pval[order],
            "pval_adj": _bh(pval[order]),
        },
        index=pd.Index(np.asarray(names, dtype=object), name=None),
    )
    metrics: dict[str, dict] = {}
    any_target = np.zeros(order.size, dtype=bool)
    for name, genes in sets.items():
        mask, missing = _match_genes(ad, genes)
        is_t = mask[order]
        if missing:
            logger.warning("rank_targets: %d of %d %r targets not found in adata.var", len(missing), len(genes), name)
        metrics[name] = _metrics(df, is_t, int(n_top), len(genes), len(missing))
        any_target |= is_t
        if len(sets) > 1:
            df[f"target_{name}"] = is_t
    df["is_target"] = any_target
    df.attrs["metrics"] = metrics

    ranking = {
        "table": df.copy(),
        "metrics": metrics,
        "params": {"n_top": int(n_top), "min_cells": int(min_cells), "target_sets": list(sets)},
    }
    ranking["table"].attrs = {}
    uns = ad.uns.get(key)
    if not isinstance(uns, Mapping):
        uns = {}
    uns = dict(uns)
    uns["ranking"] = ranking
    ad.uns[key] = uns
    return df
