from __future__ import annotations

import hashlib
import itertools
import logging

import numpy as np
import pytest
import torch
from enformer_pytorch import Enformer

import sc_dta as dta
from sc_dta.models.dna import DNAEncoder, EnformerEncoder, KmerEncoder

BIN = 8  # 2 ** num_downsamples of the small test models


def small_enformer(seed: int = 0, **kw) -> Enformer:
    """A small random Enformer whose attention output projections are not zero (so attention matters)."""
    torch.manual_seed(seed)
    hp = {"dim": 48, "depth": 1, "heads": 2, "target_length": 8, "num_downsamples": 3, "dim_divisible_by": 8}
    hp.update(kw)
    model = Enformer.from_hparams(output_heads={"human": 4}, **hp)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "to_out" in name:
                p.normal_(0, 0.2)
    return model.eval()


@pytest.fixture(scope="module")
def model() -> Enformer:
    return small_enformer()


def one_hot_by_hand(seqs: list[str]) -> torch.Tensor:
    table = {"A": [1, 0, 0, 0], "C": [0, 1, 0, 0], "G": [0, 0, 1, 0], "T": [0, 0, 0, 1]}
    arr = [[table.get(b.upper(), [0, 0, 0, 0]) for b in s] for s in seqs]
    return torch.tensor(arr, dtype=torch.float32)


def random_seqs(n: int, length: int, seed: int = 0, alphabet: str = "ACGTacgtN") -> list[str]:
    rng = np.random.default_rng(seed)
    return ["".join(rng.choice(list(alphabet), length)) for _ in range(n)]


def full_trunk(model: Enformer, seqs: list[str]) -> np.ndarray:
    """The whole Enformer trunk (with its crop to target_length bins), as enformer-pytorch runs it."""
    with torch.no_grad():
        return model(one_hot_by_hand(seqs), return_only_embeddings=True).numpy()


def crop_start(model: Enformer, n_bins_total: int) -> int:
    target = model.config.target_length
    return 0 if target == -1 else -((target - n_bins_total) // 2)


def test_protocol_and_attributes(model):
    enc = EnformerEncoder(model)
    kmer = KmerEncoder()
    assert isinstance(enc, DNAEncoder) and isinstance(kmer, DNAEncoder)
    assert not isinstance(object(), DNAEncoder)
    # native window: 8 output bins keep the official 1536:896 ratio -> ceil(8 * 12 / 7) = 14 bins of 8 bp
    assert enc.window == 14 * BIN
    assert enc.dim == 2 * 48
    assert enc.name == "enformer" and enc.pooling == "mean_tss_bins:1"
    assert dta.models.EnformerEncoder is EnformerEncoder


def test_official_geometry():
    """Official architecture: 196,608 bp, TSS half a bin upstream of the window centre -> output bin 448 of 896."""
    model = Enformer.from_hparams(dim=48, depth=1, heads=2, dim_divisible_by=8, output_heads={"human": 1})
    enc = EnformerEncoder(model)  # official target_length=896, num_downsamples=7
    assert enc.window == 196_608
    assert enc.center_shift == -64
    assert enc.tss_index == 98_304 + 64
    first, last = enc.tss_bins
    assert first == last == 768
    assert enc.tss_index // 128 == 768 and enc.tss_index % 128 == 64  # the middle of the pooled bin
    assert 768 - 320 == 896 // 2  # after Enformer's crop of 320 bins on each side


@pytest.mark.parametrize(("window_bins", "n_bins"), [(14, 1), (14, 3), (14, 2), (15, 1), (32, 4), (15, 2)])
def test_pooled_embedding_matches_full_model(model, window_bins, n_bins):
    window = window_bins * BIN
    enc = EnformerEncoder(model, window=window, n_bins=n_bins)
    seqs = random_seqs(3, window, seed=window_bins + n_bins)
    got = enc.embed(seqs, batch_size=2)
    assert got.dtype == np.float32 and got.shape == (3, 96)

    # independent: the TSS sits at window index window // 2 - center_shift; the pooled bins are centred on it
    tss = window // 2 - enc.center_shift
    if n_bins % 2:
        assert tss % BIN == BIN // 2  # middle of a bin
        centre_bin = tss // BIN
        bins = range(centre_bin - n_bins // 2, centre_bin + n_bins // 2 + 1)
    else:
        assert tss % BIN == 0  # on a bin boundary
        bins = range(tss // BIN - n_bins // 2, tss // BIN + n_bins // 2)
    assert abs(enc.center_shift) <= BIN // 2
    full = full_trunk(model, seqs)
    start = crop_start(model, window_bins)
    expected = full[:, [b - start for b in bins]].mean(axis=1)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_batching_and_case_insensitive(model):
    enc = EnformerEncoder(model)
    seqs = random_seqs(5, enc.window, seed=3)
    a = enc.embed(seqs, batch_size=1)
    b = enc.embed([s.lower() for s in seqs], batch_size=4)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert enc.embed([]).shape == (0, enc.dim)
    assert not model.training


def test_bf16_autocast_path(model, monkeypatch):
    enc = EnformerEncoder(model)
    seqs = random_seqs(2, enc.window, seed=4)
    ref = enc.embed(seqs)
    monkeypatch.setattr(dta.settings, "dtype", "bfloat16")
    low = enc.embed(seqs)
    assert low.dtype == np.float32
    assert "bfloat16" in enc.cache_tag("cpu")
    np.testing.assert_allclose(low, ref, atol=0.15 * np.abs(ref).max())
    assert np.abs(low - ref).max() > 0  # really computed in lower precision


def test_bad_inputs(model):
    with pytest.raises(ValueError, match="multiple of the bin size 8"):
        EnformerEncoder(model, window=100)
    with pytest.raises(ValueError, match="n_bins"):
        EnformerEncoder(model, window=4 * BIN, n_bins=5)
    with pytest.raises(ValueError, match="n_bins"):
        EnformerEncoder(model, n_bins=0)
    with pytest.raises(TypeError, match="Enformer"):
        EnformerEncoder(torch.nn.Linear(2, 2))
    enc = EnformerEncoder(model)
    with pytest.raises(ValueError, match=r"sequences\[1\] has length 5"):
        enc.embed(["A" * enc.window, "ACGTA"])
    with pytest.raises(ValueError, match="batch_size"):
        enc.embed(["A" * enc.window], batch_size=0)
    assert EnformerEncoder(small_enformer(target_length=-1), window=64).window == 64


def test_uncropped_enformer_without_window():
    """target_length=-1 has no native length: the encoder is built, and the window is asked for at embed time."""
    model = small_enformer(target_length=-1)
    enc = EnformerEncoder(model)
    assert enc.window is None and enc.dim == 96
    assert "window=None" in repr(enc)
    with pytest.raises(ValueError, match=r"target_length=-1.*embed_dna\(window=\.\.\.\)"):
        enc.embed(["A" * 64])
    with pytest.raises(ValueError, match=r"embed_dna\(window=\.\.\.\)"):
        enc.center_shift  # noqa: B018
    sized = enc.with_window(16 * BIN)
    assert sized.window == 16 * BIN and sized.model is model and sized.center_shift == -BIN // 2
    seqs = random_seqs(3, 16 * BIN, seed=4)
    # reference: enformer-pytorch's own (uncropped) trunk, the bin holding the TSS
    np.testing.assert_allclose(sized.embed(seqs), full_trunk(model, seqs)[:, 8], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="multiple of the bin size 8"):
        enc.with_window(100)


def test_weights_id(model):
    a = EnformerEncoder(model).weights_id
    assert a.startswith("sha256:") and a == EnformerEncoder(model).weights_id
    assert EnformerEncoder(small_enformer(seed=1)).weights_id != a
    assert EnformerEncoder(model, weights_id="mine@v1").weights_id == "mine@v1"
    assert EnformerEncoder(model).with_window(4 * BIN).weights_id == a


def test_tf_gamma_native_and_fallback(caplog):
    # dim // heads = 192 -> 32 gamma features, 1536 trunk bins at the native window: the TensorFlow gammas apply
    model = small_enformer(dim=192, heads=1, target_length=896, use_tf_gamma=True)
    native = EnformerEncoder(model)
    assert native.window == 1536 * BIN and native.use_tf_gamma
    seqs = random_seqs(1, native.window, seed=5, alphabet="ACGT")
    np.testing.assert_allclose(
        native.embed(seqs), full_trunk(model, seqs)[:, 896 // 2], rtol=1e-4, atol=1e-5
    )  # full model uses the TF gammas too

    with caplog.at_level(logging.WARNING, logger="sc_dta.models.dna"):
        other = EnformerEncoder(model, window=1024 * BIN)
    assert not other.use_tf_gamma and "use_tf_gamma=False" in caplog.text
    seqs = random_seqs(1, other.window, seed=6, alphabet="ACGT")
    got = other.embed(seqs)
    attn = [m for m in model.modules() if hasattr(m, "use_tf_gamma") and not isinstance(m, Enformer)]
    assert attn and all(m.use_tf_gamma for m in attn)  # left as it was
    for m in attn:
        m.use_tf_gamma = False
    try:
        expected = full_trunk(model, seqs)  # 1024 trunk bins, cropped to the central 896
    finally:
        for m in attn:
            m.use_tf_gamma = True
    np.testing.assert_allclose(got, expected[:, 512 - 64], rtol=1e-4, atol=1e-5)
    assert native.cache_tag("cpu") != other.cache_tag("cpu")


def test_from_pretrained_local_directory(model, tmp_path):
    model.save_pretrained(tmp_path / "enformer", safe_serialization=False)  # like the official repo
    files = sorted((tmp_path / "enformer").glob("*.safetensors")) or sorted((tmp_path / "enformer").glob("*.bin"))
    h = hashlib.sha256()
    for f in files:
        h.update(f.read_bytes())
    enc = EnformerEncoder.from_pretrained(tmp_path / "enformer", n_bins=3)
    assert enc.weights_id == "sha256:" + h.hexdigest()
    assert enc.n_bins == 3 and not enc.use_tf_gamma
    ref = EnformerEncoder(model, n_bins=3)
    seqs = random_seqs(2, ref.window, seed=7)
    np.testing.assert_allclose(enc.embed(seqs), ref.embed(seqs), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="is a file"):
        EnformerEncoder.from_pretrained(files[0])


def naive_kmer_spectrum(seq: str, k: int, canonical: bool) -> dict[str, float]:
    comp = {"A": "T", "C": "G", "G": "C", "T": "A"}
    counts: dict[str, int] = {}
    seq = seq.upper()
    for i in range(len(seq) - k + 1):
        kmer = seq[i : i + k]
        if any(b not in "ACGT" for b in kmer):
            continue
        if canonical:
            rc = "".join(comp[b] for b in reversed(kmer))
            kmer = min(kmer, rc)
        counts[kmer] = counts.get(kmer, 0) + 1
    total = sum(counts.values())
    return {kmer: c / total for kmer, c in counts.items()} if total else {}


@pytest.mark.parametrize(("k", "canonical"), [(1, False), (3, False), (3, True), (4, True)])
def test_kmer_matches_naive_counting(k, canonical):
    enc = KmerEncoder(k, window=300, canonical=canonical)
    all_kmers = ["".join(p) for p in itertools.product("ACGT", repeat=k)]
    if canonical:
        comp = str.maketrans("ACGT", "TGCA")
        all_kmers = sorted({min(x, x.translate(comp)[::-1]) for x in all_kmers})
    assert enc.kmers == all_kmers and enc.dim == len(all_kmers)
    seqs = random_seqs(4, 300, seed=k) + ["ACGTN" * 3, "N" * 10, "acgtAC", "A"]
    got = enc.embed(seqs)
    assert got.dtype == np.float32 and got.shape == (len(seqs), enc.dim)
    for row, seq in zip(got, seqs, strict=True):
        expected = naive_kmer_spectrum(seq, k, canonical)
        np.testing.assert_allclose(row, [expected.get(x, 0.0) for x in all_kmers], atol=1e-7)
    assert got[5].sum() == 0  # all N
    np.testing.assert_allclose(got[:4].sum(1), 1, rtol=1e-6)


def test_kmer_attributes_and_errors():
    enc = KmerEncoder(4, window=2000)
    assert (enc.name, enc.weights_id, enc.center_shift, enc.pooling) == ("kmer4", "kmer4-w2000", 0, "spectrum")
    assert enc.with_window(500).weights_id == "kmer4-w500"
    assert KmerEncoder(2, canonical=True).name == "kmer2c"
    with pytest.raises(ValueError, match="k must be"):
        KmerEncoder(0)
    with pytest.raises(ValueError, match="window"):
        KmerEncoder(4, window=2)
    with pytest.raises(TypeError, match=r"sequences\[0\]"):
        enc.embed([b"ACGT"])
    # strand symmetry of the canonical spectrum
    comp = str.maketrans("ACGT", "TGCA")
    seq = random_seqs(1, 200, seed=9, alphabet="ACGT")[0]
    canon = KmerEncoder(3, window=200, canonical=True)
    np.testing.assert_allclose(canon.embed([seq]), canon.embed([seq.translate(comp)[::-1]]), atol=1e-7)


def test_from_pretrained_default_repo_offline_from_hf_cache(model, tmp_path, monkeypatch, caplog):
    """The default repository resolves through sc_dta.datasets.hf_snapshot at the pinned revision, offline."""
    import huggingface_hub.constants

    from sc_dta.datasets import registry

    revision = registry()["enformer"]["revision"]
    snapshot = tmp_path / "models--EleutherAI--enformer-official-rough" / "snapshots" / revision
    model.save_pretrained(snapshot, safe_serialization=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="sc_dta.models.dna"):
        enc = EnformerEncoder.from_pretrained()
    assert enc.weights_id == f"EleutherAI/enformer-official-rough@{revision}"
    # official weights use the TensorFlow gammas; this small model's 14-bin window cannot, so the encoder falls back
    assert all(m.use_tf_gamma for m in enc.model.modules() if type(m).__name__ == "Attention")
    assert not enc.use_tf_gamma and "use_tf_gamma=False" in caplog.text
    seqs = random_seqs(2, enc.window, seed=8)
    np.testing.assert_allclose(enc.embed(seqs), EnformerEncoder(model).embed(seqs), rtol=1e-5, atol=1e-6)
