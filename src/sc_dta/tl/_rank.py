"""Rank genes by their embedding shift after a perturbation and score known targets."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

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


def _target_sets(known_targets: Any, tf: str | Sequence[str] | None = None) -> dict[str, list[str]]:
    if known_targets is None:
        return {}
    if isinstance(known_targets, pd.DataFrame):
        from sc_dta.datasets._known_targets import targets_from_table

        names = [tf] if isinstance(tf, str) or tf is None else [n for n in tf if n]
        for name in names[:-1]:  # the perturbed gene as given, then its symbol
            try:
                return {"targets": targets_from_table(known_targets, name)}
            except KeyError:
                continue
        return {"targets": targets_from_table(known_targets, names[-1] if names else None)}
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


def _gene_names(adata: AnnData, gene: str) -> list[str]:
    """List the perturbed gene as given, then its symbols in ``var`` (to find it in a TF -> target table)."""
    names = [str(gene)]
    mask, _ = _match_genes(adata, [str(gene)])
    for col in NAME_COLUMNS:
        if col in adata.var.columns and mask.any():
            names += [str(v) for v in adata.var.loc[mask, col] if str(v) not in names]
    return names


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


def pseudobulk_pvalues(layer: Any, groups: np.ndarray, evaluated: np.ndarray, *, signed: bool) -> np.ndarray:
    """Per-gene p-values with cell groups (donors, samples, batches) as the unit, not cells.

    Each gene's shifts are averaged within each group of evaluated cells. For a signed readout a two-sided
    one-sample t-test asks whether the group means differ from 0; for an unsigned one (cosine) it asks
    whether the gene's group means exceed the median gene's in the same group. Genes measured in fewer than
    two groups get NaN.
    """
    from scipy import sparse
    from scipy.stats import ttest_1samp

    csr = sparse.csr_matrix(layer)
    labels = np.asarray(groups)
    uniq = list(pd.unique(labels[evaluated]))
    means = np.full((len(uniq), csr.shape[1]), np.nan)
    for k, g in enumerate(uniq):
        rows = np.flatnonzero(evaluated & (labels == g))
        sub = csr[rows]
        n = np.diff(sparse.csc_matrix(sub).indptr)
        total = np.asarray(sub.sum(axis=0)).ravel()
        with np.errstate(invalid="ignore", divide="ignore"):
            means[k] = np.where(n > 0, total / np.maximum(n, 1), np.nan)
    if not signed:
        means = means - np.nanmedian(means, axis=1, keepdims=True)
    out = np.full(csr.shape[1], np.nan)
    n_groups = np.isfinite(means).sum(axis=0)
    ok = n_groups >= 2
    if ok.any():
        with np.errstate(invalid="ignore", divide="ignore"):
            res = ttest_1samp(
                means[:, ok], 0.0, axis=0, nan_policy="omit", alternative="two-sided" if signed else "greater"
            )
        out[ok] = np.asarray(res.pvalue, dtype=np.float64)
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


def _metrics(scores: np.ndarray, is_target: np.ndarray, n_top: int, n_given: int, n_unmatched: int) -> dict:
    """Ranking metrics of targets among genes sorted by ``scores`` (descending); genes are the unit."""
    from scipy.stats import hypergeom, mannwhitneyu

    n = len(scores)
    k = int(is_target.sum())
    top = min(n_top, n)
    hits = int(is_target[:top].sum())
    pos, neg = scores[is_target], scores[~is_target]
    mw = float(mannwhitneyu(pos, neg, alternative="greater").pvalue) if k and len(neg) else float("nan")
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


def _scores(mean: np.ndarray, direction: str) -> np.ndarray:
    if direction == "magnitude":
        return np.abs(mean)
    if direction == "up":
        return mean
    if direction == "down":
        return -mean
    raise ValueError(f"direction: expected 'magnitude', 'up' or 'down', got {direction!r}.")


def rank_targets(
    adata: AnnData | MuData,
    key: str = "dta_shift",
    *,
    known_targets: Sequence[str] | Mapping[str, Sequence[str]] | pd.DataFrame | None = None,
    direction: Literal["magnitude", "up", "down"] = "magnitude",
    compare: Sequence[str] | None = None,
    groupby: str | None = None,
    n_top: int = 50,
    min_cells: int = 1,
    mod: str = "rna",
) -> pd.DataFrame:
    """Rank genes by their predicted response to a perturbation and score known targets.

    Genes measured in at least ``min_cells`` evaluated cells are ranked by ``adata.var[key + '_mean']``: by
    magnitude (default; the expression readout and co-expression are signed), or with ``direction="up"`` /
    ``"down"`` by the signed value. With ``known_targets`` the ranking is scored with genes as the unit: hits and
    precision among the top ``n_top``, the hypergeometric probability of that many hits, the AUROC of targets vs
    the other ranked genes and its one-sided Mann–Whitney p-value. ``compare`` scores other results (co-expression
    from :func:`sc_dta.tl.coexpression`, deletion and overexpression from :func:`sc_dta.tl.perturb_gene`,
    control mutations) on the same targets, so no ranking is read without its baselines.

    Per-gene p-values never pool cells (thousands of cells of one simulated perturbation are not replicates):
    with control mutations (``perturb_tss(..., n_controls=N)``) they are the empirical p-values against the
    controls (``var[key + '_pval']``); with ``groupby`` (an ``obs`` column of donors or samples) a t-test over
    the group means (:func:`pseudobulk_pvalues`); otherwise they are NaN.

    Parameters
    ----------
    adata
        AnnData (or MuData, modality ``mod``) with a result of :func:`~sc_dta.tl.perturb_tss`,
        :func:`~sc_dta.tl.perturb_gene` or :func:`~sc_dta.tl.coexpression`.
    key
        The result key (``key_added`` of the perturbation).
    known_targets
        Gene names (var names, symbols or Ensembl ids, matched case-insensitively on ``var_names`` and
        the ``var`` columns ``gene_symbols``/``gene_name``/``gene_ids``/...), a dict of named lists
        (e.g. ``{"direct": [...], "indirect": [...]}``) scored separately, or a TF -> target table
        (:func:`sc_dta.datasets.known_targets`, decoupler/OmniPath form) from which the perturbed gene's targets
        are taken.
    direction
        ``"magnitude"``, ``"up"`` or ``"down"``.
    compare
        Other result keys scored on the same targets (``df.attrs["comparison"]``).
    groupby
        ``obs`` column whose groups are the replicates of the pseudo-bulk test.
    n_top
        Size of the top list for hits, precision and enrichment.
    min_cells
        Minimum number of evaluated cells in which a gene was measured to be ranked.
    mod
        Modality of a MuData.

    Returns
    -------
    DataFrame indexed by var name, best first, with columns ``gene``, ``score`` (what is ranked),
    ``mean_shift`` (signed where the readout is), ``std_shift`` (over cells), ``n_cells``, ``rank``, ``pval`` /
    ``pval_adj`` (Benjamini–Hochberg), ``specificity`` (with controls), ``is_target`` and, for a dict of target
    sets, one boolean column ``target_<name>`` per set. The metrics are in ``df.attrs["metrics"]`` (a dict per
    target set) and, with ``compare``, ``df.attrs["comparison"]`` (records, one per result and target set:
    ``pd.DataFrame(df.attrs["comparison"])``). Also
    stored, h5ad-serialisable, in ``adata.uns[key]['ranking']``.
    """
    ad = get_anndata(adata, mod)
    _check_key(ad, key)
    if isinstance(n_top, bool) or not isinstance(n_top, int | np.integer) or n_top < 1:
        raise ValueError(f"n_top: must be a positive integer, got {n_top!r}.")
    if isinstance(min_cells, bool) or not isinstance(min_cells, int | np.integer) or min_cells < 1:
        raise ValueError(f"min_cells: must be a positive integer, got {min_cells!r}.")
    _scores(np.zeros(1), direction)
    compare = [] if compare is None else [compare] if isinstance(compare, str) else list(compare)
    for other in compare:
        _check_key(ad, other)
    if groupby is not None and groupby not in ad.obs:
        raise KeyError(f"groupby={groupby!r} is not a column of adata.obs.")
    params = ad.uns.get(key, {}).get("params", {}) if isinstance(ad.uns.get(key), Mapping) else {}
    gene = params.get("gene") if isinstance(params, Mapping) else None
    sets = _target_sets(known_targets, _gene_names(ad, gene) if gene else None)

    table, order = _ranked_table(ad, key, direction, min_cells, groupby)
    metrics: dict[str, dict] = {}
    any_target = np.zeros(order.size, dtype=bool)
    masks = {}
    for name, genes in sets.items():
        mask, missing = _match_genes(ad, genes)
        masks[name] = (mask, len(genes), len(missing))
        is_t = mask[order]
        if missing:
            logger.warning("rank_targets: %d of %d %r targets not found in adata.var", len(missing), len(genes), name)
        metrics[name] = _metrics(table["score"].to_numpy(), is_t, int(n_top), len(genes), len(missing))
        any_target |= is_t
        if len(sets) > 1:
            table[f"target_{name}"] = is_t
    table["is_target"] = any_target
    table.attrs["metrics"] = metrics
    rows = []
    for other in [key, *compare]:
        if not masks:
            break
        t_other, o_other = (table, order) if other == key else _ranked_table(ad, other, direction, min_cells, None)
        for name, (mask, n_given, n_missing) in masks.items():
            m = _metrics(t_other["score"].to_numpy(), mask[o_other], int(n_top), n_given, n_missing)
            rows.append({"key": other, "targets": name} | {k: m[k] for k in ("auroc", "hits", "precision", "n_genes")})
    if compare:
        table.attrs["comparison"] = rows

    ranking = {
        "table": table.copy(),
        "metrics": metrics,
        "params": {
            "n_top": int(n_top),
            "min_cells": int(min_cells),
            "target_sets": list(sets),
            "direction": direction,
            "pvalues": _pvalue_source(ad, key, groupby),
        },
    }
    if compare:
        ranking["comparison"] = pd.DataFrame(rows)
    ranking["table"].attrs = {}
    uns = ad.uns.get(key)
    uns = dict(uns) if isinstance(uns, Mapping) else {}
    uns["ranking"] = ranking
    ad.uns[key] = uns
    return table


def _pvalue_source(ad: AnnData, key: str, groupby: str | None) -> str:
    if key + "_pval" in ad.var:
        return "controls"
    if groupby is not None and key in ad.layers:
        return f"pseudobulk:{groupby}"
    return "none"


def _ranked_table(
    ad: AnnData, key: str, direction: str, min_cells: int, groupby: str | None
) -> tuple[pd.DataFrame, np.ndarray]:
    """Rank one result key, best first; return the table and the var positions in that order."""
    n = ad.var[key + "_n"].to_numpy(dtype=np.int64)
    mean = ad.var[key + "_mean"].to_numpy(dtype=np.float64)
    score = _scores(mean, direction)
    std = np.full(ad.n_vars, np.nan)
    pval = np.full(ad.n_vars, np.nan)
    source = _pvalue_source(ad, key, groupby)
    if key in ad.layers:
        from scipy import sparse

        layer = sparse.csc_matrix(ad.layers[key])
        sq = np.asarray(layer.multiply(layer).sum(axis=0)).ravel()
        with np.errstate(invalid="ignore", divide="ignore"):
            var = np.where(n > 1, (sq - n * mean**2) / np.maximum(n - 1, 1), np.nan)
        std = np.sqrt(np.clip(var, 0, None))
        if source.startswith("pseudobulk"):
            evaluated = ad.obs.get(key + "_evaluated")
            ev = np.ones(ad.n_obs, bool) if evaluated is None else evaluated.to_numpy(dtype=bool)
            signed = (ad.uns.get(key, {}).get("params", {}) or {}).get("readout", "cosine") != "cosine"
            pval = pseudobulk_pvalues(layer, ad.obs[groupby].to_numpy(), ev, signed=signed)
    if source == "controls":
        pval = ad.var[key + "_pval"].to_numpy(dtype=np.float64)
    keep = (n >= min_cells) & np.isfinite(score)
    if not keep.any():
        raise ValueError(f"min_cells={min_cells}: no gene of {key!r} was measured in that many cells.")
    idx = np.flatnonzero(keep)
    order = idx[np.lexsort((np.arange(idx.size), -score[idx]))]  # descending, stable on var order
    names = ad.var_names[order].astype(str)
    table = pd.DataFrame(
        {
            "gene": np.asarray(names, dtype=object),
            "score": score[order],
            "mean_shift": mean[order],
            "std_shift": std[order],
            "n_cells": n[order],
            "rank": np.arange(1, order.size + 1, dtype=np.int64),
            "pval": pval[order],
            "pval_adj": _bh(pval[order]),
        },
        index=pd.Index(np.asarray(names, dtype=object), name=None),
    )
    if key + "_specificity" in ad.var:
        table["specificity"] = ad.var[key + "_specificity"].to_numpy(dtype=np.float64)[order]
    return table, order
