from __future__ import annotations

import anndata as ad
import h5py
import numpy as np
import pytest
import scipy.sparse as sp
import torch

import sc_dta as dta
from sc_dta.models import BioDTA, GeneformerVocab

D_DNA = 16
N_PROG, N_HK = 12, 10


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def simulate(n_cells: int = 200, seed: int = 0) -> ad.AnnData:
    """Two cell types, each expressing its own gene program at graded levels, plus housekeeping genes."""
    rng = np.random.default_rng(seed)
    genes = [f"PA{i}" for i in range(N_PROG)] + [f"PB{i}" for i in range(N_PROG)] + [f"HK{i}" for i in range(N_HK)]
    prog = 200 * 0.75 ** np.arange(N_PROG)
    cell_type = rng.integers(0, 2, n_cells)
    mu = np.zeros((n_cells, len(genes)))
    mu[:, :N_PROG] = np.where(cell_type[:, None] == 0, prog, 0.2)
    mu[:, N_PROG : 2 * N_PROG] = np.where(cell_type[:, None] == 1, prog, 0.2)
    mu[:, 2 * N_PROG :] = 30 * 0.7 ** np.arange(N_HK)
    adata = ad.AnnData(sp.csr_matrix(rng.poisson(mu).astype(np.float32)))
    adata.var_names = genes
    adata.obs_names = [f"cell{i}" for i in range(n_cells)]
    dna = rng.normal(size=(len(genes), D_DNA)).astype(np.float32)
    dna[[5, 20, 30]] = np.nan  # genes without a TSS window keep their static token
    adata.varm["dna_emb"] = dna
    adata.uns["dna_emb"] = {"params": {"encoder": "kmer", "window": 1000, "pooling": "mean"}}
    return adata


def sim_vocab(genes, max_length: int = 64) -> GeneformerVocab:
    """V2-style vocabulary with unit medians, so ranks follow the simulated expression levels."""
    tokens = {t: i for i, t in enumerate(["<pad>", "<mask>", "<cls>", "<eos>", *genes])}
    return GeneformerVocab("sim", tokens, dict.fromkeys(genes, 1.0), max_length=max_length)


def small_model(vocab, seed=0, **kwargs) -> BioDTA:
    return BioDTA.from_config(
        vocab, d_dna=D_DNA, hidden_size=32, n_layers=2, n_heads=2, intermediate_size=64, seed=seed, **kwargs
    )


def unigram_entropy(adata, vocab) -> float:
    """Cross-entropy of the best context-free predictor of a masked gene: its frequency among gene tokens."""
    toks = dta.pp.tokenize(adata, vocab=vocab)
    ids = np.concatenate(toks.input_ids)
    ids = ids[~np.isin(ids, vocab.special_ids)]
    p = np.bincount(ids) / ids.size
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def snapshot(adata):
    return {
        "X": adata.X.toarray().copy(),
        "uns": sorted(adata.uns.keys()),
        "varm": {k: np.array(v, copy=True) for k, v in adata.varm.items()},
        "obs": adata.obs.copy(),
        "var": adata.var.copy(),
    }


def assert_unchanged(adata, snap):
    np.testing.assert_array_equal(adata.X.toarray(), snap["X"])
    assert sorted(adata.uns.keys()) == snap["uns"]
    assert sorted(adata.varm.keys()) == sorted(snap["varm"])
    for k, v in snap["varm"].items():
        np.testing.assert_array_equal(np.asarray(adata.varm[k]), v)
    assert adata.obs.equals(snap["obs"]) and adata.var.equals(snap["var"])


def test_frozen_backbone_only_adapter_gets_gradients():
    adata = simulate(40)
    vocab = sim_vocab(adata.var_names)
    model = small_model(vocab)
    model.freeze_backbone()
    tok = dta.pp.tokenize(adata, vocab=vocab)
    model.set_dna_embeddings(tok.var_token_ids[[0, 1, 2]], adata.varm["dna_emb"][[0, 1, 2]])
    ids = torch.from_numpy(np.stack([s[:12] for s in tok.input_ids[:4]]))
    labels = torch.full_like(ids, -100)
    labels[:, 3] = ids[:, 3]
    model.masked_lm_loss(ids, labels).backward()
    for name, p in model.named_parameters():
        if name.startswith(("adapter.", "token_embedding.adapter.")):
            assert p.grad is not None, name
        else:
            assert p.grad is None, name
    assert any(float(p.grad.abs().sum()) > 0 for p in model.adapter.parameters())


def test_training_lowers_masked_gene_loss(tmp_path):
    torch.manual_seed(0)  # model initialisation uses the global RNG: independent of test order
    adata = simulate(200)
    vocab = sim_vocab(adata.var_names)
    baseline = unigram_entropy(adata, vocab)
    # 1) a small model from scratch: backbone and adapter together
    model = small_model(vocab)
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    model = dta.tl.train_adapter(
        adata, model, epochs=13, batch_size=8, lr=1e-2, val_fraction=0.1, seed=0, early_stopping=None
    )
    rec = adata.uns["train_adapter"]
    assert rec["loss"].size == 13 * 23  # 180 training cells, batches of 8
    assert rec["val_loss"].size == 13
    start = rec["loss"][:10].mean()
    assert start > 0.9 * np.log(len(vocab))  # an untrained model is close to uniform over the vocabulary
    assert rec["loss"][-30:].mean() < 0.6 * start
    assert rec["val_loss"][-1] < 0.75 * baseline  # uses the cell context: beats the best context-free guess
    assert not torch.equal(
        before["bert.encoder.layer.0.output.dense.weight"],
        model.backbone.state_dict()["bert.encoder.layer.0.output.dense.weight"],
    )
    assert model.loss_history and model.loss_history[-1]["val_loss"] == rec["val_loss"][-1]
    assert model.dna_encoder_info["name"] == "kmer" and model.dna_encoder_info["window"] == 1000
    assert not model.training
    # h5ad-serialisable record
    adata.write_h5ad(tmp_path / "a.h5ad")
    with h5py.File(tmp_path / "a.h5ad") as f:
        assert "train_adapter" in f["uns"]
    back = ad.read_h5ad(tmp_path / "a.h5ad")
    np.testing.assert_allclose(back.uns["train_adapter"]["loss"], rec["loss"])

    # 2) a new adapter on the trained backbone: frozen backbone, the adapter alone learns the token embeddings.
    # Its starting validation loss: one epoch at a negligible learning rate (same validation masks, seed=1)
    dta.tl.train_adapter(
        adata,
        BioDTA(model.backbone, vocab, d_dna=D_DNA),
        epochs=1,
        lr=1e-12,
        batch_size=8,
        val_fraction=0.1,
        seed=1,
        freeze_backbone=True,
    )
    start_val = adata.uns["train_adapter"]["val_loss"][0]
    fresh = BioDTA(model.backbone, vocab, d_dna=D_DNA)
    backbone_before = {k: v.clone() for k, v in fresh.backbone.state_dict().items()}
    fresh = dta.tl.train_adapter(
        adata, fresh, epochs=8, batch_size=8, lr=1e-2, val_fraction=0.1, seed=1, freeze_backbone=True
    )
    rec2 = adata.uns["train_adapter"]
    for k, v in fresh.backbone.state_dict().items():
        assert torch.equal(v, backbone_before[k]), k
    assert rec2["val_loss"][-1] < 0.85 * start_val
    assert rec2["val_loss"][-1] < 0.75 * baseline


def test_interrupted_and_resumed_equals_uninterrupted(tmp_path):
    adata = simulate(60, seed=3)
    vocab = sim_vocab(adata.var_names)
    kwargs = {
        "epochs": 2, "batch_size": 4, "lr": 5e-3, "freeze_backbone": False, "val_fraction": 0.1, "seed": 7,
        "accumulation_steps": 2,
    }  # fmt: skip
    full = dta.tl.train_adapter(adata, small_model(vocab, adapter_dropout=0.2), output_dir=tmp_path / "full", **kwargs)
    n_steps = adata.uns["train_adapter"]["loss"].size
    assert n_steps == 2 * 7  # 54 training cells -> 14 batches -> 7 optimiser steps per epoch

    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        dta.tl.train_adapter(
            adata, small_model(vocab, adapter_dropout=0.2), output_dir=out, _stop_after_steps=9, **kwargs
        )
    assert (out / "checkpoint" / "trainer_state.pt").exists()
    assert "train_adapter" not in adata.uns or adata.uns["train_adapter"]["loss"].size == n_steps
    # the checkpoint is a loadable model
    part = BioDTA.from_pretrained(out / "checkpoint" / "model")
    assert len([h for h in part.loss_history if "loss" in h]) == 9
    resumed = dta.tl.train_adapter(
        adata, small_model(vocab, seed=99, adapter_dropout=0.2), output_dir=out, resume=True, **kwargs
    )
    full_state, res_state = full.state_dict(), resumed.state_dict()
    assert full_state.keys() == res_state.keys()
    for k in full_state:
        assert torch.equal(full_state[k], res_state[k]), k
    assert [h.get("loss") for h in resumed.loss_history] == [h.get("loss") for h in full.loss_history]
    # Ctrl-C in the middle of an accumulation group (during a forward pass): resumes from the group's start
    out2 = tmp_path / "run2"
    model = small_model(vocab, adapter_dropout=0.2)
    calls = []

    def interrupt(module, inputs, output):
        calls.append(1)
        if len(calls) == 5:  # first micro-batch of the third optimiser step
            raise KeyboardInterrupt

    model.adapter.register_forward_hook(interrupt)
    with pytest.raises(KeyboardInterrupt):
        dta.tl.train_adapter(adata, model, output_dir=out2, **kwargs)
    assert len([h for h in BioDTA.from_pretrained(out2 / "checkpoint" / "model").loss_history if "loss" in h]) == 2
    resumed2 = dta.tl.train_adapter(
        adata, small_model(vocab, adapter_dropout=0.2), output_dir=out2, resume=True, **kwargs
    )
    for k, v in resumed2.state_dict().items():
        assert torch.equal(full_state[k], v), k
    # changed settings are refused
    with pytest.raises(ValueError, match="other settings"):
        dta.tl.train_adapter(
            adata, small_model(vocab, adapter_dropout=0.2), output_dir=out, resume=True, **{**kwargs, "lr": 1e-3}
        )
    # and the final model was saved
    again = BioDTA.from_pretrained(out / "model")
    for k, v in again.state_dict().items():
        assert torch.equal(v, res_state[k]), k


def test_wraps_plain_backbone(tmp_path):
    from transformers import BertConfig, BertForMaskedLM

    adata = simulate(30)
    vocab = sim_vocab(adata.var_names)
    config = BertConfig(
        vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=64, hidden_act="relu", pad_token_id=0,
    )  # fmt: skip
    bert = BertForMaskedLM(config)
    bert.save_pretrained(tmp_path / "gf")
    backbone = dta.models.load_geneformer(tmp_path / "gf", vocab=vocab)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    model = dta.tl.train_adapter(adata, backbone, epochs=1, batch_size=8, adapter_layers=1, mode="add")
    assert isinstance(model, BioDTA) and model.backbone is backbone
    assert model.adapter.n_layers == 1 and model.mode == "add" and model.d_dna == D_DNA
    assert all(torch.equal(v, before[k]) for k, v in backbone.state_dict().items())
    assert all(p.requires_grad for p in backbone.parameters())  # frozen for training only
    tok = dta.pp.tokenize(adata, vocab=vocab)
    has = model.has_dna.numpy()
    expected = np.zeros(len(vocab), dtype=bool)
    expected[tok.var_token_ids[~np.isnan(adata.varm["dna_emb"]).any(1)]] = True
    np.testing.assert_array_equal(has, expected)
    # the DNA table holds the rows of varm["dna_emb"]
    row = np.flatnonzero(adata.var_names == "PA3")[0]
    np.testing.assert_array_equal(
        model.token_embedding.dna_table[tok.var_token_ids[row]].numpy(), adata.varm["dna_emb"][row]
    )


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        ("missing", KeyError, "dna_key='dna_emb' is not in adata.varm"),
        ("wrong_dim", ValueError, "d_dna=16"),
        ("all_nan", ValueError, "NaN for every gene"),
        ("inf", ValueError, "infinite"),
        ("no_vocab_gene", ValueError, "vocabulary"),
        ("not_raw", ValueError, "raw counts"),
        ("no_cells", ValueError, "No cell"),
    ],
)
def test_bad_inputs_leave_adata_unchanged(change, error, match):
    adata = simulate(20)
    vocab = sim_vocab(adata.var_names)
    model = small_model(vocab)
    if change == "missing":
        del adata.varm["dna_emb"]
    elif change == "wrong_dim":
        adata.varm["dna_emb"] = np.zeros((adata.n_vars, 3), dtype=np.float32)
    elif change == "all_nan":
        adata.varm["dna_emb"] = np.full((adata.n_vars, D_DNA), np.nan, dtype=np.float32)
    elif change == "inf":
        adata.varm["dna_emb"][2, 0] = np.inf
    elif change == "no_vocab_gene":
        adata.var_names = [f"X{i}" for i in range(adata.n_vars)]
    elif change == "not_raw":
        adata.X = adata.X * 0.5
    elif change == "no_cells":
        adata.X = sp.csr_matrix(adata.shape, dtype=np.float32)
    snap = snapshot(adata)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error, match=match):
        dta.tl.train_adapter(adata, model, epochs=1, batch_size=4)
    assert_unchanged(adata, snap)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_bad_arguments():
    adata = simulate(10)
    model = small_model(sim_vocab(adata.var_names))
    for kwargs, match in [
        ({"epochs": 0}, "epochs"),
        ({"batch_size": 0}, "batch_size"),
        ({"mask_prob": 1.0}, "mask_prob"),
        ({"val_fraction": 1.0}, "val_fraction"),
        ({"lr": 0}, "lr"),
        ({"resume": True}, "output_dir"),
        ({"accumulation_steps": 0}, "accumulation_steps"),
    ]:
        with pytest.raises(ValueError, match=match):
            dta.tl.train_adapter(adata, model, **kwargs)
    with pytest.raises(TypeError, match="BioDTA or a Geneformer"):
        dta.tl.train_adapter(adata, torch.nn.Linear(2, 2))


def test_masking_follows_bert_recipe():
    from sc_dta.tl._trainer import Masker as _Masker

    vocab = sim_vocab([f"G{i}" for i in range(500)], max_length=512)
    special = np.asarray(vocab.special_ids)
    genes = torch.arange(4, len(vocab))
    masker = _Masker(special, vocab.pad_id, vocab.mask_id, genes, 0.15)
    rng = np.random.default_rng(0)
    batch = np.zeros((64, 402), dtype=np.int64)
    for i in range(64):
        n = rng.integers(50, 400)
        batch[i, 0], batch[i, 1 : n + 1], batch[i, n + 1] = (
            vocab.cls_id,
            rng.choice(genes.numpy(), n, replace=False),
            vocab.eos_id,
        )
    inputs, labels, attn = masker(batch, torch.Generator().manual_seed(0))
    ids = torch.from_numpy(batch)
    chosen = labels != -100
    assert torch.equal(attn, (ids != 0).long())
    assert not chosen[torch.isin(ids, torch.as_tensor(special))].any()  # never special tokens or padding
    assert torch.equal(labels[chosen], ids[chosen])
    n_genes = (~torch.isin(ids, torch.as_tensor(special))).sum()
    assert abs(chosen.sum() / n_genes - 0.15) < 0.02
    masked = chosen & (inputs == vocab.mask_id)
    same = chosen & (inputs == ids)
    other = chosen & ~masked & ~same
    n = chosen.sum().item()
    assert abs(masked.sum().item() / n - 0.8) < 0.03
    assert abs(same.sum().item() / n - 0.1) < 0.03  # unchanged (plus rare random draws of the same gene)
    assert abs(other.sum().item() / n - 0.1) < 0.03
    assert (inputs[other] >= 4).all()  # random replacements are gene tokens
    assert torch.equal(inputs[~chosen], ids[~chosen])


def test_length_grouped_batches():
    from sc_dta.tl._trainer import length_grouped_batches as _length_grouped_batches

    lengths = np.random.default_rng(0).integers(1, 1000, 1000)
    cells = np.arange(1000)
    batches = _length_grouped_batches(cells, lengths, 10, np.random.default_rng(1))
    assert sorted(np.concatenate(batches).tolist()) == cells.tolist()
    assert lengths[batches[0]].max() == lengths.max()  # longest batch first
    # within a batch lengths are close: far less spread than random batches
    spread = np.mean([np.ptp(lengths[b]) for b in batches])
    assert spread < 60
    again = _length_grouped_batches(cells, lengths, 10, np.random.default_rng(1))
    assert all(np.array_equal(a, b) for a, b in zip(batches, again, strict=True))


@pytest.mark.filterwarnings("ignore::FutureWarning:mudata")
def test_bf16_autocast_and_mudata(monkeypatch):
    """The autocast path (bf16 on CUDA; forced here on the CPU) and a MuData modality."""
    import mudata as md

    adata = simulate(24)
    vocab = sim_vocab(adata.var_names)
    monkeypatch.setattr(dta.settings, "dtype", "bfloat16")
    mdata = md.MuData({"rna": adata})
    model = dta.tl.train_adapter(mdata, small_model(vocab), epochs=2, batch_size=8, val_fraction=0.2)
    rec = mdata["rna"].uns["train_adapter"]
    assert rec["loss"].size == 2 * 3 and np.isfinite(rec["loss"]).all() and np.isfinite(rec["val_loss"]).all()
    assert all(p.dtype == torch.float32 for p in model.parameters())  # autocast, not a cast of the weights


@pytest.mark.parametrize("deterministic", [True, False])
def test_cpu_training_runs_with_deterministic_algorithms_and_restores_them(deterministic, monkeypatch):
    """settings.deterministic: torch's deterministic kernels during training on the CPU, the global flag restored."""
    monkeypatch.setattr(dta.settings, "deterministic", deterministic)
    adata = simulate(30)
    model = small_model(sim_vocab(adata.var_names))
    seen = []
    handle = model.backbone.bert.register_forward_pre_hook(
        lambda *_: seen.append(torch.are_deterministic_algorithms_enabled())
    )
    assert not torch.are_deterministic_algorithms_enabled()
    try:
        dta.tl.train_adapter(adata, model, epochs=1, batch_size=8, seed=0)
    finally:
        handle.remove()
    assert seen and set(seen) == {deterministic}
    assert not torch.are_deterministic_algorithms_enabled()
