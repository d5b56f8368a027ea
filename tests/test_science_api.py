"""The science-facing API: BioDTA.from_adata defaults and train_adapter's budget, early stopping and diagnostics."""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

torch = pytest.importorskip("torch")

import sc_dta as dta  # noqa: E402
from sc_dta.models import BioDTA  # noqa: E402

D_DNA = 8
N_PROG = 8


def simulate(n_cells=120, seed=0):
    """Two cell types with their own gene programs: the context (which program) predicts masked genes."""
    rng = np.random.default_rng(seed)
    genes = [f"PA{i}" for i in range(N_PROG)] + [f"PB{i}" for i in range(N_PROG)]
    prog = 40 * 0.8 ** np.arange(N_PROG)
    ct = rng.integers(0, 2, n_cells)
    mu = np.zeros((n_cells, len(genes)))
    mu[:, :N_PROG] = np.where(ct[:, None] == 0, prog, 0.05)
    mu[:, N_PROG:] = np.where(ct[:, None] == 1, prog, 0.05)
    a = ad.AnnData(sp.csr_matrix(rng.poisson(mu).astype(np.float32)))
    a.var_names = genes
    a.obs_names = [f"c{i}" for i in range(n_cells)]
    a.varm["dna_emb"] = rng.normal(size=(len(genes), D_DNA)).astype(np.float32)
    a.uns["dna_emb"] = {"params": {"encoder": "kmer", "window": 200}}
    return a


def tiny(a, **kw):
    return BioDTA.from_adata(a, hidden_size=16, n_heads=2, intermediate_size=32, **kw)


def test_from_adata_defaults():
    a = simulate(n_cells=30)
    model = tiny(a, seed=1)
    assert model.position_free and model.mode == "replace"
    assert model.vocab.cls_id is None  # one token per expressed gene, no <cls>/<eos>
    assert not model.pretrained_backbone
    pos = model.backbone.bert.embeddings.position_embeddings.weight
    assert torch.count_nonzero(pos) == 0 and not pos.requires_grad
    # deterministic by seed
    again = tiny(a, seed=1)
    for p, q in zip(model.parameters(), again.parameters(), strict=True):
        torch.testing.assert_close(p, q)
    with pytest.raises(ValueError, match="position_embedding"):
        BioDTA.from_config(model.vocab, d_dna=D_DNA, hidden_size=16, n_heads=2, position_embedding="rotary")
    with pytest.raises(TypeError, match="unknown"):
        BioDTA.from_config(model.vocab, d_dna=D_DNA, hidden_size=16, n_heads=2, not_a_field=1)


def test_context_gain_warns_for_an_untrained_model():
    a = simulate(n_cells=60)
    model = tiny(a, seed=0)
    with pytest.warns(UserWarning, match="context gain"):
        dta.tl.train_adapter(a, model, epochs=1, lr=1e-9, batch_size=16, val_fraction=0.25, seed=0)
    rec = a.uns["train_adapter"]
    assert np.isfinite(rec["context_gain"]) and rec["context_gain"] < 0.02
    assert rec["context_gain"] == pytest.approx(rec["loss_shuffled_context"] - rec["loss_real_context"], abs=1e-6)


def test_early_stopping_restores_best_weights():
    a = simulate(n_cells=120, seed=2)
    model = tiny(a, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        out = dta.tl.train_adapter(
            a, model, epochs=12, lr=3e-2, warmup_ratio=0.0, early_stopping=1, batch_size=16, val_fraction=0.25, seed=0
        )
    rec = a.uns["train_adapter"]
    val = rec["val_loss"]
    best = int(np.argmin(val))
    assert rec["best_epoch"] == rec["val_epoch"][best]
    # stopped early: after the best epoch at most `early_stopping` worse epochs
    assert len(val) - 1 - best <= 1 and len(val) < 12
    # the returned model is the best epoch's: its held-out loss (same batches) is the minimum, not the last
    assert rec["loss_real_context"] == pytest.approx(val.min(), rel=1e-5)
    assert val[-1] > val.min() + 1e-4  # the last epoch was worse, so restoring makes a difference
    assert rec["loss_real_context"] < val[-1] - 1e-5
    assert out is model


def test_adapter_arguments_refused_with_a_biodta():
    a = simulate(n_cells=20)
    model = tiny(a, seed=0)
    before = [p.detach().clone() for p in model.parameters()]
    for kw in ({"adapter_dropout": 0.2}, {"mode": "replace"}, {"adapter_layers": 3}):
        with pytest.raises(ValueError, match=next(iter(kw))):
            dta.tl.train_adapter(a, model, epochs=1, **kw)
    assert "train_adapter" not in a.uns
    for p, q in zip(before, model.parameters(), strict=True):
        torch.testing.assert_close(p, q)


def test_max_length_stored_in_the_model():
    a = simulate(n_cells=30)
    model = tiny(a, seed=0)
    assert model.vocab.max_length > 6
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        out = dta.tl.train_adapter(a, model, epochs=1, max_length=6, batch_size=16, seed=0)
    assert out.vocab.max_length == 6
    assert a.uns["train_adapter"]["params"]["max_length"] == 6
    toks = dta.pp.tokenize(a, vocab=out.vocab)
    assert max(len(s) for s in toks.input_ids) <= 6
