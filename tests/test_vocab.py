from __future__ import annotations

import os
import pickle
import shutil

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import sc_dta as dta
from sc_dta.models import GeneformerVocab
from sc_dta.models.vocab import _restricted_load

GATA4, TBX5 = "ENSG00000136574", "ENSG00000089225"


@pytest.fixture(scope="module")
def v1(geneformer_data):
    return GeneformerVocab.load(geneformer_data, version="V1")


@pytest.fixture(scope="module")
def v2(geneformer_data):
    return GeneformerVocab.load(geneformer_data, version="V2")


# ------------------------------------------------------------------ published vocabularies


def test_v2_vocabulary(v2, geneformer_data):
    assert v2.version == "V2"
    assert len(v2) == 20_275
    assert (v2.pad_id, v2.mask_id, v2.cls_id, v2.eos_id) == (0, 1, 2, 3)
    assert v2.special_ids == (0, 1, 2, 3)
    assert v2.max_length == 4096
    assert v2.token_ids[GATA4] == 7196 and v2.token_ids[TBX5] == 1821
    assert v2.token_id("gata4") == 7196 and v2.token_id("TBX5") == 1821
    assert v2.id_to_token[7196] == GATA4 and v2.id_to_token[2] == "<cls>"
    # medians straight from the pickle (independent plain read of the trusted reference file)
    with open(geneformer_data / "gene_median_dictionary_gc104M.pkl", "rb") as fh:
        raw = pickle.load(fh)
    assert v2.medians[GATA4] == float(raw[GATA4])
    assert v2.median_by_id[7196] == float(raw[GATA4])
    assert np.isnan(v2.median_by_id[:4]).all()
    assert all(type(v) is float for v in list(v2.medians.values())[:100])


def test_v1_vocabulary_casts_int16_ids(v1):
    assert v1.version == "V1"
    assert len(v1) == 20_275 + 5_151
    assert (v1.pad_id, v1.mask_id, v1.cls_id, v1.eos_id) == (0, 1, None, None)
    assert v1.special_ids == (0, 1)
    assert v1.max_length == 2048
    assert v1.token_ids[GATA4] == 7261 and v1.token_ids[TBX5] == 1831
    assert all(type(v) is int for v in v1.token_ids.values())
    # V1's mapping dictionary is the identity; symbols come from the gene-name dictionary
    assert v1.token_id("GATA4") == 7261 and v1.token_id("tbx5") == 1831
    assert v1.gene_id(GATA4.lower() + ".18") == GATA4  # Ensembl version stripped


def test_lookup_symbols_ids_and_unknown(v2):
    ids = v2.lookup(["GATA4", "ensg00000089225", "ENSG00000136574.18", "NOT_A_GENE", "<cls>", "<CLS>"])
    assert ids.tolist() == [7196, 1821, 7196, -1, -1, -1]
    with pytest.raises(KeyError, match="NOT_A_GENE"):
        v2.token_id("NOT_A_GENE")


def test_folder_with_both_versions_needs_version(geneformer_data):
    with pytest.raises(ValueError, match="version="):
        GeneformerVocab.load(geneformer_data)


def test_load_single_token_dictionary_file(geneformer_data, v1):
    vocab = GeneformerVocab.load(geneformer_data / "token_dictionary_gc30M.pkl")
    assert vocab == v1


def test_load_folder_with_plain_names(geneformer_data, tmp_path, v2):
    for stem in ("token_dictionary", "gene_median_dictionary", "ensembl_mapping_dict", "gene_name_id_dict"):
        os.symlink(geneformer_data / f"{stem}_gc104M.pkl", tmp_path / f"{stem}.pkl")
    vocab = GeneformerVocab.load(tmp_path)
    assert vocab.version == "V2"  # recognised by size and special tokens
    assert vocab == v2
    # missing median dictionary -> clear error
    (tmp_path / "gene_median_dictionary.pkl").unlink()
    with pytest.raises(FileNotFoundError, match="gene_median_dictionary.pkl"):
        GeneformerVocab.load(tmp_path)


def test_save_load_roundtrip(v1, tmp_path):
    path = v1.save(tmp_path / "v1")
    assert path.name == "vocab.json"
    back = GeneformerVocab.load(tmp_path / "v1")
    assert back == v1
    assert back.token_ids[GATA4] == 7261 and back.max_length == 2048
    assert GeneformerVocab.load(path) == v1
    shorter = GeneformerVocab.load(tmp_path / "v1", max_length=512)
    assert shorter.max_length == 512 and shorter != v1


def test_load_through_registry_offline(geneformer_data, monkeypatch, v1, v2):
    """'V1'/'V2' go through dta.datasets.fetch (sha256-checked cache); offline, nothing is downloaded."""
    monkeypatch.setenv("SC_DTA_OFFLINE", "1")
    reg = dta.datasets.registry()
    cache = dta.settings.cache_dir / "data"
    for version, suffix in (("v1", "_gc30M"), ("v2", "_gc104M")):
        for stem in ("token_dictionary", "gene_median_dictionary", "ensembl_mapping_dict", "gene_name_id_dict"):
            target = cache / reg[f"geneformer_{version}_{stem}"]["filename"]
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(geneformer_data / f"{stem}{suffix}.pkl", target)
    loaded = GeneformerVocab.load("V1")
    assert loaded == v1
    assert GeneformerVocab.load("v2") == v2
    assert GeneformerVocab.load("V1") is loaded  # kept in memory while the cached files are unchanged
    assert dta.pp.tokenize(ad.AnnData(np.ones((1, 1), np.float32), var=pd.DataFrame(index=["GATA4"]))).input_ids[
        0
    ].tolist() == [2, 7196, 3]  # model_version="V2" by default


def test_unknown_name_or_missing_path():
    with pytest.raises(FileNotFoundError, match="V3"):
        GeneformerVocab.load("V3")


# ------------------------------------------------------------------ restricted unpickler


class _Evil:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class _EvalEvil:
    def __reduce__(self):
        return (eval, ("__import__('os').getcwd()",))


def _write_token_dict(folder, obj):
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "token_dictionary.pkl", "wb") as fh:
        pickle.dump(obj, fh)
    with open(folder / "gene_median_dictionary.pkl", "wb") as fh:
        pickle.dump({"G1": 1.0}, fh)
    return folder


def test_restricted_unpickler_refuses_code_execution(tmp_path):
    marker = tmp_path / "pwned"
    folder = _write_token_dict(tmp_path / "evil", {"<pad>": 0, "<mask>": 1, "G1": _Evil(f"touch {marker}")})
    with pytest.raises(pickle.UnpicklingError, match=r"(posix|os|nt)\.system"):
        GeneformerVocab.load(folder)
    assert not marker.exists()
    with open(tmp_path / "eval.pkl", "wb") as fh:
        pickle.dump({"x": _EvalEvil()}, fh)
    with pytest.raises(pickle.UnpicklingError, match=r"builtins\.eval"):
        _restricted_load(tmp_path / "eval.pkl")


def test_restricted_unpickler_accepts_numpy_scalars_only(tmp_path):
    path = tmp_path / "ok.pkl"
    with open(path, "wb") as fh:
        pickle.dump({"a": np.int16(3), "b": np.float64(0.5)}, fh)
    assert _restricted_load(path) == {"a": 3, "b": 0.5}
    with open(tmp_path / "array.pkl", "wb") as fh:
        pickle.dump({"a": np.arange(3)}, fh)  # arrays need numpy's _reconstruct: refused
    with pytest.raises(pickle.UnpicklingError, match="_reconstruct"):
        _restricted_load(tmp_path / "array.pkl")


@pytest.mark.parametrize(
    ("tokens", "message"),
    [
        ([("<pad>", 0)], "expected a dict"),
        ({"<pad>": 0, "<mask>": 1, "G1": 2.5}, "not a non-negative integer"),
        ({"<pad>": 0, "<mask>": 1, "G1": "2"}, "not a non-negative integer"),
        ({"<pad>": 0, "<mask>": 1, 7: 2}, "non-string key"),
        ({"<pad>": 0, "<mask>": 1, "G1": 5}, "contiguous"),
        ({"<pad>": 0, "<mask>": 0, "G1": 1}, "used twice"),
        ({"<pad>": 0, "G1": 1}, "no <mask>"),
        ({"<pad>": 0, "<mask>": 1, "G1": 2, "G2": 3}, "no median"),
    ],
)
def test_invalid_dictionaries_are_clear_errors(tmp_path, tokens, message):
    folder = _write_token_dict(tmp_path / "bad", tokens)
    with pytest.raises(ValueError, match=message):
        GeneformerVocab.load(folder)


# ------------------------------------------------------------------ custom vocabularies


def _counts_adata(seed=0):
    rng = np.random.default_rng(seed)
    X = rng.poisson(rng.gamma(0.6, 2.0, size=(1, 12)), size=(60, 12)).astype(np.float32)
    X[:, 5] = 0  # never expressed
    names = [f"gene{i}" for i in range(12)]
    names[7] = "GENE3"  # same upper-case id as gene3: summed
    return ad.AnnData(sp.csr_matrix(X), var=pd.DataFrame(index=names))


def _expected_medians(adata):
    """Straightforward per-gene computation of Geneformer's non-zero median of counts / n_counts * 1e4."""
    X = adata.X.toarray().astype(np.float64)
    n_counts = X.sum(axis=1)
    ids = [v.upper() for v in adata.var_names]
    out = {}
    for gene in dict.fromkeys(ids):
        counts = X[:, [i for i, g in enumerate(ids) if g == gene]].sum(axis=1)
        vals = [c / n * 10_000 for c, n in zip(counts, n_counts, strict=True) if c > 0]
        if vals:
            out[gene] = float(np.median(vals))
    return out


def test_from_adata_medians_and_tokens(tmp_path):
    adata = _counts_adata()
    before = adata.copy()
    vocab = GeneformerVocab.from_adata(adata, name="toy")
    expected = _expected_medians(adata)
    assert "GENE5" not in vocab.token_ids  # never expressed: no token
    assert list(vocab.token_ids)[:4] == ["<pad>", "<mask>", "<cls>", "<eos>"]
    assert list(vocab.token_ids)[4:] == list(expected)  # var order, duplicates merged
    assert list(vocab.token_ids.values()) == list(range(len(vocab)))
    assert vocab.medians.keys() == expected.keys()
    for gene, med in expected.items():
        assert vocab.medians[gene] == pytest.approx(med, rel=1e-12)
    assert vocab.version == "toy" and vocab.max_length == 4096
    assert vocab.mapping["GENE3"] == "GENE3" and vocab.token_id("gene3") == vocab.token_ids["GENE3"]
    assert GeneformerVocab.load(vocab.save(tmp_path)) == vocab
    # adata untouched (no n_counts column written)
    assert "n_counts" not in adata.obs and (adata.X != before.X).nnz == 0


def test_from_adata_v1_style_gene_id_key_and_n_counts_column():
    adata = _counts_adata(1)
    adata.var["ensembl"] = [f"ENSTEST{i:05d}" for i in range(adata.n_vars)]
    adata.obs["n_counts"] = np.asarray(adata.X.sum(axis=1)).ravel() * 2.0  # honoured when present
    vocab = GeneformerVocab.from_adata(adata, gene_id_key="ensembl", special_tokens=False, max_length=256)
    assert vocab.cls_id is None and vocab.eos_id is None and vocab.max_length == 256
    assert list(vocab.token_ids)[:3] == ["<pad>", "<mask>", "ENSTEST00000"]
    no_column = adata.copy()
    del no_column.obs["n_counts"]
    expected = _expected_medians(ad.AnnData(no_column.X, var=pd.DataFrame(index=list(adata.var["ensembl"]))))
    for gene, med in expected.items():
        assert vocab.medians[gene] == pytest.approx(med / 2, rel=1e-12)
    tokenized = dta.pp.tokenize(adata, vocab=vocab, gene_id_key="ensembl")
    assert tokenized.lengths.max() <= 256 and tokenized.input_ids[0].dtype == np.int64


def test_from_adata_rejects_non_raw_counts():
    adata = _counts_adata()
    adata.layers["log"] = adata.X.copy()
    adata.layers["log"].data = np.log1p(adata.layers["log"].data)
    before = adata.copy()
    with pytest.raises(ValueError, match="layer 'log'.*non-integer"):
        GeneformerVocab.from_adata(adata, layer="log")
    assert (adata.layers["log"] != before.layers["log"]).nnz == 0 and list(adata.obs.columns) == []
    empty = ad.AnnData(sp.csr_matrix((5, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="no gene has a non-zero count"):
        GeneformerVocab.from_adata(empty)
