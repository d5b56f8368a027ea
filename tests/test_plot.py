from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_rank import shift_adata

import sc_dta as dta


def expected_top(a, key, n):
    mean = a.var[key + "_mean"].to_numpy()
    ok = np.flatnonzero(np.isfinite(mean) & (a.var[key + "_n"].to_numpy() > 0))
    return list(a.var_names[ok[np.argsort(-mean[ok], kind="stable")][:n]])


def labels_top_down(ax):
    ticks = sorted(ax.get_yticklabels(), key=lambda t: -t.get_position()[1])
    return [t.get_text() for t in ticks], ticks


@pytest.fixture(autouse=True)
def _close():
    yield
    plt.close("all")


def test_top_genes_and_highlight(tmp_path):
    a, _, _ = shift_adata(seed=2)
    top = expected_top(a, "dta_shift", 12)
    highlight = [top[0], top[4], top[7], "G5", "not_a_gene"]  # 3 of them in the top 12
    ax = dta.pl.target_shift(a, n_top=12, highlight=highlight, show=False)
    assert isinstance(ax, matplotlib.axes.Axes)
    names, ticks = labels_top_down(ax)
    assert names == top
    colored = [t.get_text() for t in ticks if t.get_fontweight() == "bold"]
    assert sorted(colored) == sorted([top[0], top[4], top[7]])
    assert all(matplotlib.colors.to_hex(t.get_color()) != "#000000" for t in ticks if t.get_text() in colored)
    # one box per gene, highlighted boxes coloured
    boxes = [p for p in ax.patches if isinstance(p, matplotlib.patches.PathPatch)]
    assert len(boxes) == 12
    grey = matplotlib.colors.to_rgba("#bbbbbb")
    assert sum(b.get_facecolor() != grey for b in boxes) == 3
    legend = ax.get_legend()
    assert legend is not None and legend.get_texts()[0].get_text() == "targets (3)"
    assert "G5" in ax.get_title()
    out = tmp_path / "shift.png"
    ax.figure.savefig(out)
    assert out.stat().st_size > 1000
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_named_sets_and_symbols():
    a, _, _ = shift_adata(seed=2)
    b, _, _ = shift_adata(seed=5, key="dta_shift_delete")
    a.layers["dta_shift_delete"] = b.layers["dta_shift_delete"]
    for col in ("dta_shift_delete_mean", "dta_shift_delete_n"):
        a.var[col] = b.var[col].to_numpy()
    top_a = expected_top(a, "dta_shift", 8)
    top_b = expected_top(a, "dta_shift_delete", 8)
    sets = {"direct": [top_a[0], top_b[1]], "indirect": [top_a[2]]}
    fig = dta.pl.target_shift(
        a, n_top=8, compare="dta_shift_delete", highlight=sets, gene_symbols="gene_symbols", return_fig=True
    )
    assert isinstance(fig, matplotlib.figure.Figure)
    ax1, ax2 = fig.axes[:2]
    assert labels_top_down(ax1)[0] == ["sym" + g[1:] for g in top_a]
    assert labels_top_down(ax2)[0] == ["sym" + g[1:] for g in top_b]
    texts = [t.get_text() for t in ax1.get_legend().get_texts()]
    assert texts[0].startswith("direct") and texts[1].startswith("indirect")
    n_bold_2 = sum(t.get_fontweight() == "bold" for t in ax2.get_yticklabels())
    assert n_bold_2 == len({top_b[1], top_a[0], top_a[2]} & set(top_b))


def test_into_given_axes_and_errors():
    a, _, _ = shift_adata()
    fig, ax = plt.subplots()
    out = dta.pl.target_shift(a, n_top=5, ax=ax)
    assert out is ax and len(ax.get_yticklabels()) == 5
    with pytest.raises(ValueError, match="ax"):
        dta.pl.target_shift(a, n_top=5, ax=ax, compare="dta_shift")
    with pytest.raises(KeyError, match="missing_key"):
        dta.pl.target_shift(a, "missing_key", show=False)
    with pytest.raises(KeyError, match="gene_symbols"):
        dta.pl.target_shift(a, gene_symbols="nope", show=False)
    assert dta.pl.target_shift(a, n_top=3, show=True) is None
