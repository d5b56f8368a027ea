from __future__ import annotations

import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
from enformer_pytorch import Enformer

import sc_dta as dta
from sc_dta.genome import Genome
from sc_dta.models.dna import EnformerEncoder, KmerEncoder
from sc_dta.tl._dna_cache import DNAEmbeddingCache, embed_windows, sequence_key, tss_window

sys.path.insert(0, str(Path(__file__).parent))
from _genome_data import expected_window, make_test_adata, revcomp, write_test_genome

WINDOW = 32 * 8  # 32 trunk bins of 8 bp: windows reach past both chromosome ends for FIRRM and SCYL3


def small_enformer(seed: int = 0) -> Enformer:
    torch.manual_seed(seed)
    model = Enformer.from_hparams(
        dim=48, depth=1, heads=2, target_length=8, num_downsamples=3, dim_divisible_by=8, output_heads={"human": 4}
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "to_out" in name:  # zero-initialised by enformer-pytorch; make attention matter
                p.normal_(0, 0.2)
    return model.eval()


class WindowCounter:
    """Counts the windows that go through the model's stem (a forward hook: observation, nothing replaced)."""

    def __init__(self, model: Enformer) -> None:
        self.n = 0
        self.handle = model.stem.register_forward_hook(self)

    def __call__(self, module, args, output) -> None:
        self.n += args[0].shape[0]


@pytest.fixture(scope="module")
def genome_files(tmp_path_factory):
    return write_test_genome(tmp_path_factory.mktemp("genome"))


@pytest.fixture(scope="module")
def model() -> Enformer:
    return small_enformer()


@pytest.fixture
def encoder(model) -> EnformerEncoder:
    return EnformerEncoder(model, window=WINDOW, n_bins=1)


def tss_adata(expected: dict) -> ad.AnnData:
    """Test AnnData with the TSS columns filled from the hand-computed table (not via annotate_tss)."""
    adata = make_test_adata(expected, n_obs=5)
    genes = expected["genes"]
    adata.var["tss_chrom"] = pd.Series(
        [genes[g]["chrom"] if g in genes else None for g in adata.var_names], dtype=object
    ).values
    adata.var["tss_pos"] = pd.array([genes[g]["tss"] if g in genes else None for g in adata.var_names], dtype="Int64")
    adata.var["tss_strand"] = [genes[g]["strand"] if g in genes else None for g in adata.var_names]
    return adata


def window_by_hand(sequences: dict[str, str], chrom: str, tss: int, strand: str, length: int, tss_index: int) -> str:
    """Transcription-oriented window with the TSS at ``tss_index``, by plain slicing + reverse complement."""
    seq = sequences[chrom]

    def padded(start: int, end: int) -> str:
        left = "N" * max(0, -start)
        right = "N" * max(0, end - len(seq))
        return left + seq[max(start, 0) : min(end, len(seq))] + right

    if strand == "+":
        return padded(tss - tss_index, tss - tss_index + length)
    # oriented index i holds the complement of genomic base tss - (i - tss_index)
    return revcomp(padded(tss + tss_index - length + 1, tss + tss_index + 1))


def snapshot(adata: ad.AnnData) -> tuple:
    return (adata.var.copy(), sorted(adata.varm.keys()), sorted(adata.uns.keys()), adata.X.copy())


def assert_unchanged(adata: ad.AnnData, before: tuple) -> None:
    var, varm, uns, x = before
    pd.testing.assert_frame_equal(adata.var, var)
    assert sorted(adata.varm.keys()) == varm and sorted(adata.uns.keys()) == uns
    assert (adata.X != x).nnz == 0


def test_windows_by_hand(genome_files, encoder):
    fasta, _, expected = genome_files
    genome = Genome(fasta)
    seqs = expected["sequences"]
    assert encoder.center_shift == -4
    tss_index = WINDOW // 2 - encoder.center_shift
    for g in expected["genes"].values():
        w = tss_window(genome, g["chrom"], g["tss"], g["strand"], encoder)
        assert w == window_by_hand(seqs, g["chrom"], g["tss"], g["strand"], WINDOW, tss_index)
        center = g["tss"] + encoder.center_shift if g["strand"] == "+" else g["tss"] - encoder.center_shift
        assert w == expected_window(seqs, g["chrom"], center, WINDOW, g["strand"])
        # the first transcribed base sits at the TSS index on both strands
        base = seqs[g["chrom"]][g["tss"]]
        assert w[tss_index] == (base if g["strand"] == "+" else revcomp(base))
    firrm = expected["genes"]["ENSG00000000460"]  # TSS 40 on chr2 +: the window starts before the chromosome
    assert tss_window(genome, "chr2", firrm["tss"], "+", encoder).startswith("N" * (tss_index - 40))


def test_tss_window_with_snv(genome_files, encoder):
    fasta, _, expected = genome_files
    genome = Genome(fasta)
    seqs = expected["sequences"]
    tss_index = WINDOW // 2 - encoder.center_shift
    for gid in ("ENSG00000000419", "ENSG00000000003"):  # + and - strand
        g = expected["genes"][gid]
        ref_base = seqs[g["chrom"]][g["tss"]]
        alt = "A" if ref_base != "A" else "C"
        variant = f"{g['chrom']}:{g['tss'] + 1}:{ref_base}>{alt}"
        ref = tss_window(genome, g["chrom"], g["tss"], g["strand"], encoder)
        mut = tss_window(genome, g["chrom"], g["tss"], g["strand"], encoder, mutations=[variant])
        oriented_alt = alt if g["strand"] == "+" else revcomp(alt)
        assert mut == ref[:tss_index] + oriented_alt + ref[tss_index + 1 :]


def test_tss_window_with_tss_deletion(genome_files, encoder):
    """TSS-relative specs refer to the real TSS, not to the shifted window centre; the TSS index is kept."""
    fasta, _, expected = genome_files
    genome = Genome(fasta)
    tss_index = WINDOW // 2 - encoder.center_shift
    for gid in ("ENSG00000000419", "ENSG00000000003"):  # + and - strand
        g = expected["genes"][gid]
        big, t = WINDOW + 200, (WINDOW + 200) // 2
        oriented = window_by_hand(expected["sequences"], g["chrom"], g["tss"], g["strand"], big, t)
        deleted = oriented[: t - 10] + oriented[t + 11 :]  # oriented bases -10..+10 removed (21 bp)
        start = (t - 10) - tss_index  # the base after the deletion (old +11) takes the TSS index
        mut = tss_window(genome, g["chrom"], g["tss"], g["strand"], encoder, mutations=["delete:-10:+10"])
        assert mut == deleted[start : start + WINDOW]
        # a single spec string or mutation object is one mutation, not a sequence of characters
        assert tss_window(genome, g["chrom"], g["tss"], g["strand"], encoder, mutations="delete:-10:+10") == mut
        one = dta.genome.parse_mutation("delete:-10:+10")
        assert tss_window(genome, g["chrom"], g["tss"], g["strand"], encoder, mutations=one) == mut


def test_unwritable_cache_does_not_lose_work(tmp_path, caplog):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    dta.settings.cache_dir = not_a_dir
    enc = KmerEncoder(2, 40)
    seqs = ["ACGT" * 10, "GGCC" * 10]
    with caplog.at_level("WARNING", logger="sc_dta.tl._dna_cache"):
        got = embed_windows(seqs, enc)
    np.testing.assert_array_equal(got, enc.embed(seqs))
    assert "not writable" in caplog.text


def test_embed_dna_rows_match_encoder(genome_files, encoder):
    fasta, _, expected = genome_files
    adata = tss_adata(expected)
    dta.tl.embed_dna(adata, genome=fasta, encoder=encoder, batch_size=2)
    emb = adata.varm["dna_emb"]
    assert emb.dtype == np.float32 and emb.shape == (adata.n_vars, encoder.dim)

    tss_index = WINDOW // 2 - encoder.center_shift
    ids = expected["gene_ids"]
    windows = [
        window_by_hand(expected["sequences"], g["chrom"], g["tss"], g["strand"], WINDOW, tss_index)
        for g in (expected["genes"][i] for i in ids)
    ]
    fresh = EnformerEncoder(small_enformer(), window=WINDOW).embed(windows, batch_size=3)
    np.testing.assert_allclose(emb[[adata.var_names.get_loc(i) for i in ids]], fresh, rtol=1e-5, atol=1e-6)
    assert np.isnan(emb[adata.var_names.get_loc("ENSG00000999999")]).all()
    assert np.isfinite(emb[: len(ids)]).all()

    params = adata.uns["dna_emb"]["params"]
    assert params["encoder"] == "enformer" and params["weights_id"] == encoder.weights_id
    assert params["genome"] == "genome" and params["window"] == WINDOW and params["center_shift"] == -4
    assert params["pooling"] == "mean_tss_bins:1" and params["n_bins"] == 1 and params["n_genes_embedded"] == 6
    assert "date" in params and "precision=float32" in params["encoder_tag"]


def test_uncropped_enformer_window_from_embed_dna(genome_files):
    """An Enformer built with target_length=-1 has no native window: embed_dna(window=...) supplies it."""
    fasta, _, expected = genome_files
    torch.manual_seed(3)
    model = Enformer.from_hparams(
        dim=48, depth=1, heads=2, target_length=-1, num_downsamples=3, dim_divisible_by=8, output_heads={"human": 4}
    ).eval()
    encoder = EnformerEncoder(model)
    adata = tss_adata(expected)
    before = snapshot(adata)
    with pytest.raises(ValueError, match=r"no window of its own.*embed_dna\(window=\.\.\.\)"):
        dta.tl.embed_dna(adata, genome=fasta, encoder=encoder)
    assert_unchanged(adata, before)

    dta.tl.embed_dna(adata, genome=fasta, encoder=encoder, window=WINDOW)
    assert adata.uns["dna_emb"]["params"]["window"] == WINDOW
    assert adata.uns["dna_emb"]["params"]["center_shift"] == -4
    # reference: enformer-pytorch's full uncropped trunk on hand-cut windows, the TSS bin (32 bins -> bin 16)
    tss_index = WINDOW // 2 + 4
    ids = expected["gene_ids"]
    windows = [
        window_by_hand(expected["sequences"], g["chrom"], g["tss"], g["strand"], WINDOW, tss_index)
        for g in (expected["genes"][i] for i in ids)
    ]
    table = {"A": [1, 0, 0, 0], "C": [0, 1, 0, 0], "G": [0, 0, 1, 0], "T": [0, 0, 0, 1]}
    x = torch.tensor([[table.get(b.upper(), [0] * 4) for b in w] for w in windows], dtype=torch.float32)
    with torch.no_grad():
        ref = model(x, return_only_embeddings=True)[:, 16].numpy()
    got = adata.varm["dna_emb"][[adata.var_names.get_loc(i) for i in ids]]
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    assert encoder.window is None  # the caller's encoder is not modified


def test_genes_subset_kmer_window_override_and_h5ad(genome_files, tmp_path):
    fasta, _, expected = genome_files
    adata = tss_adata(expected)
    subset = ["ENSG00000000003", "ENSG00000000457"]  # both minus strand, one at the chromosome end
    kmer = KmerEncoder(3, window=1000)
    dta.tl.embed_dna(adata, genome=Genome(fasta, name="test"), encoder=kmer, window=300, genes=subset, key_added="k")
    emb = adata.varm["k"]
    assert emb.shape == (adata.n_vars, 64)
    selected = adata.var_names.isin(subset)
    assert np.isnan(emb[~selected]).all() and np.isfinite(emb[selected]).all()
    for gid in subset:
        g = expected["genes"][gid]
        w = window_by_hand(expected["sequences"], g["chrom"], g["tss"], g["strand"], 300, 150)
        np.testing.assert_array_equal(emb[adata.var_names.get_loc(gid)], KmerEncoder(3, window=300).embed([w])[0])
    params = adata.uns["k"]["params"]
    assert (params["encoder"], params["window"], params["weights_id"], params["genome"]) == (
        "kmer3",
        300,
        "kmer3-w300",
        "test",
    )

    path = tmp_path / "a.h5ad"
    adata.write_h5ad(path)
    back = ad.read_h5ad(path)
    np.testing.assert_array_equal(back.varm["k"], emb)  # NaN rows compare equal
    assert back.varm["k"].dtype == np.float32
    assert dict(back.uns["k"]["params"]) == params
    pd.testing.assert_frame_equal(back.var[["tss_chrom", "tss_strand"]], adata.var[["tss_chrom", "tss_strand"]])


def test_cache_hits_skip_the_model(genome_files, model):
    fasta, _, expected = genome_files
    counter = WindowCounter(model)
    try:
        encoder = EnformerEncoder(model, window=WINDOW)
        first = tss_adata(expected)
        dta.tl.embed_dna(first, genome=fasta, encoder=encoder)
        assert counter.n == 6
        cache = DNAEmbeddingCache(encoder)
        assert len(cache) == 6 and (cache.directory / "meta.json").is_file()
        assert cache.directory.is_relative_to(dta.settings.cache_dir / "dna_embeddings")

        again = tss_adata(expected)
        dta.tl.embed_dna(again, genome=fasta, encoder=EnformerEncoder(model, window=WINDOW))  # new instance
        assert counter.n == 6  # everything came from the cache
        np.testing.assert_array_equal(again.varm["dna_emb"], first.varm["dna_emb"])

        dta.tl.embed_dna(again, genome=fasta, encoder=encoder, cache=False)
        assert counter.n == 12
        dta.tl.embed_dna(again, genome=fasta, encoder=EnformerEncoder(model, window=WINDOW, n_bins=3))
        assert counter.n == 18  # other pooling: another cache
    finally:
        counter.handle.remove()


def test_embed_windows_dedupes_and_recovers_from_bad_entries(model):
    encoder = EnformerEncoder(model, window=WINDOW)
    rng = np.random.default_rng(1)
    a, b = ("".join(rng.choice(list("ACGT"), WINDOW)) for _ in range(2))
    counter = WindowCounter(model)
    try:
        out = embed_windows([a, b, a, a.lower()], encoder, batch_size=1)
        assert counter.n == 2
        np.testing.assert_array_equal(out[0], out[2])
        np.testing.assert_array_equal(out[0], out[3])
        np.testing.assert_allclose(out[:2], encoder.embed([a, b]), rtol=1e-5, atol=1e-6)
        assert counter.n == 4
        cache = DNAEmbeddingCache(encoder)
        assert sequence_key(a) in cache and cache.path(sequence_key(a)).parent.name == sequence_key(a)[:2]
        cache.path(sequence_key(b)).write_bytes(b"not an npy file")  # a damaged entry is recomputed
        again = embed_windows([a, b], encoder)
        assert counter.n == 5  # only b again
        np.testing.assert_array_equal(again, out[:2])
        assert not list(cache.directory.glob("*/*.tmp"))
    finally:
        counter.handle.remove()


def test_split_gzip_fasta_and_mudata(genome_files, tmp_path):
    import mudata as md

    _, _, expected = genome_files
    split, _, _ = write_test_genome(tmp_path, fasta_format="split")
    kmer = KmerEncoder(2, window=200)
    plain = tss_adata(expected)
    dta.tl.embed_dna(plain, genome=genome_files[0], encoder=kmer)
    mdata = md.MuData({"rna": tss_adata(expected)})
    out = dta.tl.embed_dna(mdata, genome=split, encoder=kmer, copy=True)
    assert "dna_emb" not in mdata["rna"].varm
    np.testing.assert_array_equal(out["rna"].varm["dna_emb"], plain.varm["dna_emb"])


def test_errors_leave_adata_unchanged(genome_files, encoder):
    fasta, _, expected = genome_files
    adata = tss_adata(expected)
    before = snapshot(adata)

    with pytest.raises(KeyError, match="ENSG_NOPE"):
        dta.tl.embed_dna(adata, genome=fasta, encoder=encoder, genes=["ENSG00000000003", "ENSG_NOPE"])
    assert_unchanged(adata, before)

    bad = adata.copy()
    bad.var["tss_chrom"] = bad.var["tss_chrom"].replace({"chr2": "chr9"})
    bad_before = snapshot(bad)
    with pytest.raises(KeyError, match="chr9"):
        dta.tl.embed_dna(bad, genome=fasta, encoder=encoder)
    assert_unchanged(bad, bad_before)
    # genes= restricted to genes on existing chromosomes works
    dta.tl.embed_dna(bad, genome=fasta, encoder=encoder, genes=["ENSG00000000419"])
    assert np.isfinite(bad.varm["dna_emb"][0]).all()

    far = adata.copy()
    far.var.loc["ENSG00000000419", "tss_pos"] = 50_000
    far_before = snapshot(far)
    with pytest.raises(ValueError, match="ENSG00000000419.*outside chr1"):
        dta.tl.embed_dna(far, genome=fasta, encoder=encoder)
    assert_unchanged(far, far_before)

    no_tss = make_test_adata(expected, n_obs=5)
    no_before = snapshot(no_tss)
    with pytest.raises(KeyError, match="annotate_tss"):
        dta.tl.embed_dna(no_tss, genome=fasta, encoder=encoder)
    assert_unchanged(no_tss, no_before)

    with pytest.raises(ValueError, match="window=100"):
        dta.tl.embed_dna(adata, genome=fasta, encoder=encoder, window=100)

    class FixedWindow:  # a complete DNAEncoder without with_window
        name, weights_id, window, dim, center_shift, pooling = "fixed", "fixed-1", 50, 4, 0, "spectrum"

        def embed(self, sequences, *, batch_size=None, device=None):
            return KmerEncoder(1, window=50).embed(sequences)

    with pytest.raises(ValueError, match="fixed window of 50"):
        dta.tl.embed_dna(adata, genome=fasta, encoder=FixedWindow(), window=60)
    dta.tl.embed_dna(adata, genome=fasta, encoder=FixedWindow(), key_added="fixed")
    assert adata.varm["fixed"].shape == (adata.n_vars, 4)

    with pytest.raises(TypeError, match="DNAEncoder"):
        dta.tl.embed_dna(adata, genome=fasta, encoder="enformer")
    with pytest.raises(FileNotFoundError):
        dta.tl.embed_dna(adata, genome="/nonexistent/genome.fa", encoder=encoder)


def test_cache_concurrent_writers_and_readers():
    """Writers rename complete files into place: a reader sees nothing or the whole entry, never a partial one."""
    import threading

    kmer = KmerEncoder(5, window=100)  # 1,024-d entries
    cache = DNAEmbeddingCache(kmer)
    key = sequence_key("ACGT" * 25)
    value = np.random.default_rng(0).random(kmer.dim).astype(np.float32)
    seen = []
    cache.put(key, value)  # readers always find an entry, while writers keep replacing it

    def write() -> None:
        for _ in range(20):
            cache.put(key, value)

    def read() -> None:
        for _ in range(200):
            got = cache.get(key)
            seen.append(got is not None and bool(np.array_equal(got, value)))

    threads = [threading.Thread(target=write) for _ in range(4)] + [threading.Thread(target=read) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(seen) == 800 and all(seen)
    assert np.array_equal(cache.get(key), value)
    assert not list(cache.directory.glob("*/*.tmp")) and len(cache) == 1


def test_end_to_end_with_annotate_tss(genome_files):
    fasta, gtf, expected = genome_files
    adata = make_test_adata(expected, n_obs=5)
    dta.pp.annotate_tss(adata, gtf)
    kmer = KmerEncoder(2, window=200)
    dta.tl.embed_dna(adata, genome=fasta, encoder=kmer)
    by_hand = tss_adata(expected)
    dta.tl.embed_dna(by_hand, genome=fasta, encoder=kmer)
    np.testing.assert_array_equal(adata.varm["dna_emb"], by_hand.varm["dna_emb"])
