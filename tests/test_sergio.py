from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import sparse

pytest.importorskip("SERGIO", reason="sergio_grn needs sergio-scsim==1.9.3")

import sc_dta as dta
from sc_dta.datasets import _sergio
from sc_dta.datasets._sergio import sergio_grn
from sc_dta.datasets._simulated import DEFAULT_MOTIF, TARGET_MOTIF_POSITIONS, TF_MOTIF_POSITIONS, TF_MUTATION

sys.path.insert(0, str(Path(__file__).parent))
from _sim_files import canonical_tss as _canonical_tss
from _sim_files import read_fasta as _read_fasta
from _sim_files import revcomp as _revcomp

# a small network that simulates in about a second: 60 genes, 500 SERGIO steps
SMALL = {
    "n_cells": 300,
    "n_genes": 60,
    "n_direct": 12,
    "n_indirect": 8,
    "n_modules": 2,
    "n_housekeeping": 5,
    "repressed_fraction": 0.25,
    "safety_iter": 100,
    "scale_iter": 4,
}


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    return sergio_grn(**SMALL, seed=3, out_dir=tmp_path_factory.mktemp("sergio"))


def _col(adata, gene):
    return adata.var_names.get_loc(gene)


def _edges(sim):
    e = sim.adata.uns["sergio_grn"]["edges"]
    return list(zip(e["regulator"].tolist(), e["target"].tolist(), e["k"].tolist(), strict=True))


def _oriented_window(seqs, chrom, tss, strand, half):
    """Transcription-oriented window with the TSS at index ``half``."""
    if strand == "+":
        return seqs[chrom][tss - half : tss + half]
    return _revcomp(seqs[chrom][tss - half + 1 : tss + half + 1])


def test_shapes_and_integer_counts(sim):
    ad = sim.adata
    assert ad.shape == (300, 60)
    assert sparse.issparse(ad.X) and ad.X.format == "csr"
    x = ad.X.toarray()
    assert np.issubdtype(x.dtype, np.integer) and x.min() >= 0
    np.testing.assert_array_equal(ad.obs["n_counts"].to_numpy(), x.sum(axis=1))
    assert all(re.fullmatch(r"ENSSIM\d{11}", g) for g in ad.var_names)
    assert ad.var["gene_symbol"].is_unique
    assert ad.var_names[ad.var["gene_symbol"] == "SIMTF1"].tolist() == [sim.tf] and sim.tf_symbol == "SIMTF1"
    assert list(ad.obs["cell_type"].cat.categories) == ["cardiomyocyte", "fibroblast", "endothelial"]
    assert ad.obs["cell_type"].value_counts().to_dict() == {"cardiomyocyte": 100, "fibroblast": 100, "endothelial": 100}
    # noise-free SERGIO levels next to the counts; the TF's level is obs['tf_activity']
    expr = ad.layers["sergio_expr"]
    assert expr.shape == ad.shape and expr.dtype == np.float32 and expr.min() >= 0
    np.testing.assert_array_equal(ad.obs["tf_activity"].to_numpy(), expr[:, _col(ad, sim.tf)])
    # cell types are interleaved, not in SERGIO's blocks
    assert (ad.obs["cell_type"].cat.codes.to_numpy()[:100] != 0).any()
    meta = ad.uns["sergio_grn"]
    assert meta["sergio_version"] == "1.9.3"
    assert meta["params"]["n_genes"] == 60 and meta["params"]["seed"] == 3
    assert (sim.mutation, sim.tf_motif, sim.motif_positions) == (TF_MUTATION, DEFAULT_MOTIF, TF_MOTIF_POSITIONS)


def test_truth_partition(sim):
    groups = {k: set(v) for k, v in sim.truth.items()}
    assert list(groups) == ["tf", "direct", "indirect", "housekeeping", "marker", "unrelated"]
    assert groups["tf"] == {sim.tf}
    assert (len(groups["direct"]), len(groups["indirect"]), len(groups["housekeeping"])) == (12, 8, 5)
    assert groups["marker"] == set()
    assert len(groups["unrelated"]) == 60 - 1 - 12 - 8 - 5
    names = list(groups)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not groups[a] & groups[b], (a, b)
    assert set().union(*groups.values()) == set(sim.adata.var_names)
    roles = sim.adata.var["sim_role"]
    for k, genes in sim.truth.items():
        assert (roles[genes] == k).all()
    stored = sim.adata.uns["sergio_grn"]["truth"]
    assert {k: sorted(v.tolist()) for k, v in stored.items()} == {k: sorted(v) for k, v in sim.truth.items()}


def test_network_structure(sim):
    """Direct targets hang on the TF alone, indirect ones on direct targets only; modules are separate."""
    edges = _edges(sim)
    direct, indirect = set(sim.truth["direct"]), set(sim.truth["indirect"])
    regs_of: dict[str, set[str]] = {}
    for r, t, _ in edges:
        regs_of.setdefault(t, set()).add(r)
    assert {t for r, t, _ in edges if r == sim.tf} == direct
    for g in direct:
        assert regs_of[g] == {sim.tf}
    for g in indirect:
        assert sim.tf not in regs_of[g] and 1 <= len(regs_of[g]) <= 2 and regs_of[g] <= direct
    # the TF and housekeeping genes are master regulators (no regulators); every other gene has one
    masters = set(sim.truth["tf"]) | set(sim.truth["housekeeping"])
    assert not masters & set(regs_of)
    assert all(not any(r == h for r, _, _ in edges) for h in sim.truth["housekeeping"])
    unrelated = set(sim.truth["unrelated"])
    module_mrs = unrelated - set(regs_of)
    assert len(module_mrs) == 2
    for r, t, _ in edges:  # no edge crosses between the TF programme and the unrelated modules
        assert (r in unrelated) == (t in unrelated)
    # repressed fraction of the TF's edges, and SERGIO's parameter ranges
    k_tf = np.array([k for r, _, k in edges if r == sim.tf])
    assert (k_tf < 0).sum() == round(0.25 * 12)
    k_all = np.abs([k for _, _, k in edges])
    assert k_all.min() >= 1 and k_all.max() <= 5
    e = sim.adata.uns["sergio_grn"]["edges"]
    np.testing.assert_array_equal(e["n"], 2.0)
    assert (e["h"] > 0).all()
    # SERGIO sets half-responses to the regulator's mean steady state: production rate / decay for the TF
    rates = sim.adata.uns["sergio_grn"]["production_rates"]
    tf_rate = rates["rate"][rates["gene"].tolist().index(sim.tf)]
    np.testing.assert_allclose(e["h"][e["regulator"] == sim.tf], tf_rate.mean() / 0.8)
    assert tf_rate[0] > tf_rate[1] > tf_rate[2:].max()


def test_targets_follow_the_tf_with_the_sign_of_their_edge(sim):
    ad = sim.adata
    expr = ad.layers["sergio_expr"].astype(float)
    tf = expr[:, _col(ad, sim.tf)]
    corr = {t: np.corrcoef(tf, expr[:, _col(ad, t)])[0, 1] for r, t, _ in _edges(sim) if r == sim.tf}
    k = {t: k for r, t, k in _edges(sim) if r == sim.tf}
    act = [corr[t] for t in corr if k[t] > 0]
    rep = [corr[t] for t in corr if k[t] < 0]
    assert min(act) > 0.1 and np.mean(act) > 0.3
    assert max(rep) < -0.1 and np.mean(rep) < -0.3
    # TF level by cell type: high in cardiomyocytes, intermediate in fibroblasts, low elsewhere
    means = ad.obs.groupby("cell_type", observed=True)["tf_activity"].mean()
    assert means["cardiomyocyte"] > 1.3 * means["fibroblast"] > 1.3 * 1.3 * means["endothelial"]
    # housekeeping genes do not follow the TF
    hk = [abs(np.corrcoef(tf, expr[:, _col(ad, g)])[0, 1]) for g in sim.truth["housekeeping"]]
    assert np.mean(hk) < 0.2


def test_dense_counts_follow_the_tf(tmp_path):
    sim = sergio_grn(**SMALL, library_size=1000.0, dropout_percentile=0.0, seed=3, out_dir=tmp_path)
    x = sim.adata.X.toarray().astype(float)
    assert (x > 0).mean() > 0.6 and np.median(x.sum(1)) > 600
    norm = np.log1p(x / x.sum(1, keepdims=True) * 1e4)
    tf = norm[:, _col(sim.adata, sim.tf)]
    for r, t, k in _edges(sim):
        if r == sim.tf:
            c = np.corrcoef(tf, norm[:, _col(sim.adata, t)])[0, 1]
            assert np.sign(c) == np.sign(k), (t, k, c)


def test_sparsity_at_the_defaults(tmp_path):
    """The defaults give sparse 10x-like data: ~50 UMIs and ~25 detected genes of 150 per cell."""
    sim = sergio_grn(n_cells=150, seed=0, out_dir=tmp_path)
    x = sim.adata.X.toarray()
    assert x.shape == (150, 150)
    umis, detected = x.sum(1), (x > 0).sum(1)
    assert 30 <= np.median(umis) <= 75 and 35 <= umis.mean() <= 80
    assert 15 <= np.median(detected) <= 35
    assert 0.75 <= (x == 0).mean() <= 0.9
    assert umis.std() / umis.mean() > 0.3  # library sizes vary


def test_motifs_planted_where_documented(sim):
    seqs = _read_fasta(sim.fasta)
    tss = _canonical_tss(sim.gtf)
    half, motif = 1000, sim.tf_motif
    m = len(motif)
    chrom, pos, strand = tss[sim.tf]
    win = _oriented_window(seqs, chrom, pos, strand, half)
    lo, hi = (int(v) for v in re.fullmatch(r"delete:(-\d+):\+(\d+)", sim.mutation).groups())
    for p in TF_MOTIF_POSITIONS:
        assert win[half + p : half + p + m] == motif
        assert lo <= p and p + m <= hi  # inside the deletion
    assert win.count(motif) == len(TF_MOTIF_POSITIONS)
    deleted = win[: half + lo] + win[half + hi :]
    assert motif not in deleted and _revcomp(motif) not in deleted
    k = {t: k for r, t, k in _edges(sim) if r == sim.tf}
    assert {np.sign(v) for v in k.values()} == {-1.0, 1.0}  # activated and repressed targets alike
    for g in sim.truth["direct"]:
        c, p0, s = tss[g]
        w = _oriented_window(seqs, c, p0, s, half)
        for p in TARGET_MOTIF_POSITIONS:
            assert w[half + p : half + p + m] == motif, g
    planted = len(TF_MOTIF_POSITIONS) + len(TARGET_MOTIF_POSITIONS) * len(sim.truth["direct"])
    assert sum(s.count(motif) + s.count(_revcomp(motif)) for s in seqs.values()) == planted
    gc = sum(s.count("G") + s.count("C") for s in seqs.values()) / sum(len(s) for s in seqs.values())
    assert 0.38 < gc < 0.42


def test_annotate_tss_annotates_every_gene(sim):
    ad = sim.adata.copy()
    dta.pp.annotate_tss(ad, sim.gtf)
    assert ad.var["tss_chrom"].notna().all() and ad.var["tss_pos"].notna().all()
    expected = _canonical_tss(sim.gtf)
    got = {g: (r.tss_chrom, int(r.tss_pos), r.tss_strand) for g, r in ad.var.iterrows()}
    assert got == expected
    assert set(ad.var["tss_strand"]) == {"+", "-"}


def test_h5ad_round_trip(sim, tmp_path):
    import anndata

    path = tmp_path / "sergio.h5ad"
    sim.adata.copy().write_h5ad(path)  # writing turns string columns into categoricals in place
    back = anndata.read_h5ad(path)
    assert (back.X != sim.adata.X).nnz == 0
    np.testing.assert_array_equal(back.layers["sergio_expr"], sim.adata.layers["sergio_expr"])
    np.testing.assert_array_equal(back.uns["sergio_grn"]["edges"]["k"], sim.adata.uns["sergio_grn"]["edges"]["k"])


def test_deterministic_and_seed_dependent(sim, tmp_path):
    a = sergio_grn(**SMALL, seed=3, out_dir=tmp_path / "a")
    for attr in ("truth", "tf", "params"):
        assert getattr(a, attr) == getattr(sim, attr)
    assert (a.adata.X != sim.adata.X).nnz == 0
    np.testing.assert_array_equal(a.adata.layers["sergio_expr"], sim.adata.layers["sergio_expr"])
    assert a.adata.obs.equals(sim.adata.obs) and a.adata.var.equals(sim.adata.var)
    assert a.fasta.read_bytes() == sim.fasta.read_bytes() and a.gtf.read_bytes() == sim.gtf.read_bytes()
    state = np.random.get_state()[1].copy()
    b = sergio_grn(**SMALL, seed=4, out_dir=tmp_path / "b")
    np.testing.assert_array_equal(np.random.get_state()[1], state)  # numpy's global generator left as it was
    assert b.truth != a.truth
    assert _edges(b) != _edges(a)
    assert b.fasta.read_bytes() != a.fasta.read_bytes()


def test_counts_are_cached(tmp_path, monkeypatch):
    monkeypatch.setattr(dta.settings, "cache_dir", tmp_path)
    simulate = _sergio._simulate
    params = {**SMALL, "n_cells": 90}
    a = sergio_grn(**params, seed=1)
    assert a.fasta.is_relative_to(tmp_path / "sergio")
    cached = list(a.fasta.parent.glob("sergio_counts_*.npz"))
    assert len(cached) == 1
    fasta_mtime = a.fasta.stat().st_mtime_ns

    def fail(*args, **kwargs):
        raise AssertionError("simulated again instead of reading the cache")

    monkeypatch.setattr(_sergio, "_simulate", fail)
    b = sergio_grn(**params, seed=1)
    assert b.fasta == a.fasta and b.fasta.stat().st_mtime_ns == fasta_mtime
    assert (b.adata.X != a.adata.X).nnz == 0
    np.testing.assert_array_equal(b.adata.layers["sergio_expr"], a.adata.layers["sergio_expr"])
    with pytest.raises(AssertionError, match="simulated again"):  # other parameters: another cache entry
        sergio_grn(**params, seed=1, library_size=200.0)
    monkeypatch.setattr(_sergio, "_simulate", simulate)
    # a damaged cache file is ignored and rewritten
    cached[0].write_bytes(b"not an npz file")
    c = sergio_grn(**params, seed=1)
    assert (c.adata.X != a.adata.X).nnz == 0
    assert cached[0].stat().st_size > 100


def test_missing_sergio_names_the_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "SERGIO", None)
    with pytest.raises(ImportError, match=r"pip install sergio-scsim==1\.9\.3.*test"):
        sergio_grn(**SMALL, out_dir=tmp_path)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_genes": 29}, "n_genes=29 does not fit.*n_genes >= 30"),
        ({"n_modules": 0}, "n_modules >= 1"),
        ({"n_direct": 0}, "n_direct must be a positive integer"),
        ({"repressed_fraction": 1.5}, "repressed_fraction must be between 0 and 1"),
        ({"dropout_percentile": 100}, r"dropout_percentile must be in \[0, 100\)"),
        ({"library_size": 0}, "library_size must be a positive number"),
        ({"n_cell_types": 9}, "n_cell_types must be between 2 and 8"),
        ({"n_cells": 2}, "n_cells=2 is smaller than n_cell_types=3"),
        ({"dt": 1.0}, r"dt must be in \(0, 0.2\]"),
        ({"tf_motif": "ACGTACGT"}, "its own reverse complement"),
        ({"seed": 1.5}, "seed must be an integer"),
    ],
)
def test_bad_arguments(kwargs, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        sergio_grn(**{**SMALL, **kwargs}, out_dir=tmp_path)
