"""tl.screen: equality with the single perturb_gene / perturb_tss calls, groups, per-cell values, storage, resume."""

from __future__ import annotations

import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

torch = pytest.importorskip("torch")

sys.path.insert(0, str(Path(__file__).parent))

import test_perturb  # noqa: E402
from test_perturb import _build, assert_unchanged, snapshot  # noqa: E402

import sc_dta as dta  # noqa: E402

tss_setup = test_perturb.tss_setup  # the BioDTA + genome fixture of the perturb tests

pytestmark = pytest.mark.filterwarnings("ignore:From 0.4 .update:FutureWarning")


def _frequent_genes(a, tokens, vocab, n):
    """The ``n`` var names present in most cells' tokens (so every perturbation evaluates several cells)."""
    counts = {}
    for ids in tokens.input_ids:
        for t in set(ids.tolist()) - set(vocab.special_ids):
            counts[t] = counts.get(t, 0) + 1
    best = sorted(counts, key=lambda t: (-counts[t], t))[:n]
    return [vocab.id_to_token[t] for t in best]


def _single(a, gene, kind, readout, **kw):
    out = dta.tl.perturb_gene(a, gene, model=kw.pop("model"), kind=kind, readout=readout, copy=True, **kw)
    return out, f"dta_shift_{kind}"


@pytest.mark.parametrize("readout", ["cosine", "expression"])
def test_screen_equals_single_calls(readout, tmp_path):
    a, vocab, model, tokens = _build("V2")
    a = a.copy()
    a.obs["group"] = pd.Categorical(np.where(np.arange(a.n_obs) % 3 == 0, "A", "B"))
    genes = _frequent_genes(a, tokens, vocab, 3)
    perts = [(genes[0], "delete"), (genes[1], "delete"), (genes[0], "overexpress"), (genes[2], "delete")]
    snap = snapshot(a)
    res = dta.tl.screen(
        a, perts, model=model, readout=readout, groupby="group", per_cell=True, chunk_size=3, key_added="scr"
    )
    # only the key_added slots of the cell AnnData are written
    assert list(a.uns) == [*snap[3], "scr"] and list(a.uns["scr"]["perturbations"]) == list(res.obs_names)
    cell_slots = ["scr_cell_shift"] + (["scr_cell_emb_shift"] if readout == "cosine" else [])
    assert sorted(a.obsm) == sorted(cell_slots)
    cell_shift = a.obsm["scr_cell_shift"]
    cell_emb_shift = a.obsm.get("scr_cell_emb_shift")
    assert cell_shift.shape == (a.n_obs, len(perts)) and cell_shift.dtype == np.float32
    for slot in cell_slots:
        del a.obsm[slot]
    del a.uns["scr"]
    assert_unchanged(a, snap)
    assert res.shape == (4, a.n_vars) and list(res.var_names) == list(a.var_names)
    assert list(res.obs["gene"]) == [p[0] for p in perts] and list(res.obs["perturbation"]) == [p[1] for p in perts]
    assert "gene_symbols" in res.var.columns
    for i, (gene, kind) in enumerate(perts):
        single, key = _single(a, gene, kind, readout, model=model)
        np.testing.assert_allclose(res.X[i], single.var[f"{key}_mean"].to_numpy(), atol=2e-5, equal_nan=True)
        np.testing.assert_array_equal(res.layers["n"][i], single.var[f"{key}_n"].to_numpy())
        assert res.obs["n_cells"].iloc[i] == single.obs[f"{key}_evaluated"].sum() > 0
        # per-cell values are the layer the single call writes
        layer = single.layers[key].toarray()
        got = res.uns["per_cell"]["shift"][res.obs_names[i]].toarray()
        np.testing.assert_allclose(got, layer, atol=2e-5)
        np.testing.assert_allclose(
            res.obsm["cell_shift"].iloc[i].to_numpy(), single.obs[f"{key}_cell"].to_numpy(), atol=2e-5, equal_nan=True
        )
        # the cells x perturbations values in the cell AnnData are the single call's obs columns
        np.testing.assert_allclose(cell_shift[:, i], single.obs[f"{key}_cell"].to_numpy(), atol=2e-5, equal_nan=True)
        assert np.isfinite(cell_shift[:, i]).sum() == single.obs[f"{key}_evaluated"].sum()
        if readout == "cosine":
            np.testing.assert_allclose(
                cell_emb_shift[:, i], single.obs[f"{key}_cell_emb"].to_numpy(), atol=2e-5, equal_nan=True
            )
        # group means: mean of the stored per-cell values within each group
        stored = single.layers[key].tocsr()
        for g in ("A", "B"):
            rows = np.flatnonzero(a.obs["group"].to_numpy() == g)
            sub = stored[rows]
            n = np.bincount(sub.indices, minlength=a.n_vars)
            tot = np.bincount(sub.indices, weights=sub.data, minlength=a.n_vars)
            with np.errstate(invalid="ignore"):
                expect = np.where(n > 0, tot / np.maximum(n, 1), np.nan)
            np.testing.assert_allclose(res.layers[f"mean_{g}"][i], expect, atol=2e-5, equal_nan=True)
            np.testing.assert_array_equal(res.layers[f"n_{g}"][i], n)
    assert np.isfinite(res.X).sum() > 20 and np.nanmax(np.abs(res.X)) > 1e-4
    # h5ad round trip and MuData modality
    path = tmp_path / "screen.h5ad"
    res.write_h5ad(path)
    back = ad.read_h5ad(path)
    np.testing.assert_array_equal(back.X, res.X)
    assert list(back.obs["perturbation"]) == list(res.obs["perturbation"])
    assert back.uns["screen"]["params"]["readout"] == readout
    np.testing.assert_array_equal(
        back.uns["per_cell"]["shift"][res.obs_names[1]].toarray(),
        res.uns["per_cell"]["shift"][res.obs_names[1]].toarray(),
    )
    import mudata as md

    m = md.MuData({"rna": a.copy(), "screen": res})
    m.write(tmp_path / "m.h5mu")
    np.testing.assert_array_equal(md.read_h5mu(tmp_path / "m.h5mu")["screen"].X, res.X)


def test_screen_shares_unperturbed_forward_across_genes():
    """Cosine readout: k deletions of different genes cost one unperturbed forward per cell, not k."""
    a, vocab, model, tokens = _build("V2")
    genes = _frequent_genes(a, tokens, vocab, 4)
    calls = []
    handle = model.bert.encoder.layer[0].register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    try:
        dta.tl.screen(a, [(g, "delete") for g in genes], model=model, readout="cosine", batch_size=64)
        together = sum(calls)
        calls.clear()
        for g in genes:
            dta.tl.perturb_gene(a, g, model=model, readout="cosine", copy=True, batch_size=64)
        separate = sum(calls)
    finally:
        handle.remove()
    n_cells = sum(1 for ids in tokens.input_ids if len(ids) > 2)
    evaluated = sum(sum(1 for ids in tokens.input_ids if vocab.token_ids[g] in ids) for g in genes)
    assert together == n_cells + evaluated  # one original per cell (any gene) + one perturbed per evaluated cell
    assert separate == 2 * evaluated


def _count_forwards(model, fn):
    calls = []
    handle = model.bert.encoder.layer[0].register_forward_hook(lambda m, i, o: calls.append(1))
    try:
        out = fn()
    finally:
        handle.remove()
    return out, len(calls)


def test_screen_resume_after_interrupt(tmp_path):
    a, vocab, model, tokens = _build("V2")
    genes = sorted(_frequent_genes(a, tokens, vocab, 5))  # sorted: processed in the given order
    perts = pd.DataFrame({"gene": genes, "perturbation": ["delete"] * 5})
    kw = {"model": model, "readout": "cosine", "chunk_size": 2, "batch_size": 64}
    full, n_full = _count_forwards(model, lambda: dta.tl.screen(a, perts, **kw))
    _, n_first = _count_forwards(model, lambda: dta.tl.screen(a, perts.iloc[:2], **kw))

    calls = []

    def interrupt(module, inputs, output):
        calls.append(1)
        if len(calls) == n_first + 1:  # first forward of the second chunk
            raise KeyboardInterrupt

    handle = model.bert.encoder.layer[0].register_forward_hook(interrupt)
    ckpt = tmp_path / "ckpt"
    try:
        with pytest.raises(KeyboardInterrupt):
            dta.tl.screen(a, perts, checkpoint_dir=ckpt, **kw)
    finally:
        handle.remove()
    assert len(list(ckpt.glob("perturbation_*.npz"))) == 2
    assert not list(ckpt.glob(".*tmp"))
    resumed, n_resumed = _count_forwards(model, lambda: dta.tl.screen(a, perts, checkpoint_dir=ckpt, **kw))
    assert n_resumed == n_full - n_first  # only the 3 remaining perturbations ran
    np.testing.assert_allclose(resumed.X, full.X, atol=1e-6, equal_nan=True)
    pd.testing.assert_frame_equal(resumed.obs, full.obs)
    # a finished screen reruns from the checkpoint alone; another screen's directory is refused
    again, n_again = _count_forwards(model, lambda: dta.tl.screen(a, perts, checkpoint_dir=ckpt, **kw))
    assert n_again == 0
    np.testing.assert_array_equal(again.X, resumed.X)
    with pytest.raises(ValueError, match="holds another screen"):
        dta.tl.screen(a, perts.iloc[:3], checkpoint_dir=ckpt, **kw)


def test_screen_tss_mutations_and_saturation(tss_setup, tmp_path):
    from sc_dta.genome import Variant

    a, vocab, model, encoder, genome, expected = tss_setup
    gene = "ENSG00000000419"  # DPM1, chr1 + strand, TSS 1500 (0-based)
    snvs = dta.genome.saturation(genome, "chr1", 1500, "+", 4, 5)
    seq = expected["sequences"]["chr1"]
    assert len(snvs) == 6 and {str(v.ref) for v in snvs} == {seq[1504], seq[1505]}
    assert all(v.pos in (1505, 1506) and v.alt != v.ref for v in snvs)
    perts = [(gene, snvs[0]), ("DPM1", "delete:-20:+20"), (gene, "delete"), (gene, [snvs[0], snvs[5]])]
    res = dta.tl.screen(a, perts, model=model, genome=genome, encoder=encoder, readout="cosine")
    for i, (g, m) in enumerate(perts):
        if m == "delete":
            out, key = _single(a, g, "delete", "cosine", model=model)
        else:
            out = dta.tl.perturb_tss(a, g, [m] if isinstance(m, list) else m, model=model, genome=genome,
                                     encoder=encoder, readout="cosine", copy=True)  # fmt: skip
            key = "dta_shift_0" if isinstance(m, list) else "dta_shift"
        np.testing.assert_allclose(res.X[i], out.var[f"{key}_mean"].to_numpy(), atol=2e-5, equal_nan=True)
    assert list(res.obs["kind"]) == ["tss_mutation", "tss_mutation", "delete", "tss_mutation"]
    assert res.obs["perturbation"].iloc[3] == f"{snvs[0]};{snvs[5]}"
    # bare VCF records are assigned to the genes whose TSS window contains them
    far = Variant("chr1", 1, seq[0], "A" if seq[0] != "A" else "C")
    with pytest.warns(UserWarning, match="outside every gene's TSS window"):
        vcf = dta.tl.screen(a, [snvs[0], far], model=model, genome=genome, encoder=encoder, readout="cosine")
    assert gene in set(vcf.obs["gene"])
    np.testing.assert_allclose(vcf.X[list(vcf.obs["gene"]).index(gene)], res.X[0], atol=1e-6, equal_nan=True)


def test_saturation_minus_strand_and_errors(tss_setup):
    a, vocab, model, encoder, genome, expected = tss_setup
    seq = expected["sequences"]["chr1"]
    snvs = dta.genome.saturation(genome, "chr1", 1500, "-", -2, 0)
    # TSS-relative -2 on the minus strand is 2 bp to the right on the plus strand; ordered by relative position
    assert [v.pos for v in snvs[::3]] == [1503, 1502, 1501]
    assert [v.ref for v in snvs[::3]] == [seq[1502], seq[1501], seq[1500]]
    with pytest.raises(ValueError, match="start"):
        dta.genome.saturation(genome, "chr1", 1500, "+", 5, 1)
    with pytest.raises(ValueError, match="strand"):
        dta.genome.saturation(genome, "chr1", 1500, "x", 1, 5)


def test_screen_errors(tss_setup):
    a, vocab, model, encoder, genome, expected = tss_setup
    snap = snapshot(a)
    obsm_before = list(a.obsm)
    with pytest.raises(ValueError, match="neither 'delete', 'overexpress' nor a mutation spec"):
        dta.tl.screen(a, [("DPM1", "knockout")], model=model)
    with pytest.raises(KeyError, match="NOPE"):
        dta.tl.screen(a, [("NOPE", "delete")], model=model)
    with pytest.raises(ValueError, match="needs genome= and encoder="):
        dta.tl.screen(a, [("DPM1", "delete:-5:+5")], model=model)
    with pytest.raises(KeyError, match="lacks the column"):
        dta.tl.screen(a, pd.DataFrame({"gene": ["DPM1"]}), model=model)
    with pytest.raises(TypeError, match="pair or a Variant"):
        dta.tl.screen(a, [("DPM1", "delete", 1)], model=model)
    with pytest.raises(ValueError, match="no perturbation"):
        dta.tl.screen(a, [], model=model)
    with pytest.raises(ValueError, match="chunk_size"):
        dta.tl.screen(a, [("DPM1", "delete")], model=model, chunk_size=0)
    with pytest.raises(ValueError, match="key_added"):
        dta.tl.screen(a, [("DPM1", "delete")], model=model, key_added="")
    assert_unchanged(a, snap)
    assert list(a.obsm) == obsm_before


def test_screen_key_added_protects_other_data_and_replaces_its_own():
    a, vocab, model, tokens = _build("V2")
    a = a.copy()
    for k in [k for k in a.obsm if k.startswith("screen_")]:  # written by other tests into the shared AnnData
        del a.obsm[k]
    a.uns.pop("screen", None)
    gene = _frequent_genes(a, tokens, vocab, 1)[0]
    a.obsm["umap_cell_shift"] = np.zeros((a.n_obs, 2))
    with pytest.raises(ValueError, match=r"obsm\['umap_cell_shift'\] already exist.*not a previous screen"):
        dta.tl.screen(a, [(gene, "delete")], model=model, readout="cosine", key_added="umap")
    assert list(a.obsm) == ["umap_cell_shift"] and "umap" not in a.uns
    a.uns["other"] = {"params": {"kind": "delete"}}
    with pytest.raises(ValueError, match=r"uns\['other'\]"):
        dta.tl.screen(a, [(gene, "delete")], model=model, readout="cosine", key_added="other")
    snap = snapshot(a)
    dta.tl.screen(a, [(gene, "delete")], model=model, readout="cosine", key_added=None)
    assert_unchanged(a, snap) and list(a.obsm) == ["umap_cell_shift"]
    dta.tl.screen(a, [(gene, "delete"), (gene, "overexpress")], model=model, readout="cosine")
    assert a.obsm["screen_cell_shift"].shape == (a.n_obs, 2)
    dta.tl.screen(a, [(gene, "delete")], model=model, readout="expression")  # a previous screen's slots: replaced
    assert a.obsm["screen_cell_shift"].shape == (a.n_obs, 1) and "screen_cell_emb_shift" not in a.obsm
    assert list(a.uns["screen"]["perturbations"]) == [f"{gene}|delete"]


@pytest.mark.parametrize("readout", ["cosine", "expression"])
def test_screen_two_gloo_processes_equal_one(readout, tmp_path):
    from _screen_worker import screen_worker

    a, vocab, model, tokens = _build("V2")
    a = a.copy()
    genes = _frequent_genes(a, tokens, vocab, 3)
    perts = [(genes[0], "delete"), (genes[1], "overexpress"), (genes[2], "delete")]
    kw = {"readout": readout, "per_cell": True, "chunk_size": 2, "checkpoint_dir": str(tmp_path / "ckpt")}
    out = tmp_path / "two.h5ad"
    torch.multiprocessing.spawn(
        screen_worker, args=(2, str(tmp_path / "store"), str(out), {"perturbations": perts, **kw}), nprocs=2
    )
    two = ad.read_h5ad(out)
    one = dta.tl.screen(a, perts, model=model, **{**kw, "checkpoint_dir": None})
    np.testing.assert_allclose(two.X, one.X, atol=2e-5, equal_nan=True)
    np.testing.assert_array_equal(two.layers["n"], one.layers["n"])
    pd.testing.assert_frame_equal(two.obs.astype(str), one.obs.astype(str))  # h5ad makes strings categorical
    for name in one.obs_names:
        np.testing.assert_allclose(
            two.uns["per_cell"]["shift"][name].toarray(), one.uns["per_cell"]["shift"][name].toarray(), atol=2e-5
        )
    np.testing.assert_allclose(two.obsm["cell_shift"].to_numpy(), one.obsm["cell_shift"].to_numpy(), atol=2e-5)
    assert len(list((tmp_path / "ckpt").glob("perturbation_*.npz"))) == 3  # written once, by rank 0
