from __future__ import annotations

import logging
import pickle

import anndata as ad
import mudata as md
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import sc_dta as dta
from sc_dta.models import GeneformerVocab
from sc_dta.pp._tokenize import _top_ranked

GATA4, TBX5 = "ENSG00000136574", "ENSG00000089225"


# ------------------------------------------------------------------ independent reference


class Reference:
    """Geneformer's rank-value encoding written out cell by cell from the raw reference dictionaries."""

    def __init__(self, folder, suffix, *, special: bool, max_length: int):
        def read(stem):
            with open(folder / f"{stem}{suffix}.pkl", "rb") as fh:  # trusted reference files
                return pickle.load(fh)

        self.tokens = {k: int(v) for k, v in read("token_dictionary").items()}
        self.medians = {k: float(v) for k, v in read("gene_median_dictionary").items()}
        self.mapping = dict(read("ensembl_mapping_dict"))
        for symbol, gene in read("gene_name_id_dict").items():
            self.mapping.setdefault(symbol.upper(), gene)
        self.special = special
        self.max_length = max_length

    def gene(self, var_id):
        gene = self.mapping.get(var_id.upper())
        if gene not in self.tokens and var_id.upper().startswith("ENSG") and "." in var_id:
            gene = self.mapping.get(var_id.upper().split(".")[0])  # documented: Ensembl version dropped
        return gene if gene in self.tokens and not gene.startswith("<") else None

    def cell(self, counts, var_ids, n_counts=None, max_length=None):
        max_length = max_length or self.max_length
        if n_counts is None:
            n_counts = float(sum(float(c) for c in counts))  # over all genes
        summed, first = {}, {}
        for j, (c, var_id) in enumerate(zip(counts, var_ids, strict=True)):
            gene = self.gene(var_id)
            if gene is None:
                continue
            first.setdefault(gene, j)
            summed[gene] = summed.get(gene, 0.0) + float(c)
        ranked = sorted(
            ((c / n_counts * 10_000 / self.medians[g], first[g], g) for g, c in summed.items() if c > 0),
            key=lambda t: (-t[0], t[1]),
        )
        tokens = [self.tokens[g] for _, _, g in ranked]
        if self.special:
            return [self.tokens["<cls>"], *tokens[: max_length - 2], self.tokens["<eos>"]]
        return tokens[:max_length]

    def all(self, X, var_ids, n_counts=None, max_length=None):
        X = X.toarray() if sp.issparse(X) else np.asarray(X)
        return [
            self.cell(X[i], var_ids, None if n_counts is None else float(n_counts[i]), max_length)
            for i in range(X.shape[0])
        ]


@pytest.fixture(scope="module")
def v2(geneformer_data):
    return GeneformerVocab.load(geneformer_data, version="V2")


@pytest.fixture(scope="module")
def v1(geneformer_data):
    return GeneformerVocab.load(geneformer_data, version="V1")


@pytest.fixture(scope="module")
def ref2(geneformer_data):
    return Reference(geneformer_data, "_gc104M", special=True, max_length=4096)


@pytest.fixture(scope="module")
def ref1(geneformer_data):
    return Reference(geneformer_data, "_gc30M", special=False, max_length=2048)


def _var_ids(vocab, n_genes, seed):
    """Ensembl ids in mixed case, symbols, a versioned id, duplicates and genes outside the vocabulary."""
    rng = np.random.default_rng(seed)
    genes = [t for t in vocab.token_ids if t.startswith("ENSG") and t not in (GATA4, TBX5)]
    ids = list(rng.choice(genes, n_genes - 8, replace=False))
    ids[3] = ids[3].lower()
    ids += [GATA4, "tbx5", "Gata4", ids[10], "NOT_A_GENE", "ENSG99999999999", TBX5 + ".7", "ACTB"]
    return ids


def _counts(n_cells, n_genes, seed, density=0.3):
    rng = np.random.default_rng(seed)
    rates = rng.gamma(0.5, 3.0, size=n_genes) * (rng.random((n_cells, n_genes)) < density)
    X = rng.poisson(rates).astype(np.float32)
    X[2] = 0  # an empty cell
    X[5] = 0
    X[5, -4:-2] = 3  # counts only in genes outside the vocabulary
    return X


def _tokens(result):
    return [ids.tolist() for ids in result.input_ids]


# ------------------------------------------------------------------ exactness


@pytest.mark.parametrize("version", ["V1", "V2"])
def test_matches_reference(version, v1, v2, ref1, ref2, caplog):
    vocab, ref = (v1, ref1) if version == "V1" else (v2, ref2)
    var_ids = _var_ids(vocab, 400, seed=1)
    X = _counts(50, len(var_ids), seed=2)
    adata = ad.AnnData(sp.csr_matrix(X), var=pd.DataFrame(index=var_ids))
    with caplog.at_level(logging.INFO, logger="sc_dta.pp._tokenize"):
        result = dta.pp.tokenize(adata, vocab=vocab)
    assert "computing n_counts" in caplog.text
    expected = ref.all(X, var_ids)
    assert _tokens(result) == expected
    assert all(ids.dtype == np.int64 for ids in result.input_ids)
    np.testing.assert_array_equal(result.lengths, [len(e) for e in expected])
    np.testing.assert_array_equal(result.n_counts, X.astype(np.float64).sum(axis=1))  # all vars
    assert result.empty.tolist() == [i in (2, 5) for i in range(50)] and result.n_counts[5] == 6
    assert result.params["n_counts_computed"] and result.model_version == version
    assert list(result.obs_names) == list(adata.obs_names)
    # GATA4 (given twice, as id and symbol: summed) and TBX5 (symbol and versioned id)
    gata4, tbx5 = (7261, 1831) if version == "V1" else (7196, 1821)
    assert result.var_token_ids[len(var_ids) - 8 : len(var_ids)].tolist() == [
        gata4,
        tbx5,
        gata4,
        result.var_token_ids[10],
        -1,
        -1,
        tbx5,
        vocab.token_ids[ref.mapping["ACTB"]],
    ]
    assert result.token_to_var()[gata4] == len(var_ids) - 8
    assert "NOT_A_GENE" not in result.genes and GATA4 in result.genes


def test_gata4_tbx5_lead_when_most_expressed(v1, v2):
    var_ids = [GATA4, TBX5, "ENSG00000000003"]
    adata = ad.AnnData(np.array([[500, 300, 1], [0, 9, 0]], dtype=np.float32), var=pd.DataFrame(index=var_ids))
    assert _tokens(dta.pp.tokenize(adata, vocab=v2)) == [[2, 7196, 1821, 4, 3], [2, 1821, 3]]
    assert _tokens(dta.pp.tokenize(adata, vocab=v1)) == [[7261, 1831, 2], [1831]]


def test_n_counts_column_is_used(v2, ref2, caplog):
    var_ids = _var_ids(v2, 300, seed=3)
    X = _counts(20, len(var_ids), seed=4)
    adata = ad.AnnData(sp.csr_matrix(X), var=pd.DataFrame(index=var_ids))
    n_counts = X.sum(axis=1) * 3.0 + 7.0
    adata.obs["n_counts"] = n_counts
    with caplog.at_level(logging.INFO, logger="sc_dta.pp._tokenize"):
        result = dta.pp.tokenize(adata, vocab=v2)
    assert "computing n_counts" not in caplog.text
    assert _tokens(result) == ref2.all(X, var_ids, n_counts=n_counts)
    np.testing.assert_array_equal(result.n_counts, n_counts)
    assert not result.params["n_counts_computed"]
    adata.obs["total"] = n_counts
    del adata.obs["n_counts"]
    again = dta.pp.tokenize(adata, vocab=v2, n_counts_key="total")
    np.testing.assert_array_equal(again.n_counts, n_counts)


def test_truncation(v1, v2, ref1, ref2):
    genes = [t for t in v2.token_ids if t.startswith("ENSG") and t in v1.token_ids][:5000]
    rng = np.random.default_rng(5)
    X = rng.integers(1, 50, size=(3, len(genes))).astype(np.float32)
    X[1, 3000:] = 0  # 3,000 genes: fits V2, not V1
    adata = ad.AnnData(sp.csr_matrix(X), var=pd.DataFrame(index=genes))
    r2 = dta.pp.tokenize(adata, vocab=v2)
    assert r2.lengths.tolist() == [4096, 3002, 4096]
    assert all(ids[0] == 2 and ids[-1] == 3 for ids in r2.input_ids)
    assert _tokens(r2) == ref2.all(X, genes)
    r1 = dta.pp.tokenize(adata, vocab=v1)
    assert r1.lengths.tolist() == [2048, 2048, 2048]
    assert _tokens(r1) == ref1.all(X, genes)
    short = dta.pp.tokenize(adata, vocab=v2, max_length=100)
    assert short.lengths.tolist() == [100, 100, 100] and short.max_length == 100
    assert _tokens(short) == ref2.all(X, genes, max_length=100)
    assert _tokens(dta.pp.tokenize(adata, vocab=v1, max_length=10)) == ref1.all(X, genes, max_length=10)


def test_empty_cells(v1, v2):
    var_ids = [GATA4, "NOT_A_GENE"]
    X = np.array([[0, 0], [0, 5], [2, 1]], dtype=np.float32)
    adata = ad.AnnData(X, var=pd.DataFrame(index=var_ids))
    r2 = dta.pp.tokenize(adata, vocab=v2)
    assert _tokens(r2) == [[2, 3], [2, 3], [2, 7196, 3]]
    assert r2.empty.tolist() == [True, True, False] and r2.lengths.tolist() == [2, 2, 3]
    r1 = dta.pp.tokenize(adata, vocab=v1)
    assert _tokens(r1) == [[], [], [7261]] and r1.empty.tolist() == [True, True, False]
    assert r1.n_counts.tolist() == [0.0, 5.0, 3.0]
    ids, mask = r2.to_padded()
    assert ids.tolist() == [[2, 3, 0], [2, 3, 0], [2, 7196, 3]]
    assert mask.tolist() == [[1, 1, 0], [1, 1, 0], [1, 1, 1]]


@pytest.mark.parametrize(
    "convert",
    [
        sp.csc_matrix,
        lambda x: x,  # dense numpy
        lambda x: sp.csr_array(x.astype(np.int64)),
        lambda x: sp.csr_matrix(x.astype(np.float64)),
    ],
    ids=["csc", "dense", "csr_array-int64", "csr-float64"],
)
def test_formats_identical(v2, convert):
    var_ids = _var_ids(v2, 300, seed=6)
    X = _counts(40, len(var_ids), seed=7)
    base = dta.pp.tokenize(ad.AnnData(sp.csr_matrix(X), var=pd.DataFrame(index=var_ids)), vocab=v2)
    other = dta.pp.tokenize(ad.AnnData(convert(X), var=pd.DataFrame(index=var_ids)), vocab=v2, chunk_size=7)
    assert _tokens(other) == _tokens(base)
    np.testing.assert_array_equal(other.empty, base.empty)


def test_unsorted_indices_explicit_zeros_and_layer(v2, ref2):
    var_ids = _var_ids(v2, 200, seed=8)
    X = _counts(15, len(var_ids), seed=9)
    m = sp.csr_matrix(X)
    # reverse the column order inside each row and store some explicit zeros
    for i in range(m.shape[0]):
        seg = slice(m.indptr[i], m.indptr[i + 1])
        m.indices[seg] = m.indices[seg][::-1].copy()
        m.data[seg] = m.data[seg][::-1].copy()
    m.has_sorted_indices = False
    m.data[::7] = 0
    adata = ad.AnnData(np.zeros_like(X), var=pd.DataFrame(index=var_ids), layers={"counts": m})
    result = dta.pp.tokenize(adata, vocab=v2, layer="counts")
    assert _tokens(result) == ref2.all(m.toarray(), var_ids)


def test_backed_and_mudata(v2, ref2, tmp_path):
    var_ids = _var_ids(v2, 200, seed=10)
    X = _counts(30, len(var_ids), seed=11)
    adata = ad.AnnData(sp.csr_matrix(X), var=pd.DataFrame(index=[f"v{i}" for i in range(len(var_ids))]))
    adata.var["ensembl"] = var_ids
    adata.write_h5ad(tmp_path / "a.h5ad")
    backed = ad.read_h5ad(tmp_path / "a.h5ad", backed="r")
    expected = ref2.all(X, var_ids)
    assert _tokens(dta.pp.tokenize(backed, vocab=v2, gene_id_key="ensembl", chunk_size=8)) == expected
    backed.file.close()
    mdata = md.MuData({"rna": adata})
    assert _tokens(dta.pp.tokenize(mdata, vocab=v2, gene_id_key="ensembl")) == expected
    view = adata[3:20]
    assert _tokens(dta.pp.tokenize(view, vocab=v2, gene_id_key="ensembl")) == expected[3:20]
    assert view.is_view


def test_ties_follow_var_order():
    names = ["A", "B", "C", "D"]
    vocab = GeneformerVocab(
        "ties",
        {"<pad>": 0, "<mask>": 1, "<cls>": 2, "<eos>": 3, "A": 4, "B": 5, "C": 6, "D": 7},
        dict.fromkeys(names, 1.0),
    )
    X = np.array([[1, 1, 2, 1], [3, 3, 3, 3]], dtype=np.float32)
    forward = dta.pp.tokenize(ad.AnnData(X, var=pd.DataFrame(index=names)), vocab=vocab)
    assert _tokens(forward) == [[2, 6, 4, 5, 7, 3], [2, 4, 5, 6, 7, 3]]
    backward = dta.pp.tokenize(ad.AnnData(X[:, ::-1].copy(), var=pd.DataFrame(index=names[::-1])), vocab=vocab)
    assert _tokens(backward) == [[2, 6, 7, 5, 4, 3], [2, 7, 6, 5, 4, 3]]


def test_rank_is_exact_beyond_float32():
    # values equal in float32 but not in float64 must still be ranked by their float64 value
    values = np.array([1.0, 1.0 + 1e-12, 1.0, 2.0, 5.0, 1.0 + 2e-12, 7.0])
    indptr = np.array([0, 4, 4, 7])
    order, kept, ranked = _top_ranked(indptr, values, 10)
    assert order.tolist() == [1, 2, 0]  # rows by number of entries
    assert kept.tolist() == [0, 3, 4]
    assert ranked.tolist() == [6, 4, 5, 3, 1, 0, 2]
    _, kept, ranked = _top_ranked(indptr, values, 2)
    assert kept.tolist() == [0, 2, 2] and ranked.tolist() == [6, 4, 3, 1]


def test_tokenized_cells_helpers(v2):
    var_ids = _var_ids(v2, 100, seed=12)
    X = _counts(10, len(var_ids), seed=13)
    adata = ad.AnnData(sp.csr_matrix(X), var=pd.DataFrame(index=var_ids))
    result = dta.pp.tokenize(adata, vocab=v2)
    assert len(result) == 10 and "n_empty=2" in repr(result)
    sub = result.subset(~result.empty)
    assert len(sub) == 8 and not sub.empty.any()
    assert _tokens(sub) == [t for t, e in zip(_tokens(result), result.empty, strict=True) if not e]
    assert _tokens(result.subset(["3", "0"])) == [_tokens(result)[3], _tokens(result)[0]]
    ids, mask = result.to_padded([0, 1], max_length=8)
    assert ids.shape == (2, 8) and mask.sum(axis=1).tolist() == [min(8, n) for n in result.lengths[:2]]
    assert ids[0, :8].tolist() == result.input_ids[0][:8].tolist()


# ------------------------------------------------------------------ errors leave the AnnData unchanged


def _assert_unchanged(adata, before):
    assert adata.obs.equals(before.obs) and adata.var.equals(before.var)
    assert list(adata.layers) == list(before.layers)
    for key in adata.layers:
        np.testing.assert_array_equal(np.asarray(adata.layers[key].todense()), np.asarray(before.layers[key].todense()))
    np.testing.assert_array_equal(adata.X.toarray(), before.X.toarray())


def test_errors(v2):
    var_ids = _var_ids(v2, 50, seed=14)
    X = _counts(8, len(var_ids), seed=15)
    adata = ad.AnnData(sp.csr_matrix(X), var=pd.DataFrame(index=var_ids))
    adata.layers["norm"] = sp.csr_matrix(X / np.maximum(X.sum(axis=1, keepdims=True), 1) * 1e4)
    adata.layers["neg"] = sp.csr_matrix(-X)
    before = adata.copy()
    with pytest.raises(ValueError, match="layer 'norm' has non-integer"):
        dta.pp.tokenize(adata, vocab=v2, layer="norm")
    with pytest.raises(ValueError, match="layer 'neg' has negative"):
        dta.pp.tokenize(adata, vocab=v2, layer="neg")
    with pytest.raises(KeyError, match="layer='raw'"):
        dta.pp.tokenize(adata, vocab=v2, layer="raw")
    with pytest.raises(KeyError, match="gene_id_key='ensembl'"):
        dta.pp.tokenize(adata, vocab=v2, gene_id_key="ensembl")
    with pytest.raises(ValueError, match="model_version='V3'"):
        dta.pp.tokenize(adata, model_version="V3")
    with pytest.raises(ValueError, match="max_length=5000"):
        dta.pp.tokenize(adata, vocab=v2, max_length=5000)
    adata.obs["n_counts"] = np.nan
    with pytest.raises(ValueError, match="obs\\['n_counts'\\]"):
        dta.pp.tokenize(adata, vocab=v2)
    adata.obs["n_counts"] = 0.0
    with pytest.raises(ValueError, match="which has counts"):
        dta.pp.tokenize(adata, vocab=v2)
    del adata.obs["n_counts"]
    _assert_unchanged(adata, before)

    symbols = ad.AnnData(sp.csr_matrix(X), var=pd.DataFrame(index=[f"gene{i}" for i in range(len(var_ids))]))
    before = symbols.copy()
    with pytest.raises(ValueError, match="None of the 50 genes in adata.var_names"):
        dta.pp.tokenize(symbols, vocab=v2)
    _assert_unchanged(symbols, before)
