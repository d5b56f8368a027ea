"""encoder_from_name: every name builds the encoder it documents (no downloads)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from enformer_pytorch import Enformer

import sc_dta as dta
from sc_dta.models import EnformerEncoder, KmerEncoder, MotifEncoder, encoder_from_name
from sc_dta.models.dna import DNAEncoder
from sc_dta.models.encoders import DEFAULT_WINDOWS, ENCODER_NAMES, ENFORMER_SMALL


def tiny_enformer(seed: int = 0) -> Enformer:
    torch.manual_seed(seed)
    return Enformer.from_hparams(
        dim=48, depth=1, heads=2, target_length=8, num_downsamples=3, dim_divisible_by=8, output_heads={"human": 4}
    ).eval()


def test_kmer():
    enc = encoder_from_name("kmer")
    assert isinstance(enc, KmerEncoder) and isinstance(enc, DNAEncoder)
    assert (enc.k, enc.window, enc.canonical) == (4, 512, False) == (4, DEFAULT_WINDOWS["kmer"], False)
    enc = encoder_from_name("kmer", window=300, k=3, canonical=True)
    assert (enc.name, enc.window, enc.dim) == ("kmer3c", 300, 32)
    assert dta.models.encoder_from_name is encoder_from_name


def test_enformer_small_is_seeded(one_torch_thread):
    enc = encoder_from_name("enformer-small")
    assert isinstance(enc, EnformerEncoder) and enc.name == "enformer-small" and enc.window == 512
    assert enc.dim == 2 * ENFORMER_SMALL["dim"]
    same = encoder_from_name("enformer-small", seed=0)
    assert same.weights_id == enc.weights_id
    assert encoder_from_name("enformer-small", seed=1).weights_id != enc.weights_id
    state = torch.random.get_rng_state()
    other = encoder_from_name("enformer-small", window=256, seed=0, n_bins=3)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global generator is left alone
    assert other.window == 256 and other.n_bins == 3 and other.weights_id == enc.weights_id
    seq = "ACGT" * 64
    np.testing.assert_allclose(
        other.embed([seq]), encoder_from_name("enformer-small", window=256, n_bins=3).embed([seq]), rtol=1e-6
    )


def test_enformer_small_matches_demo(one_torch_thread):
    """Same weights as the demo's make_encoder, which this function succeeds."""
    from sc_dta._demo import make_encoder

    assert make_encoder("enformer-small", seed=3).weights_id == encoder_from_name("enformer-small", seed=3).weights_id


def test_motif():
    enc = encoder_from_name("motif")
    assert isinstance(enc, MotifEncoder) and enc.window == 1000 and enc.n_motifs > 500
    assert enc.name == "jaspar2024-core-vertebrates"
    sub = encoder_from_name("motif", window=200, motifs=["GATA4"], pooling="occupancy")
    assert (sub.window, sub.motif_names, sub.dim) == (200, ["GATA4"], 1)
    with pytest.raises(TypeError, match="k"):
        encoder_from_name("motif", k=4)


def test_local_enformer_directory(tmp_path, one_torch_thread):
    model = tiny_enformer()
    model.save_pretrained(tmp_path / "enformer", safe_serialization=False)
    for name in (str(tmp_path / "enformer"), tmp_path / "enformer"):
        enc = encoder_from_name(name)
        assert isinstance(enc, EnformerEncoder) and enc.weights_id.startswith("sha256:")
        assert enc.window == 14 * 8  # the native window of this small model
    enc = encoder_from_name(tmp_path / "enformer", window=16 * 8, n_bins=2)
    assert enc.window == 128 and enc.n_bins == 2
    seq = "ACGTTGCA" * 16
    np.testing.assert_allclose(
        enc.embed([seq]), EnformerEncoder(model, window=128, n_bins=2).embed([seq]), rtol=1e-5, atol=1e-6
    )


def test_enformer_official_offline_from_hf_cache(tmp_path, monkeypatch, one_torch_thread):
    """'enformer' resolves the official repository at the pinned revision; here from a local HF cache, offline."""
    import huggingface_hub.constants

    from sc_dta.datasets import registry

    revision = registry()["enformer"]["revision"]
    snapshot = tmp_path / "models--EleutherAI--enformer-official-rough" / "snapshots" / revision
    tiny_enformer().save_pretrained(snapshot, safe_serialization=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    enc = encoder_from_name("enformer", revision=revision)
    assert enc.weights_id == f"EleutherAI/enformer-official-rough@{revision}" and enc.name == "enformer"
    assert encoder_from_name("enformer", window=64).window == 64


def test_unknown_names_and_keywords(tmp_path):
    with pytest.raises(ValueError, match=r"encoder name 'kmers': expected one of \['kmer', 'enformer'"):
        encoder_from_name("kmers")
    with pytest.raises(ValueError, match="existing directory of Enformer weights"):
        encoder_from_name(str(tmp_path / "missing"))
    assert set(ENCODER_NAMES) == {"kmer", "enformer", "enformer-small", "motif"}
    with pytest.raises(TypeError, match=r"encoder 'kmer' does not take the keyword\(s\) \['seed'\]"):
        encoder_from_name("kmer", seed=0)
    with pytest.raises(TypeError, match=r"'enformer-small' does not take the keyword\(s\) \['k'\]"):
        encoder_from_name("enformer-small", k=3)
    with pytest.raises(TypeError, match="name must be a string or a path"):
        encoder_from_name(3)
    with pytest.raises(ValueError, match="window"):
        encoder_from_name("kmer", window=0)
