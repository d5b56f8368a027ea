from __future__ import annotations

from math import comb

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from scipy.stats import mannwhitneyu

import sc_dta as dta

# MuData's own deprecation notice when building a MuData
pytestmark = pytest.mark.filterwarnings("ignore:From 0.4 .update:FutureWarning")


def shift_adata(n_obs=40, n_vars=80, seed=0, key="dta_shift"):
    """AnnData holding a perturbation result laid out as perturb_tss writes it."""
    rng = np.random.default_rng(seed)
    present = rng.random((n_obs, n_vars)) < 0.5
    present[:, 5] = False  # the perturbed gene: never measured
    present[:, 6] = False
    present[0, 6] = True  # measured in one cell only
    scale = rng.gamma(2.0, 0.01, n_vars)
    vals = np.where(present, rng.random((n_obs, n_vars)) * scale, 0.0).astype(np.float32)
    layer = sp.csr_matrix(vals)
    a = ad.AnnData(X=sp.csr_matrix((n_obs, n_vars), dtype=np.float32))
    a.var_names = [f"G{j}" for j in range(n_vars)]
    a.var["gene_symbols"] = [f"sym{j}" for j in range(n_vars)]
    a.obs_names = [f"c{i}" for i in range(n_obs)]
    a.layers[key] = layer
    n = present.sum(0)
    with np.errstate(invalid="ignore"):
        a.var[key + "_mean"] = np.where(n > 0, vals.sum(0) / np.maximum(n, 1), np.nan).astype(np.float32)
    a.var[key + "_n"] = n
    a.uns[key] = {"params": {"gene": "G5", "mutation": "delete:-100:+50"}}
    return a, vals, present


def test_ranking_table():
    a, vals, present = shift_adata()
    df = dta.tl.rank_targets(a, min_cells=2)
    n = present.sum(0)
    ok = np.flatnonzero(n >= 2)
    assert "G5" not in df.index and "G6" not in df.index
    assert set(df.index) == {f"G{j}" for j in ok}
    assert (np.diff(df["mean_shift"].to_numpy()) <= 0).all()
    assert df["rank"].tolist() == list(range(1, len(ok) + 1))
    for g in ["G0", "G10", df.index[0]]:
        j = int(g[1:])
        col = vals[present[:, j], j]
        assert df.loc[g, "n_cells"] == n[j]
        assert df.loc[g, "mean_shift"] == pytest.approx(col.mean(), rel=1e-5)
        assert df.loc[g, "std_shift"] == pytest.approx(np.std(col, ddof=1), rel=1e-4)
    assert not df["is_target"].any()
    # min_cells=1 includes G6
    assert "G6" in dta.tl.rank_targets(a).index


def test_metrics_against_independent_computation():
    a, vals, present = shift_adata(seed=3)
    df0 = dta.tl.rank_targets(a)
    # targets: a few of the top genes, a few others, one unknown, the unmeasured G5 (not ranked)
    targets = [df0.index[0], df0.index[3], df0.index[20], df0.index[-1], df0.index[-5], "NOPE", "G5"]
    df = dta.tl.rank_targets(a, known_targets=targets, n_top=10)
    m = df.attrs["metrics"]["targets"]
    ranked = df.index.tolist()
    is_t = np.array([g in targets for g in ranked])
    N, K, top = len(ranked), int(is_t.sum()), 10
    hits = int(is_t[:top].sum())
    assert (m["n_genes"], m["n_targets_ranked"], m["hits"], m["n_top"]) == (N, K, hits, top)
    assert m["n_targets"] == 7 and m["n_targets_not_found"] == 1
    assert m["precision"] == pytest.approx(hits / top)
    p_hyper = sum(comb(K, x) * comb(N - K, top - x) for x in range(hits, min(K, top) + 1)) / comb(N, top)
    assert m["hypergeom_p"] == pytest.approx(p_hyper, rel=1e-9)
    pos = df["mean_shift"].to_numpy()[is_t]
    neg = df["mean_shift"].to_numpy()[~is_t]
    pairs = sum((p > q) + 0.5 * (p == q) for p in pos for q in neg)
    assert m["auroc"] == pytest.approx(pairs / (len(pos) * len(neg)))
    assert m["mannwhitney_p"] == pytest.approx(mannwhitneyu(pos, neg, alternative="greater").pvalue)
    assert df["is_target"].sum() == K


def test_named_target_sets_and_symbols(tmp_path):
    a, _, _ = shift_adata(seed=1)
    df0 = dta.tl.rank_targets(a)
    direct = [df0.index[0], df0.index[1]]
    indirect = ["sym" + df0.index[-1][1:], "SYM" + df0.index[2][1:]]  # symbols, any case
    df = dta.tl.rank_targets(a, known_targets={"direct": direct, "indirect": indirect}, n_top=5)
    assert set(df.attrs["metrics"]) == {"direct", "indirect"}
    assert df["target_direct"].sum() == 2 and df["target_indirect"].sum() == 2
    assert df.attrs["metrics"]["direct"]["hits"] == 2
    assert df.attrs["metrics"]["indirect"]["hits"] == 1
    assert df["is_target"].sum() == 4
    # stored and h5ad round-trippable
    a.write_h5ad(tmp_path / "r.h5ad")
    b = ad.read_h5ad(tmp_path / "r.h5ad")
    table = b.uns["dta_shift"]["ranking"]["table"]
    assert isinstance(table, pd.DataFrame)
    assert table["gene"].tolist() == df["gene"].tolist()
    assert b.uns["dta_shift"]["ranking"]["metrics"]["direct"]["hits"] == 2
    assert b.uns["dta_shift"]["params"]["gene"] == "G5"


def test_mudata_and_errors():
    import mudata as md

    a, _, _ = shift_adata()
    mdata = md.MuData({"rna": a})
    df = dta.tl.rank_targets(mdata, known_targets=["G1"])
    assert "ranking" in mdata["rna"].uns["dta_shift"]
    assert len(df) > 0
    with pytest.raises(KeyError, match="nope"):
        dta.tl.rank_targets(a, "nope")
    with pytest.raises(ValueError, match="n_top"):
        dta.tl.rank_targets(a, n_top=0)
    with pytest.raises(TypeError, match="known_targets"):
        dta.tl.rank_targets(a, known_targets="G1")
    with pytest.raises(ValueError, match="min_cells"):
        dta.tl.rank_targets(a, min_cells=10_000)


def signed_adata(seed=5, n_obs=30, n_vars=40, key="dta_shift"):
    """A signed (expression-readout-like) result, measured everywhere except the perturbed gene G5."""
    rng = np.random.default_rng(seed)
    vals = rng.normal(0, 0.1, (n_obs, n_vars)) + rng.normal(0, 0.3, n_vars)[None, :]
    vals[:, 5] = 0.0
    present = np.ones_like(vals, dtype=bool)
    present[:, 5] = False
    a = ad.AnnData(X=sp.csr_matrix((n_obs, n_vars), dtype=np.float32))
    a.var_names = [f"G{j}" for j in range(n_vars)]
    a.obs_names = [f"c{i}" for i in range(n_obs)]
    a.layers[key] = sp.csr_matrix(vals.astype(np.float32))
    a.var[key + "_mean"] = np.where(present.any(0), vals.mean(0), np.nan).astype(np.float32)
    a.var[key + "_n"] = present.sum(0)
    a.obs[key + "_evaluated"] = True
    a.uns[key] = {"params": {"gene": "G5", "readout": "expression"}}
    return a, vals.astype(np.float32), present


def test_direction_orders():
    a, vals, present = signed_adata()
    mean = a.var["dta_shift_mean"].to_numpy(dtype=np.float64)
    ok = np.isfinite(mean)
    names = a.var_names.to_numpy()
    for direction, score in [("magnitude", np.abs(mean)), ("up", mean), ("down", -mean)]:
        df = dta.tl.rank_targets(a, direction=direction)
        expect = names[ok][np.argsort(-score[ok], kind="stable")]
        assert df.index.tolist() == expect.tolist(), direction
        np.testing.assert_allclose(df["score"].to_numpy(), np.sort(score[ok])[::-1], rtol=1e-6)
        assert a.uns["dta_shift"]["ranking"]["params"]["direction"] == direction
    up, down = dta.tl.rank_targets(a, direction="up"), dta.tl.rank_targets(a, direction="down")
    assert up["mean_shift"].iloc[0] > 0 > down["mean_shift"].iloc[0]
    assert "G5" not in up.index
    with pytest.raises(ValueError, match="direction"):
        dta.tl.rank_targets(a, direction="sideways")
    # without controls or groupby there are no p-values
    df = dta.tl.rank_targets(a)
    assert df["pval"].isna().all() and a.uns["dta_shift"]["ranking"]["params"]["pvalues"] == "none"


def test_pvalues_from_controls():
    a, vals, present = signed_adata(seed=6)
    rng = np.random.default_rng(0)
    pval = rng.random(a.n_vars).astype(np.float32)
    pval[5] = np.nan
    spec = rng.gamma(2.0, 1.0, a.n_vars).astype(np.float32)
    a.var["dta_shift_pval"] = pval
    a.var["dta_shift_specificity"] = spec
    a.obs["donor"] = np.repeat(["d0", "d1", "d2"], a.n_obs // 3)
    df = dta.tl.rank_targets(a, groupby="donor")  # controls take precedence over pseudo-bulk
    j = np.array([int(g[1:]) for g in df.index])
    np.testing.assert_allclose(df["pval"].to_numpy(), pval[j].astype(np.float64))
    np.testing.assert_allclose(df["specificity"].to_numpy(), spec[j].astype(np.float64))
    p = df["pval"].to_numpy()
    order = np.argsort(p)
    m = len(p)
    adj = np.minimum.accumulate((p[order] * m / np.arange(1, m + 1))[::-1])[::-1]
    expect = np.empty(m)
    expect[order] = np.minimum(adj, 1)
    np.testing.assert_allclose(df["pval_adj"].to_numpy(), expect, rtol=1e-10)
    assert a.uns["dta_shift"]["ranking"]["params"]["pvalues"] == "controls"


@pytest.mark.parametrize("readout", ["expression", "cosine"])
def test_pseudobulk_pvalues_against_ttest(readout):
    from scipy.stats import ttest_1samp

    a, vals, present = signed_adata(seed=7, n_obs=36)
    if readout == "cosine":
        vals = np.abs(vals)
        a.layers["dta_shift"] = sp.csr_matrix(vals)
        a.var["dta_shift_mean"] = np.where(present.any(0), vals.sum(0) / np.maximum(present.sum(0), 1), np.nan)
    a.uns["dta_shift"]["params"]["readout"] = readout
    donors = np.array(["d0", "d1", "d2", "d3"])[np.random.default_rng(1).integers(0, 4, a.n_obs)]
    a.obs["donor"] = donors
    ev = np.ones(a.n_obs, dtype=bool)
    ev[:4] = False  # not evaluated cells do not count
    a.obs["dta_shift_evaluated"] = ev
    df = dta.tl.rank_targets(a, groupby="donor")
    assert a.uns["dta_shift"]["ranking"]["params"]["pvalues"] == "pseudobulk:donor"
    groups = [g for g in ["d0", "d1", "d2", "d3"] if (ev & (donors == g)).any()]
    means = np.array([[vals[ev & (donors == g), k].mean() for k in range(a.n_vars)] for g in groups])
    means[:, 5] = np.nan
    if readout == "cosine":
        means = means - np.nanmedian(means, axis=1, keepdims=True)
    for g in df.index:
        k = int(g[1:])
        alt = "two-sided" if readout == "expression" else "greater"
        expect = ttest_1samp(means[:, k], 0.0, alternative=alt).pvalue
        assert df.loc[g, "pval"] == pytest.approx(expect, rel=1e-4), g
    with pytest.raises(KeyError, match="groupby"):
        dta.tl.rank_targets(a, groupby="nope")


def test_compare_records_and_target_table():
    a, vals, present = signed_adata(seed=8)
    rng = np.random.default_rng(2)
    a.var["other_mean"] = rng.normal(0, 1, a.n_vars)
    a.var["other_n"] = 10
    targets = ["G1", "G2", "G3", "G7"]
    df = dta.tl.rank_targets(a, known_targets=targets, compare=["other"], n_top=5)
    rows = pd.DataFrame(df.attrs["comparison"])
    assert rows["key"].tolist() == ["dta_shift", "other"] and (rows["targets"] == "targets").all()
    assert rows.iloc[0]["auroc"] == pytest.approx(df.attrs["metrics"]["targets"]["auroc"])
    other = np.abs(a.var["other_mean"].to_numpy())
    is_t = np.isin(a.var_names, targets)
    pos, neg = other[is_t], other[~is_t]
    pairs = sum((p > q) + 0.5 * (p == q) for p in pos for q in neg)
    assert rows.iloc[1]["auroc"] == pytest.approx(pairs / (len(pos) * len(neg)))
    top = a.var_names[np.argsort(-other, kind="stable")[:5]]
    assert rows.iloc[1]["hits"] == int(np.isin(top, targets).sum())
    assert rows.iloc[1]["n_genes"] == a.n_vars
    assert isinstance(a.uns["dta_shift"]["ranking"]["comparison"], pd.DataFrame)
    with pytest.raises(KeyError, match="nope"):
        dta.tl.rank_targets(a, compare=["nope"])
    # a source/target table selects the rows of the perturbed TF (params gene G5)
    table = pd.DataFrame({"source": ["G5", "G5", "G9"], "target": ["G1", "G2", "G3"]})
    df = dta.tl.rank_targets(a, known_targets=table)
    assert set(df.index[df["is_target"]]) == {"G1", "G2"}
    # a table that names TFs by symbol (CollecTRI) finds the perturbed gene through var's symbol column
    a.var["gene_symbol"] = [f"sym{j}" for j in range(a.n_vars)]
    by_symbol = pd.DataFrame({"source": ["SYM5", "sym5", "sym9"], "target": ["sym1", "G2", "sym3"]})
    df = dta.tl.rank_targets(a, known_targets=by_symbol)
    assert set(df.index[df["is_target"]]) == {"G1", "G2"}
