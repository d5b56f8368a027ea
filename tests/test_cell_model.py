from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

import sc_dta as dta
from sc_dta.models import BioDTA, GeneformerVocab, load_geneformer
from sc_dta.models.cell import infer_vocab_version, model_source, model_vocab

REVISION = "04c2b2e84da7c0f385c3f9ad8f3ec24bab6650e5"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def shrunk_checkpoint(geneformer_data, name: str, folder, **overrides):
    """A random BertForMaskedLM from the real config of ``name``, shrunk, saved with save_pretrained."""
    from transformers import BertConfig, BertForMaskedLM

    config = json.loads((geneformer_data / f"{name}_config.json").read_text())
    config.update(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    config.update(overrides)
    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig(**config))
    model.save_pretrained(folder)
    return model


@pytest.fixture
def cached_dictionaries(geneformer_data, monkeypatch):
    """Put the real V1/V2 dictionaries into the (per-test) data cache, as dta.datasets.fetch stores them."""
    monkeypatch.setenv("SC_DTA_OFFLINE", "1")
    cache = dta.settings.cache_dir / "data" / "geneformer"
    (cache / "gene_dictionaries_30m").mkdir(parents=True)
    for f in geneformer_data.glob("*_gc104M.pkl"):
        shutil.copy(f, cache / f.name)
    for f in geneformer_data.glob("*_gc30M.pkl"):
        shutil.copy(f, cache / "gene_dictionaries_30m" / f.name)
    return cache


@pytest.mark.parametrize(
    ("name", "version", "gata4"),
    [("Geneformer-V1-10M", "V1", 7261), ("Geneformer-V2-104M", "V2", 7196)],
)
def test_load_local_checkpoint_infers_vocabulary(geneformer_data, cached_dictionaries, tmp_path, name, version, gata4):
    ref = shrunk_checkpoint(geneformer_data, name, tmp_path / name)
    model = load_geneformer(tmp_path / name, device="cpu")
    assert not model.training
    assert model.config._attn_implementation == "sdpa"
    assert model.config.output_hidden_states
    assert model.config.hidden_act == "relu" and model.config.pad_token_id == 0
    assert model.device.type == "cpu"
    assert model_source(model)["name_or_path"] == str((tmp_path / name).resolve())
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(model.state_dict()[k], v, rtol=0, atol=0)
    vocab = model_vocab(model)  # loaded lazily from the (offline) data cache
    assert isinstance(vocab, GeneformerVocab) and vocab.version == version
    assert len(vocab) == model.config.vocab_size
    assert vocab.token_ids["ENSG00000136574"] == gata4
    assert model_vocab(model) is vocab  # cached after the first call
    # outputs hidden states for every layer (embeddings + 1 layer)
    ids = torch.tensor([[vocab.cls_id if vocab.cls_id is not None else 5, 10, 11, 12]])
    with torch.inference_mode():
        out = model(input_ids=ids)
    assert len(out.hidden_states) == 2


def test_vocab_argument_and_errors(geneformer_data, tmp_path):
    shrunk_checkpoint(geneformer_data, "Geneformer-V1-10M", tmp_path / "v1")
    shrunk_checkpoint(geneformer_data, "Geneformer-V1-10M", tmp_path / "odd", vocab_size=30, max_position_embeddings=64)
    with pytest.raises(ValueError, match="vocab_size=30 and max_position_embeddings=64.*pass vocab="):
        load_geneformer(tmp_path / "odd")
    genes = [f"G{i}" for i in range(26)]
    custom = GeneformerVocab(
        "mine", {t: i for i, t in enumerate(["<pad>", "<mask>", "<cls>", "<eos>", *genes])}, dict.fromkeys(genes, 1.0)
    )
    model = load_geneformer(tmp_path / "odd", vocab=custom)
    assert model_vocab(model) is custom
    # a saved vocabulary folder works too
    custom.save(tmp_path / "vocab")
    assert model_vocab(load_geneformer(tmp_path / "odd", vocab=tmp_path / "vocab")) == custom
    with pytest.raises(ValueError, match="has 20275 tokens"):
        load_geneformer(tmp_path / "v1", vocab="V2")
    bigger = GeneformerVocab("big", {**custom.token_ids, "G99": 30}, {**custom.medians, "G99": 1.0})
    with pytest.raises(ValueError, match="31 tokens"):
        load_geneformer(tmp_path / "odd", vocab=bigger)
    with pytest.raises(FileNotFoundError, match="Geneformer-V1-10M"):
        load_geneformer("Geneformer-V9-1B")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_geneformer(tmp_path / "empty")
    cfg = type("C", (), {"vocab_size": 20_275, "max_position_embeddings": 4_096})()
    assert infer_vocab_version(cfg) == "V2"


def test_published_name_resolves_through_hf_cache_offline(geneformer_data, tmp_path, monkeypatch):
    """`load_geneformer("Geneformer-V1-10M")` finds the pinned snapshot in the Hugging Face cache offline."""
    import huggingface_hub.constants

    hub = tmp_path / "hub"
    snapshot = hub / "models--ctheodoris--Geneformer" / "snapshots" / REVISION / "Geneformer-V1-10M"
    ref = shrunk_checkpoint(geneformer_data, "Geneformer-V1-10M", snapshot)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = load_geneformer("Geneformer-V1-10M")
    assert model_source(model) == {"name_or_path": "Geneformer-V1-10M", "revision": REVISION}
    torch.testing.assert_close(
        model.bert.embeddings.word_embeddings.weight, ref.bert.embeddings.word_embeddings.weight, rtol=0, atol=0
    )
    with pytest.raises(FileNotFoundError):  # another revision is not cached
        load_geneformer("Geneformer-V1-10M", revision="0" * 40)


def test_model_vocab_of_biodta_and_reference_roundtrip(geneformer_data, cached_dictionaries, tmp_path):
    """A BioDTA on a published-style checkpoint is saved as a reference and reloaded from it."""
    shrunk_checkpoint(geneformer_data, "Geneformer-V2-104M", tmp_path / "gf")
    backbone = load_geneformer(tmp_path / "gf")
    bio = BioDTA(backbone, d_dna=6, adapter_layers=1)
    assert model_vocab(bio) is bio.vocab and bio.vocab.version == "V2"
    tokens = [bio.vocab.token_ids[g] for g in ("ENSG00000136574", "ENSG00000089225")]  # GATA4, TBX5
    bio.set_dna_embeddings(tokens, np.arange(12, dtype=np.float32).reshape(2, 6))
    bio.save_pretrained(tmp_path / "bio")
    assert not (tmp_path / "bio" / "backbone").exists()
    back = BioDTA.from_pretrained(tmp_path / "bio")
    ids = torch.tensor([[bio.vocab.cls_id, tokens[0], 100, tokens[1], bio.vocab.eos_id]])
    bio.eval()
    with torch.inference_mode():
        torch.testing.assert_close(back(ids).logits, bio(ids).logits, rtol=0, atol=0)
