from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from sc_dta.models import Adapter, DynamicTokenEmbedding

VOCAB, HIDDEN, D_DNA = 12, 8, 5
SPECIAL = [0, 1, 2, 3]


def _make(mode="replace", seed=0, dna_ids=(4, 5, 7, 9)):
    torch.manual_seed(seed)
    static = nn.Embedding(VOCAB, HIDDEN, padding_idx=0)
    adapter = Adapter(D_DNA, HIDDEN, n_layers=2, d_hidden=6, dropout=0.0)
    rng = np.random.default_rng(seed)
    table = np.full((VOCAB, D_DNA), np.nan, dtype=np.float32)
    table[list(dna_ids)] = rng.normal(size=(len(dna_ids), D_DNA))
    emb = DynamicTokenEmbedding(static, adapter, table, mode=mode, special_ids=SPECIAL)
    return emb, table


def _adapter_by_hand(adapter: Adapter, x: np.ndarray) -> np.ndarray:
    """Independent evaluation of LayerNorm -> Linear -> GELU -> Linear with numpy."""
    ln, lin1, lin2 = adapter.norm, adapter.mlp[0], adapter.mlp[-1]
    x = x.astype(np.float64)
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    h = (x - mu) / np.sqrt(var + ln.eps) * ln.weight.detach().numpy() + ln.bias.detach().numpy()
    h = h @ lin1.weight.detach().numpy().T + lin1.bias.detach().numpy()
    from scipy.special import erf

    h = 0.5 * h * (1 + erf(h / np.sqrt(2)))
    return h @ lin2.weight.detach().numpy().T + lin2.bias.detach().numpy()


@pytest.mark.parametrize("mode", ["replace", "add"])
def test_dynamic_embedding_matches_hand_computation(mode):
    emb, table = _make(mode)
    emb.eval()
    ids = torch.tensor([[2, 4, 6, 5, 3, 0], [2, 9, 4, 8, 7, 3]])
    out = emb(ids).detach().numpy()
    static = emb.static.weight.detach().numpy()
    for b in range(ids.shape[0]):
        for t in range(ids.shape[1]):
            tok = int(ids[b, t])
            expected = static[tok].astype(np.float64)
            if not np.isnan(table[tok]).any():
                dyn = _adapter_by_hand(emb.adapter, table[tok][None])[0]
                expected = dyn if mode == "replace" else expected + dyn
            np.testing.assert_allclose(out[b, t], expected, rtol=1e-5, atol=1e-6)


def test_adapter_runs_once_on_unique_dna_tokens():
    emb, _ = _make()
    seen = []
    emb.adapter.register_forward_hook(lambda m, inp, out: seen.append(inp[0].shape[0]))
    ids = torch.tensor([[2, 4, 4, 5, 6, 3], [2, 5, 4, 6, 6, 3], [2, 6, 8, 10, 3, 0]])
    emb(ids)
    assert seen == [2]  # tokens 4 and 5 have DNA; 6, 8, 10 and the special tokens do not
    seen.clear()
    emb(torch.tensor([[2, 6, 8, 3]]))
    assert seen == []  # no token with DNA: the adapter is not run


def test_dna_overrides():
    emb, table = _make()
    emb.eval()
    ids = torch.tensor([[2, 4, 5, 6, 3]])
    base = emb(ids).detach()
    vec = np.linspace(-1, 1, D_DNA).astype(np.float32)
    over = emb(ids, {4: vec}).detach()
    np.testing.assert_allclose(over[0, 1].numpy(), _adapter_by_hand(emb.adapter, vec[None])[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(over[0, [0, 2, 3, 4]], base[0, [0, 2, 3, 4]])
    # a gene without a DNA row takes the adapter output when overridden
    over6 = emb(ids, {6: torch.from_numpy(vec)}).detach()
    torch.testing.assert_close(over6[0, 3], over[0, 1])
    # overriding a token absent from the batch changes nothing
    torch.testing.assert_close(emb(ids, {9: vec}).detach(), base)
    with pytest.raises(ValueError, match="special token"):
        emb(ids, {2: vec})
    with pytest.raises(ValueError, match="d_dna=5"):
        emb(ids, {4: vec[:3]})
    with pytest.raises(ValueError, match="NaN"):
        emb(ids, {4: np.full(D_DNA, np.nan)})


def test_gradients_reach_adapter_and_only_used_static_rows():
    emb, _ = _make("replace")
    ids = torch.tensor([[2, 4, 6, 3]])
    emb(ids).pow(2).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in emb.adapter.parameters() if p.ndim == 2)
    g = emb.static.weight.grad
    assert g[4].abs().sum() == 0  # replaced by the adapter: no gradient to its static row
    assert g[6].abs().sum() > 0 and g[2].abs().sum() > 0
    assert g[5].abs().sum() == 0  # not in the batch


def test_set_dna_embeddings_and_table_roundtrip():
    emb, table = _make()
    np.testing.assert_array_equal(emb.has_dna.numpy(), ~np.isnan(table).any(1))
    np.testing.assert_allclose(emb.dna_table.numpy(), table, equal_nan=True)
    new = np.ones((2, D_DNA), dtype=np.float32)
    new[1] = np.nan
    emb.set_dna_embeddings([6, 4], new)  # adds 6, removes 4
    expected = table.copy()
    expected[6] = 1.0
    expected[4] = np.nan
    np.testing.assert_allclose(emb.dna_table.numpy(), expected, equal_nan=True)
    assert sorted(emb.dna_token_ids.tolist()) == [5, 6, 7, 9]
    with pytest.raises(ValueError, match="Special tokens"):
        emb.set_dna_embeddings([1], np.ones((1, D_DNA)))
    with pytest.raises(ValueError, match="shape"):
        emb.set_dna_embeddings([6], np.ones((1, D_DNA + 1)))
    with pytest.raises(ValueError, match="lie in"):
        emb.set_dna_embeddings([VOCAB], np.ones((1, D_DNA)))
    with pytest.raises(ValueError, match="duplicates"):
        emb.set_dna_embeddings([5, 5], np.ones((2, D_DNA)))


def test_constructor_errors():
    static = nn.Embedding(VOCAB, HIDDEN)
    with pytest.raises(ValueError, match="mode"):
        DynamicTokenEmbedding(static, Adapter(D_DNA, HIDDEN), mode="concat")
    with pytest.raises(ValueError, match="outputs 7"):
        DynamicTokenEmbedding(static, Adapter(D_DNA, 7))
    with pytest.raises(ValueError, match="vocab_size, d_dna"):
        DynamicTokenEmbedding(static, Adapter(D_DNA, HIDDEN), np.zeros((3, D_DNA)))
    with pytest.raises(ValueError, match="n_layers"):
        Adapter(D_DNA, HIDDEN, n_layers=0)
    with pytest.raises(ValueError, match="dropout"):
        Adapter(D_DNA, HIDDEN, dropout=1.5)
    with pytest.raises(ValueError, match="dimension 5"):
        Adapter(D_DNA, HIDDEN)(torch.zeros(2, 4))


def test_dynamic_equals_static_through_bert():
    """When the adapter reproduces the static rows, BERT gives identical outputs via inputs_embeds."""
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(1)
    config = BertConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=2, intermediate_size=16,
        max_position_embeddings=16, hidden_act="relu", pad_token_id=0, output_hidden_states=True,
    )  # fmt: skip
    bert = BertForMaskedLM._from_config(config, attn_implementation="sdpa").eval()
    static = bert.get_input_embeddings()
    dna_ids = np.array([4, 5, 6, 7, 8, 9, 10, 11])
    # one-hot DNA embeddings and a single linear layer whose weight columns are the static rows
    adapter = Adapter(len(dna_ids), HIDDEN, n_layers=1, layer_norm=False, dropout=0.0)
    with torch.no_grad():
        adapter.output_layer.weight.copy_(static.weight[torch.from_numpy(dna_ids)].T)
        adapter.output_layer.bias.zero_()
    emb = DynamicTokenEmbedding(static, adapter, np.eye(len(dna_ids)), mode="replace", token_ids=dna_ids)
    ids = torch.tensor([[2, 4, 9, 11, 6, 3, 0, 0], [2, 10, 5, 8, 7, 6, 4, 3]])
    mask = (ids != 0).long()
    with torch.no_grad():
        ref = bert(input_ids=ids, attention_mask=mask)
        dyn = bert(inputs_embeds=emb(ids), attention_mask=mask)
    torch.testing.assert_close(dyn.logits, ref.logits, rtol=1e-5, atol=1e-5)
    for a, b in zip(dyn.hidden_states, ref.hidden_states, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # and a different adapter output changes the result (the check can fail)
    with torch.no_grad():
        adapter.output_layer.bias.add_(torch.linspace(-1, 1, HIDDEN))  # not a constant: LayerNorm would remove it
        moved = bert(inputs_embeds=emb(ids), attention_mask=mask)
    assert (moved.hidden_states[-1] - ref.hidden_states[-1]).abs().max() > 0.1
