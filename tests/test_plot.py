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
    ax = dta.pl.target_shift(a, n_top=12, highlight=highlight, gene_symbols=None, show=False)
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
    assert ax.get_title() == "Bio-DTA: G5 delete:-100:+50"  # params without kind: a TSS mutation
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


def scaled(a, key, factor):
    a.layers[key] = a.layers[key] * factor
    a.var[key + "_mean"] = a.var[key + "_mean"] * factor
    return a


def with_result(a, key, params, seed=5, factor=1.0):
    b, _, _ = shift_adata(seed=seed, key=key)
    a.layers[key] = b.layers[key] * factor
    for suffix in ("_mean", "_n"):
        a.var[key + suffix] = b.var[key + suffix].to_numpy() * (factor if suffix == "_mean" else 1)
    a.uns[key] = {"params": params}
    return a


def test_gene_symbols_auto_detected_and_off():
    a, _, _ = shift_adata(seed=2)
    top = expected_top(a, "dta_shift", 6)
    # default: the symbol column is found; None and False turn it off
    assert labels_top_down(dta.pl.target_shift(a, n_top=6, show=False))[0] == ["sym" + g[1:] for g in top]
    for off in (None, False):
        assert labels_top_down(dta.pl.target_shift(a, n_top=6, gene_symbols=off, show=False))[0] == top
    # the order of preference: gene_symbol, gene_symbols, gene_name, feature_name; a missing symbol keeps the name
    a.var["feature_name"] = [f"feat{j}" for j in range(a.n_vars)]
    a.var["gene_name"] = [None if j == int(top[0][1:]) else f"name{j}" for j in range(a.n_vars)]
    del a.var["gene_symbols"]
    got = labels_top_down(dta.pl.target_shift(a, n_top=6, show=False))[0]
    assert got == [top[0]] + ["name" + g[1:] for g in top[1:]]
    got = labels_top_down(dta.pl.target_shift(a, n_top=6, gene_symbols="feature_name", show=False))[0]
    assert got == ["feat" + g[1:] for g in top]
    del a.var["gene_name"], a.var["feature_name"]
    assert labels_top_down(dta.pl.target_shift(a, n_top=6, show=False))[0] == top  # nothing to detect


def test_titles_say_what_was_done():
    a, _, _ = shift_adata(seed=2)
    a.var["gene_symbol"] = [f"SYM{j}" for j in range(a.n_vars)]
    a.var.loc["G5", "gene_symbol"] = "SIMTF1"
    a.uns["dta_shift"] = {
        "params": {"gene": "G5", "gene_id": "G5", "kind": "tss_mutation", "mutation": "delete:-150:+50"}
    }
    with_result(a, "dta_shift_delete", {"gene": "SIMTF1", "gene_id": "G5", "kind": "delete", "mutation": "delete"})
    with_result(a, "dta_shift_overexpress", {"gene": "G5", "kind": "overexpress", "mutation": "overexpress"})
    with_result(a, "plain", {})
    titles = {
        k: dta.pl.target_shift(a, k, n_top=5, show=False).get_title()
        for k in ("dta_shift", "dta_shift_delete", "dta_shift_overexpress", "plain")
    }
    assert titles == {
        "dta_shift": "Bio-DTA: SIMTF1 delete:-150:+50",
        "dta_shift_delete": "deletion: SIMTF1",
        "dta_shift_overexpress": "overexpression: SIMTF1",
        "plain": "plain",  # no params: the key
    }
    # without symbols the gene is named as the result names it
    assert dta.pl.target_shift(a, n_top=5, gene_symbols=None, show=False).get_title() == "Bio-DTA: G5 delete:-150:+50"


def test_compare_says_when_the_x_scale_differs():
    a, _, _ = shift_adata(seed=2)
    with_result(a, "dta_shift_delete", {"gene": "G5", "kind": "delete"}, factor=40.0)
    ax1, ax2 = dta.pl.target_shift(a, n_top=8, compare="dta_shift_delete", show=False)
    ratio = max(map(abs, ax2.get_xlim())) / max(map(abs, ax1.get_xlim()))
    assert ratio > 10
    assert ax1.get_title() == "Bio-DTA: sym5 delete:-100:+50"
    assert ax2.get_title() == f"deletion: sym5\n(x-scale differs from the first panel: ×{ratio:,.0f})"
    # the other way round: the second panel is smaller
    ax1, ax2 = dta.pl.target_shift(a, "dta_shift_delete", n_top=8, compare="dta_shift", show=False)
    ratio = max(map(abs, ax1.get_xlim())) / max(map(abs, ax2.get_xlim()))
    assert ax2.get_title().endswith(f"(x-scale differs from the first panel: ÷{ratio:,.0f})")
    # similar ranges: one common x-range and no note
    with_result(a, "dta_shift_delete", {"gene": "G5", "kind": "delete"}, seed=2, factor=1.1)
    ax1, ax2 = dta.pl.target_shift(a, n_top=8, compare="dta_shift_delete", show=False)
    assert ax1.get_xlim() == ax2.get_xlim()
    assert ax2.get_title() == "deletion: sym5"


@pytest.mark.parametrize("factor", [1e-3, 1e-6, 1.0])
def test_power_of_ten_in_the_label_not_an_offset(factor):
    a = scaled(shift_adata(seed=2)[0], "dta_shift", factor)
    fig, ax = plt.subplots(figsize=(3, 4))  # narrow: matplotlib's offset text ran into the axis label here
    dta.pl.target_shift(a, n_top=10, ax=ax)
    fig.tight_layout()
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    offset, label = ax.xaxis.get_offset_text(), ax.xaxis.label
    assert offset.get_text() == "" or not offset.get_window_extent(renderer).overlaps(label.get_window_extent(renderer))
    hi = max(map(abs, ax.get_xlim()))
    exponent = int(np.floor(np.log10(hi)))
    text = label.get_text()
    assert text.startswith("embedding shift (1 − cosine)")
    if factor < 1:
        assert exponent <= -3 and f"10^{{{exponent}}}" in text
    else:
        assert "10^" not in text
    # each tick label times the label's multiplier is the tick's value
    scale = 10.0**exponent if factor < 1 else 1.0
    for tick in ax.get_xticklabels():
        if tick.get_text():
            value = float(tick.get_text().replace("−", "-"))
            assert value * scale == pytest.approx(tick.get_position()[0], rel=1e-3, abs=1e-12 * scale)


def test_signed_readout_ranked_by_magnitude():
    a, _, present = shift_adata(seed=2)
    sign = np.where(np.arange(a.n_vars) % 2, -1.0, 1.0).astype(np.float32)
    a.layers["dta_shift"] = a.layers["dta_shift"].multiply(sign[None, :]).tocsr()
    a.var["dta_shift_mean"] = a.var["dta_shift_mean"] * sign
    a.uns["dta_shift"]["params"]["readout"] = "expression"
    ax = dta.pl.target_shift(a, n_top=6, gene_symbols=None, show=False)
    mean = a.var["dta_shift_mean"].to_numpy()
    ok = np.flatnonzero(np.isfinite(mean) & (a.var["dta_shift_n"].to_numpy() > 0))
    expected = list(a.var_names[ok[np.argsort(-np.abs(mean[ok]), kind="stable")][:6]])
    assert labels_top_down(ax)[0] == expected
    assert any(mean[a.var_names.get_loc(g)] < 0 for g in expected)  # negative changes are shown too
    assert ax.get_xlabel().startswith("expression change")
