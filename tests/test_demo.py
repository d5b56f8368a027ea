from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from sc_dta._demo import make_encoder, run_demo
from sc_dta.cli import main

SMALL = ["--n-cells", "240", "--n-genes", "130", "--epochs", "1", "--n-controls", "3"]


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
    assert list(metrics["method"]) == [
        "Bio-DTA motif deletion",
        "matched control deletion",
        "TF token deletion",
        "TF overexpression",
        "co-expression",
        "chance",
    ]
    tf = res.uns["simulated_grn"]["tf"]
    roles = res.var["sim_role"].drop(tf)
    groups = {"direct": roles == "direct", "indirect": roles == "indirect"}
    groups["descendants"] = groups["direct"] | groups["indirect"]
    for method, key in (
        ("Bio-DTA motif deletion", "dta_shift"),
        ("TF token deletion", "dta_shift_delete"),
        ("TF overexpression", "dta_shift_overexpress"),
        ("co-expression", "coexpression"),
    ):
        score = res.var[f"{key}_mean"].drop(tf).abs()
        ok = score.notna().to_numpy()
        row = metrics[metrics["method"] == method].iloc[0]
        for group, mask in groups.items():
            m = mask.to_numpy()
            assert row[group] == pytest.approx(_auroc(score[ok & m], score[ok & ~m]), abs=1e-9)
    # controls: the mean AUROC over the control mutations' rankings
    ctrl = np.abs(np.asarray(res.uns["dta_shift"]["controls"]["mean"]))[:, res.var_names != tf]
    m = groups["descendants"].to_numpy()
    expected = np.mean([_auroc(c[np.isfinite(c) & m], c[np.isfinite(c) & ~m]) for c in ctrl])
    assert metrics[metrics["method"] == "matched control deletion"]["descendants"].iloc[0] == pytest.approx(expected)
    assert (metrics[metrics["method"] == "chance"][["direct", "indirect", "descendants"]] == 0.5).all(axis=None)
    # the perturbed cells are the cardiomyocytes that express the TF
    evaluated = res.obs["dta_shift_evaluated"].to_numpy()
    tf_counts = np.asarray(res.X[:, res.var_names.get_loc(tf)].todense()).ravel()
    assert (res.obs.loc[evaluated, "cell_type"] == "cardiomyocyte").all()
    assert (tf_counts[evaluated] > 0).all()
    assert "context_gain" in res.uns["train_adapter"]


def test_demo_reproducible(demo_run, tmp_path):
    out, _ = demo_run
    again = run_demo(tmp_path, seed=3, n_cells=240, n_genes=130, epochs=1, n_controls=3, verbose=False)
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
