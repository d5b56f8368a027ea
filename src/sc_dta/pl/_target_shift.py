"""Plot the genes whose embeddings shift most after an in-silico perturbation."""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from sc_dta._utils import get_anndata

if TYPE_CHECKING:
    from anndata import AnnData
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from mudata import MuData

__all__ = ["target_shift"]

HIGHLIGHT_COLORS = ("#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")
BASE_COLOR = "#bbbbbb"


def _highlight_sets(highlight: Any) -> dict[str, list[str]]:
    if highlight is None:
        return {}
    if isinstance(highlight, str):
        return {"targets": [highlight]}
    if isinstance(highlight, Mapping):
        return {str(k): [str(g) for g in v] for k, v in highlight.items()}
    return {"targets": [str(g) for g in highlight]}


def _top_genes(adata: AnnData, key: str, n_top: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """Var positions of the ``n_top`` largest mean shifts and each one's per-cell shifts."""
    from scipy import sparse

    from sc_dta.tl._rank import _check_key

    _check_key(adata, key)
    mean = adata.var[key + "_mean"].to_numpy(dtype=np.float64)
    n = adata.var[key + "_n"].to_numpy()
    ok = np.flatnonzero(np.isfinite(mean) & (n > 0))
    top = ok[np.lexsort((np.arange(ok.size), -mean[ok]))][:n_top]
    values: list[np.ndarray] = []
    if key in adata.layers:
        layer = sparse.csc_matrix(adata.layers[key])
        for j in top:
            values.append(layer.data[layer.indptr[j] : layer.indptr[j + 1]].astype(np.float64))
    else:
        values = [np.array([mean[j]]) for j in top]
    return top, values


def _draw(
    ax: Axes,
    adata: AnnData,
    key: str,
    n_top: int,
    sets: dict[str, list[str]],
    gene_symbols: str | None,
) -> dict[str, Any]:
    from matplotlib.patches import Patch

    from sc_dta.tl._rank import _match_genes

    top, values = _top_genes(adata, key, n_top)
    labels = (
        adata.var[gene_symbols].astype(str).to_numpy()[top]
        if gene_symbols is not None
        else np.asarray(adata.var_names.astype(str))[top]
    )
    colors = np.array([BASE_COLOR] * len(top), dtype=object)
    which = np.full(len(top), "", dtype=object)
    handles = []
    # later sets do not recolour genes already claimed by an earlier set
    for i, (name, genes) in enumerate(sets.items()):
        mask, _ = _match_genes(adata, genes)
        sel = mask[top] & (which == "")
        color = HIGHLIGHT_COLORS[i % len(HIGHLIGHT_COLORS)]
        colors[sel] = color
        which[sel] = name
        handles.append(Patch(facecolor=color, edgecolor="black", label=f"{name} ({int(mask[top].sum())})"))
    pos = np.arange(len(top))[::-1]  # best gene at the top
    # matplotlib >= 3.10 spells vert=False as orientation="horizontal" (vert is deprecated in 3.11)
    horizontal = (
        {"orientation": "horizontal"} if "orientation" in inspect.signature(ax.boxplot).parameters else {"vert": False}
    )
    bp = ax.boxplot(
        values,
        positions=pos,
        **horizontal,
        widths=0.6,
        patch_artist=True,
        showfliers=False,
        medianprops={"color": "black", "linewidth": 0.8},
    )
    for patch, c in zip(bp["boxes"], colors, strict=True):
        patch.set_facecolor(c)
        patch.set_edgecolor("black")
        patch.set_linewidth(0.6)
    means = adata.var[key + "_mean"].to_numpy()[top]
    ax.scatter(means, pos, marker="D", s=10, color="black", zorder=3, label="mean")
    ax.set_yticks(pos)
    ax.set_yticklabels(labels)
    for tick, c, w in zip(ax.get_yticklabels(), colors, which, strict=True):
        if w:
            tick.set_color(c)
            tick.set_fontweight("bold")
    ax.set_ylim(-0.7, len(top) - 0.3)
    ax.set_xlabel("embedding shift (1 − cosine)")
    ax.ticklabel_format(axis="x", style="sci", scilimits=(-3, 4), useMathText=True)
    params = adata.uns.get(key, {}).get("params", {}) if isinstance(adata.uns.get(key), Mapping) else {}
    title = key
    if params:
        what = params.get("mutation") or params.get("kind") or ""
        title = f"{key}: {params.get('gene', '')} {what}".strip()
    ax.set_title(title)
    if handles:
        ax.legend(handles=handles, loc="lower right", fontsize="small", frameon=False)
    return {"genes": labels, "highlighted": int((which != "").sum())}


def target_shift(
    adata: AnnData | MuData,
    key: str = "dta_shift",
    *,
    n_top: int = 50,
    highlight: Sequence[str] | Mapping[str, Sequence[str]] | None = None,
    compare: str | None = None,
    gene_symbols: str | None = None,
    ax: Axes | Sequence[Axes] | None = None,
    show: bool | None = None,
    return_fig: bool = False,
    mod: str = "rna",
) -> Axes | list[Axes] | Figure | None:
    """Top genes by mean embedding shift, with their per-cell spread and known targets highlighted.

    One horizontal box per gene (per-cell shifts of the cells where it was measured; whiskers at
    1.5 IQR, no fliers) with its mean as a black diamond, largest shift at the top. Genes in
    ``highlight`` are coloured (box and tick label) with a legend per target set.

    Parameters
    ----------
    adata
        AnnData (or MuData, modality ``mod``) with a perturbation result.
    key
        Result key of :func:`~sc_dta.tl.perturb_tss` / :func:`~sc_dta.tl.perturb_gene`.
    n_top
        Number of genes shown.
    highlight
        Known targets: a list of gene names, or a dict of named lists (each its own colour).
    compare
        A second result key (e.g. the adapter-free ``"dta_shift_delete"``) drawn side by side.
    gene_symbols
        ``var`` column used for the gene labels instead of ``var_names``.
    ax
        Axes to draw into (a pair of axes with ``compare``); by default a new figure.
    show
        Show the figure; default: when no ``ax`` is given and ``return_fig`` is False.
    return_fig
        Return the figure instead of the axes.
    mod
        Modality of a MuData.

    Returns
    -------
    None when shown; else the Figure if ``return_fig``, else the Axes (a list of two with ``compare``).
    """
    import matplotlib.pyplot as plt

    ad = get_anndata(adata, mod)
    if isinstance(n_top, bool) or not isinstance(n_top, int | np.integer) or n_top < 1:
        raise ValueError(f"n_top: must be a positive integer, got {n_top!r}.")
    if gene_symbols is not None and gene_symbols not in ad.var.columns:
        raise KeyError(f"gene_symbols: {gene_symbols!r} is not a column of adata.var.")
    keys = [key] if compare is None else [key, compare]
    from sc_dta.tl._rank import _check_key

    for k in keys:
        _check_key(ad, k)
    sets = _highlight_sets(highlight)

    if ax is None:
        height = max(3.0, 0.22 * min(n_top, ad.n_vars) + 1.2)
        fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), height), squeeze=False)
        axes = list(axes[0])
    else:
        axes = [ax] if not isinstance(ax, Sequence | np.ndarray) else list(np.ravel(ax))
        if len(axes) != len(keys):
            raise ValueError(f"ax: expected {len(keys)} axes (one per key {keys}), got {len(axes)}.")
        fig = axes[0].figure
    for a, k in zip(axes, keys, strict=True):
        _draw(a, ad, k, int(n_top), sets, gene_symbols)
    if ax is None:
        fig.tight_layout()
    if show is None:
        show = ax is None and not return_fig
    if show:
        plt.show()
        return None
    if return_fig:
        return fig
    return axes[0] if len(axes) == 1 else axes
