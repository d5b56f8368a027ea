from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import BertConfig, BertForMaskedLM

from sc_dta.models import BioDTA, GeneformerVocab, load_geneformer

D_DNA = 6
GENES = [f"G{i}" for i in range(20)]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def vocab():
    tokens = {t: i for i, t in enumerate(["<pad>", "<mask>", "<cls>", "<eos>", *GENES])}
    return GeneformerVocab("test", tokens, dict.fromkeys(GENES, 1.0), max_length=32)


def small(vocab, **kwargs):
    return BioDTA.from_config(
        vocab, d_dna=D_DNA, hidden_size=16, n_layers=2, n_heads=2, intermediate_size=32, seed=0, **kwargs
    )


def batch():
    return torch.tensor([[2, 4, 7, 9, 11, 3, 0, 0], [2, 5, 6, 8, 10, 12, 13, 3]])


def test_from_config_is_geneformer_like(vocab):
    model = small(vocab)
    cfg = model.backbone.config
    assert isinstance(model.backbone, BertForMaskedLM)
    assert cfg.hidden_act == "relu" and cfg.position_embedding_type == "absolute" and cfg.pad_token_id == 0
    assert cfg._attn_implementation == "sdpa" and cfg.output_hidden_states
    assert cfg.vocab_size == len(vocab) and cfg.max_position_embeddings == vocab.max_length
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads) == (16, 2, 2)
    assert model.adapter.d_dna == D_DNA and model.adapter.hidden == 16
    assert model.token_embedding.static is model.backbone.get_input_embeddings()
    # the same seed gives the same weights
    other = small(vocab)
    for (k, a), b in zip(model.state_dict().items(), other.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    with pytest.raises(ValueError, match="divisible"):
        BioDTA.from_config(vocab, d_dna=4, hidden_size=10, n_heads=3)


def test_forward_paths_agree(vocab):
    model = small(vocab).eval()
    model.set_dna_embeddings([4, 5, 6, 7], np.random.default_rng(0).normal(size=(4, D_DNA)))
    ids = batch()
    mask = (ids != 0).long()
    with torch.no_grad():
        out = model(ids)
        explicit = model.backbone(inputs_embeds=model.embed_tokens(ids), attention_mask=mask)
        torch.testing.assert_close(out.logits, explicit.logits)
        labels = torch.full_like(ids, -100)
        labels[0, 2], labels[1, 4], labels[1, 6] = 7, 10, 13
        full = model(ids, labels=labels).loss
        fast = model.masked_lm_loss(ids, labels)
        torch.testing.assert_close(fast, full)
        # independent cross-entropy from the full logits
        logp = torch.log_softmax(out.logits, -1)
        sel = labels != -100
        manual = -logp[sel].gather(1, labels[sel][:, None]).mean()
        torch.testing.assert_close(fast, manual, rtol=1e-5, atol=1e-6)


def test_dna_overrides_change_only_that_token(vocab):
    model = small(vocab).eval()
    model.set_dna_embeddings([4, 5, 6, 7], np.random.default_rng(0).normal(size=(4, D_DNA)))
    ids = batch()
    with torch.no_grad():
        base = model.embed_tokens(ids)
        new = model.embed_tokens(ids, dna_overrides={7: np.ones(D_DNA, dtype=np.float32)})
        changed = (new - base).abs().sum(-1) > 0
        assert torch.equal(changed, ids == 7)
        out_base = model(ids).hidden_states[-1]
        out_new = model(ids, dna_overrides={7: np.ones(D_DNA, dtype=np.float32)}).hidden_states[-1]
        # attention propagates the change to the other tokens of the same cell only
        assert (out_new[0] - out_base[0]).abs().max() > 1e-4
        torch.testing.assert_close(out_new[1], out_base[1])


def test_add_mode_starts_as_the_backbone(vocab):
    model = small(vocab, mode="add").eval()
    model.set_dna_embeddings([4, 5, 6], np.random.default_rng(1).normal(size=(3, D_DNA)))
    ids = batch()
    with torch.no_grad():
        torch.testing.assert_close(
            model(ids).logits, model.backbone(input_ids=ids, attention_mask=(ids != 0).long()).logits
        )


@pytest.mark.parametrize("mode", ["replace", "add"])
def test_save_load_identical_outputs(vocab, tmp_path, mode):
    model = small(vocab, mode=mode, dna_encoder_info={"name": "kmer", "window": 512, "pooling": "mean"})
    with torch.no_grad():
        for p in model.adapter.parameters():  # non-trivial adapter weights (the add mode starts at zero)
            p.add_(torch.randn_like(p) * 0.1)
    table = np.random.default_rng(2).normal(size=(5, D_DNA)).astype(np.float32)
    model.set_dna_embeddings([4, 6, 8, 10, 12], table)
    model.loss_history = [{"epoch": 0, "step": 1, "loss": 2.5, "lr": 1e-3}]
    model.save_pretrained(tmp_path / "m")
    saved = json.loads((tmp_path / "m" / "biodta_config.json").read_text())
    assert saved["backbone"]["saved"] == "backbone"  # a random backbone is saved in full
    assert (tmp_path / "m" / "backbone" / "model.safetensors").exists()
    back = BioDTA.from_pretrained(tmp_path / "m")
    assert back.vocab == vocab and back.mode == mode and back.dna_encoder_info == model.dna_encoder_info
    assert back.loss_history == model.loss_history
    np.testing.assert_array_equal(back.has_dna.numpy(), model.has_dna.numpy())
    np.testing.assert_array_equal(back.token_embedding.dna_table[[4, 6, 8, 10, 12]].numpy(), table)
    model.eval()
    ids = batch()
    with torch.no_grad():
        a, b = model(ids), back(ids)
        torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=0)
        for x, y in zip(a.hidden_states, b.hidden_states, strict=True):
            torch.testing.assert_close(x, y, rtol=0, atol=0)
        v = np.linspace(0, 1, D_DNA, dtype=np.float32)
        torch.testing.assert_close(model(ids, dna_overrides={9: v}).logits, back(ids, dna_overrides={9: v}).logits)


def test_frozen_backbone_saved_as_checked_reference(vocab, tmp_path):
    config = BertConfig(
        vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=32, hidden_act="relu", pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    BertForMaskedLM(config).save_pretrained(tmp_path / "gf")
    model = BioDTA(load_geneformer(tmp_path / "gf", vocab=vocab), d_dna=D_DNA)
    model.set_dna_embeddings([5], np.ones((1, D_DNA)))
    assert not model.backbone_trained
    model.save_pretrained(tmp_path / "m")
    saved = json.loads((tmp_path / "m" / "biodta_config.json").read_text())
    assert saved["backbone"]["saved"] is None
    assert saved["backbone"]["source"]["name_or_path"] == str((tmp_path / "gf").resolve())
    assert not (tmp_path / "m" / "backbone").exists()
    back = BioDTA.from_pretrained(tmp_path / "m")
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(back(batch()).logits, model(batch()).logits, rtol=0, atol=0)
    # the referenced checkpoint changed: refused, unless told otherwise
    torch.manual_seed(1)
    BertForMaskedLM(config).save_pretrained(tmp_path / "gf")
    with pytest.raises(ValueError, match="differ"):
        BioDTA.from_pretrained(tmp_path / "m")
    BioDTA.from_pretrained(tmp_path / "m", check_backbone=False)
    # or a backbone passed explicitly
    BioDTA.from_pretrained(tmp_path / "m", backbone=model.backbone)
    with pytest.raises(FileNotFoundError, match="not a saved BioDTA"):
        BioDTA.from_pretrained(tmp_path / "gf")


def test_constructor_errors(vocab):
    backbone = small(vocab).backbone
    with pytest.raises(ValueError, match="d_dna is required"):
        BioDTA(backbone, vocab)
    with pytest.raises(TypeError, match="BertForMaskedLM"):
        BioDTA(torch.nn.Linear(2, 2), vocab, d_dna=3)
    with pytest.raises(ValueError, match="mode"):
        BioDTA(backbone, vocab, d_dna=3, mode="concat")
    big = GeneformerVocab("big", {**vocab.token_ids, "G99": len(vocab)}, {**vocab.medians, "G99": 1.0})
    with pytest.raises(ValueError, match="more than the backbone"):
        BioDTA(backbone, big, d_dna=3)


@pytest.fixture
def no_network(monkeypatch):
    """Record (and refuse) every outgoing socket connection: loading a local folder must never try one."""
    import socket

    attempts: list = []

    def refuse(self, address, *args, **kwargs):
        attempts.append(address)
        raise OSError(f"test: network access to {address} refused")

    def refuse_lookup(host, *args, **kwargs):
        attempts.append(host)
        raise socket.gaierror(f"test: name lookup of {host} refused")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse_lookup)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    return attempts


@pytest.fixture
def saved(vocab, tmp_path):
    model = small(vocab)
    model.set_dna_embeddings([4, 6], np.ones((2, D_DNA), dtype=np.float32))
    return model.save_pretrained(tmp_path / "saved")


def _variant(saved, tmp_path, name):
    import shutil

    return Path(shutil.copytree(saved, tmp_path / name))


def test_damaged_backbone_folder_fails_fast_offline(saved, tmp_path, no_network, monkeypatch):
    import shutil
    import time

    no_backbone = _variant(saved, tmp_path, "no_backbone")
    shutil.rmtree(no_backbone / "backbone")
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError, match=r"backbone folder .*no_backbone/backbone is missing"):
        BioDTA.from_pretrained(no_backbone)
    # a relative path: "no_backbone/backbone" is also a valid Hub repo id, and must not be looked up there
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"backbone folder no_backbone/backbone is missing"):
        BioDTA.from_pretrained("no_backbone")
    assert no_network == []
    assert time.perf_counter() - start < 5
    no_weights = _variant(saved, tmp_path, "no_weights")
    (no_weights / "backbone" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"no_weights/backbone holds no weights"):
        BioDTA.from_pretrained(no_weights)
    no_config = _variant(saved, tmp_path, "no_bconfig")
    (no_config / "backbone" / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"no_bconfig/backbone lacks config.json"):
        BioDTA.from_pretrained(no_config)
    truncated = _variant(saved, tmp_path, "truncated_backbone")
    weights = truncated / "backbone" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"saved backbone in .*truncated_backbone/backbone could not be loaded"):
        BioDTA.from_pretrained(truncated)
    assert no_network == []  # not one connection attempt
    # the intact folder still loads, offline
    assert isinstance(BioDTA.from_pretrained(saved), BioDTA) and no_network == []


def test_damaged_adapter_file_names_it(saved, tmp_path, vocab, no_network):
    from safetensors import SafetensorError

    truncated = _variant(saved, tmp_path, "truncated")
    weights = truncated / "adapter.safetensors"
    weights.write_bytes(weights.read_bytes()[:50])
    with pytest.raises(ValueError, match=r"truncated/adapter.safetensors is damaged") as err:
        BioDTA.from_pretrained(truncated)
    assert not isinstance(err.value, SafetensorError) and isinstance(err.value.__cause__, SafetensorError)
    missing = _variant(saved, tmp_path, "missing")
    (missing / "adapter.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing lacks adapter.safetensors"):
        BioDTA.from_pretrained(missing)
    # the adapter file of another model (other d_dna) does not fit this config
    mixed = _variant(saved, tmp_path, "mixed")
    other = BioDTA.from_config(vocab, d_dna=D_DNA + 1, hidden_size=16, n_layers=2, n_heads=2, intermediate_size=32)
    other.save_pretrained(tmp_path / "other")
    (mixed / "adapter.safetensors").write_bytes((tmp_path / "other" / "adapter.safetensors").read_bytes())
    with pytest.raises(ValueError, match=r"mixed/adapter.safetensors does not fit .*biodta_config.json"):
        BioDTA.from_pretrained(mixed)
    assert no_network == []


def test_damaged_config_and_vocab_name_the_file(saved, tmp_path, no_network):
    import shutil

    with pytest.raises(FileNotFoundError, match="does not exist"):
        BioDTA.from_pretrained(tmp_path / "nowhere")
    no_config = _variant(saved, tmp_path, "no_config")
    (no_config / "biodta_config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"no_config.* has no biodta_config.json"):
        BioDTA.from_pretrained(no_config)
    bad_json = _variant(saved, tmp_path, "bad_json")
    text = (bad_json / "biodta_config.json").read_text()
    (bad_json / "biodta_config.json").write_text(text[: len(text) // 2])
    with pytest.raises(ValueError, match=r"bad_json/biodta_config.json is damaged \(not valid JSON"):
        BioDTA.from_pretrained(bad_json)
    no_adapter_entry = _variant(saved, tmp_path, "no_entry")
    config = json.loads(text)
    del config["adapter"]
    (no_adapter_entry / "biodta_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"no_entry/biodta_config.json is damaged: it lacks the entries \['adapter'\]"):
        BioDTA.from_pretrained(no_adapter_entry)
    no_vocab = _variant(saved, tmp_path, "no_vocab")
    shutil.rmtree(no_vocab / "vocab")
    with pytest.raises(FileNotFoundError, match=r"no_vocab lacks its vocab/ folder"):
        BioDTA.from_pretrained(no_vocab)
    assert no_network == []


def test_emb_layer_names_and_integers(vocab):
    from sc_dta.models._forward import contextual_embeddings, resolve_emb_layer

    model = small(vocab).eval()  # 2 layers
    assert resolve_emb_layer(model, "second_to_last") == resolve_emb_layer(model, -1) == 1
    assert resolve_emb_layer(model, "last") == resolve_emb_layer(model, 0) == 2
    assert resolve_emb_layer(model, "Second-To-Last") == 1
    assert resolve_emb_layer(model, np.int64(-2)) == 0  # the embedding output
    for bad in (1, -3, "first", "-1", True, 1.0, None):
        with pytest.raises(ValueError, match=r"emb_layer: must be 'second_to_last' .* between -2 .* got"):
            resolve_emb_layer(model, bad)
    ids = batch()
    mask = (ids != 0).long()
    with torch.no_grad():
        ref = model(ids, attention_mask=mask, output_hidden_states=True).hidden_states
        for name, index in (("last", 2), ("second_to_last", 1)):
            got = contextual_embeddings(model, ids, mask, emb_layer=name)
            torch.testing.assert_close(got[mask.bool()], ref[index][mask.bool()], rtol=1e-5, atol=1e-5)
