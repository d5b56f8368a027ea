"""Batched perturbation engine vs a straightforward float64 reference, one cell at a time."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

sys.path.insert(0, str(Path(__file__).parent))
from _perturb_helpers import MiniVocab, make_adata, make_cells, make_model  # noqa: E402

from sc_dta.models._forward import contextual_embeddings  # noqa: E402
from sc_dta.models._perturb_engine import PerturbSpec, run_perturbations  # noqa: E402

MAX_LEN = 96


@pytest.fixture(autouse=True)
def _mix_lengths(monkeypatch):
    """Let every batch mix very different lengths, so that padding leaks would show."""
    import sc_dta.models._perturb_engine as engine_module

    monkeypatch.setattr(engine_module, "MIN_FILL", {"cpu": 0.0, "default": 0.0})


# ----------------------------------------------------------------------------- the reference


def reference_perturb(tokens, vocab, kind, gene, max_len):
    """Geneformer-style perturbed token list, written with plain Python lists."""
    ids = [int(t) for t in tokens]
    special = vocab.cls_id is not None
    if kind == "delete":
        return [t for t in ids if t != gene]
    if gene in ids:
        ids.remove(gene)
    ids.insert(1 if special else 0, gene)
    if len(ids) > max_len:
        ids = ids[: max_len - 1] + [ids[-1]] if special else ids[:max_len]
    return ids


def reference_shifts(model64, vocab, cells, kind, gene, max_len, emb_layer=-1):
    """Per cell: {token: shift}, mean gene shift, cell-embedding shift (float64, unbatched)."""
    n_layers = model64.config.num_hidden_layers
    specials = set(vocab.special_ids)
    out = []
    with torch.no_grad():
        for cell in cells:
            if gene not in cell:
                out.append(None)
                continue
            pert = reference_perturb(cell, vocab, kind, gene, max_len)
            h0 = model64(torch.tensor([list(cell)]), output_hidden_states=True).hidden_states[n_layers + emb_layer][0]
            h1 = model64(torch.tensor([pert]), output_hidden_states=True).hidden_states[n_layers + emb_layer][0]
            pos1 = {t: i for i, t in enumerate(pert)}
            shifts, e0, e1 = {}, [], []
            for i, t in enumerate(int(x) for x in cell):
                if t in specials or t == gene or t not in pos1:
                    continue
                a, b = h0[i], h1[pos1[t]]
                shifts[t] = 1.0 - float(torch.dot(a, b) / (a.norm() * b.norm()))
                e0.append(a)
                e1.append(b)
            if vocab.cls_id is not None:
                c0, c1 = h0[0], h1[0]
            else:
                c0, c1 = torch.stack(e0).mean(0), torch.stack(e1).mean(0)
            cell_shift = 1.0 - float(torch.dot(c0, c1) / (c0.norm() * c1.norm()))
            out.append((shifts, float(np.mean(list(shifts.values()))), cell_shift))
    return out


def engine(model, vocab, cells, kinds, gene, *, batch_size=8, overexpress_absent=False, emb_layer=-1):
    specs = [PerturbSpec(kind=k, token_id=gene) for k in kinds]
    return run_perturbations(
        model,
        cells,
        specs,
        special_ids=vocab.special_ids,
        pad_id=vocab.pad_id,
        cls_id=vocab.cls_id,
        eos_id=vocab.eos_id,
        max_length=vocab.max_length,
        emb_layer=emb_layer,
        batch_size=batch_size,
        device="cpu",
        overexpress_absent=overexpress_absent,
    )


def compare(res, ref, n_cells):
    assert res.evaluated.tolist() == [r is not None for r in ref]
    all_ref = []
    for i in range(n_cells):
        sel = res.cell == i
        if ref[i] is None:
            assert not sel.any()
            assert np.isnan(res.cell_mean[i]) and np.isnan(res.cell_emb[i])
            continue
        shifts, mean, cell_shift = ref[i]
        got = dict(zip(res.token[sel].tolist(), res.shift[sel].tolist(), strict=True))
        assert set(got) == set(shifts)
        for t, s in shifts.items():
            assert abs(got[t] - s) < 1e-5, (i, t, got[t], s)
        assert abs(res.cell_mean[i] - mean) < 1e-5
        assert abs(res.cell_emb[i] - cell_shift) < 1e-5
        all_ref += list(shifts.values())
    # shifts must be large enough for the 1e-5 tolerance to mean something
    assert np.median(all_ref) > 1e-3


@pytest.fixture(scope="module", params=["V1", "V2"])
def setup(request):
    version = request.param
    vocab = MiniVocab.make(version, n_genes=150, max_length=MAX_LEN)
    gene = vocab.first_gene_id + 7
    n_special = 2 if version == "V2" else 0
    full = MAX_LEN - n_special
    # very different lengths in one batch; gene first / middle / last / absent; two cells at max length
    lengths = [4, full, 30, 9, full, 60, 12, 2, 45]
    gene_pos = [0, 40, "last", None, "last", 0, 5, 1, None]
    cells = make_cells(vocab, lengths, gene=gene, gene_pos=gene_pos, seed=1)
    model = make_model(vocab, n_layers=3, seed=2)
    model64 = copy.deepcopy(model).double()
    return vocab, gene, cells, model, model64


def test_forward_matches_hidden_states(setup):
    vocab, gene, cells, model, model64 = setup
    n = model.config.num_hidden_layers
    ids = torch.zeros(len(cells), max(map(len, cells)), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, c in enumerate(cells):
        ids[i, : len(c)] = torch.from_numpy(c)
        mask[i, : len(c)] = 1
    with torch.no_grad():
        for emb_layer in (0, -1, -n):
            h = contextual_embeddings(model, ids, mask, emb_layer=emb_layer)
            for i, c in enumerate(cells):
                ref = model64(torch.from_numpy(c)[None], output_hidden_states=True).hidden_states[n + emb_layer][0]
                np.testing.assert_allclose(h[i, : len(c)].double().numpy(), ref.numpy(), atol=2e-5)
        # inputs_embeds gives the same result as the token lookup
        emb = model.bert.embeddings.word_embeddings(ids)
        np.testing.assert_allclose(
            contextual_embeddings(model, None, mask, inputs_embeds=emb).numpy(),
            contextual_embeddings(model, ids, mask).numpy(),
            atol=1e-6,
        )
    with pytest.raises(ValueError, match="emb_layer"):
        contextual_embeddings(model, ids, mask, emb_layer=1)
    with pytest.raises(ValueError, match="emb_layer"):
        contextual_embeddings(model, ids, mask, emb_layer=-n - 1)


@pytest.mark.parametrize("kind", ["delete", "overexpress"])
def test_engine_matches_reference(setup, kind):
    vocab, gene, cells, model, model64 = setup
    ref = reference_shifts(model64, vocab, cells, kind, gene, MAX_LEN)
    # batch 4: batches mix the 94-token cells with 4-token ones (padding must not leak)
    (res,) = engine(model, vocab, cells, [kind], gene, batch_size=4)
    compare(res, ref, len(cells))
    # a different batching gives the same numbers
    (res1,) = engine(model, vocab, cells, [kind], gene, batch_size=1)
    np.testing.assert_allclose(np.sort(res1.shift), np.sort(res.shift), atol=2e-6)


def test_engine_both_kinds_share_original(setup):
    vocab, gene, cells, model, model64 = setup
    calls = []

    def counting_forward(m, ids, mask, **kw):
        calls.append(ids.shape[0])
        return contextual_embeddings(m, ids, mask, **kw)

    specs = [PerturbSpec("delete", gene), PerturbSpec("overexpress", gene)]
    res = run_perturbations(
        model,
        cells,
        specs,
        special_ids=vocab.special_ids,
        cls_id=vocab.cls_id,
        eos_id=vocab.eos_id,
        batch_size=16,
        device="cpu",
        forward=counting_forward,
    )
    n_with_gene = sum(gene in c for c in cells)
    # per batch: one original forward + one per kind, over the cells containing the gene only
    assert len(calls) % 3 == 0
    triples = [calls[i : i + 3] for i in range(0, len(calls), 3)]
    assert all(t[0] == t[1] == t[2] for t in triples)
    assert sum(t[0] for t in triples) == n_with_gene
    for kind, r in zip(["delete", "overexpress"], res, strict=True):
        compare(r, reference_shifts(model64, vocab, cells, kind, gene, MAX_LEN), len(cells))


def test_overexpress_absent_trims_at_max_length(setup):
    """Geneformer's overexpression of a gene a cell lacks: insert at the front, trim to max_length."""
    vocab, gene, cells, model, model64 = setup
    absent = [c for c in cells if gene not in c]
    assert any(len(c) == MAX_LEN for c in cells)
    full = make_cells(vocab, [MAX_LEN - (2 if vocab.cls_id else 0)], gene=gene, gene_pos=[None], seed=5)
    test_cells = absent + full
    (res,) = engine(model, vocab, test_cells, ["overexpress"], gene, overexpress_absent=True)
    n_layers = model.config.num_hidden_layers
    with torch.no_grad():
        for i, c in enumerate(test_cells):
            pert = reference_perturb(c, vocab, "overexpress", gene, MAX_LEN)
            assert len(pert) == min(len(c) + 1, MAX_LEN)
            h0 = model64(torch.from_numpy(c)[None], output_hidden_states=True).hidden_states[n_layers - 1][0]
            h1 = model64(torch.tensor([pert]), output_hidden_states=True).hidden_states[n_layers - 1][0]
            pos1 = {t: j for j, t in enumerate(pert)}
            expect = {}
            for j, t in enumerate(c.tolist()):
                if t in vocab.special_ids or t not in pos1:
                    continue
                a, b = h0[j], h1[pos1[t]]
                expect[t] = 1.0 - float(torch.dot(a, b) / (a.norm() * b.norm()))
            sel = res.cell == i
            got = dict(zip(res.token[sel].tolist(), res.shift[sel].tolist(), strict=True))
            assert set(got) == set(expect)
            if len(c) == MAX_LEN:  # the last gene was trimmed away and is not compared
                assert c[-2 if vocab.eos_id else -1] not in got
            for t in expect:
                assert abs(got[t] - expect[t]) < 1e-5


def test_perturb_gene_matches_reference(setup):
    """The public AnnData function writes the reference shifts at the right (cell, gene) entries."""
    import sc_dta as dta

    vocab, gene, cells, model, model64 = setup
    adata, tokens = make_adata(vocab, cells)
    dta.tl.perturb_gene(
        adata, vocab.id_to_token[gene], model=model, kind="delete", readout="cosine", tokens=tokens, batch_size=3
    )
    ref = reference_shifts(model64, vocab, cells, "delete", gene, MAX_LEN)
    layer = adata.layers["dta_shift_delete"].toarray()
    var_of = {int(t): j for j, t in enumerate(tokens.var_token_ids) if t >= 0}
    expected = np.zeros_like(layer)
    present = np.zeros(layer.shape, dtype=bool)
    for i, r in enumerate(ref):
        if r is None:
            continue
        for t, s in r[0].items():
            expected[i, var_of[t]] = s
            present[i, var_of[t]] = True
        assert abs(adata.obs["dta_shift_delete_cell"].iloc[i] - r[1]) < 1e-5
        assert abs(adata.obs["dta_shift_delete_cell_emb"].iloc[i] - r[2]) < 1e-5
    np.testing.assert_allclose(layer, expected, atol=1e-5)
    stored = adata.layers["dta_shift_delete"]
    rows, cols = stored.nonzero()
    assert present[rows, cols].all()
    assert stored.nnz == present.sum()


def test_cell_embedding_modes(setup):
    """cell_emb='mean' pools the paired gene embeddings also when a <cls> is present; 'cls' needs one."""
    vocab, gene, cells, model, model64 = setup
    specs = [PerturbSpec("delete", gene)]
    kw = {"special_ids": vocab.special_ids, "cls_id": vocab.cls_id, "eos_id": vocab.eos_id, "device": "cpu"}
    if vocab.cls_id is None:
        with pytest.raises(ValueError, match="cls"):
            run_perturbations(model, cells, specs, cell_emb="cls", **kw)
        return
    (res,) = run_perturbations(model, cells, specs, cell_emb="mean", **kw)
    assert res.cell_emb_mode == "mean"
    n_layers = model.config.num_hidden_layers
    with torch.no_grad():
        for i, c in enumerate(cells):
            if gene not in c:
                continue
            pert = reference_perturb(c, vocab, "delete", gene, MAX_LEN)
            h0 = model64(torch.from_numpy(c)[None], output_hidden_states=True).hidden_states[n_layers - 1][0]
            h1 = model64(torch.tensor([pert]), output_hidden_states=True).hidden_states[n_layers - 1][0]
            keep0 = [j for j, t in enumerate(c.tolist()) if t not in vocab.special_ids and t != gene]
            keep1 = [j for j, t in enumerate(pert) if t not in vocab.special_ids]
            e0, e1 = h0[keep0].mean(0), h1[keep1].mean(0)
            expect = 1.0 - float(torch.dot(e0, e1) / (e0.norm() * e1.norm()))
            assert abs(res.cell_emb[i] - expect) < 1e-5


def test_out_of_memory_halves_the_batch(setup, caplog):
    """An out-of-memory error on a batch makes the engine halve the batch and go on, with the same results."""
    vocab, gene, cells, model, model64 = setup
    seen = []

    def tight_forward(m, ids, mask, **kw):
        seen.append(ids.shape[0])
        if ids.shape[0] > 2:
            raise torch.cuda.OutOfMemoryError("simulated")
        return contextual_embeddings(m, ids, mask, **kw)

    kw = {"special_ids": vocab.special_ids, "cls_id": vocab.cls_id, "eos_id": vocab.eos_id, "device": "cpu"}
    (res,) = run_perturbations(model, cells, [PerturbSpec("delete", gene)], batch_size=8, forward=tight_forward, **kw)
    (ref,) = run_perturbations(model, cells, [PerturbSpec("delete", gene)], batch_size=8, **kw)
    assert seen[0] > 2 and seen[-1] <= 2 and all(b <= a for a, b in zip(seen, seen[1:], strict=False))
    assert "retrying with batch_size" in caplog.text
    np.testing.assert_allclose(np.sort(res.shift), np.sort(ref.shift), atol=2e-6)
    np.testing.assert_array_equal(res.evaluated, ref.evaluated)

    def always_oom(m, ids, mask, **kw):
        raise torch.cuda.OutOfMemoryError("simulated")

    with pytest.raises(torch.cuda.OutOfMemoryError):
        run_perturbations(model, cells, [PerturbSpec("delete", gene)], batch_size=4, forward=always_oom, **kw)
