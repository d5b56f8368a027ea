"""Plot the genes whose embeddings shift most after an in-silico perturbation."""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from sc_dta._utils import get_anndata

from ._labels import gene_labels, is_signed, result_title, symbol_column, value_label

if TYPE_CHECKING:
    from anndata import AnnData
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from mudata import MuData

__all__ = ["target_shift"]

HIGHLIGHT_COLORS = ("#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")
BASE_COLOR = "#bbbbbb"
#: Panels whose x-ranges differ by less than this factor share one x-range; others are labelled as differing.
SAME_SCALE_RATIO = 1.5


def _highlight_sets(highlight: Any) -> dict[str, list[str]]:
    if highlight is None:
        return {}
    if isinstance(highlight, str):
        return {"targets": [highlight]}
    if isinstance(highlight, Mapping):
        return {str(k): [str(g) for g in v] for k, v in highlight.items()}
    return {"targets": [str(g) for g in highlight]}


def _top_genes(adata: AnnData, key: str, n_top: int, *, signed: bool) -> tuple[np.ndarray, list[np.ndarray]]:
    """Var positions of the ``n_top`` largest mean shifts (in magnitude when ``signed``) and their per-cell values."""
    from scipy import sparse

    from sc_dta.tl._rank import _check_key

    _check_key(adata, key)
    mean = adata.var[key + "_mean"].to_numpy(dtype=np.float64)
    n = adata.var[key + "_n"].to_numpy()
    ok = np.flatnonzero(np.isfinite(mean) & (n > 0))
    score = np.abs(mean[ok]) if signed else mean[ok]
    top = ok[np.lexsort((np.arange(ok.size), -score))][:n_top]
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
    labels_all: np.ndarray,
) -> dict[str, Any]:
    from matplotlib.patches import Patch

    from sc_dta.tl._rank import _match_genes

    top, values = _top_genes(adata, key, n_top, signed=is_signed(adata, key))
    labels = labels_all[top]
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
    ax.set_title(result_title(adata, key, labels_all))
    if handles:
        ax.legend(handles=handles, loc="lower right", fontsize="small", frameon=False)
    return {"genes": labels, "highlighted": int((which != "").sum())}


def _extent(ax: Axes) -> float:
    lo, hi = ax.get_xlim()
    return max(abs(lo), abs(hi))


def _match_scales(axes: list[Axes]) -> None:
    """Give panels of similar range one common x-range; else say on each later panel that its scale differs."""
    first = _extent(axes[0])
    for ax in axes[1:]:
        ratio = _extent(ax) / first if first > 0 else np.inf
        if 1 / SAME_SCALE_RATIO <= ratio <= SAME_SCALE_RATIO:
            lo = min(a.get_xlim()[0] for a in (axes[0], ax))
            hi = max(a.get_xlim()[1] for a in (axes[0], ax))
            axes[0].set_xlim(lo, hi)
            ax.set_xlim(lo, hi)
        else:
            ax.set_title(f"{ax.get_title()}\n(x-scale differs from the first panel: {_times(ratio)})")


def _times(ratio: float) -> str:
    """``×40``, ``×2.5``, ``÷300``: how much larger (or smaller) a range is."""
    if not np.isfinite(ratio) or ratio <= 0:
        return "not comparable"
    sign, value = ("×", ratio) if ratio >= 1 else ("÷", 1 / ratio)
    return f"{sign}{value:,.0f}" if value >= 10 else f"{sign}{value:.1f}"


def _scale_x(ax: Axes, label: str) -> None:
    """Put a power-of-ten multiplier into the axis label instead of matplotlib's offset text.

    The offset text (``×10⁻⁴`` at the right end of the axis) collides with a centred axis label on narrow axes;
    here the ticks are divided by ``10**e`` (``e`` from the axis range, as ``scilimits=(-3, 4)`` would pick) and
    the label says so, e.g. ``embedding shift (1 − cosine) (×10⁻⁴)``.
    """
    from matplotlib.ticker import FuncFormatter, ScalarFormatter

    extent = _extent(ax)
    exponent = int(np.floor(np.log10(extent))) if np.isfinite(extent) and extent > 0 else 0
    if exponent <= -3 or exponent >= 4:
        scale = 10.0**exponent
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v / scale:.4g}"))
        ax.set_xlabel(rf"{label} ($\times 10^{{{exponent}}}$)")
    else:
        formatter = ScalarFormatter(useOffset=False)
        formatter.set_scientific(False)
        ax.xaxis.set_major_formatter(formatter)
        ax.set_xlabel(label)


def target_shift(
    adata: AnnData | MuData,
    key: str = "dta_shift",
    *,
    n_top: int = 50,
    highlight: Sequence[str] | Mapping[str, Sequence[str]] | None = None,
    compare: str | None = None,
    gene_symbols: str | bool | None = "auto",
    ax: Axes | Sequence[Axes] | None = None,
    show: bool | None = None,
    return_fig: bool = False,
    mod: str = "rna",
) -> Axes | list[Axes] | Figure | None:
    """Top genes by mean embedding shift, with their per-cell spread and known targets highlighted.

    One horizontal box per gene (per-cell shifts of the cells where it was measured; whiskers at
    1.5 IQR, no fliers) with its mean as a black diamond, largest shift at the top (largest in magnitude
    for signed readouts such as ``readout="expression"``). Genes in ``highlight`` are coloured (box and
    tick label) with a legend per target set. Genes are labelled by symbol (see ``gene_symbols``); the
    title says what was done, from ``adata.uns[key]['params']`` (``"Bio-DTA: GATA4 delete:-150:+50"``,
    ``"deletion: GATA4"``, ``"overexpression: GATA4"``; the key when unknown); a power-of-ten multiplier
    goes into the axis label (``×10⁻⁴``), never into a separate offset text.

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
        A second result key (e.g. the adapter-free ``"dta_shift_delete"``) drawn side by side. When the
        two x-ranges differ by less than a factor 1.5 both panels get the same x-range; otherwise the
        second panel's title says that its x-scale differs (and by how much).
    gene_symbols
        ``var`` column with the gene labels. Default ``"auto"``: the first of ``var['gene_symbol']``,
        ``var['gene_symbols']``, ``var['gene_name']``, ``var['feature_name']`` that exists (genes without a
        symbol keep their var name); None or False: ``var_names``.
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
    labels = gene_labels(ad, symbol_column(ad, gene_symbols))
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
        _draw(a, ad, k, int(n_top), sets, labels)
    if len(axes) > 1:
        _match_scales(axes)
    for a, k in zip(axes, keys, strict=True):
        _scale_x(a, value_label(ad, k))
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
