"""MotifEncoder: JASPAR motifs (real pyjaspar data), scores against a brute-force scorer, sites, errors."""

from __future__ import annotations

import math
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

import sc_dta as dta
from sc_dta.models.dna import DNAEncoder
from sc_dta.models.motif import Motif, MotifEncoder, load_jaspar, log_odds

sys.path.insert(0, str(Path(__file__).parent))
from _genome_data import expected_window, make_test_adata, revcomp, write_test_genome

GATA4 = "MA0482.3"  # JASPAR2024 CORE vertebrates; consensus CCTTATCT (reverse strand: AGATAAGG)
BASES = "ACGT"

# custom count matrices: 4 x L, L x 4 and a mapping (with zero counts, so the pseudocount matters)
CUSTOM = {
    "m6": [[9, 0, 1, 2, 0, 5], [0, 7, 1, 6, 1, 2], [1, 2, 8, 1, 0, 2], [0, 1, 0, 1, 9, 1]],
    "m5": [[0, 10, 0, 0], [2, 2, 6, 0], [10, 0, 0, 0], [0, 0, 1, 9], [3, 3, 3, 1]],
    "m3": {"A": [1, 0, 4], "C": [4, 0, 0], "G": [0, 4, 0], "T": [0, 1, 1]},
}


# ---------------------------------------------------------------------------------------------------------------
# independent pure-Python reference
# ---------------------------------------------------------------------------------------------------------------


def brute_pwm(counts_rows, pseudocount=0.8, bg=(0.25, 0.25, 0.25, 0.25)):
    """Log-odds (bits) by the formula, as lists: pwm[base][position]."""
    length = len(counts_rows[0])
    pwm = [[0.0] * length for _ in range(4)]
    for j in range(length):
        total = sum(counts_rows[b][j] for b in range(4))
        for b in range(4):
            p = (counts_rows[b][j] + 4 * pseudocount * bg[b]) / (total + 4 * pseudocount)
            pwm[b][j] = math.log2(p / bg[b])
    return pwm


def rows_of(value):
    if isinstance(value, dict):
        return [list(value[b]) for b in BASES]
    arr = np.asarray(value, dtype=float)
    return (arr if arr.shape[0] == 4 else arr.T).tolist()


def brute_scores(seq, pwm):
    """Every (start, strand, score): the reverse strand scores the reverse complement of the same bases."""
    length = len(pwm[0])
    out = []
    for p in range(len(seq) - length + 1):
        for strand, sub in (("+", seq[p : p + length].upper()), ("-", revcomp(seq[p : p + length].upper()))):
            score = sum(pwm[BASES.index(c)][j] for j, c in enumerate(sub) if c in BASES)  # N adds 0
            out.append((p, strand, score))
    return out


def brute_features(seq, pwm):
    best = sum(max(pwm[b][j] for b in range(4)) for j in range(len(pwm[0])))
    scores = [s for _, _, s in brute_scores(seq, pwm)]
    mx = min(max(max(scores) / best, 0.0), 1.0)
    occ = math.log1p(sum(2.0 ** (s - best) for s in scores))
    return mx, occ, best


def random_seq(rng, n):
    return "".join(rng.choice(list(BASES), n))


def plant(seq, pos, site):
    return seq[:pos] + site + seq[pos + len(site) :]


@pytest.fixture(scope="module")
def core():
    return MotifEncoder(window=1000)


@pytest.fixture(scope="module")
def gata():
    return MotifEncoder([GATA4, "TBX5"], window=300)


def background_without(enc, rng, n, motif, thr=0.85):
    """A random sequence with no site of ``motif`` at relative score >= thr."""
    for _ in range(200):
        seq = random_seq(rng, n)
        if enc.hits(seq, min_relative_score=thr, motifs=[motif]).empty:
            return seq
    raise AssertionError("no background found")


# ---------------------------------------------------------------------------------------------------------------
# JASPAR
# ---------------------------------------------------------------------------------------------------------------


def test_jaspar_core_vertebrates(core):
    motifs = load_jaspar()
    assert len(motifs) > 500
    ids = [m.id for m in motifs]
    assert len(set(ids)) == len(ids) and ids == sorted(ids)
    by_id = {m.id: m for m in motifs}
    assert by_id[GATA4].name == "GATA4" and by_id[GATA4].consensus == "CCTTATCT"
    assert all(m.counts.shape == (4, m.length) and (m.counts >= 0).all() for m in motifs)
    assert not by_id[GATA4].counts.flags.writeable
    assert load_jaspar()[0] is motifs[0]  # cached in-process

    assert isinstance(core, DNAEncoder) and dta.models.MotifEncoder is MotifEncoder
    assert core.n_motifs == len(motifs) and core.motif_ids == ids
    assert core.name == "jaspar2024-core-vertebrates" and core.pooling == "max+occupancy"
    assert core.dim == 2 * len(motifs) == len(core.feature_names)
    i = core.feature_index("GATA4", "occupancy")
    assert core.feature_names[i] == f"{GATA4} GATA4 occupancy" and core.feature_names[i - 1] == f"{GATA4} GATA4 max"
    assert core.feature_index("MA0482", "max") == i - 1  # id without version
    assert core.center_shift == 0 and core.window == 1000
    assert "n_motifs=" in repr(core) and "jaspar2024-core-vertebrates" in repr(core)
    other = load_jaspar("JASPAR2024", collection="CORE", tax_group="insects")
    assert 0 < len(other) < len(motifs) and not {m.id for m in other} & set(ids)


def test_pwm_matches_biopython():
    """Log-odds equal Biopython's normalize(pseudocounts).log_odds(background) for a JASPAR record."""
    from pyjaspar import jaspardb

    record = jaspardb(release="JASPAR2024").fetch_motif_by_id(GATA4)
    for bg in (None, {"A": 0.3, "C": 0.2, "G": 0.2, "T": 0.3}):
        enc = MotifEncoder([GATA4], window=50, background=bg)
        uniform = bg is None
        pseudo = 0.8 if uniform else {b: 4 * 0.8 * bg[b] for b in BASES}
        lo = record.counts.normalize(pseudocounts=pseudo).log_odds(background=None if uniform else bg)
        expected = np.array([lo[b] for b in BASES])
        np.testing.assert_allclose(enc.pwms[0], expected, rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(enc.best_scores[0], expected.max(axis=0).sum())


# ---------------------------------------------------------------------------------------------------------------
# scores
# ---------------------------------------------------------------------------------------------------------------


def test_features_match_brute_force():
    rng = np.random.default_rng(0)
    enc = MotifEncoder(CUSTOM, window=30)
    assert enc.name == "motif-custom" and enc.motif_ids == ["m6", "m5", "m3"]
    assert enc.feature_names[:2] == ["m6 max", "m6 occupancy"]
    seqs = [random_seq(rng, 30) for _ in range(4)]
    seqs.append("N" * 5 + seqs[0][5:20].lower() + "NNRYN" + seqs[1][:5])  # N, lower case, IUPAC codes
    seqs.append("ACGTA" + "TTTTTGGGGGCCCCCAAAAA" + "ACGTT")
    got = enc.embed(seqs, batch_size=2)
    assert got.dtype == np.float32 and got.shape == (len(seqs), 6)
    for k, name in enumerate(CUSTOM):
        pwm = brute_pwm(rows_of(CUSTOM[name]))
        np.testing.assert_allclose(enc.pwms[k], pwm, rtol=1e-12)
        for i, seq in enumerate(seqs):
            mx, occ, _ = brute_features(seq, pwm)
            np.testing.assert_allclose(got[i, 2 * k : 2 * k + 2], [mx, occ], rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(enc.embed(seqs, batch_size=1), got, rtol=1e-6, atol=1e-7)  # batch-independent
    assert enc.embed([]).shape == (0, 6)

    # non-uniform background and another pseudocount, pooling order as given
    bg = (0.3, 0.2, 0.2, 0.3)
    enc2 = MotifEncoder({"m6": CUSTOM["m6"]}, window=30, pooling=("occupancy", "max"), pseudocount=0.25, background=bg)
    pwm = brute_pwm(rows_of(CUSTOM["m6"]), 0.25, bg)
    mx, occ, _ = brute_features(seqs[2], pwm)
    np.testing.assert_allclose(enc2.embed([seqs[2]])[0], [occ, mx], rtol=2e-5)
    assert enc2.feature_names == ["m6 occupancy", "m6 max"] and enc2.pooling == "occupancy+max"
    assert MotifEncoder({"m6": CUSTOM["m6"]}, window=30, pooling="max").dim == 1


def test_planted_site_deletion_and_control(gata):
    rng = np.random.default_rng(1)
    seq = background_without(gata, rng, 300, GATA4)
    mx, occ = gata.feature_index(GATA4, "max"), gata.feature_index(GATA4, "occupancy")
    site = "AGATAAGG"  # GATA4 consensus on the reverse strand
    with_site = plant(seq, 150, site)
    # deletion: the site replaced by random bases that contain no strong GATA4 site (same length)
    deleted = None
    for _ in range(100):
        candidate = plant(with_site, 150, random_seq(rng, len(site)))
        if gata.hits(candidate, motifs=[GATA4]).empty:
            deleted = candidate
            break
    assert deleted is not None
    control = plant(with_site, 40, random_seq(rng, len(site)))  # elsewhere: the site is kept
    base, planted, gone, ctl = gata.embed([seq, with_site, deleted, control])

    assert base[mx] < 0.85 and planted[mx] == pytest.approx(1.0, abs=1e-6)
    assert planted[occ] - base[occ] > math.log1p(1.0) - 0.1  # one more consensus site: about +log(2)
    assert gone[mx] < 0.85 and planted[occ] - gone[occ] > 0.5
    assert ctl[mx] == pytest.approx(1.0, abs=1e-6)
    assert abs(ctl[occ] - planted[occ]) < 0.02 * abs(planted[occ] - gone[occ])
    # the same numbers as the brute-force scorer
    pwm = brute_pwm(gata.motifs[0].counts.tolist())
    for got, s in ((planted, with_site), (gone, deleted)):
        np.testing.assert_allclose(got[[mx, occ]], brute_features(s, pwm)[:2], rtol=2e-5, atol=1e-6)


def test_motif_deletion_moves_the_embedding_more_than_controls(core):
    """All CORE vertebrate motifs: deleting two GATA sites moves the occupancy features more than same-length
    control deletions placed away from every strong site, and the GATA family carries the change."""
    rng = np.random.default_rng(7)
    genome = random_seq(rng, 1200)
    genome = plant(plant(genome, 560, "AGATAAGG"), 585, "CCTTATCT")
    length = 40

    def window(s):
        return s[100:1100]

    covered = np.zeros(len(genome), bool)
    for start, end in core.hits(genome)[["start", "end"]].itertuples(index=False):
        covered[start:end] = True
    free = [a for a in range(150, 1100 - length - 50) if not covered[a - 10 : a + length + 10].any()]
    assert len(free) >= 5
    controls = [genome[:a] + genome[a + length :] for a in rng.choice(free, 5, replace=False)]
    mutant = genome[:555] + genome[555 + length :]  # both GATA sites
    emb = core.embed([window(genome), window(mutant)] + [window(c) for c in controls])
    occ = np.array([core.feature_index(i, "occupancy") for i in core.motif_ids])
    d_mut = np.linalg.norm(emb[1, occ] - emb[0, occ])
    d_ctl = np.linalg.norm(emb[2:, occ] - emb[0, occ], axis=1)
    assert d_mut > 2 * d_ctl.max()
    top = np.argsort(-np.abs(emb[1, occ] - emb[0, occ]))[:8]
    assert sum("GATA" in core.motif_names[i].upper() for i in top) >= 6


def test_strand_symmetry(gata):
    rng = np.random.default_rng(2)
    seq = background_without(gata, rng, 300, GATA4)
    fwd = plant(seq, 100, "CCTTATCT")
    rev = plant(seq, 100, "AGATAAGG")
    i = gata.feature_index(GATA4, "max")
    a, b = gata.embed([fwd, rev])
    assert a[i] == pytest.approx(1.0, abs=1e-6) and b[i] == pytest.approx(1.0, abs=1e-6)
    # both strands are scored, so a window and its reverse complement have the same features
    seqs = [random_seq(rng, 300) for _ in range(3)] + [fwd]
    np.testing.assert_allclose(gata.embed(seqs), gata.embed([revcomp(s) for s in seqs]), rtol=1e-5, atol=1e-6)
    enc = MotifEncoder(CUSTOM, window=40)
    seqs = [random_seq(rng, 40) for _ in range(3)]
    np.testing.assert_allclose(enc.embed(seqs), enc.embed([revcomp(s) for s in seqs]), rtol=1e-5, atol=1e-6)


def test_hits_find_planted_sites(gata):
    rng = np.random.default_rng(3)
    seq = background_without(gata, rng, 300, GATA4)
    seq = plant(plant(seq, 40, "CCTTATCT"), 200, "AGATAAGG")
    hits = gata.hits(seq, motifs=GATA4)
    assert list(hits.columns) == ["motif_id", "name", "start", "end", "strand", "score", "relative_score"]
    strong = hits[hits.relative_score > 0.999]
    assert strong[["start", "end", "strand"]].values.tolist() == [[40, 48, "+"], [200, 208, "-"]]
    assert (strong.motif_id == GATA4).all() and (strong.name == "GATA4").all()
    np.testing.assert_allclose(strong.score, gata.best_scores[0], rtol=1e-6)
    assert hits.start.is_monotonic_increasing

    # every site against the brute-force scorer, at a lower threshold, for both motifs
    for k, motif in enumerate(gata.motifs):
        pwm = brute_pwm(motif.counts.tolist())
        best = brute_features(seq, pwm)[2]
        expected = sorted((p, p + motif.length, st) for p, st, s in brute_scores(seq, pwm) if s / best >= 0.7)
        got = gata.hits(seq, min_relative_score=0.7, motifs=[motif.id])
        assert sorted(got[["start", "end", "strand"]].itertuples(index=False, name=None)) == expected
        assert (got.relative_score >= 0.7 - 1e-6).all() and (got.name == gata.motif_names[k]).all()
    both = gata.hits(seq, min_relative_score=0.7)
    assert set(both.motif_id) <= set(gata.motif_ids) and len(both) >= len(got)
    empty = gata.hits("ACGT")  # shorter than the motifs
    assert empty.empty and list(empty.columns) == list(hits.columns)


def test_weights_id_and_with_window():
    a = MotifEncoder(CUSTOM, window=50)
    assert a.weights_id.startswith("sha256:") and a.weights_id == MotifEncoder(CUSTOM, window=50).weights_id
    assert MotifEncoder(CUSTOM, window=51).weights_id != a.weights_id
    assert MotifEncoder(CUSTOM, window=50, pseudocount=0.5).weights_id != a.weights_id
    assert MotifEncoder(CUSTOM, window=50, pooling="max").weights_id != a.weights_id
    assert MotifEncoder({"m6": CUSTOM["m6"]}, window=50).weights_id != a.weights_id
    b = a.with_window(80)
    assert b.window == 80 and a.window == 50 and b.motifs is a.motifs
    assert b.weights_id == MotifEncoder(CUSTOM, window=80).weights_id
    seq = random_seq(np.random.default_rng(4), 80)
    np.testing.assert_array_equal(b.embed([seq]), MotifEncoder(CUSTOM, window=80).embed([seq]))
    sel = MotifEncoder(["GATA4", "MA0807"], window=100)  # a name and an id without version (TBX5)
    assert sel.name == "jaspar2024-selected" and sel.motif_names == ["GATA4", "TBX5"]
    assert sel.motif_ids[1].startswith("MA0807.")


def test_errors():
    with pytest.raises(ValueError, match=r"'MA9999\.1' is not a matrix id in JASPAR2024"):
        MotifEncoder(["MA9999.1"])
    with pytest.raises(ValueError, match=r"no motif named 'GATA44'.*close matches: \[.*'GATA4'"):
        MotifEncoder(["GATA44"])
    with pytest.raises(ValueError, match=r"motifs\['bad'\]: expected a 4 x L or L x 4 matrix.*shape \(3, 5\)"):
        MotifEncoder({"bad": np.ones((3, 5))})
    with pytest.raises(ValueError, match=r"motifs\['neg'\]: counts must be finite and non-negative"):
        MotifEncoder({"neg": [[1, -1], [1, 1], [1, 1], [1, 1]]})
    with pytest.raises(ValueError, match=r"keys A, C, G, T"):
        MotifEncoder({"m": {"A": [1], "C": [1], "G": [1]}})
    with pytest.raises(ValueError, match="motifs is empty"):
        MotifEncoder([])
    with pytest.raises(ValueError, match="motifs is empty"):
        MotifEncoder({})
    with pytest.raises(ValueError, match=r"selected twice"):
        MotifEncoder(["GATA4", "MA0482.3"])
    with pytest.raises(
        ValueError, match=r"window must be an integer of at least the longest motif's length \(m6, 6 bp\)"
    ):
        MotifEncoder(CUSTOM, window=5)
    with pytest.raises(ValueError, match=r"longest motif"):
        MotifEncoder(CUSTOM, window=50).with_window(3)
    enc = MotifEncoder(CUSTOM, window=20)
    with pytest.raises(ValueError, match=r"sequences\[1\] has length 19, expected 20 bp"):
        enc.embed(["A" * 20, "A" * 19])
    with pytest.raises(TypeError, match=r"sequences\[0\] is a int"):
        enc.embed([5])
    with pytest.raises(ValueError, match="batch_size"):
        enc.embed(["A" * 20], batch_size=0)
    with pytest.raises(ValueError, match=r"pooling: 'mean' is not one of \('max', 'occupancy'\)"):
        MotifEncoder(CUSTOM, window=20, pooling="mean")
    with pytest.raises(ValueError, match="names a feature twice"):
        MotifEncoder(CUSTOM, window=20, pooling=("max", "max"))
    with pytest.raises(ValueError, match=r"release='JASPAR1999' is not a JASPAR release"):
        MotifEncoder(release="JASPAR1999")
    with pytest.raises(ValueError, match=r"tax_group='martians' is not in this JASPAR release"):
        MotifEncoder(tax_group="martians")
    with pytest.raises(ValueError, match=r"collection='NOPE'"):
        load_jaspar(collection="NOPE")
    with pytest.raises(ValueError, match=r"motif m6 has zero counts.*pseudocount=0"):
        MotifEncoder(CUSTOM, window=20, pseudocount=0)
    with pytest.raises(ValueError, match="pseudocount must be a non-negative number"):
        MotifEncoder(CUSTOM, window=20, pseudocount=-1)
    with pytest.raises(ValueError, match="background must be 4 positive probabilities"):
        MotifEncoder(CUSTOM, window=20, background=(0.5, 0.5, 0.1, 0.1))
    with pytest.raises(ValueError, match="uninformative"):
        MotifEncoder({"flat": np.full((4, 3), 5.0)}, window=20)
    with pytest.warns(UserWarning, match="probability matrix"):
        MotifEncoder({"p": np.full((3, 4), 0.25) + np.array([0.3, -0.1, -0.1, -0.1])}, window=20)
    with pytest.raises(ValueError, match="min_relative_score"):
        enc.hits("A" * 20, min_relative_score=1.5)
    with pytest.raises(ValueError, match=r"motif 'GATA4' is not one of this encoder's 3 motifs"):
        enc.hits("A" * 20, motifs=["GATA4"])
    with pytest.raises(ValueError, match=r"pooling='occupancy' is not computed"):
        MotifEncoder(CUSTOM, window=20, pooling="max").feature_index("m6", "occupancy")
    with pytest.raises(ValueError, match=r"names several motifs"):
        MotifEncoder(["RORA"], window=50).feature_index("RORA")
    with pytest.raises(TypeError, match="JASPAR matrix ids or TF names"):
        MotifEncoder([3])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # pyjaspar's warnings about unknown ids stay inside
        with pytest.raises(ValueError):
            MotifEncoder(["MA0000.9"])


def test_embed_dna_with_motif_encoder(tmp_path):
    """sc_dta.tl.embed_dna on the small test genome: each gene's row is the encoder on its hand-cut window."""
    fasta, gtf, expected = write_test_genome(tmp_path)
    adata = make_test_adata(expected, n_obs=5)
    dta.pp.annotate_tss(adata, gtf)
    enc = MotifEncoder(["GATA4", "TBX5", "NKX2-5"], window=300)
    dta.tl.embed_dna(adata, genome=fasta, encoder=enc)
    emb = adata.varm["dna_emb"]
    assert emb.shape == (adata.n_vars, enc.dim) == (adata.n_vars, 6) and emb.dtype == np.float32
    ids = expected["gene_ids"]
    windows = [
        expected_window(expected["sequences"], g["chrom"], g["tss"], 300, g["strand"])
        for g in (expected["genes"][i] for i in ids)
    ]
    assert windows[3].startswith("N" * 100)  # FIRRM: TSS 40 bp from the chromosome start
    np.testing.assert_allclose(emb[[adata.var_names.get_loc(i) for i in ids]], enc.embed(windows), rtol=1e-6)
    assert np.isnan(emb[adata.var_names.get_loc("ENSG00000999999")]).all()
    params = adata.uns["dna_emb"]["params"]
    assert params["encoder"] == enc.name == "jaspar2024-selected"
    assert params["weights_id"] == enc.weights_id and params["window"] == 300 and params["pooling"] == "max+occupancy"
    # the window override goes through with_window
    dta.tl.embed_dna(adata, genome=fasta, encoder=enc, window=200, key_added="short")
    assert adata.uns["short"]["params"]["window"] == 200
    assert isinstance(enc.motifs[0], Motif) and log_odds(enc.motifs[0].counts).shape == enc.pwms[0].shape
