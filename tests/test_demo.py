from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from scipy.stats import mannwhitneyu

from sc_dta._demo import make_encoder, run_demo
from sc_dta.cli import main

SMALL = ["--n-cells", "240", "--n-genes", "130", "--epochs", "1"]


def _auroc(pos, neg):
    pos, neg = np.asarray(pos)[:, None], np.asarray(neg)[None, :]
    return float((pos > neg).mean() + 0.5 * (pos == neg).mean())


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    code = main(["--quiet", "demo", "--out", str(out), "--seed", "3", *SMALL])
    return out, code


def test_demo_outputs(demo_run, capsys):
    out, code = demo_run
    assert code == 0
    for name in ("demo.h5ad", "target_shift.png", "metrics.csv", "model/biodta_config.json", "genome/genome.fa"):
        assert (out / name).exists(), name
    assert (out / "target_shift.png").read_bytes()[:4] == b"\x89PNG"


def test_demo_metrics_match_independent_computation(demo_run):
    out, _ = demo_run
    metrics = pd.read_csv(out / "metrics.csv")
    res = ad.read_h5ad(out / "demo.h5ad")
    assert set(metrics["method"]) == {"Bio-DTA (TSS motif deletion)", "baseline (TF token deletion)", "chance"}
    assert set(metrics["targets"]) == {"direct", "indirect"}
    tf = res.uns["simulated_grn"]["tf"]
    roles = res.var["sim_role"]
    for method, key in (
        ("Bio-DTA (TSS motif deletion)", "dta_shift"),
        ("baseline (TF token deletion)", "dta_shift_delete"),
    ):
        score = res.var[f"{key}_mean"].drop(tf).dropna()
        top = set(score.sort_values(ascending=False).index[:20])
        for group in ("direct", "indirect"):
            row = metrics[(metrics["method"] == method) & (metrics["targets"] == group)].iloc[0]
            is_t = (roles[score.index] == group).to_numpy()
            pos, neg = score.to_numpy()[is_t], score.to_numpy()[~is_t]
            assert row["n_targets"] == is_t.sum() and row["n_ranked"] == len(score)
            assert row["hits@20"] == len(top & set(score.index[is_t]))
            assert row["auroc"] == pytest.approx(_auroc(pos, neg), abs=1e-9)
            assert row["mannwhitney_p"] == pytest.approx(mannwhitneyu(pos, neg, alternative="greater").pvalue)
    chance = metrics[metrics["method"] == "chance"].set_index("targets")
    for group in ("direct", "indirect"):
        n_t, n = chance.loc[group, "n_targets"], chance.loc[group, "n_ranked"]
        assert chance.loc[group, "hits@20"] == pytest.approx(20 * n_t / n)
        assert chance.loc[group, "auroc"] == 0.5
    # the perturbed cells are the cardiomyocytes that express the TF
    evaluated = res.obs["dta_shift_evaluated"].to_numpy()
    tf_counts = np.asarray(res.X[:, res.var_names.get_loc(tf)].todense()).ravel()
    assert (res.obs.loc[evaluated, "cell_type"] == "cardiomyocyte").all()
    assert (tf_counts[evaluated] > 0).all()


def test_demo_reproducible(demo_run, tmp_path):
    out, _ = demo_run
    again = run_demo(tmp_path, seed=3, n_cells=240, n_genes=130, epochs=1, verbose=False)
    first = pd.read_csv(out / "metrics.csv")
    pd.testing.assert_frame_equal(first, pd.read_csv(again["paths"]["metrics"]))
    res = ad.read_h5ad(out / "demo.h5ad")
    np.testing.assert_array_equal(res.var["dta_shift_mean"].to_numpy(), again["adata"].var["dta_shift_mean"].to_numpy())


def test_demo_enformer_small_encoder(tmp_path):
    enc = make_encoder("enformer-small", seed=0, window=256)
    emb = enc.embed(["ACGT" * 64, "T" * 256])
    assert emb.shape == (2, enc.dim) and np.isfinite(emb).all()
    again = make_encoder("enformer-small", seed=0, window=256).embed(["ACGT" * 64, "T" * 256])
    np.testing.assert_array_equal(emb, again)  # seeded random weights


def test_demo_bad_arguments(tmp_path, capsys):
    with pytest.raises(ValueError, match="encoder"):
        run_demo(tmp_path, encoder="enformer")
    assert main(["demo", "--out", str(tmp_path), "--n-cells", "20", "--n-genes", "30"]) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    last = err.splitlines()[-1]
    assert last.startswith("sc-dta demo: error:") and "n_genes=30" in last
