"""Execute the tutorial notebooks in smoke mode (``SC_DTA_SMOKE=1``): every cell must run without error."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TUTORIALS = REPO / "tutorials"
NOTEBOOKS = ["quickstart.ipynb", "fetal_cardiomyocytes.ipynb"]
CELL_TIMEOUT = 300  # seconds per cell


def _smoke_env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "SC_DTA_SMOKE": "1",
            "SC_DTA_PROGRESS": "0",
            "SC_DTA_DEVICE": "cpu",
            "SC_DTA_CACHE_DIR": str(tmp_path / "cache"),
            "HF_HUB_OFFLINE": "1",
            "PYDEVD_DISABLE_FILE_VALIDATION": "1",
            "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS", "2"),
        }
    )
    # the kernel must import this checkout's sc_dta even where it is not installed
    src = str(REPO / "src")
    env["PYTHONPATH"] = os.pathsep.join([src, env["PYTHONPATH"]]) if env.get("PYTHONPATH") else src
    return env


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_in_smoke_mode(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")

    nb = nbformat.read(TUTORIALS / name, as_version=4)
    # The kernel inherits the environment of this process; set it for the kernel only. No MPLBACKEND: ipykernel then
    # draws figures inline, as in Jupyter and in the docs build, so that the figures can be checked below.
    for key, value in _smoke_env(tmp_path).items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("MPLBACKEND", raising=False)
    # The notebook's own folder, as when it is run in place: nothing may be written there.
    cwd = tmp_path / "notebook_dir"
    cwd.mkdir()
    client = nbclient.NotebookClient(
        nb,
        timeout=CELL_TIMEOUT,
        kernel_name="python3",
        resources={"metadata": {"path": str(cwd)}},
        allow_errors=False,
    )
    t0 = time.perf_counter()
    try:
        client.execute(cwd=str(cwd))
    except nbclient.exceptions.CellExecutionError as e:  # pragma: no cover - the failure message is the point
        pytest.fail(f"{name}: a cell failed in smoke mode:\n{e}")
    elapsed = time.perf_counter() - t0
    print(f"{name}: executed in {elapsed:.1f} s")

    code_cells = [c for c in nb.cells if c.cell_type == "code"]
    assert code_cells and all(c.get("execution_count") for c in code_cells), "not every code cell was executed"
    errors = [o for c in code_cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    left = sorted(p.relative_to(cwd).as_posix() for p in cwd.rglob("*"))
    assert not left, f"{name} wrote into the folder it ran in (write under dta.settings.cache_dir instead): {left}"
    # What the rendered page shows: at least one figure and one table.
    data = [o.get("data", {}) for c in code_cells for o in c.get("outputs", [])]
    assert sum("image/png" in d for d in data) >= 1, f"{name}: no figure among the outputs"
    assert any('class="dataframe"' in "".join(d.get("text/html", "")) for d in data), f"{name}: no table in outputs"
    RESULT_CHECKS[name](tmp_path / "cache" / "tutorials")


def _check_shift(adata, key: str, gene_id: str, *, n_controls: int = 0) -> None:
    """The storage contract of one perturbation result (expression readout), recomputed from its layer."""
    import numpy as np
    from scipy import sparse

    layer = adata.layers[key]
    assert sparse.issparse(layer) and layer.shape == adata.shape
    layer = sparse.csc_matrix(layer)
    evaluated = adata.obs[f"{key}_evaluated"].to_numpy(dtype=bool)
    assert evaluated.sum() > 0
    rows = np.unique(layer.nonzero()[0])
    assert evaluated[rows].all(), "shifts stored for cells that were not evaluated"
    assert adata.uns[key]["params"]["readout"] == "expression"
    n = adata.var[f"{key}_n"].to_numpy()
    mean = adata.var[f"{key}_mean"].to_numpy(dtype=float)
    pos = adata.var_names.get_loc(gene_id)
    assert n[pos] == 0 and np.isnan(mean[pos]), "the perturbed gene must not be an affected gene"
    measured = n > 0
    assert measured.sum() > 10
    col_sum = np.asarray(layer.sum(axis=0)).ravel()
    np.testing.assert_allclose(mean[measured], col_sum[measured] / n[measured], rtol=1e-4, atol=1e-7)
    assert np.isfinite(mean[measured]).all()
    # the expression readout is signed; even a barely trained smoke model moves its predictions a little
    assert np.nanmax(np.abs(mean)) > 0, f"{key}: every mean shift is 0"
    if n_controls:
        controls = adata.uns[key]["controls"]
        assert len(controls["mutations"]) == n_controls
        ctrl = np.asarray(controls["mean"], dtype=float)
        assert ctrl.shape == (n_controls, adata.n_vars) and list(controls["var_names"]) == list(adata.var_names)
        pval = adata.var[f"{key}_pval"].to_numpy(dtype=float)[measured]
        spec = adata.var[f"{key}_specificity"].to_numpy(dtype=float)[measured]
        # empirical p-value: (1 + controls moving the gene at least as much) / (1 + controls), recomputed
        at_least = (np.abs(ctrl[:, measured]) >= np.abs(mean[measured])).sum(axis=0)
        np.testing.assert_allclose(pval, (1 + at_least) / (1 + n_controls), rtol=1e-6)
        with np.errstate(divide="ignore"):  # a barely trained smoke model can leave a gene exactly unmoved
            expected = np.abs(mean[measured]) / np.abs(ctrl[:, measured]).mean(axis=0)
        np.testing.assert_allclose(spec, expected, rtol=1e-4)


def _check_ranking(adata, key: str, compare: list[str]) -> None:
    """``rank_targets`` stored its table and the comparison with every baseline on the same target sets."""
    ranking = adata.uns[key]["ranking"]
    assert ranking["table"].shape[0] == int((adata.var[f"{key}_n"] > 0).sum())
    assert ranking["params"]["pvalues"] == "controls"
    comparison = ranking["comparison"]
    assert set(comparison["key"]) == {key, *compare}
    assert set(comparison["targets"]) == set(ranking["params"]["target_sets"])
    assert ((comparison["auroc"] >= 0) & (comparison["auroc"] <= 1)).all()


def _check_quickstart(outputs: Path) -> None:
    """The files the quick start wrote under ``dta.settings.cache_dir / "tutorials"``."""
    import anndata as ad
    import numpy as np

    adata = ad.read_h5ad(outputs / "quickstart_out" / "quickstart.h5ad")
    tf = adata.var_names[adata.var["sim_role"] == "tf"][0]
    assert adata.varm["dna_emb"].shape == (adata.n_vars, 256)  # 4-mer spectrum
    assert adata.uns["simulated_grn"]["params"]["umis_per_cell"] == 50
    assert np.isfinite(adata.uns["train_adapter"]["context_gain"])
    for key, n_controls in (("dta_shift", 2), ("dta_shift_delete", 0), ("dta_shift_overexpress", 0)):
        _check_shift(adata, key, tf, n_controls=n_controls)
        evaluated = adata.obs[f"{key}_evaluated"].to_numpy(dtype=bool)
        assert (adata.obs["cell_type"][evaluated] == "cardiomyocyte").all()
    assert adata.uns["dta_shift"]["params"]["mutation"] == "delete:-150:+50"
    assert np.isnan(adata.var.loc[tf, "coexpression_mean"]) or adata.var.loc[tf, "coexpression_mean"] > 0.99
    _check_ranking(adata, "dta_shift", ["dta_shift_delete", "dta_shift_overexpress", "coexpression"])
    assert (outputs / "quickstart_out" / "target_shift.png").stat().st_size > 0


def _check_fetal(outputs: Path) -> None:
    """The files the fetal cardiomyocyte study wrote under ``dta.settings.cache_dir / "tutorials"``."""
    import anndata as ad
    import numpy as np
    import pandas as pd

    out = outputs / "fetal_cardiomyocytes_out"
    adata = ad.read_h5ad(out / "fetal_cardiomyocytes_dta.h5ad")
    tf = adata.var_names[adata.var["sim_role"] == "tf"][0]
    for key, n_controls in (("dta_tss_0", 2), ("dta_tss_1", 2), ("dta_shift_delete", 0), ("dta_shift_overexpress", 0)):
        _check_shift(adata, key, tf, n_controls=n_controls)
    assert adata.uns["dta_tss_0"]["params"]["mutation"] == "delete:-150:+50"
    assert ">" in adata.uns["dta_tss_1"]["params"]["mutation"]  # the explicit single-base variant
    # the two mutations give different embeddings of the gene, hence different shifts
    a, b = (adata.var[f"dta_tss_{i}_mean"].to_numpy(dtype=float) for i in (0, 1))
    assert not np.array_equal(a, b, equal_nan=True)
    for key in ("dta_tss_0", "dta_tss_1"):
        _check_ranking(adata, key, ["dta_shift_delete", "dta_shift_overexpress", "coexpression"])
    # the target list came through dta.datasets.known_targets from the planted network in CollecTRI's form
    network = pd.read_csv(out / "planted_network.csv")
    assert list(network.columns) == ["source", "target", "weight"] and set(network["source"]) == {"SIMTF1"}
    direct = set(adata.var.loc[adata.var["sim_role"] == "direct", "gene_symbol"])
    assert set(network["target"]) == direct
    ranked = adata.uns["dta_tss_0"]["ranking"]
    assert list(ranked["params"]["target_sets"]) == ["SIMTF1 targets"]
    table = ranked["table"]
    assert set(adata.var.loc[table.index[table["is_target"].to_numpy(dtype=bool)], "gene_symbol"]) == direct
    assert (out / "target_shift.png").stat().st_size > 0
    assert (out / "biodta").is_dir()


RESULT_CHECKS = {"quickstart.ipynb": _check_quickstart, "fetal_cardiomyocytes.ipynb": _check_fetal}


def _notebook_json(name: str) -> dict:
    return json.loads((TUTORIALS / name).read_text(encoding="utf-8"))


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_saved_clean(name: str) -> None:
    """Notebooks are committed without outputs, execution counts or per-user metadata."""
    nb = _notebook_json(name)
    assert nb["metadata"].get("kernelspec", {}).get("name") == "python3"
    assert set(nb["metadata"]) <= {"kernelspec", "language_info"}
    for cell in nb["cells"]:
        assert cell.get("metadata", {}) == {}, cell.get("id")
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [], cell.get("id")
            assert cell["execution_count"] is None, cell.get("id")


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_docs_link_to_tutorial(name: str) -> None:
    """docs/tutorials/<name> is a symlink to the notebook, so the docs render the tested file."""
    link = REPO / "docs" / "tutorials" / name
    assert link.is_symlink(), f"{link} should be a symlink to ../../tutorials/{name}"
    assert os.readlink(link) == f"../../tutorials/{name}"
    assert link.resolve() == (TUTORIALS / name).resolve()


def test_smoke_switch_is_the_only_difference() -> None:
    """Each notebook reads SC_DTA_SMOKE in one place: the configuration cell near the top."""
    for name in NOTEBOOKS:
        cells = [c for c in _notebook_json(name)["cells"] if c["cell_type"] == "code"]
        readers = [i for i, c in enumerate(cells) if "SC_DTA_SMOKE" in "".join(c["source"])]
        assert readers == [0], f"{name}: SC_DTA_SMOKE is read in code cells {readers}, expected only the first"
        later = ["".join(c["source"]) for c in cells[1:]]
        assert not any("if SMOKE" in s or "if not SMOKE" in s for s in later), f"{name}: SMOKE branches after config"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-v", "-s"]))
