"""perturb_gene / perturb_tss on AnnData: storage contract, keys, MuData, errors, BioDTA and TSS mutations."""

from __future__ import annotations

import copy
import functools
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

import sc_dta as dta  # noqa: E402
from sc_dta.models._batches import _batch_len  # noqa: E402

N_OBS, N_GENES = 24, 50
# MuData's own deprecation notice when building a MuData
pytestmark = pytest.mark.filterwarnings("ignore:From 0.4 .update:FutureWarning")


def scale_weights(model, std=0.3, seed=0):
    """Random weights large enough for shifts well above float32 noise."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def counts_adata(seed=0):
    rng = np.random.default_rng(seed)
    lib = rng.choice([0.05, 0.3, 1.0, 3.0], size=N_OBS)  # very different numbers of expressed genes
    x = rng.poisson(lib[:, None] * rng.gamma(1.0, 1.0, N_GENES)[None, :]).astype(np.float32)
    x[:, -1] = 0  # never expressed: not in a vocabulary built from this data
    x[3] = 0  # an empty cell
    x[0, 4] = x[1, 4] = x[5, 4] = 0
    x[2, 4] = x[6, 4] = 50  # gene 4 top-ranked where present
    x[7:, 4] = np.maximum(x[7:, 4], 1)
    a = ad.AnnData(X=sp.csr_matrix(x))
    a.var_names = [f"ENSG{j:011d}" for j in range(N_GENES)]
    a.var["gene_symbols"] = [f"SYM{j}" for j in range(N_GENES)]
    a.obs_names = [f"cell{i}" for i in range(N_OBS)]
    return a


@functools.cache
def _build(version):
    from transformers import BertConfig, BertForMaskedLM

    from sc_dta.models.cell import attach_vocab
    from sc_dta.models.vocab import GeneformerVocab

    a = counts_adata()
    vocab = GeneformerVocab.from_adata(a, special_tokens=version == "V2", max_length=40)
    cfg = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=40,
        hidden_act="relu",
        pad_token_id=0,
    )
    torch.manual_seed(0)
    model = BertForMaskedLM._from_config(cfg, attn_implementation="sdpa").eval()
    scale_weights(model)
    attach_vocab(model, vocab)
    tokens = dta.pp.tokenize(a, vocab=vocab)
    return a, vocab, model, tokens


@pytest.fixture
def setup():
    """V2-style vocabulary (<cls>/<eos>) and model."""
    return _build("V2")


@pytest.fixture(params=["V2", "V1"])
def setup_both(request):
    return _build(request.param)


def snapshot(a):
    return (
        list(a.obs.columns),
        list(a.var.columns),
        list(a.layers.keys()),
        list(a.uns.keys()),
        a.X.copy(),
    )


def assert_unchanged(a, snap):
    now = snapshot(a)
    assert now[:4] == snap[:4]
    assert (now[4] != snap[4]).nnz == 0


GENE = "ENSG00000000004"


def test_batches_bound_padding():
    lengths = np.array([100, 95, 91, 89, 50, 49, 10])
    assert _batch_len(lengths, 16) == 3
    assert _batch_len(lengths[3:], 16) == 1
    assert _batch_len(lengths[4:], 16) == 2
    assert _batch_len(lengths, 2) == 2
    assert _batch_len(lengths[-1:], 4) == 1


def test_storage_contract(setup_both, tmp_path):
    a, vocab, model, tokens = setup_both
    a = a.copy()
    dta.tl.perturb_gene(a, GENE, model=model, readout="cosine")  # tokenizes itself
    key = "dta_shift_delete"
    layer = a.layers[key]
    assert sp.issparse(layer) and layer.format == "csr" and layer.dtype == np.float32
    assert layer.shape == (a.n_obs, a.n_vars)
    tid = vocab.token_ids[GENE]
    gene_col = a.var_names.get_loc(GENE)
    has = np.array([tid in ids for ids in tokens.input_ids])
    assert has.sum() >= 10 and (~has).sum() >= 3
    np.testing.assert_array_equal(a.obs[key + "_evaluated"].to_numpy(), has)
    # stored exactly where the gene is among the cell's tokens, never for the perturbed gene
    expected = np.zeros(layer.shape, dtype=bool)
    for i, ids in enumerate(tokens.input_ids):
        if has[i]:
            for t in ids:
                if t not in vocab.special_ids and t != tid:
                    expected[i, a.var_names.get_loc(vocab.id_to_token[t])] = True
    stored = np.zeros(layer.shape, dtype=bool)
    coo = layer.tocoo()
    stored[coo.row, coo.col] = True
    np.testing.assert_array_equal(stored, expected)
    assert not stored[:, gene_col].any()
    vals = layer.toarray()
    assert (vals[expected] > 1e-4).mean() > 0.9 and (vals[expected] <= 2).all()
    # per-cell and per-gene summaries agree with the layer
    cell = a.obs[key + "_cell"].to_numpy()
    for i in np.flatnonzero(has):
        if expected[i].any():
            assert cell[i] == pytest.approx(vals[i, expected[i]].mean(), rel=1e-5)
    assert np.isnan(cell[~has]).all() and np.isnan(a.obs[key + "_cell_emb"].to_numpy()[~has]).all()
    assert (a.obs[key + "_cell_emb"].to_numpy()[has] >= 0).all()
    n = expected.sum(0)
    np.testing.assert_array_equal(a.var[key + "_n"].to_numpy(), n)
    with np.errstate(invalid="ignore"):
        mean = np.where(n > 0, vals.sum(0) / np.maximum(n, 1), np.nan)
    np.testing.assert_allclose(a.var[key + "_mean"].to_numpy(), mean, rtol=1e-5)
    params = a.uns[key]["params"]
    assert params["gene"] == GENE and params["token_id"] == tid and params["kind"] == "delete"
    assert params["emb_layer"] == -1 and params["n_evaluated"] == has.sum()
    assert params["cell_emb"] == ("cls" if vocab.cls_id is not None else "mean")
    # h5ad round trip
    a.write_h5ad(tmp_path / "p.h5ad")
    b = ad.read_h5ad(tmp_path / "p.h5ad")
    assert (b.layers[key] != layer).nnz == 0 and b.layers[key].dtype == np.float32
    pd.testing.assert_frame_equal(b.obs, a.obs)
    pd.testing.assert_frame_equal(b.var, a.var)
    assert b.uns[key]["params"]["model"]["n_layers"] == 3
    # rank_targets on the result round-trips too
    dta.tl.rank_targets(b, key, known_targets=["SYM1", "SYM2"], n_top=5)
    b.write_h5ad(tmp_path / "q.h5ad")
    assert "ranking" in ad.read_h5ad(tmp_path / "q.h5ad").uns[key]


def test_kinds_share_forward_and_keys(setup):
    a, vocab, model, tokens = setup
    both = a.copy()
    dta.tl.perturb_gene(both, "sym4", model=model, kind=["delete", "overexpress"], key_added="x", tokens=tokens)
    for kind in ("delete", "overexpress"):
        single = dta.tl.perturb_gene(a, GENE, model=model, kind=kind, tokens=tokens, copy=True)
        np.testing.assert_allclose(
            both.layers[f"x_{kind}"].toarray(), single.layers[f"dta_shift_{kind}"].toarray(), atol=1e-6
        )
        assert both.uns[f"x_{kind}"]["params"]["kind"] == kind
    assert "dta_shift_delete" not in a.layers  # copy=True left `a` alone
    # overexpressing a gene already ranked first changes nothing in the cells where it is first
    first = np.array(
        [len(ids) > 0 and vocab.token_ids[GENE] == ids[1 if vocab.cls_id else 0] for ids in tokens.input_ids]
    )
    assert first.any()
    np.testing.assert_allclose(both.obs["x_overexpress_cell"].to_numpy()[first], 0.0, atol=1e-6)


def test_cells_subset_mudata_and_batches(setup):
    import mudata as md

    a, vocab, model, tokens = setup
    m = md.MuData({"rna": a.copy()})
    subset = ["cell2", "cell6", "cell9", "cell1"]
    dta.tl.perturb_gene(m, GENE, model=model, readout="cosine", cells=subset, key_added="sub", batch_size=2)
    rna = m["rna"]
    ev = rna.obs["sub_evaluated"]
    assert set(ev.index[ev]) == {"cell2", "cell6", "cell9"}  # cell1 lacks the gene
    full = dta.tl.perturb_gene(a, GENE, model=model, readout="cosine", tokens=tokens, copy=True, batch_size=16)
    rows = [a.obs_names.get_loc(c) for c in ("cell2", "cell6", "cell9")]
    np.testing.assert_allclose(
        rna.layers["sub"][rows].toarray(), full.layers["dta_shift_delete"][rows].toarray(), atol=2e-6
    )
    # boolean mask works as well
    mask = np.zeros(a.n_obs, dtype=bool)
    mask[[2, 6]] = True
    out = dta.tl.perturb_gene(a, GENE, model=model, tokens=tokens, cells=mask, copy=True)
    assert out.obs["dta_shift_delete_evaluated"].sum() == 2


def test_errors_leave_adata_unchanged(setup):
    a, vocab, model, tokens = setup
    from sc_dta.models.vocab import GeneformerVocab

    a = a.copy()
    longer = GeneformerVocab(vocab.version, vocab.token_ids, vocab.medians, vocab.mapping, max_length=60)
    long_tokens = dta.pp.tokenize(a, vocab=longer)
    assert long_tokens.lengths.max() > 40
    snap = snapshot(a)
    cases = [
        (KeyError, "NOT_A_GENE", {}),
        (ValueError, a.var_names[-1], {}),  # never expressed: not in the vocabulary
        (ValueError, GENE, {"cells": ["cell0", "cell1", "cell5"]}),  # gene in none of the cells
        (ValueError, GENE, {"kind": "knockout"}),
        (ValueError, GENE, {"kind": ["delete", "delete"]}),
        (ValueError, GENE, {"emb_layer": 1}),
        (KeyError, GENE, {"cells": ["cell0", "nope"]}),
        (ValueError, GENE, {"cells": np.ones(3, dtype=bool)}),
        (ValueError, GENE, {"tokens": dta.pp.tokenize(a[:, :10], vocab=vocab)}),
        (ValueError, GENE, {"tokens": _build("V1")[3]}),  # another vocabulary than the model's
        (ValueError, GENE, {"tokens": long_tokens}),  # longer than the model's positions
    ]
    for exc, gene, kw in cases:
        with pytest.raises(exc) as info:
            dta.tl.perturb_gene(a, gene, model=model, **kw)
        assert_unchanged(a, snap)
        msg = str(info.value)
        assert any(s in msg for s in ("gene", "kind", "emb_layer", "cells", "tokens")), msg
    with pytest.raises(TypeError, match="BioDTA"):
        dta.tl.perturb_tss(a, GENE, "chr1:10:A>C", model=model, genome=None, encoder=None)
    assert_unchanged(a, snap)


def test_key_collision_refuses_foreign_slots_and_overwrites_own_results(setup):
    a, vocab, model, tokens = setup
    a = a.copy()
    a.obs["k_cell"] = 1.0
    a.layers["counts"] = a.X.copy()
    snap = a.copy()
    # slots that are not a previous perturb_gene result are never overwritten
    for key in ("k", "counts"):
        with pytest.raises(ValueError, match=f"key_added='{key}'.*not a previous perturb_gene result"):
            dta.tl.perturb_gene(a, GENE, model=model, tokens=tokens, key_added=key)
    assert (a.layers["counts"] != snap.layers["counts"]).nnz == 0 and "k" not in a.uns
    # a previous result is overwritten, with a warning issued only once the new result exists
    dta.tl.perturb_gene(a, GENE, model=model, tokens=tokens, key_added="fresh")
    first = a.layers["fresh"].copy()
    with pytest.warns(UserWarning, match="overwriting the previous result"):
        dta.tl.perturb_gene(a, GENE, model=model, tokens=tokens, key_added="fresh")
    assert abs(a.layers["fresh"] - first).max() < 1e-6
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a failing call does not warn
        with pytest.raises(KeyError):
            dta.tl.perturb_gene(a, "NOT_A_GENE", model=model, tokens=tokens, key_added="fresh")


def test_layer_argument_reads_raw_counts_from_a_layer(setup):
    a, vocab, model, tokens = setup
    raw = a.copy()
    a = a.copy()
    a.layers["counts"] = a.X.copy()
    a.X = np.log1p(a.X)  # what sc.pp.log1p leaves in X
    with pytest.raises(ValueError, match="raw"):
        dta.tl.perturb_gene(a, GENE, model=model, copy=True)
    res = dta.tl.perturb_gene(a, GENE, model=model, layer="counts", copy=True)
    ref = dta.tl.perturb_gene(raw, GENE, model=model, copy=True)
    np.testing.assert_allclose(res.var["dta_shift_delete_mean"], ref.var["dta_shift_delete_mean"], equal_nan=True)
    assert res.uns["dta_shift_delete"]["params"]["layer"] == "counts"


# ----------------------------------------------------------------------------- BioDTA + TSS mutations


@pytest.fixture(scope="module")
def tss_setup(tmp_path_factory):
    from _genome_data import make_test_adata, write_test_genome

    from sc_dta.genome import Genome
    from sc_dta.models import BioDTA, KmerEncoder
    from sc_dta.models.vocab import GeneformerVocab

    d = tmp_path_factory.mktemp("genome")
    fasta, gtf, expected = write_test_genome(d)
    a = make_test_adata(expected, n_obs=16, seed=3)
    x = a.X.toarray()
    x[:4, 0] = 0  # DPM1 (var 0) absent from 4 cells
    x[4:, 0] = 30
    a.X = sp.csr_matrix(x)
    a.obs["n_counts"] = x.sum(1)
    dta.pp.annotate_tss(a, gtf)
    vocab = GeneformerVocab.from_adata(a, special_tokens=True, max_length=16)
    encoder = KmerEncoder(k=3, window=200)
    genome = Genome(fasta)
    model = BioDTA.from_config(
        vocab,
        d_dna=encoder.dim,
        hidden_size=32,
        n_layers=3,
        n_heads=4,
        intermediate_size=64,
        seed=0,
        dna_encoder_info={"name": encoder.name, "window": encoder.window},
    ).eval()
    scale_weights(model.backbone, std=0.3)
    tids = vocab.lookup(a.var_names)
    with_tss = (tids >= 0) & a.var["tss_chrom"].notna().to_numpy()
    seqs = [
        genome.window(str(c), int(p), encoder.window, str(s))
        for c, p, s in a.var.loc[with_tss, ["tss_chrom", "tss_pos", "tss_strand"]].itertuples(index=False)
    ]
    model.set_dna_embeddings(tids[with_tss], encoder.embed(seqs))
    return a, vocab, model, encoder, genome, expected


def reference_tss(model, tokens, gene_tid, dna, n_layers):
    """Float64, one cell at a time, the model's own forward with hidden states."""
    m = copy.deepcopy(model).double()
    override = {gene_tid: torch.as_tensor(dna, dtype=torch.float64)}
    out = []
    with torch.no_grad():
        for ids in tokens.input_ids:
            if gene_tid not in ids:
                out.append(None)
                continue
            x = torch.from_numpy(ids)[None]
            h0 = m(x, output_hidden_states=True).hidden_states[n_layers - 1][0]
            h1 = m(x, dna_overrides=override, output_hidden_states=True).hidden_states[n_layers - 1][0]
            cos = torch.nn.functional.cosine_similarity(h0, h1, dim=-1)
            keep = ~np.isin(ids, model.vocab.special_ids) & (ids != gene_tid)
            out.append(dict(zip(ids[keep].tolist(), (1 - cos[torch.from_numpy(keep)]).tolist(), strict=True)))
    return out


def test_perturb_tss_matches_reference(tss_setup, tmp_path):
    from sc_dta.genome import Variant

    a, vocab, model, encoder, genome, expected = tss_setup
    a = a.copy()
    gene = "ENSG00000000419"  # DPM1, chr1 + strand, TSS 1500 (0-based)
    seq = expected["sequences"]["chr1"]
    ref_base = seq[1505]
    alt = "A" if ref_base != "A" else "C"
    snv = f"chr1:1506:{ref_base}>{alt}"
    region = "delete:-20:+20"
    dta.tl.perturb_tss(
        a,
        "DPM1",
        [snv, Variant("chr1", 1511, seq[1510], "G" if seq[1510] != "G" else "T"), region],
        model=model,
        genome=genome,
        encoder=encoder,
        readout="cosine",
        batch_size=3,
    )
    assert {"dta_shift_0", "dta_shift_1", "dta_shift_2"} <= set(a.layers)
    p0 = a.uns["dta_shift_0"]["params"]
    assert p0["mutation"] == snv and p0["kind"] == "tss_mutation" and p0["gene_id"] == gene
    assert a.uns["dta_shift_2"]["params"]["mutation"] == region
    # independent mutated window and float64 reference for the SNV
    window = list(genome.window("chr1", 1500, encoder.window, "+"))
    assert window[encoder.window // 2] == seq[1500]
    window[encoder.window // 2 + 5] = alt
    dna = encoder.embed(["".join(window)])[0]
    tokens = dta.pp.tokenize(a, vocab=vocab)
    ref = reference_tss(model, tokens, vocab.token_ids[gene], dna, 3)
    layer = a.layers["dta_shift_0"].toarray()
    n_checked = 0
    for i, r in enumerate(ref):
        assert bool(a.obs["dta_shift_0_evaluated"].iloc[i]) == (r is not None)
        if r is None:
            assert not layer[i].any()
            continue
        for t, s in r.items():
            j = a.var_names.get_loc(vocab.id_to_token[t])
            assert abs(layer[i, j] - s) < 1e-5
            n_checked += 1
        assert a.obs["dta_shift_0_cell"].iloc[i] == pytest.approx(np.mean(list(r.values())), abs=1e-5)
    assert n_checked > 20 and np.median(layer[layer > 0]) > 1e-4
    # a single mutation writes key_added itself; MuData works
    import mudata as md

    m = md.MuData({"rna": a.copy()})
    dta.tl.perturb_tss(m, gene, snv, model=model, genome=genome, encoder=encoder, readout="cosine", key_added="one")
    np.testing.assert_allclose(m["rna"].layers["one"].toarray(), layer, atol=1e-6)
    m["rna"].write_h5ad(tmp_path / "t.h5ad")
    assert ad.read_h5ad(tmp_path / "t.h5ad").uns["one"]["params"]["mutation"] == snv


def test_perturb_gene_on_biodta(tss_setup):
    a, vocab, model, encoder, genome, expected = tss_setup
    out = dta.tl.perturb_gene(a, "ENSG00000000419", model=model, copy=True)
    assert out.obs["dta_shift_delete_evaluated"].sum() == 12
    assert out.uns["dta_shift_delete"]["params"]["model"]["class"] == "BioDTA"


def test_perturb_tss_errors(tss_setup):
    a, vocab, model, encoder, genome, expected = tss_setup
    a = a.copy()
    snap = snapshot(a)
    seq = expected["sequences"]["chr1"]
    wrong = "A" if seq[1505] != "A" else "C"
    kw = {"model": model, "genome": genome, "encoder": encoder}
    cases = [
        (KeyError, "NOPE", "chr1:1506:A>C", "gene"),
        (ValueError, "DPM1", f"chr1:1506:{wrong}>G", "1506"),  # reference allele mismatch
        (ValueError, "DPM1", "chr1:5000:A>C" if seq[4999] == "A" else f"chr1:5000:{seq[4999]}>A", "window"),
        (ValueError, "DPM1", "not a mutation", "mutation"),
    ]
    for exc, gene, mut, match in cases:
        with pytest.raises(exc, match=match):
            dta.tl.perturb_tss(a, gene, mut, **kw)
        assert_unchanged(a, snap)
    # a gene without TSS annotation (extra gene not in the GTF)
    no_tss = a.var_names[a.var["tss_chrom"].isna().to_numpy()]
    assert len(no_tss)
    with pytest.raises((ValueError, KeyError), match="TSS|vocabulary"):
        dta.tl.perturb_tss(a, no_tss[0], "chr1:1506:A>C", **kw)
    assert_unchanged(a, snap)


def test_model_mode_restored_after_success_and_failure(tss_setup):
    from sc_dta.models._perturb_engine import PerturbSpec, run_perturbations

    a, vocab, model, encoder, genome, expected = tss_setup
    tokens = dta.pp.tokenize(a, vocab=vocab)
    tid = vocab.token_id("ENSG00000000419")
    model.train()
    try:
        dta.tl.perturb_gene(a, "ENSG00000000419", model=model, copy=True)
        assert model.training
        bad = PerturbSpec(kind="embedding", token_id=tid, dna_override=np.zeros(3, dtype=np.float32))  # wrong d_dna
        with pytest.raises((ValueError, RuntimeError)):
            run_perturbations(model, tokens.input_ids, [bad], special_ids=vocab.special_ids, cls_id=vocab.cls_id)
        assert model.training
    finally:
        model.eval()


def test_expression_readout_storage(setup):
    """Default readout: signed log-ratios for every var gene in the vocabulary, in each evaluated cell."""
    a, vocab, model, tokens = setup
    out = dta.tl.perturb_gene(a, GENE, model=model, tokens=tokens, copy=True, n_folds=3)
    key = "dta_shift_delete"
    params = out.uns[key]["params"]
    assert params["readout"] == "expression" and params["n_folds"] == 3
    has = np.array([vocab.token_ids[GENE] in ids for ids in tokens.input_ids])
    np.testing.assert_array_equal(out.obs[key + "_evaluated"].to_numpy(), has)
    in_vocab = np.array([g in vocab.token_ids for g in a.var_names])
    in_vocab[a.var_names.get_loc(GENE)] = False
    vals = out.layers[key].toarray()
    stored = np.zeros(vals.shape, dtype=bool)
    coo = out.layers[key].tocoo()
    stored[coo.row, coo.col] = True
    np.testing.assert_array_equal(stored, has[:, None] & in_vocab[None, :])
    assert (vals[stored] < 0).any() and (vals[stored] > 0).any()  # signed
    n = stored.sum(0)
    np.testing.assert_array_equal(out.var[key + "_n"].to_numpy(), n)
    with np.errstate(invalid="ignore"):
        mean = np.where(n > 0, vals.sum(0) / np.maximum(n, 1), np.nan)
    np.testing.assert_allclose(out.var[key + "_mean"].to_numpy(), mean, rtol=1e-5)
    cell = out.obs[key + "_cell"].to_numpy()
    for i in np.flatnonzero(has):
        assert cell[i] == pytest.approx(np.abs(vals[i, stored[i]]).mean(), rel=1e-5)
    assert np.isnan(cell[~has]).all()
    # batching does not change the result
    again = dta.tl.perturb_gene(a, GENE, model=model, tokens=tokens, copy=True, n_folds=3, batch_size=2)
    np.testing.assert_allclose(again.layers[key].toarray(), vals, atol=2e-5)


def test_expression_readout_independent_of_cell_subset(setup):
    a, vocab, model, tokens = setup
    subset = ["cell2", "cell6", "cell9"]
    sub = dta.tl.perturb_gene(a, GENE, model=model, tokens=tokens, cells=subset, copy=True)
    full = dta.tl.perturb_gene(a, GENE, model=model, tokens=tokens, copy=True)
    rows = [a.obs_names.get_loc(c) for c in subset]
    np.testing.assert_allclose(
        sub.layers["dta_shift_delete"][rows].toarray(), full.layers["dta_shift_delete"][rows].toarray(), atol=2e-5
    )


def test_warns_when_every_shift_is_numerical_noise(setup):
    a, vocab, model, tokens = setup
    import copy as _copy

    import torch

    deaf = _copy.deepcopy(model)
    bert = getattr(deaf, "backbone", deaf).bert
    with torch.no_grad():  # no attention, no positions: a masked slot's prediction ignores the rest of the cell
        bert.embeddings.position_embeddings.weight.zero_()
        for layer in bert.encoder.layer:
            layer.attention.self.query.weight.zero_()
            layer.attention.self.key.weight.zero_()
            layer.attention.self.value.weight.zero_()
            layer.attention.self.value.bias.zero_()
    with pytest.warns(UserWarning, match="numerical-noise level"):
        dta.tl.perturb_gene(a, GENE, model=deaf, tokens=tokens, copy=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dta.tl.perturb_gene(a, GENE, model=model, tokens=tokens, copy=True)


def test_perturb_tss_takes_paths_and_names_and_refuses_another_encoder(tss_setup, tmp_path):
    from sc_dta.models import KmerEncoder

    a, vocab, model, encoder, genome, expected = tss_setup
    ref = dta.tl.perturb_tss(a, "DPM1", "delete:-20:+20", model=model, genome=genome, encoder=encoder, copy=True)
    # a FASTA path and a saved model folder work like the objects
    model.save_pretrained(tmp_path / "model")
    res = dta.tl.perturb_tss(
        a,
        "DPM1",
        "delete:-20:+20",
        model=tmp_path / "model",
        genome=[str(x) for x in genome.paths],
        encoder=encoder,
        copy=True,
    )
    np.testing.assert_allclose(res.var["dta_shift_mean"], ref.var["dta_shift_mean"], atol=1e-5, equal_nan=True)
    # another window or k than the adapter was trained on is an error naming the encoder, before anything is written
    snap = snapshot(a)
    for other, what in ((KmerEncoder(k=3, window=300), "window"), (KmerEncoder(k=4, window=200), "embeds")):
        with pytest.raises(ValueError, match=what):
            dta.tl.perturb_tss(a, "DPM1", "delete:-20:+20", model=model, genome=genome, encoder=other)
    assert_unchanged(a, snap)
