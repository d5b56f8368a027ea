"""Matched control mutations (tl.control_mutations), their statistics, and perturb_tss(..., n_controls=)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

sys.path.insert(0, str(Path(__file__).parent))

import sc_dta as dta
from sc_dta.tl._perturb import control_statistics

WINDOW = 200


@pytest.fixture(scope="module")
def genome_setup(tmp_path_factory):
    from _genome_data import write_test_genome

    from sc_dta.genome import Genome
    from sc_dta.models import KmerEncoder

    fasta, gtf, expected = write_test_genome(tmp_path_factory.mktemp("genome"))
    return Genome(fasta), KmerEncoder(k=3, window=WINDOW), expected, gtf


GENES = [("chr1", 1500, "+"), ("chr1", 5499, "-")]  # DPM1, TSPAN6


def window_range(encoder):
    """TSS-relative first and last base of the encoder's window (TSS at index window // 2 - center_shift)."""
    first = -(encoder.window // 2 - encoder.center_shift)
    return first, first + encoder.window - 1


@pytest.mark.parametrize(("chrom", "tss", "strand"), GENES)
def test_deletion_controls(genome_setup, chrom, tss, strand):
    from sc_dta.genome import TSSDeletion

    genome, encoder, expected, _ = genome_setup
    controls = dta.tl.control_mutations(genome, chrom, tss, strand, ["delete:-20:+20"], encoder, n=12, seed=3)
    assert len(controls) == 12
    lo, hi = window_range(encoder)
    starts = set()
    for group in controls:
        assert len(group) == 1 and isinstance(group[0], TSSDeletion)
        d = group[0]
        assert d.end - d.start + 1 == 41  # same length
        assert d.end < -20 or d.start > 20  # never overlapping the mutated span
        assert lo <= d.start and d.end <= hi  # within the window
        starts.add(d.start)
    assert len(starts) > 3  # placed at random, not always at the same spot
    # deterministic by seed, different for another seed
    again = dta.tl.control_mutations(genome, chrom, tss, strand, ["delete:-20:+20"], encoder, n=12, seed=3)
    assert again == controls
    other = dta.tl.control_mutations(genome, chrom, tss, strand, ["delete:-20:+20"], encoder, n=12, seed=4)
    assert other != controls


@pytest.mark.parametrize(("chrom", "tss", "strand"), GENES)
def test_substitution_controls(genome_setup, chrom, tss, strand):
    from sc_dta.genome import Variant

    genome, encoder, expected, _ = genome_setup
    seq = expected["sequences"][chrom]
    pos1 = tss + 1 + 5  # 1-based, 5 bp downstream on the plus strand
    ref = seq[pos1 - 1]
    snv = Variant(chrom, pos1, ref, "A" if ref != "A" else "C")
    controls = dta.tl.control_mutations(genome, chrom, tss, strand, [snv], encoder, n=8, seed=0)
    lo, hi = window_range(encoder)
    for (v,) in controls:
        assert isinstance(v, Variant) and len(v.ref) == len(v.alt) == 1
        assert v.pos != pos1
        assert v.ref == seq[v.pos - 1] and v.alt != v.ref  # the genome's base, replaced by another
        rel = (v.pos - 1 - tss) if strand == "+" else (tss - (v.pos - 1))
        assert lo <= rel <= hi


def test_control_errors(genome_setup):
    genome, encoder, _, _ = genome_setup
    with pytest.raises(ValueError, match="No room"):
        dta.tl.control_mutations(genome, "chr1", 1500, "+", ["delete:-60:+60"], encoder, n=2)
    with pytest.raises(ValueError, match="n_controls"):
        dta.tl.control_mutations(genome, "chr1", 1500, "+", ["delete:-5:+5"], encoder, n=0)


def test_control_statistics_by_hand():
    rng = np.random.default_rng(0)
    shift = rng.normal(size=20)
    ctrl = rng.normal(size=(9, 20))
    ctrl[:, 0] = shift[0]  # ties count as at least as large
    shift[3] = np.nan
    ctrl[2, 4] = np.nan
    pval, spec = control_statistics(shift, ctrl)
    for j in range(20):
        if j in (3, 4):
            assert np.isnan(pval[j]) and np.isnan(spec[j])
            continue
        count = sum(abs(ctrl[c, j]) >= abs(shift[j]) for c in range(9))
        assert pval[j] == pytest.approx((1 + count) / 10, rel=1e-6)
        assert spec[j] == pytest.approx(abs(shift[j]) / np.mean(np.abs(ctrl[:, j])), rel=1e-5)
    assert pval[0] == pytest.approx(1.0)


def test_perturb_tss_with_controls(genome_setup):
    from _genome_data import make_test_adata

    from sc_dta.models import BioDTA
    from sc_dta.models.vocab import GeneformerVocab

    genome, encoder, expected, gtf = genome_setup
    a = make_test_adata(expected, n_obs=10, seed=3)
    x = a.X.toarray()
    x[:, 0] = 30  # DPM1 in every cell
    a.X = sp.csr_matrix(x)
    a.obs["n_counts"] = x.sum(1)
    dta.pp.annotate_tss(a, gtf)
    vocab = GeneformerVocab.from_adata(a, special_tokens=False, max_length=16)
    model = BioDTA.from_config(
        vocab, d_dna=encoder.dim, hidden_size=16, n_layers=2, n_heads=2, intermediate_size=32, seed=0,
        position_embedding="none", initializer_range=0.3,
    ).eval()  # fmt: skip
    tids = vocab.lookup(a.var_names)
    ok = (tids >= 0) & a.var["tss_chrom"].notna().to_numpy()
    seqs = [
        genome.window(str(c), int(p), encoder.window, str(s))
        for c, p, s in a.var.loc[ok, ["tss_chrom", "tss_pos", "tss_strand"]].itertuples(index=False)
    ]
    model.set_dna_embeddings(tids[ok], encoder.embed(seqs))
    dta.tl.perturb_tss(
        a, "DPM1", "delete:-10:+10", model=model, genome=genome, encoder=encoder, n_controls=4, n_folds=2,
        key_added="m",
    )  # fmt: skip
    ctrl = a.uns["m"]["controls"]
    assert ctrl["mean"].shape == (4, a.n_vars) and len(ctrl["mutations"]) == 4
    assert list(ctrl["var_names"]) == list(a.var_names)
    assert a.uns["m"]["params"]["n_controls"] == 4
    expect = dta.tl.control_mutations(genome, "chr1", 1500, "+", ["delete:-10:+10"], encoder, n=4, seed=0)
    assert len(expect) == 4 and "delete:-10:+10" not in [str(m) for m in ctrl["mutations"]]
    shift = a.var["m_mean"].to_numpy(dtype=np.float64)
    means = np.asarray(ctrl["mean"], dtype=np.float64)
    measured = np.isfinite(shift)
    assert measured.sum() >= 5
    for j in np.flatnonzero(measured):
        count = int((np.abs(means[:, j]) >= abs(shift[j])).sum())
        assert a.var["m_pval"].iloc[j] == pytest.approx((1 + count) / 5, rel=1e-6)
        assert a.var["m_specificity"].iloc[j] == pytest.approx(abs(shift[j]) / np.abs(means[:, j]).mean(), rel=1e-4)
    assert np.isnan(a.var["m_pval"].to_numpy()[~measured]).all()
    df = dta.tl.rank_targets(a, "m")
    assert a.uns["m"]["ranking"]["params"]["pvalues"] == "controls"
    np.testing.assert_allclose(df["pval"].to_numpy(), a.var.loc[df.index, "m_pval"].to_numpy(), rtol=1e-6)
    # no room for the controls: a clear error naming the mutation, adata untouched
    with pytest.raises(ValueError, match="controls for mutation"):
        dta.tl.perturb_tss(
            a, "DPM1", "delete:-60:+60", model=model, genome=genome, encoder=encoder, n_controls=2, key_added="big"
        )
    assert "big" not in a.layers
    with pytest.raises(ValueError, match="n_controls"):
        dta.tl.perturb_tss(a, "DPM1", "delete:-5:+5", model=model, genome=genome, encoder=encoder, n_controls=-1)


def test_controls_are_distinct_and_warn_when_the_window_is_tight(genome_setup):
    genome, encoder, _, _ = genome_setup
    # a 41 bp deletion at the TSS of a 200 bp window leaves room for about 100 distinct 41 bp placements, not 150
    with pytest.warns(UserWarning, match="distinct controls"):
        controls = dta.tl.control_mutations(genome, "chr1", 1500, "+", ["delete:-20:+20"], encoder, n=150, seed=0)
    texts = [";".join(map(str, g)) for g in controls]
    assert len(texts) == len(set(texts)) < 150
