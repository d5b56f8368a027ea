"""tl.coexpression against scipy.stats on normalised log1p data."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
from scipy.stats import pearsonr, spearmanr

import sc_dta as dta


def counts_adata(seed=0, n_obs=40, n_vars=12):
    rng = np.random.default_rng(seed)
    tf = rng.poisson(3.0, n_obs)
    x = rng.poisson(1.0, (n_obs, n_vars)).astype(np.float32)
    x[:, 0] = tf
    x[:, 1] = rng.poisson(0.5 + tf)  # co-expressed with the TF
    x[:, 2] = rng.poisson(np.maximum(0.2, 4 - tf))  # anti-correlated
    x[:, 3] = 0  # never expressed: no correlation
    a = ad.AnnData(X=sp.csr_matrix(x))
    a.var_names = [f"G{j}" for j in range(n_vars)]
    a.var["gene_symbols"] = [f"sym{j}" for j in range(n_vars)]
    a.obs_names = [f"c{i}" for i in range(n_obs)]
    a.layers["counts"] = sp.csr_matrix(x)
    return a, x


def normalised(x):
    lib = x.sum(1)
    scale = np.median(lib[lib > 0])
    return np.log1p(x * np.where(lib > 0, scale / np.maximum(lib, 1e-12), 0)[:, None])


@pytest.mark.parametrize(("method", "ref"), [("spearman", spearmanr), ("pearson", pearsonr)])
def test_against_scipy(method, ref):
    a, x = counts_adata()
    a.X = sp.csr_matrix(np.zeros_like(x))  # counts only in the layer
    dta.tl.coexpression(a, "G0", layer="counts", method=method)
    key = "coexpression_G0"
    got = a.var[key + "_mean"].to_numpy()
    y = normalised(x.astype(np.float64))
    for j in range(a.n_vars):
        if j in (0, 3):
            assert np.isnan(got[j])  # the gene itself, and a constant gene
            assert a.var[key + "_n"].iloc[j] == 0
            continue
        assert got[j] == pytest.approx(ref(y[:, 0], y[:, j])[0], abs=1e-5), j
        assert a.var[key + "_n"].iloc[j] == a.n_obs
    assert got[1] > 0.3 and got[2] < -0.3
    params = a.uns[key]["params"]
    assert params["method"] == method and params["layer"] == "counts" and params["kind"] == "coexpression"
    # ranked by magnitude like any signed result
    df = dta.tl.rank_targets(a, key)
    assert set(df.index[:2]) == {"G1", "G2"}


def test_symbol_cells_and_no_normalisation():
    a, x = counts_adata(seed=1)
    cells = np.arange(a.n_obs) % 2 == 0
    dta.tl.coexpression(a, "sym0", cells=cells, normalize=False, key_added="k")
    got = a.var["k_mean"].to_numpy()
    for j in (1, 2, 5):
        assert got[j] == pytest.approx(spearmanr(x[cells, 0], x[cells, j])[0], abs=1e-5)
    assert a.uns["k"]["params"]["cells"] == cells.sum()


def test_errors():
    a, _ = counts_adata()
    with pytest.raises(KeyError, match="NOPE"):
        dta.tl.coexpression(a, "NOPE")
    with pytest.raises(KeyError, match="layer"):
        dta.tl.coexpression(a, "G0", layer="missing")
    with pytest.raises(ValueError, match="method"):
        dta.tl.coexpression(a, "G0", method="kendall")
    with pytest.raises(ValueError, match="3 cells"):
        dta.tl.coexpression(a, "G0", cells=["c0", "c1"])
    assert not any(k.startswith("coexpression") for k in a.var.columns)


def test_coexpression_never_overwrites_other_results():
    rng = np.random.default_rng(0)
    a = ad.AnnData(sp.csr_matrix(rng.poisson(2.0, size=(40, 5)).astype(np.float32)))
    a.var_names = [f"g{i}" for i in range(5)]
    a.var["mine_mean"] = 1.0
    with pytest.raises(ValueError, match="key_added='mine'"):
        dta.tl.coexpression(a, "g0", key_added="mine")
    assert (a.var["mine_mean"] == 1.0).all() and "mine" not in a.uns
    dta.tl.coexpression(a, "g0", key_added="ok")
    dta.tl.coexpression(a, "g1", key_added="ok")  # a previous result of the same function is replaced
    assert a.uns["ok"]["params"]["gene"] == "g1"
