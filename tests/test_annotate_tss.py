from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _genome_data import make_test_adata, write_test_genome

import sc_dta as dta
from sc_dta.genome import read_tss

COLUMNS = ["tss_chrom", "tss_pos", "tss_strand"]


@pytest.fixture
def data(tmp_path):
    _, gtf, expected = write_test_genome(tmp_path)
    return gtf, expected


def _check(adata, expected, ids):
    """var rows equal the hand-computed TSS of ``ids`` (None = unmatched)."""
    var = adata.var
    assert var["tss_pos"].dtype == "Int64"
    for i, gene_id in enumerate(ids):
        if gene_id is None:
            assert pd.isna(var["tss_chrom"].iloc[i])
            assert var["tss_pos"].iloc[i] is pd.NA
            assert pd.isna(var["tss_strand"].iloc[i])
        else:
            exp = expected["genes"][gene_id]
            assert var["tss_chrom"].iloc[i] == exp["chrom"]
            assert var["tss_pos"].iloc[i] == exp["tss"]
            assert var["tss_strand"].iloc[i] == exp["strand"]


def test_by_ensembl_id(data, caplog):
    gtf, expected = data
    adata = make_test_adata(expected, extra_genes=("ENSG00000999999", "ENSG00000999998"))
    with caplog.at_level(logging.INFO, logger="sc_dta"):
        assert dta.pp.annotate_tss(adata, gtf) is None
    _check(adata, expected, expected["gene_ids"] + [None, None])
    params = adata.uns["tss"]["params"]
    assert params["gtf"] == str(gtf)
    assert params["n_matched"] == 6 and params["n_matched_by_id"] == 6 and params["n_unmatched"] == 2
    records = [r for r in caplog.records if r.name.startswith("sc_dta.pp")]
    assert len(records) == 1 and records[0].levelno == logging.WARNING
    assert "2 of 8 genes have no TSS" in records[0].getMessage()


def test_by_versioned_id_in_column(data):
    gtf, expected = data
    adata = make_test_adata(expected)
    versioned = [expected["genes"][g]["versioned_id"] for g in expected["gene_ids"]] + ["ENSG00000999999.1"]
    adata.var["gene_ids"] = versioned
    adata.var_names = [f"g{i}" for i in range(adata.n_vars)]
    dta.pp.annotate_tss(adata, gtf, gene_id_key="gene_ids")
    _check(adata, expected, expected["gene_ids"] + [None])
    assert adata.uns["tss"]["params"]["gene_id_key"] == "gene_ids"
    # versioned var_names work too
    adata2 = make_test_adata(expected)
    adata2.var_names = versioned
    dta.pp.annotate_tss(adata2, gtf)
    _check(adata2, expected, expected["gene_ids"] + [None])


def test_by_symbol_case_insensitive(data, caplog):
    gtf, expected = data
    adata = make_test_adata(expected)
    symbols = [expected["genes"][g]["gene_name"] for g in expected["gene_ids"]]
    mixed = [s.lower() if i % 2 else s for i, s in enumerate(symbols)] + ["NOTAGENE"]
    adata.var_names = mixed
    with caplog.at_level(logging.INFO, logger="sc_dta"):
        dta.pp.annotate_tss(adata, gtf)
    _check(adata, expected, expected["gene_ids"] + [None])
    params = adata.uns["tss"]["params"]
    assert params["n_matched_by_symbol"] == 6 and params["n_matched_by_id"] == 0
    assert "1 of 7 genes have no TSS" in caplog.text


def test_mixed_ids_and_symbols_with_key(data):
    gtf, expected = data
    adata = make_test_adata(expected)
    # ids for some genes, nothing useful for others: those fall back to symbols in var_names
    ids = list(adata.var_names)
    ids[1] = "unknown"
    ids[4] = "unknown2"
    adata.var["ensembl"] = ids
    adata.var_names = list(adata.var["gene_symbols"])
    dta.pp.annotate_tss(adata, gtf, gene_id_key="ensembl")
    _check(adata, expected, expected["gene_ids"] + [None])
    assert adata.uns["tss"]["params"]["n_matched_by_symbol"] == 2


def test_dataframe_input_and_ambiguous_symbol(data):
    gtf, expected = data
    table = read_tss(gtf)
    extra = pd.DataFrame(
        {"gene_name": ["DPM1"], "chrom": ["chrUn_KI270742v1"], "tss": [5], "strand": ["+"], "transcript_id": ["T"]},
        index=pd.Index(["ENSG00000000001"], name="gene_id"),
    )
    table = pd.concat([extra, table])
    adata = make_test_adata(expected)
    adata.var_names = list(adata.var["gene_symbols"])
    dta.pp.annotate_tss(adata, table)
    # the symbol shared with a gene on an unplaced contig resolves to the primary-chromosome gene
    _check(adata, expected, expected["gene_ids"] + [None])
    assert adata.uns["tss"]["params"]["gtf"] == "DataFrame"


def test_h5ad_round_trip(data, tmp_path):
    gtf, expected = data
    adata = make_test_adata(expected)
    dta.pp.annotate_tss(adata, gtf)
    path = tmp_path / "a.h5ad"
    adata.write_h5ad(path)
    back = ad.read_h5ad(path)
    pd.testing.assert_frame_equal(back.var[COLUMNS], adata.var[COLUMNS])
    _check(back, expected, expected["gene_ids"] + [None])
    assert back.uns["tss"]["params"]["n_matched"] == 6


def test_copy_and_mudata(data):
    mudata = pytest.importorskip("mudata")
    gtf, expected = data
    adata = make_test_adata(expected)
    before = adata.var.copy()
    out = dta.pp.annotate_tss(adata, gtf, copy=True)
    pd.testing.assert_frame_equal(adata.var, before)
    assert "tss" not in adata.uns
    _check(out, expected, expected["gene_ids"] + [None])

    mdata = mudata.MuData({"rna": make_test_adata(expected)})
    dta.pp.annotate_tss(mdata, gtf)
    _check(mdata["rna"], expected, expected["gene_ids"] + [None])
    with pytest.raises(KeyError, match="atac"):
        dta.pp.annotate_tss(mdata, gtf, mod="atac")


def test_errors_leave_adata_unchanged(data, tmp_path):
    gtf, expected = data
    adata = make_test_adata(expected)
    before_var, before_uns = adata.var.copy(), dict(adata.uns)
    with pytest.raises(FileNotFoundError, match="missing.gtf"):
        dta.pp.annotate_tss(adata, tmp_path / "missing.gtf")
    with pytest.raises(KeyError, match="no_such_column"):
        dta.pp.annotate_tss(adata, gtf, gene_id_key="no_such_column")
    with pytest.raises(ValueError, match="lacks columns"):
        dta.pp.annotate_tss(adata, pd.DataFrame({"chrom": ["chr1"]}, index=["ENSG00000000419"]))
    bad_strand = read_tss(gtf).assign(strand="*")
    with pytest.raises(ValueError, match="strand"):
        dta.pp.annotate_tss(adata, bad_strand)
    pd.testing.assert_frame_equal(adata.var, before_var)
    assert dict(adata.uns) == before_uns


def test_rerun_overwrites(data):
    gtf, expected = data
    adata = make_test_adata(expected)
    dta.pp.annotate_tss(adata, gtf)
    first = adata.var[COLUMNS].copy()
    dta.pp.annotate_tss(adata, gtf)
    pd.testing.assert_frame_equal(adata.var[COLUMNS], first)
    assert np.array_equal(adata.var["tss_pos"].isna().to_numpy(), [False] * 6 + [True])


def test_no_gene_matched_raises_with_hint(data):
    gtf, expected = data
    adata = make_test_adata(expected)
    adata.var_names = [f"g{i}" for i in range(adata.n_vars)]  # neither ids nor symbols; symbols sit in a column
    before_var, before_uns = adata.var.copy(), dict(adata.uns)
    with pytest.raises(ValueError, match="none of the 7 genes matched") as err:
        dta.pp.annotate_tss(adata, gtf)
    msg = str(err.value)
    assert "adata.var_names look like 'g0', 'g1', 'g2'" in msg
    assert "'ENSG00000000003'" in msg and "'TSPAN6'" in msg  # what the GTF holds
    assert "version suffix" in msg and "symbol" in msg
    assert "adata.var['gene_symbols'] would match 6 of 7 genes: pass gene_id_key='gene_symbols'" in msg
    pd.testing.assert_frame_equal(adata.var, before_var)
    assert dict(adata.uns) == before_uns
    # the suggested column really works
    dta.pp.annotate_tss(adata, gtf, gene_id_key="gene_symbols")
    _check(adata, expected, expected["gene_ids"] + [None])


def test_no_gene_matched_versioned_table_and_wrong_key(data):
    gtf, expected = data
    table = read_tss(gtf)
    table.index = [f"{g}.7" for g in table.index]
    table["gene_name"] = [f"X{i}" for i in range(len(table))]
    adata = make_test_adata(expected)
    with pytest.raises(ValueError, match="GTF table's gene ids carry versions"):
        dta.pp.annotate_tss(adata, table)
    # gene_id_key naming a column without ids (var_names hold the Ensembl ids): the hint says to drop the key
    adata.var["junk"] = [f"j{i}" for i in range(adata.n_vars)]
    with pytest.raises(ValueError, match="none of the 7 genes") as err:
        dta.pp.annotate_tss(adata, gtf, gene_id_key="junk")
    assert "adata.var['junk'] look like 'j0'" in str(err.value)
    assert "adata.var_names would match 6 of 7 genes: leave gene_id_key=None" in str(err.value)


def test_few_genes_matched_warns(data, caplog):
    gtf, expected = data
    extra = tuple(f"ENSG0000099999{i}" for i in range(7))
    adata = make_test_adata(expected, extra_genes=extra)  # 6 of 13 match
    with pytest.warns(UserWarning, match=r"only 6 of 13 genes \(46%\) matched") as record:
        dta.pp.annotate_tss(adata, gtf)
    msg = str(record[0].message)
    assert "the other 7 get no TSS" in msg and "gene_id_key" in msg and "version suffix" in msg
    _check(adata, expected, list(expected["gene_ids"]) + [None] * 7)  # still annotated
    assert adata.uns["tss"]["params"]["n_matched"] == 6
    # exactly half matched: only the usual log line, no UserWarning
    half = make_test_adata(expected, extra_genes=extra[:6])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with caplog.at_level(logging.WARNING, logger="sc_dta"):
            dta.pp.annotate_tss(half, gtf)
    assert "6 of 12 genes have no TSS" in caplog.text
