"""The perturbation forward pass (models/_forward.py) against the model's own hidden states."""

from __future__ import annotations

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from sc_dta.models import _forward  # noqa: E402
from sc_dta.models._forward import contextual_embeddings, masked_log_probs  # noqa: E402

LENGTHS = [40, 7, 33, 40, 1, 21]  # right-padded to 40; much padding (the per-sequence attention path)


def make_model(attn: str = "sdpa", *, seed: int = 0, **config) -> transformers.BertForMaskedLM:
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(
        vocab_size=60,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        hidden_act="relu",
        initializer_range=0.3,
        **config,
    )
    model = transformers.BertForMaskedLM._from_config(cfg, attn_implementation=attn)
    return model.eval()


def batch(lengths=LENGTHS, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    rng = np.random.default_rng(seed)
    seqs = [torch.from_numpy(rng.integers(2, 60, size=n)) for n in lengths]
    ids = torch.zeros(len(seqs), max(lengths), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = s
        mask[i, : len(s)] = 1
    return ids, mask, seqs


def hidden_states(model, seq: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The model's own hidden states of one unpadded sequence, in float64 (an independent computation)."""
    m64 = copy.deepcopy(model).double()
    with torch.no_grad():
        return m64(seq[None], output_hidden_states=True).hidden_states


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_equals_hidden_states_at_every_layer_with_padding(attn):
    model = make_model(attn)
    ids, mask, seqs = batch()
    n = model.config.num_hidden_layers
    refs = [hidden_states(model, s) for s in seqs]
    with torch.no_grad():
        for emb_layer in range(-n, 1):
            got = contextual_embeddings(model, ids, mask, emb_layer=emb_layer)
            assert got.shape == (*ids.shape, model.config.hidden_size)
            for i, s in enumerate(seqs):
                np.testing.assert_allclose(
                    got[i, : len(s)].double().numpy(), refs[i][n + emb_layer][0].numpy(), atol=1e-5, rtol=0
                )
    # the values compared must be far from 0 for the tolerance to mean something
    assert float(refs[0][n - 1].abs().mean()) > 0.1


def test_unpadded_float32_is_identical_to_the_sdpa_model():
    model = make_model("sdpa")
    ids, _, _ = batch([25, 25, 25])
    n = model.config.num_hidden_layers
    with torch.no_grad():
        ref = model(ids, output_hidden_states=True).hidden_states
        for emb_layer in (0, -1, -2):
            got = contextual_embeddings(model, ids, torch.ones_like(ids), emb_layer=emb_layer)
            torch.testing.assert_close(got, ref[n + emb_layer], rtol=0, atol=0)


@pytest.mark.parametrize("saving", [0.0, 1.0])
def test_per_sequence_and_masked_attention_agree(monkeypatch, saving):
    """Both ways of attending over a padded batch (per sequence, or one masked call) give the same values."""
    model = make_model("sdpa")
    ids, mask, seqs = batch([30, 29, 30, 28])  # little padding
    with torch.no_grad():
        monkeypatch.setattr(_forward, "PER_SEQUENCE_MIN_SAVING", saving)
        plan = _forward._attention_plan(mask, torch.float32)
        assert (plan.lengths is not None) == (saving == 0.0)
        got = contextual_embeddings(model, ids, mask)
        for i, s in enumerate(seqs):
            ref = contextual_embeddings(model, s[None], None)[0]
            np.testing.assert_allclose(got[i, : len(s)].numpy(), ref.numpy(), atol=2e-6, rtol=0)


def test_padding_that_is_not_at_the_right_end():
    """A mask with holes is honoured through the additive mask (padded keys ignored)."""
    model = make_model("sdpa")
    ids, mask, seqs = batch([12, 12])
    mask[1, 3] = 0  # position 3 of sequence 1 is padding in the middle
    assert _forward._attention_plan(mask, torch.float32).mask is not None
    with torch.no_grad():
        got = contextual_embeddings(model, ids, mask)
        ref = model(ids, attention_mask=mask, output_hidden_states=True).hidden_states[-2]
    keep = mask.bool()
    np.testing.assert_allclose(got[keep].numpy(), ref[keep].numpy(), atol=2e-6, rtol=0)
    # position 3 is invisible to the others: changing its token changes nothing elsewhere
    ids2 = ids.clone()
    ids2[1, 3] = (ids2[1, 3] + 1) % 58 + 2
    with torch.no_grad():
        got2 = contextual_embeddings(model, ids2, mask)
    np.testing.assert_allclose(got2[keep].numpy(), got[keep].numpy(), atol=1e-6, rtol=0)


def test_layers_it_cannot_evaluate_run_through_their_modules():
    """Relative position embeddings and training mode fall back to the modules (same values as the model)."""
    model = make_model("eager", position_embedding_type="relative_key")
    ids, mask, seqs = batch([9, 5])
    assert not _forward._fast_layers(model.bert)
    with torch.no_grad():
        got = contextual_embeddings(model, ids, mask, emb_layer=0)
        for i, s in enumerate(seqs):
            ref = model(s[None], output_hidden_states=True).hidden_states[-1][0]
            np.testing.assert_allclose(got[i, : len(s)].numpy(), ref.numpy(), atol=2e-6, rtol=0)
    plain = make_model("sdpa")
    assert _forward._fast_layers(plain.bert)
    plain.train()
    assert not _forward._fast_layers(plain.bert)


def test_forward_hooks_fire_and_see_the_same_values():
    """A hook on a layer (or a global one) makes the layers run as modules: hooks fire, values are unchanged."""
    model = make_model("sdpa")
    ids, mask, _ = batch()
    with torch.no_grad():
        fast = contextual_embeddings(model, ids, mask, emb_layer=-1)
    seen = []
    handle = model.bert.encoder.layer[1].attention.self.register_forward_hook(lambda *_: seen.append(1))
    try:
        assert not _forward._fast_layers(model.bert)
        with torch.no_grad():
            hooked = contextual_embeddings(model, ids, mask, emb_layer=-1)
    finally:
        handle.remove()
    assert seen == [1]
    valid = mask.bool()
    np.testing.assert_allclose(hooked[valid].numpy(), fast[valid].numpy(), atol=2e-6, rtol=0)
    assert _forward._fast_layers(model.bert)
    handle = torch.nn.modules.module.register_module_forward_hook(lambda *_: None)
    try:
        assert not _forward._fast_layers(model.bert)
    finally:
        handle.remove()


def test_fused_projection_follows_weight_updates():
    """The cached query/key/value concatenation is rebuilt after an in-place weight update."""
    model = make_model("sdpa")
    ids, mask, seqs = batch([10, 6])
    with torch.no_grad():
        before = contextual_embeddings(model, ids, mask)
        model.bert.encoder.layer[0].attention.self.key.weight.mul_(1.5)
        after = contextual_embeddings(model, ids, mask)
        ref = model(seqs[0][None], output_hidden_states=True).hidden_states[-2][0]
    assert float((after - before).abs().max()) > 1e-3
    np.testing.assert_allclose(after[0].numpy(), ref.numpy(), atol=2e-6, rtol=0)


def test_gradients_reach_the_projection_weights():
    model = make_model("sdpa")
    ids, mask, _ = batch([8, 5])
    contextual_embeddings(model, ids, mask).sum().backward()
    query = model.bert.encoder.layer[0].attention.self.query.weight
    assert query.grad is not None and float(query.grad.abs().sum()) > 0


def test_masked_log_probs_equal_the_model_logits():
    model = make_model("sdpa")
    ids, mask, seqs = batch([20, 11])
    select = torch.zeros_like(mask, dtype=torch.bool)
    select[0, 3] = select[1, 10] = select[0, 19] = True
    with torch.no_grad():
        got = masked_log_probs(model, ids, mask, select)
        rows = []
        for i, p in [(0, 3), (0, 19), (1, 10)]:
            logits = model(seqs[i][None]).logits[0, p]
            rows.append(torch.log_softmax(logits.double(), dim=-1))
    np.testing.assert_allclose(got.double().numpy(), torch.stack(rows).numpy(), atol=1e-5, rtol=0)
