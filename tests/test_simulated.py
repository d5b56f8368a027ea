from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import sparse

import sc_dta as dta
from sc_dta.datasets._simulated import DEFAULT_MOTIF, TF_MOTIF_POSITIONS

sys.path.insert(0, str(Path(__file__).parent))
from _sim_files import canonical_tss as _canonical_tss
from _sim_files import read_fasta as _read_fasta
from _sim_files import revcomp as _revcomp


def _oriented_window(seqs, chrom, tss, strand, half):
    """Transcription-oriented window with the TSS at index ``half``."""
    if strand == "+":
        return seqs[chrom][tss - half : tss + half]
    return _revcomp(seqs[chrom][tss - half + 1 : tss + half + 1])


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    return dta.datasets.simulated_grn(n_cells=600, n_genes=200, seed=3, out_dir=tmp_path_factory.mktemp("sim"))


def test_deterministic(tmp_path):
    a = dta.datasets.simulated_grn(n_cells=300, n_genes=150, seed=7, out_dir=tmp_path / "a")
    b = dta.datasets.simulated_grn(n_cells=300, n_genes=150, seed=7, out_dir=tmp_path / "b")
    c = dta.datasets.simulated_grn(n_cells=300, n_genes=150, seed=8, out_dir=tmp_path / "c")
    assert (a.adata.X != b.adata.X).nnz == 0
    assert a.fasta.read_bytes() == b.fasta.read_bytes()
    assert a.gtf.read_bytes() == b.gtf.read_bytes()
    assert a.truth == b.truth
    assert a.adata.obs.equals(b.adata.obs)
    assert a.fasta.read_bytes() != c.fasta.read_bytes()
    assert a.adata.X.shape != c.adata.X.shape or (a.adata.X != c.adata.X).nnz > 0


def test_default_out_dir_is_cached(tmp_path):
    dta.settings.cache_dir = tmp_path
    a = dta.datasets.simulated_grn(n_cells=100, n_genes=120, seed=1)
    assert a.fasta.is_relative_to(tmp_path / "simulated")
    mtime = a.fasta.stat().st_mtime_ns
    b = dta.datasets.simulated_grn(n_cells=100, n_genes=120, seed=1)
    assert b.fasta == a.fasta and b.fasta.stat().st_mtime_ns == mtime  # identical file not rewritten
    c = dta.datasets.simulated_grn(n_cells=100, n_genes=120, seed=2)
    assert c.fasta.parent != a.fasta.parent


def test_counts_and_annotations(sim):
    ad = sim.adata
    assert ad.shape == (600, 200)
    assert sparse.isspmatrix_csr(ad.X) or isinstance(ad.X, sparse.csr_array)
    x = ad.X.toarray()
    assert np.issubdtype(x.dtype, np.integer) and x.min() >= 0
    np.testing.assert_array_equal(ad.obs["n_counts"].to_numpy(), x.sum(axis=1))
    assert all(re.fullmatch(r"ENSSIM\d{11}", g) for g in ad.var_names)
    assert ad.var["gene_symbol"].is_unique
    assert list(ad.obs["cell_type"].cat.categories) == ["cardiomyocyte", "fibroblast", "endothelial"]
    assert ad.var_names[ad.var["gene_symbol"] == sim.tf_symbol].tolist() == [sim.tf]
    # library sizes vary
    assert ad.obs["n_counts"].std() / ad.obs["n_counts"].mean() > 0.2


def test_truth_disjoint_and_complete(sim):
    groups = {k: set(v) for k, v in sim.truth.items()}
    assert set(groups) >= {"tf", "direct", "indirect", "housekeeping", "unrelated"}
    assert groups["tf"] == {sim.tf}
    assert len(groups["direct"]) == 20 and len(groups["indirect"]) == 20
    names = list(groups)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not groups[a] & groups[b], (a, b)
    assert set().union(*groups.values()) == set(sim.adata.var_names)
    roles = sim.adata.var["sim_role"]
    for k, genes in sim.truth.items():
        assert (roles[genes] == k).all()


def test_expression_follows_the_network(sim):
    ad = sim.adata
    x = ad.X.toarray().astype(float)
    norm = np.log1p(x / x.sum(1, keepdims=True) * 1e4)
    activity = ad.obs["tf_activity"].to_numpy()
    tf = norm[:, ad.var_names.get_loc(sim.tf)]
    assert np.corrcoef(tf, activity)[0, 1] > 0.7

    def mean_corr(genes):
        cols = [ad.var_names.get_loc(g) for g in genes]
        return np.mean([np.corrcoef(tf, norm[:, c])[0, 1] for c in cols])

    assert mean_corr(sim.truth["direct"]) > 0.6
    assert mean_corr(sim.truth["indirect"]) > 0.5
    assert abs(mean_corr(sim.truth["unrelated"])) < 0.2
    hk = [ad.var_names.get_loc(g) for g in sim.truth["housekeeping"]]
    other = [ad.var_names.get_loc(g) for g in sim.truth["unrelated"]]
    assert x[:, hk].mean() > 5 * x[:, other].mean()
    # the TF is silent outside cardiomyocytes and fibroblasts
    silent = ad.obs["cell_type"].to_numpy() == "endothelial"
    assert activity[silent].max() == 0


def test_motifs_in_fasta(sim):
    """The planted motifs sit where documented, and nowhere else in the genome."""
    seqs = _read_fasta(sim.fasta)
    tss = _canonical_tss(sim.gtf)
    half = 1000
    motif, m = sim.tf_motif, len(sim.tf_motif)
    assert motif == DEFAULT_MOTIF and sim.motif_positions == TF_MOTIF_POSITIONS
    chrom, pos, strand = tss[sim.tf]
    win = _oriented_window(seqs, chrom, pos, strand, half)
    for p in sim.motif_positions:
        assert win[half + p : half + p + m] == motif
        assert -150 <= p and p + m <= 50
    assert win.count(motif) == len(sim.motif_positions)
    for g in sim.truth["direct"]:
        c, p0, s = tss[g]
        assert _oriented_window(seqs, c, p0, s, half).count(motif) >= 1
    planted = len(sim.motif_positions) + 2 * len(sim.truth["direct"])
    total = sum(s.count(motif) + s.count(_revcomp(motif)) for s in seqs.values())
    assert total == planted
    gc = sum(s.count("G") + s.count("C") for s in seqs.values()) / sum(len(s) for s in seqs.values())
    assert 0.38 < gc < 0.42


def test_gtf_read_tss(sim):
    from sc_dta.genome import read_tss

    table = read_tss(sim.gtf)
    expected = _canonical_tss(sim.gtf)
    assert set(table.index) == set(sim.adata.var_names)
    for gid, (chrom, pos, strand) in expected.items():
        row = table.loc[gid]
        assert (row["chrom"], int(row["tss"]), row["strand"]) == (chrom, pos, strand)
    assert set(table["strand"]) == {"+", "-"}
    sym = dict(zip(sim.adata.var_names, sim.adata.var["gene_symbol"], strict=True))
    assert all(table.loc[g, "gene_name"] == sym[g] for g in table.index)


def test_motif_removed_by_mutation_via_genome(sim):
    from sc_dta.genome import Genome, read_tss

    genome = Genome(sim.fasta)
    row = read_tss(sim.gtf).loc[sim.tf]
    length = 2000
    ref = genome.window(row["chrom"], int(row["tss"]), length, row["strand"])
    for p in sim.motif_positions:
        assert ref[length // 2 + p : length // 2 + p + len(sim.tf_motif)] == sim.tf_motif
    mut = genome.mutated_window(row["chrom"], int(row["tss"]), length, row["strand"], [sim.mutation])
    assert len(mut) == length
    assert sim.tf_motif not in mut and _revcomp(sim.tf_motif) not in mut
    # only the deleted core differs: the far flanks are untouched on the upstream side
    assert mut[: length // 2 - 300] != "" and ref.count(sim.tf_motif) == 4


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"n_genes": 50}, "n_genes"),
        ({"n_cells": 0}, "n_cells"),
        ({"n_cell_types": 1}, "n_cell_types"),
        ({"tf_motif": "ACGTNN"}, "tf_motif"),
        ({"tf_motif": "ACGCGT"}, "tf_motif"),
        ({"gene_spacing": 10}, "gene_spacing"),
    ],
)
def test_bad_parameters(kwargs, name, tmp_path):
    with pytest.raises(ValueError, match=name):
        dta.datasets.simulated_grn(**{"n_cells": 50, "out_dir": tmp_path, **kwargs})
