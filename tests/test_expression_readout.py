"""Expression readout of perturb_gene against a brute-force float64 reference, and position-free invariances."""

from __future__ import annotations

import copy
import functools

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

torch = pytest.importorskip("torch")

import sc_dta as dta  # noqa: E402
from sc_dta.models._expression_readout import run_expression_readout  # noqa: E402
from sc_dta.models._perturb_engine import PerturbSpec  # noqa: E402

N_OBS, N_GENES, N_FOLDS, SEED = 8, 14, 3, 4
TF = "G3"


def make_adata():
    rng = np.random.default_rng(0)
    x = rng.poisson(2.0, (N_OBS, N_GENES)).astype(np.float32)
    x[x.sum(1) == 0, 0] = 1  # no empty cell
    x[:2, 3] = 0  # the TF is absent from two cells
    x[2:, 3] = np.maximum(x[2:, 3], 1)
    a = ad.AnnData(X=sp.csr_matrix(x))
    a.var_names = [f"G{j}" for j in range(N_GENES)]
    a.obs_names = [f"c{i}" for i in range(N_OBS)]
    a.obs["n_counts"] = x.sum(1)
    return a


@functools.cache
def build(position_embedding="none"):
    from sc_dta.models import BioDTA
    from sc_dta.models.vocab import GeneformerVocab

    a = make_adata()
    vocab = GeneformerVocab.from_adata(a, special_tokens=False, max_length=N_GENES)
    model = BioDTA.from_config(
        vocab,
        d_dna=4,
        hidden_size=16,
        n_layers=2,
        n_heads=2,
        intermediate_size=32,
        position_embedding=position_embedding,
        seed=0,
        initializer_range=0.5,  # a BertConfig field: large random weights, readouts well above float32 noise
    ).eval()
    rng = np.random.default_rng(1)
    ids = np.arange(len(vocab))
    genes = ids[~np.isin(ids, vocab.special_ids)]
    model.set_dna_embeddings(genes, rng.normal(size=(genes.size, 4)).astype(np.float32))
    tokens = dta.pp.tokenize(a, vocab=vocab)
    return a, vocab, model, tokens


def presence(model64, seq, slots, folds, exclude):
    """Expected presence of every vocabulary token: mask each fold, softmax without ``exclude``, sum."""
    total = torch.zeros(model64.backbone.config.vocab_size, dtype=torch.float64)
    for f in np.unique(folds):
        masked = seq.copy()
        where = slots[folds == f]
        masked[where] = model64.vocab.mask_id
        with torch.no_grad():
            logits = model64(torch.from_numpy(masked)[None]).logits[0, torch.from_numpy(where)]
        logits[:, torch.from_numpy(exclude)] = -torch.inf
        total += torch.softmax(logits, dim=-1).sum(0)
    return total.numpy()


def reference_delete(model, seq, gene, cell_index, n_folds=N_FOLDS, seed=SEED):
    """Log-ratio of expected presence, TF deleted vs original, for every vocabulary token (float64)."""
    model64 = copy.deepcopy(model).double()
    vocab = model.vocab
    exclude = np.zeros(len(vocab), dtype=bool)
    exclude[list(vocab.special_ids)] = True
    exclude[gene] = True
    others = np.flatnonzero(~np.isin(seq, vocab.special_ids) & (seq != gene))
    n = others.size
    folds = np.random.default_rng([seed, cell_index]).permutation(np.arange(n) % min(n_folds, n))
    e0 = presence(model64, seq, others, folds, exclude)
    deleted = seq[seq != gene]
    # the same genes in the same folds, at their new positions
    new_pos = np.array([np.flatnonzero(deleted == seq[p])[0] for p in others])
    e1 = presence(model64, deleted, new_pos, folds, exclude)
    with np.errstate(divide="ignore", invalid="ignore"):  # special tokens and the TF: probability 0
        return np.log(e1) - np.log(e0)


def test_perturb_gene_expression_matches_brute_force():
    a, vocab, model, tokens = build("none")
    out = dta.tl.perturb_gene(a, TF, model=model, tokens=tokens, n_folds=N_FOLDS, seed=SEED, copy=True, batch_size=4)
    key = "dta_shift_delete"
    layer = out.layers[key].toarray()
    stored = np.zeros(layer.shape, dtype=bool)
    coo = out.layers[key].tocoo()
    stored[coo.row, coo.col] = True
    gene = vocab.token_ids[TF]
    tf_col = a.var_names.get_loc(TF)
    n_checked, signs = 0, []
    for i, seq in enumerate(tokens.input_ids):
        seq = np.asarray(seq)
        if gene not in seq:
            assert not stored[i].any() and not out.obs[key + "_evaluated"].iloc[i]
            continue
        ref = reference_delete(model, seq, gene, i)
        for j, name in enumerate(a.var_names):
            if j == tf_col:
                assert not stored[i, j]  # the perturbed gene has no readout
                continue
            t = vocab.token_ids[name]
            assert stored[i, j]
            assert layer[i, j] == pytest.approx(ref[t], abs=2e-5), (i, name)
            signs.append(np.sign(ref[t]))
            n_checked += 1
    assert n_checked >= 60
    assert -1 in signs and 1 in signs  # signed readout
    assert np.abs(layer[stored]).max() > 1e-3


def cell_specs(vocab):
    sp_ = {"special_ids": vocab.special_ids, "mask_id": vocab.mask_id, "pad_id": vocab.pad_id}
    return sp_ | {"cls_id": vocab.cls_id, "eos_id": vocab.eos_id}


def readout(model, cell, gene, n_folds, seed=SEED):
    vocab = model.vocab
    cols = np.flatnonzero(~np.isin(np.arange(len(vocab)), vocab.special_ids))
    (res,) = run_expression_readout(
        model,
        [np.asarray(cell)],
        [PerturbSpec(kind="delete", token_id=gene)],
        columns=cols,
        n_folds=n_folds,
        seed=seed,
        **cell_specs(vocab),
    )
    assert res.cells.tolist() == [0]
    return res.delta[0], cols


def test_position_free_readout_ignores_gene_order():
    a, vocab, model, tokens = build("none")
    assert model.position_free
    gene = vocab.token_ids[TF]
    seq = np.asarray(next(s for s in tokens.input_ids if gene in s and len(s) >= 8))
    perm = np.random.default_rng(3).permutation(seq.size)
    d0, cols = readout(model, seq, gene, n_folds=1)
    d1, _ = readout(model, seq[perm], gene, n_folds=1)
    np.testing.assert_allclose(d1, d0, atol=2e-5)
    assert np.isnan(d0[cols == gene]).all() and np.isfinite(d0[cols != gene]).all()
    # the TF moved elsewhere (other genes in the same order, so the same folds): the same readout
    rest = seq[seq != gene]
    moved = np.concatenate([rest[:2], [gene], rest[2:]])
    assert not np.array_equal(moved, seq)
    d2, _ = readout(model, seq, gene, n_folds=N_FOLDS)
    d3, _ = readout(model, moved, gene, n_folds=N_FOLDS)
    np.testing.assert_allclose(d3, d2, atol=2e-5)
    # and both equal the brute-force reference on the re-ordered cell
    ref = reference_delete(model, moved, gene, 0)
    np.testing.assert_allclose(d3[cols != gene], ref[cols[cols != gene]], atol=2e-5)


def test_absolute_positions_make_order_matter():
    """Control for the test above: with position embeddings, moving the TF changes the readout."""
    a, vocab, model, tokens = build("absolute")
    assert not model.position_free
    gene = vocab.token_ids[TF]
    seq = np.asarray(next(s for s in tokens.input_ids if gene in s and len(s) >= 8))
    rest = seq[seq != gene]
    moved = np.concatenate([rest[:2], [gene], rest[2:]]) if seq[2] != gene else np.concatenate([[gene], rest])
    d0, cols = readout(model, seq, gene, n_folds=N_FOLDS)
    d1, _ = readout(model, moved, gene, n_folds=N_FOLDS)
    ok = cols != gene
    assert np.abs(d1[ok] - d0[ok]).max() > 1e-3
    ref = reference_delete(model, seq, gene, 0)
    np.testing.assert_allclose(d0[ok], ref[cols[ok]], atol=2e-5)


def test_readout_errors():
    a, vocab, model, tokens = build("none")
    gene = vocab.token_ids[TF]
    with pytest.raises(ValueError, match="n_folds"):
        dta.tl.perturb_gene(a, TF, model=model, tokens=tokens, n_folds=0)
    with pytest.raises(ValueError, match="readout"):
        dta.tl.perturb_gene(a, TF, model=model, tokens=tokens, readout="logits")
    with pytest.raises(ValueError, match="same gene"):
        run_expression_readout(
            model,
            tokens.input_ids,
            [PerturbSpec(kind="delete", token_id=gene), PerturbSpec(kind="delete", token_id=gene + 1)],
            columns=np.arange(len(vocab)),
            **cell_specs(vocab),
        )
    assert "dta_shift_delete" not in a.layers


def test_out_of_memory_halves_the_batches_and_gives_the_same_result(monkeypatch):
    import torch

    import sc_dta.models._forward as fwd

    a, vocab, model, tokens = build("none")
    ref = dta.tl.perturb_gene(a, TF, model=model, tokens=tokens, n_folds=N_FOLDS, seed=SEED, copy=True, batch_size=8)
    real, calls = fwd.masked_log_probs, []

    def flaky(model_, ids, *args, **kwargs):
        calls.append(ids.shape[0])
        if ids.shape[0] > 2:  # more than two masked sequences per pass "do not fit"
            raise torch.cuda.OutOfMemoryError("simulated")
        return real(model_, ids, *args, **kwargs)

    monkeypatch.setattr(fwd, "masked_log_probs", flaky)
    out = dta.tl.perturb_gene(a, TF, model=model, tokens=tokens, n_folds=N_FOLDS, seed=SEED, copy=True, batch_size=8)
    assert max(calls) > 2 and min(calls) <= 2  # it failed, then ran with smaller passes
    np.testing.assert_allclose(
        out.layers["dta_shift_delete"].toarray(), ref.layers["dta_shift_delete"].toarray(), atol=2e-5
    )
