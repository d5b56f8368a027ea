"""The perturbation engines' pieces: the plan, the perturbed batch, the batch loop and out-of-memory handling."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

sys.path.insert(0, str(Path(__file__).parent))
from _perturb_helpers import MiniVocab, make_cells, make_model  # noqa: E402

import sc_dta as dta  # noqa: E402
from sc_dta.models._batches import is_memory_error, length_sorted_batches  # noqa: E402
from sc_dta.models._expression_readout import run_expression_readout  # noqa: E402
from sc_dta.models._forward import contextual_embeddings  # noqa: E402
from sc_dta.models._perturb_engine import (  # noqa: E402
    PerturbSpec,
    _plan,
    _Vocab,
    holds_tokens,
    perturb_tokens,
    perturbed_batch,
    run_perturbations,
)

#: More bytes than any machine's address space: the CPU allocator refuses at once, without touching memory.
IMPOSSIBLE = 1 << 52


@pytest.fixture(autouse=True)
def _quiet():
    before = dta.settings.progress
    dta.settings.progress = False
    yield
    dta.settings.progress = before


@pytest.fixture(scope="module")
def setup():
    vocab = MiniVocab.make("V2", n_genes=60, max_length=40)
    gene = vocab.first_gene_id + 3
    lengths = [30, 12, 25, 8, 38, 20]
    cells = make_cells(vocab, lengths, gene=gene, gene_pos=[0, 4, None, "last", 10, 2], seed=0)
    model = make_model(vocab, n_layers=2, seed=1)
    return vocab, gene, cells, model


def _kw(vocab):
    return {
        "special_ids": vocab.special_ids,
        "pad_id": vocab.pad_id,
        "cls_id": vocab.cls_id,
        "eos_id": vocab.eos_id,
        "max_length": vocab.max_length,
        "device": "cpu",
    }


def _allocate_too_much(*_args, **_kwargs):
    return torch.empty(IMPOSSIBLE, dtype=torch.uint8)  # the real DefaultCPUAllocator RuntimeError


# ----------------------------------------------------------------------------- the plan and one batch


def test_holds_matches_a_loop_over_cells():
    rng = np.random.default_rng(0)
    cells = [rng.integers(0, 30, int(n)) for n in rng.integers(0, 12, 25)]
    tokens = np.asarray([3, 7, 3, 29, 31, 0], dtype=np.int64)  # repeated, absent everywhere (31), present
    got = holds_tokens(cells, tokens)
    want = np.asarray([[bool(np.any(c == t)) for c in cells] for t in tokens])
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(holds_tokens(cells, tokens, block=4), want)  # blocks of cells
    assert holds_tokens([], tokens).shape == (len(tokens), 0)


def test_plan_orders_evaluable_cells_longest_first(setup):
    vocab, gene, cells, _ = setup
    specs = [PerturbSpec("delete", gene), PerturbSpec("overexpress", gene + 50)]
    plan = _plan(cells, specs, cls_id=vocab.cls_id, cell_emb="auto", overexpress_absent=False)
    has = [gene in c for c in cells]
    np.testing.assert_array_equal(plan.evaluable[0], has)
    np.testing.assert_array_equal(plan.evaluable[1], [gene + 50 in c for c in cells])
    lengths = [len(cells[i]) for i in plan.order]
    assert lengths == sorted(lengths, reverse=True) and list(plan.sorted_lengths) == lengths
    assert set(plan.order) == {i for i, h in enumerate(has) if h or gene + 50 in cells[i]}
    assert plan.use_cls and plan.cell_emb_mode == "cls"
    # inserting an absent gene evaluates every cell
    plan = _plan(cells, specs, cls_id=vocab.cls_id, cell_emb="mean", overexpress_absent=True)
    assert plan.evaluable[1].all() and len(plan.order) == len(cells) and plan.cell_emb_mode == "mean"
    with pytest.raises(ValueError, match="<cls>"):
        _plan(cells, specs, cls_id=None, cell_emb="cls", overexpress_absent=False)


def test_perturbed_batch_pairs_every_affected_gene(setup):
    vocab, gene, cells, _ = setup
    facts = _Vocab(np.asarray(vocab.special_ids), vocab.pad_id, vocab.cls_id, vocab.eos_id, vocab.max_length)
    batch = [cells[i] for i in (0, 2, 3)]  # the gene in 0 and 3, absent from 2
    special = [np.isin(c, vocab.special_ids) for c in batch]
    spec = PerturbSpec("delete", gene)
    pert = perturbed_batch(batch, special, spec, np.ones(3, dtype=bool), facts)
    assert pert.rows.tolist() == [0, 2]
    for r, j in enumerate(pert.rows):
        one = perturb_tokens(batch[j], spec, special_ids=np.asarray(vocab.special_ids), **_facts(vocab))
        np.testing.assert_array_equal(pert.ids[r, : len(one[0])], one[0])
        assert pert.mask[r].sum() == len(one[0]) and (pert.ids[r, len(one[0]) :] == vocab.pad_id).all()
        sel = pert.pair_row == r
        np.testing.assert_array_equal(pert.orig_pos[sel], one[1])
        np.testing.assert_array_equal(pert.pert_pos[sel], one[2])
        # paired positions hold the same gene; neither the deleted gene nor <cls>/<eos> is paired
        np.testing.assert_array_equal(batch[j][pert.orig_pos[sel]], pert.ids[r, pert.pert_pos[sel]])
        assert not np.isin(batch[j][pert.orig_pos[sel]], [gene, *vocab.special_ids]).any()
    # a cell left out by the plan is not perturbed; nothing evaluable gives None
    assert perturbed_batch(batch, special, spec, np.array([False, True, True]), facts).rows.tolist() == [2]
    assert perturbed_batch(batch, special, spec, np.zeros(3, dtype=bool), facts) is None


def _facts(vocab):
    return {"cls_id": vocab.cls_id, "eos_id": vocab.eos_id, "max_length": vocab.max_length}


def test_length_sorted_batches_cut_by_fill_and_size():
    order = np.arange(7)
    lengths = np.asarray([100, 99, 98, 80, 79, 10, 9])
    device = torch.device("cpu")
    seen = [b.tolist() for b, _ in length_sorted_batches(order, lengths, 2, device, lambda b: b, desc="t")]
    assert seen == [[0, 1], [2], [3, 4], [5], [6]]  # 98 < 0.97 * 99; 9 < 0.97 * 10
    seen = [
        b.tolist()
        for b, _ in length_sorted_batches(order, lengths, 4, device, lambda b: b, desc="t", min_fill={"default": 0.0})
    ]
    assert seen == [[0, 1, 2, 3], [4, 5, 6]]


# ----------------------------------------------------------------------------- out of memory


def test_is_memory_error():
    assert is_memory_error(MemoryError())
    assert is_memory_error(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 bytes"))
    assert is_memory_error(RuntimeError("MPS backend out of memory (MPS allocated: 1 GB)"))
    assert is_memory_error(RuntimeError("[enforce fail at alloc_cpu.cpp:117] not enough memory: you tried ..."))
    assert not is_memory_error(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not is_memory_error(torch.cuda.OutOfMemoryError("CUDA out of memory"))  # that one halves the batch
    assert not is_memory_error(ValueError("out of memory"))


def test_a_plain_cuda_out_of_memory_runtime_error_halves_on_cuda_only():
    from sc_dta.models._batches import _cuda_oom_errors, _is_cuda_oom

    err = RuntimeError("CUDA error: out of memory")
    assert _is_cuda_oom(err, torch.device("cuda"), _cuda_oom_errors())
    assert not _is_cuda_oom(err, torch.device("cpu"), _cuda_oom_errors())
    assert _is_cuda_oom(torch.cuda.OutOfMemoryError("x"), torch.device("cpu"), _cuda_oom_errors())
    cpu_text = RuntimeError("DefaultCPUAllocator: can't allocate memory")
    assert not _is_cuda_oom(cpu_text, torch.device("cuda"), _cuda_oom_errors())


def test_cpu_allocation_failure_is_a_clear_memory_error_not_retried(setup, monkeypatch):
    from sc_dta.models import _perturb_engine

    monkeypatch.setattr(_perturb_engine, "MIN_FILL", {"cpu": 0.0, "default": 0.0})  # a batch of several cells
    vocab, gene, cells, model = setup
    calls = []

    def greedy(m, ids, mask, **kw):
        calls.append(tuple(ids.shape))
        return _allocate_too_much()

    with pytest.raises(MemoryError) as info:
        run_perturbations(model, cells, [PerturbSpec("delete", gene)], batch_size=4, forward=greedy, **_kw(vocab))
    assert len(calls) == 1  # not retried with a smaller batch
    n_cells, width = calls[0]
    assert n_cells == 4
    msg = str(info.value)
    assert "Out of memory on cpu" in msg
    assert f"batch of {n_cells} cells of up to {width} tokens" in msg
    longest = sorted((len(c) for c in cells if gene in c), reverse=True)[:n_cells]
    assert f"({sum(longest)} tokens in all" in msg
    assert "batch_size=" in msg and "checkpoint_dir=" in msg and "can't allocate memory" in msg
    assert isinstance(info.value.__cause__, RuntimeError)  # raised from the allocator's error
    assert "DefaultCPUAllocator" in str(info.value.__cause__)
    assert model.training is False


def test_python_memory_error_is_reworded_and_other_errors_pass_through(setup):
    vocab, gene, cells, model = setup

    def python_oom(m, ids, mask, **kw):
        raise MemoryError("Unable to allocate 3.2 GiB for an array")

    with pytest.raises(MemoryError, match=r"Out of memory on cpu .*Unable to allocate 3\.2 GiB") as info:
        run_perturbations(model, cells, [PerturbSpec("delete", gene)], forward=python_oom, **_kw(vocab))
    assert type(info.value.__cause__) is MemoryError

    def broken(m, ids, mask, **kw):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    with pytest.raises(RuntimeError, match="mat1 and mat2") as info:
        run_perturbations(model, cells, [PerturbSpec("delete", gene)], forward=broken, **_kw(vocab))
    assert not isinstance(info.value, MemoryError)


def test_cuda_out_of_memory_still_halves_the_batch(setup, monkeypatch):
    vocab, gene, cells, model = setup
    specs = [PerturbSpec("delete", gene), PerturbSpec("overexpress", gene)]
    ref = run_perturbations(model, cells, specs, batch_size=1, **_kw(vocab))
    calls = []

    def small_only(m, ids, mask, **kw):
        calls.append(ids.shape[0])
        if ids.shape[0] > 1:
            raise torch.cuda.OutOfMemoryError("simulated")
        return contextual_embeddings(m, ids, mask, **kw)

    from sc_dta.models import _perturb_engine

    monkeypatch.setattr(_perturb_engine, "MIN_FILL", {"cpu": 0.0, "default": 0.0})  # batches of several cells
    out = run_perturbations(model, cells, specs, batch_size=4, forward=small_only, **_kw(vocab))
    assert max(calls) > 1
    for a, b in zip(ref, out, strict=True):
        np.testing.assert_array_equal(a.evaluated, b.evaluated)
        order_a, order_b = np.lexsort((a.token, a.cell)), np.lexsort((b.token, b.cell))
        np.testing.assert_array_equal(a.token[order_a], b.token[order_b])
        np.testing.assert_allclose(a.shift[order_a], b.shift[order_b], atol=1e-6)


class _GreedyLayer(torch.nn.Module):
    """An encoder layer that asks the CPU allocator for more than it can give (real error type, real allocator)."""

    def forward(self, hidden, *args, **kwargs):
        return (_allocate_too_much(),)


def test_expression_readout_allocation_failure_names_n_folds(setup):
    import copy

    vocab, gene, cells, model = setup
    greedy = copy.deepcopy(model)
    greedy.bert.encoder.layer[1] = _GreedyLayer()
    with pytest.raises(MemoryError) as info:
        run_expression_readout(
            greedy,
            cells,
            [PerturbSpec("delete", gene)],
            special_ids=vocab.special_ids,
            mask_id=vocab.mask_id,
            pad_id=vocab.pad_id,
            cls_id=vocab.cls_id,
            eos_id=vocab.eos_id,
            columns=np.arange(len(vocab)),
            n_folds=3,
            batch_size=6,
            device="cpu",
        )
    msg = str(info.value)
    assert re.search(r"Out of memory on cpu running a batch of (1 cell|2 cells) of up to \d+ tokens", msg)
    assert "n_folds= (now 3" in msg and "batch_size= (masked sequences per forward pass, now 6)" in msg
    assert "DefaultCPUAllocator" in str(info.value.__cause__)


def test_perturb_gene_reports_the_memory_error(setup):
    """The public function passes the engine's MemoryError on (nothing swallows it)."""
    from _perturb_helpers import make_adata

    vocab, gene, cells, model = setup
    adata, tokens = make_adata(vocab, cells)
    greedy = make_model(vocab, n_layers=2, seed=1)
    greedy.bert.encoder.layer[0] = _GreedyLayer()
    name = vocab.id_to_token[gene]
    with pytest.raises(MemoryError, match="Out of memory on cpu"):
        dta.tl.perturb_gene(adata, name, model=greedy, tokens=tokens, readout="cosine", device="cpu", copy=True)
