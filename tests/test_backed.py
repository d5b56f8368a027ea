"""Backed (on-disk) AnnData: tokenize, perturb_gene / perturb_tss and screen read the counts chunk by chunk and give
exactly the in-memory results; layers, writes and copies of a backed object behave as documented."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

torch = pytest.importorskip("torch")

sys.path.insert(0, str(Path(__file__).parent))

import test_perturb  # noqa: E402
from test_perturb import GENE, _build  # noqa: E402
from test_tokenize import _counts, _tokens, _var_ids, v2  # noqa: E402, F401  (v2: a fixture)

import sc_dta as dta  # noqa: E402
from sc_dta import _chunks  # noqa: E402

tss_setup = test_perturb.tss_setup  # the BioDTA + genome fixture of the perturb tests

pytestmark = [
    pytest.mark.filterwarnings("ignore:From 0.4 .update:FutureWarning"),
    pytest.mark.usefixtures("one_torch_thread"),
]


@pytest.fixture
def small_chunks(monkeypatch):
    """Every streamed read takes 5 cells at a time (the test AnnData has 24: five chunks)."""
    monkeypatch.setattr(dta.settings, "chunk_size_cells", 5)


def _write(a: ad.AnnData, path: Path, fmt: str = "csr") -> ad.AnnData:
    a = a.copy()
    if fmt == "csc":
        a.X = sp.csc_matrix(a.X)
    elif fmt == "dense":
        a.X = a.X.toarray()
    a.write_h5ad(path)
    return ad.read_h5ad(path, backed="r")


class _Recorder:
    """The backed matrix, recording the rows of every read (what is in memory at a time)."""

    def __init__(self, X):
        self.X, self.reads = X, []
        self.shape, self.format = X.shape, getattr(X, "format", None)
        if hasattr(X, "group"):
            self.group = X.group

    def __getitem__(self, index):
        rows = index[0] if isinstance(index, tuple) else index
        if isinstance(rows, slice):
            self.reads.append((rows.start or 0, rows.stop if rows.stop is not None else self.shape[0]))
        else:
            self.reads.append(list(rows))
        return self.X[index]


# ----------------------------------------------------------------------------- the chunk reader


@pytest.mark.parametrize("fmt", ["csr", "csc", "dense"])
def test_row_chunks_of_a_backed_matrix_equal_the_matrix(fmt, tmp_path):
    rng = np.random.default_rng(0)
    x = rng.poisson(0.4, (23, 40)).astype(np.float32)
    backed = _write(ad.AnnData(sp.csr_matrix(x)), tmp_path / "x.h5ad", fmt)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        X, name = _chunks.counts_matrix(backed, None)
    assert any("backed CSC" in str(w.message) for w in caught) == (fmt == "csc")
    assert name == "adata.X" and not isinstance(X, np.ndarray | sp.spmatrix)  # still on disk
    rec = _Recorder(X)
    rows = np.array([0, 1, 7, 8, 9, 20, 22])
    for selected, expect in ((None, np.arange(23)), (rows, rows)):
        rec.reads.clear()
        chunks = list(_chunks.iter_row_chunks(rec, 23, rows=selected, chunk_size=4))
        got = sp.vstack([sp.csr_matrix((c.data, c.indices, c.indptr), shape=(c.n_rows, 40)) for c in chunks])
        np.testing.assert_array_equal(got.toarray(), x[expect])
        np.testing.assert_array_equal(np.concatenate([c.rows for c in chunks]), expect)
        assert all(c.n_rows <= 4 for c in chunks)
        if fmt != "csc":  # CSC reads blocks of columns for each row range
            assert all(stop - start <= 4 for start, stop in rec.reads)
    # only the row ranges holding selected cells were read: 0-1, 7, 8-9, 20-22
    assert rec.reads == [(0, 2), (7, 8), (8, 10), (20, 23)] or fmt == "csc"
    # two cells of a 20-row range: read one by one, not the range
    rec.reads.clear()
    (chunk,) = _chunks.iter_row_chunks(rec, 23, rows=[1, 17], chunk_size=20)
    got = sp.csr_matrix((chunk.data, chunk.indices, chunk.indptr), shape=(2, 40))
    np.testing.assert_array_equal(got.toarray(), x[[1, 17]])
    assert rec.reads == [[1, 17]] or fmt == "csc"
    backed.file.close()


def test_chunk_size_is_validated_and_defaults_to_the_setting(monkeypatch):
    with pytest.raises(ValueError, match="chunk_size"):
        _chunks.chunk_size_or_default(0)
    with pytest.raises(ValueError, match="chunk_size"):
        _chunks.chunk_size_or_default(2.5)
    assert _chunks.chunk_size_or_default(None) == dta.settings.chunk_size_cells == 2048
    monkeypatch.setattr(dta.settings, "chunk_size_cells", 7)
    assert _chunks.chunk_size_or_default(None) == 7
    with pytest.raises(ValueError, match="chunk_size_cells"):
        dta.settings.chunk_size_cells = 0
    with pytest.raises(ValueError, match="increasing"):
        list(_chunks.iter_row_chunks(sp.csr_matrix((5, 3)), 5, rows=[3, 1]))


def test_free_memory_is_released_between_chunks(monkeypatch):
    x = sp.random(30, 6, density=0.5, format="csr", random_state=1, dtype=np.float32)
    calls = []
    monkeypatch.setattr(_chunks, "release_free_memory", lambda: calls.append(1))
    chunks = list(_chunks.iter_row_chunks(x, 30, chunk_size=2))
    assert len(chunks) == 15 and len(calls) == (15 - 1) // _chunks.TRIM_EVERY
    got = sp.vstack([sp.csr_matrix((c.data, c.indices, c.indptr), shape=(c.n_rows, 6)) for c in chunks])
    assert (got != x).nnz == 0
    monkeypatch.undo()
    _chunks.release_free_memory()  # the real call (glibc malloc_trim, or nothing) runs


def test_token_ids_are_int64_arrays_of_their_own_cells(v2):  # noqa: F811
    var_ids = _var_ids(v2, 100, seed=25)
    x = _counts(40, len(var_ids), seed=26)
    mem = ad.AnnData(sp.csr_matrix(x), var=pd.DataFrame(index=var_ids))
    small, large = dta.pp.tokenize(mem, vocab=v2, chunk_size=3), dta.pp.tokenize(mem, vocab=v2, chunk_size=100)
    assert _tokens(small) == _tokens(large)
    assert all(ids.dtype == np.int64 for ids in small.input_ids)
    small.input_ids[0][:] = -1  # cells are disjoint views: changing one leaves the others and other results alone
    assert _tokens(small)[1:] == _tokens(large)[1:] and _tokens(large)[0][0] != -1


# ----------------------------------------------------------------------------- tokenize


@pytest.mark.parametrize("fmt", ["csr", "csc", "dense"])
def test_tokenize_backed_equals_in_memory(fmt, v2, tmp_path, small_chunks):  # noqa: F811
    var_ids = _var_ids(v2, 300, seed=21)
    x = _counts(23, len(var_ids), seed=22)
    mem = ad.AnnData(sp.csr_matrix(x), var=pd.DataFrame(index=var_ids))
    mem.obs_names = [f"c{i}" for i in range(mem.n_obs)]
    expected = dta.pp.tokenize(mem, vocab=v2)
    backed = _write(mem, tmp_path / "a.h5ad", fmt)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the backed-CSC warning
        got = dta.pp.tokenize(backed, vocab=v2)
        assert _tokens(got) == _tokens(expected)
        for attr in ("lengths", "empty", "n_counts", "var_token_ids"):
            np.testing.assert_array_equal(getattr(got, attr), getattr(expected, attr))
        assert list(got.obs_names) == list(expected.obs_names) and got.params == expected.params
        # a subset of cells: only those are read and tokenized, the same tokens as in the full run
        cells = ["c1", "c6", "c7", "c19"]
        sub = dta.pp.tokenize(backed, vocab=v2, cells=cells, chunk_size=3)
    assert list(sub.obs_names) == cells
    assert _tokens(sub) == [_tokens(expected)[int(c[1:])] for c in cells]
    np.testing.assert_array_equal(sub.n_counts, expected.n_counts[[1, 6, 7, 19]])
    backed.file.close()


def test_tokenize_backed_refuses_normalised_counts_and_warns_on_layers(v2, tmp_path, small_chunks):  # noqa: F811
    var_ids = _var_ids(v2, 120, seed=23)
    x = _counts(12, len(var_ids), seed=24)
    mem = ad.AnnData(sp.csr_matrix(np.log1p(x)), var=pd.DataFrame(index=var_ids), layers={"counts": sp.csr_matrix(x)})
    backed = _write(mem, tmp_path / "a.h5ad")
    with pytest.raises(ValueError, match="raw counts"):
        dta.pp.tokenize(backed, vocab=v2)
    with pytest.warns(UserWarning, match="not streamed"):
        got = dta.pp.tokenize(backed, vocab=v2, layer="counts")
    assert _tokens(got) == _tokens(dta.pp.tokenize(mem, vocab=v2, layer="counts"))
    with pytest.raises(KeyError, match="layer='missing'"):
        dta.pp.tokenize(backed, vocab=v2, layer="missing")
    backed.file.close()


# ----------------------------------------------------------------------------- perturb_gene / perturb_tss


def _results(a: ad.AnnData, key: str) -> dict:
    return {
        "layer": a.layers[key].toarray(),
        **{c: a.obs[c].to_numpy() for c in a.obs.columns if c.startswith(key)},
        **{c: a.var[c].to_numpy() for c in a.var.columns if c.startswith(key)},
    }


def _assert_same(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for k in expected:
        np.testing.assert_array_equal(got[k], expected[k], err_msg=k)


@pytest.mark.parametrize("readout", ["cosine", "expression"])
def test_perturb_gene_on_backed_equals_in_memory(readout, tmp_path, small_chunks):
    a, vocab, model, tokens = _build("V2")
    cells = a.obs_names[[0, 2, 5, 6, 9, 10, 11, 17, 23]]
    kw = {"model": model, "readout": readout, "kind": ["delete", "overexpress"], "batch_size": 64}
    mem = dta.tl.perturb_gene(a, GENE, copy=True, **kw)
    backed = _write(a, tmp_path / "a.h5ad")
    assert dta.tl.perturb_gene(backed, GENE, **kw) is None  # written into the backed object
    for key in ("dta_shift_delete", "dta_shift_overexpress"):
        _assert_same(_results(backed, key), _results(mem, key))
        assert backed.uns[key]["params"]["n_evaluated"] == mem.uns[key]["params"]["n_evaluated"] > 0
    assert backed.isbacked and sp.issparse(backed.layers["dta_shift_delete"])
    # the results round-trip through a new h5ad file written from the backed object
    backed.write_h5ad(tmp_path / "out.h5ad")
    back = ad.read_h5ad(tmp_path / "out.h5ad")
    _assert_same(_results(back, "dta_shift_delete"), _results(mem, "dta_shift_delete"))
    np.testing.assert_array_equal(back.X.toarray(), a.X.toarray())
    backed.file.close()
    # a subset of cells: only those are tokenized, the same values as in memory
    sub_mem = dta.tl.perturb_gene(a, GENE, cells=cells, copy=True, **kw)
    backed = ad.read_h5ad(tmp_path / "a.h5ad", backed="r")
    dta.tl.perturb_gene(backed, GENE, cells=cells, **kw)
    _assert_same(_results(backed, "dta_shift_delete"), _results(sub_mem, "dta_shift_delete"))
    backed.file.close()


def test_perturb_gene_on_backed_refuses_copy_and_leaves_it_unchanged_on_failure(tmp_path, small_chunks):
    a, vocab, model, tokens = _build("V2")
    backed = _write(a, tmp_path / "a.h5ad")
    before = (list(backed.obs.columns), list(backed.var.columns), list(backed.layers), list(backed.uns))
    with pytest.raises(ValueError, match=r"copy=True: perturb_gene got a backed AnnData.*tl.screen"):
        dta.tl.perturb_gene(backed, GENE, model=model, copy=True)
    with pytest.raises(KeyError, match="NOT_A_GENE"):
        dta.tl.perturb_gene(backed, "NOT_A_GENE", model=model)
    with pytest.raises(ValueError, match="emb_layer"):
        dta.tl.perturb_gene(backed, GENE, model=model, readout="cosine", emb_layer=7)
    assert (list(backed.obs.columns), list(backed.var.columns), list(backed.layers), list(backed.uns)) == before
    backed.file.close()
    # a backed file with normalised X: the raw-counts check fires on the streamed chunks, nothing written
    log = a.copy()
    log.X = log.X.log1p()
    log.layers["counts"] = a.X.copy()
    backed = _write(log, tmp_path / "log.h5ad")
    with pytest.raises(ValueError, match="raw counts"):
        dta.tl.perturb_gene(backed, GENE, model=model)
    assert "dta_shift_delete" not in backed.layers and "dta_shift_delete_mean" not in backed.var
    with pytest.warns(UserWarning, match="not streamed"):
        dta.tl.perturb_gene(backed, GENE, model=model, readout="cosine", layer="counts", batch_size=64)
    expected = dta.tl.perturb_gene(a, GENE, model=model, readout="cosine", copy=True, batch_size=64)
    _assert_same(_results(backed, "dta_shift_delete"), _results(expected, "dta_shift_delete"))
    backed.file.close()


def test_perturb_tss_on_backed_equals_in_memory(tss_setup, tmp_path, small_chunks):
    a, vocab, model, encoder, genome, expected = tss_setup
    kw = {"model": model, "genome": genome, "encoder": encoder, "readout": "cosine", "batch_size": 64}
    mem = dta.tl.perturb_tss(a, "DPM1", "delete:-20:+20", copy=True, **kw)
    backed = _write(a, tmp_path / "tss.h5ad")
    dta.tl.perturb_tss(backed, "DPM1", "delete:-20:+20", **kw)
    _assert_same(_results(backed, "dta_shift"), _results(mem, "dta_shift"))
    with pytest.raises(ValueError, match="copy=True: perturb_tss"):
        dta.tl.perturb_tss(backed, "DPM1", "delete:-20:+20", copy=True, **kw)
    backed.file.close()


# ----------------------------------------------------------------------------- screen


@pytest.mark.parametrize("readout", ["cosine", "expression"])
def test_screen_on_backed_equals_in_memory(readout, tmp_path, small_chunks):
    a, vocab, model, tokens = _build("V2")
    a = a.copy()
    a.obs["group"] = pd.Categorical(np.where(np.arange(a.n_obs) % 3 == 0, "A", "B"))
    genes = [GENE, "ENSG00000000001", "ENSG00000000002"]
    perts = [(genes[0], "delete"), (genes[1], "delete"), (genes[0], "overexpress"), (genes[2], "delete")]
    kw = {"model": model, "readout": readout, "groupby": "group", "per_cell": True, "chunk_size": 2, "batch_size": 64}
    cells = np.arange(a.n_obs) % 4 != 1
    for sel in (None, cells):
        mem = dta.tl.screen(a, perts, cells=sel, **kw)
        backed = _write(a, tmp_path / "s.h5ad")
        before = (list(backed.obs.columns), list(backed.var.columns), list(backed.layers), list(backed.uns))
        got = dta.tl.screen(backed, perts, cells=sel, **kw)
        assert (list(backed.obs.columns), list(backed.var.columns), list(backed.layers), list(backed.uns)) == before
        np.testing.assert_array_equal(got.X, mem.X)
        assert np.isfinite(got.X).sum() > 10
        assert got.layers.keys() == mem.layers.keys()
        for k in mem.layers:
            np.testing.assert_array_equal(got.layers[k], mem.layers[k], err_msg=k)
        pd.testing.assert_frame_equal(got.obs, mem.obs)
        pd.testing.assert_frame_equal(got.obsm["cell_shift"], mem.obsm["cell_shift"])
        for name, m in mem.uns["per_cell"]["shift"].items():
            assert (got.uns["per_cell"]["shift"][name] != m).nnz == 0
        backed.file.close()
