"""embed_dna and train_adapter under torch.distributed: 2 gloo processes give what one process gives."""

from __future__ import annotations

import pickle
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import sc_dta as dta
from sc_dta._distributed import Distributed

sys.path.insert(0, str(Path(__file__).parent))
from _ddp_worker import embed_adata, embed_worker, sgd_step, step_worker, train_inputs, train_worker
from _genome_data import write_test_genome

pytestmark = pytest.mark.usefixtures("one_torch_thread")

#: Loss curves and weights of 2 processes vs 1: the same arithmetic up to float32 summation order.
RTOL, ATOL = 1e-4, 1e-5


def _spawn(worker, tmp_path: Path, kwargs: dict) -> None:
    torch.multiprocessing.spawn(worker, args=(2, str(tmp_path / "store"), str(tmp_path), kwargs), nprocs=2)


def test_no_process_group_is_one_process():
    dist = Distributed()
    assert not dist.active and dist.main and (dist.rank, dist.size) == (0, 1)
    np.testing.assert_array_equal(dist.shard(np.array([3, 1, 2])), [0, 1, 2])
    assert dist.slice(5) == slice(0, 5)
    assert dist.gather("x") == ["x"] and dist.all_gather("x") == ["x"] and dist.broadcast("x") == "x"
    np.testing.assert_array_equal(dist.all_reduce([1.5, 2]), [1.5, 2.0])
    dist.check_same(object(), "anything")  # nothing to compare with
    dist.barrier()


@pytest.mark.parametrize(("n", "size"), [(5, 2), (1, 2), (7, 3), (0, 2)])
def test_slices_cover_the_batch_once(n, size):
    parts = []
    for rank in range(size):
        d = Distributed()
        d.active, d.rank, d.size = True, rank, size
        parts.append(np.arange(n)[d.slice(n)])
    np.testing.assert_array_equal(np.concatenate(parts), np.arange(n))
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_embed_dna_two_gloo_processes_equal_one(tmp_path):
    from test_embed_dna import WINDOW, WindowCounter, small_enformer

    from sc_dta.models.dna import EnformerEncoder
    from sc_dta.tl import _dna_cache, _embed_dna

    fasta, _, expected = write_test_genome(tmp_path / "genome")
    lengths = expected["lengths"]
    # both runs start from the same partly filled cache: 4 of the windows are already there
    shared, alone = tmp_path / "cache_two", tmp_path / "cache_one"
    dta.settings.cache_dir = shared
    encoder = EnformerEncoder(small_enformer(), window=WINDOW, n_bins=1)
    prefill = embed_adata(lengths)
    dta.tl.embed_dna(prefill, genome=fasta, encoder=encoder, genes=list(prefill.var_names[[0, 1, 3, 13]]))
    shutil.copytree(shared, alone)

    kw = {"cache_dir": str(shared), "chunk": 8, "batch_size": 2, "fasta": str(fasta), "lengths": lengths}
    _spawn(embed_worker, tmp_path, kw)
    ranks = [pickle.loads((tmp_path / f"embed{r}.pkl").read_bytes()) for r in range(2)]

    dta.settings.cache_dir = alone
    adata = embed_adata(lengths)
    model = small_enformer()
    counter = WindowCounter(model)
    old_chunk = _embed_dna._MIN_CHUNK
    _embed_dna._MIN_CHUNK = 8
    try:
        dta.tl.embed_dna(adata, genome=fasta, encoder=EnformerEncoder(model, window=WINDOW, n_bins=1), batch_size=2)
    finally:
        _embed_dna._MIN_CHUNK = old_chunk
    one = adata.varm["dna_emb"]
    assert np.isnan(one[[8, 23]]).all() and np.isfinite(np.delete(one, [8, 23], axis=0)).all()
    for r in ranks:  # bit for bit: the same batches ran, only on other processes
        np.testing.assert_array_equal(r["emb"], one)
    params = {k: v for k, v in adata.uns["dna_emb"]["params"].items() if k != "date"}
    assert ranks[0]["params"] == ranks[1]["params"]  # one date too
    assert {k: v for k, v in ranks[0]["params"].items() if k != "date"} == params

    # 28 genes with a TSS, 2 pairs share a window, 4 were cached: 22 windows computed once, split between the ranks
    assert counter.n == 22
    assert ranks[0]["computed"] + ranks[1]["computed"] == 22 and min(r["computed"] for r in ranks) >= 8
    cache = _dna_cache.DNAEmbeddingCache(encoder, device="cpu", root=shared / "dna_embeddings")
    assert len(cache) == 26 and not list(cache.directory.glob("*/*.tmp")) and not list(cache.directory.glob(".*"))
    for r in ranks:
        assert "process(es) [1] of 2 hold other genes, TSS positions or DNA encoder" in r["mismatch"]


def test_distributed_gradient_is_the_global_batch_gradient(tmp_path):
    """Each process takes its slice of every global micro-batch (one gets none of a 1-cell batch); the gradient
    DDP averages equals one process's gradient of the whole batches, masked-gene losses over all masked genes."""
    _spawn(step_worker, tmp_path, {})
    ranks = [torch.load(tmp_path / f"step{r}.pt", weights_only=False) for r in range(2)]
    loss, grads = sgd_step()
    assert sum(float(g.abs().sum()) for g in grads) > 1.0
    for two_loss, two_grads in ranks:
        assert two_loss == pytest.approx(loss, rel=1e-6)
        for g2, g1 in zip(two_grads, grads, strict=True):
            torch.testing.assert_close(g2, g1, rtol=RTOL, atol=1e-6)


def _load(tmp_path: Path) -> list[dict]:
    return [torch.load(tmp_path / f"train{r}.pt", weights_only=False) for r in range(2)]


def _assert_same_run(two: dict, one_uns: dict, one_weights: dict) -> None:
    for key in ("step", "val_epoch"):
        np.testing.assert_array_equal(two["uns"][key], one_uns[key])
    for key in ("loss", "val_loss", "lr"):
        np.testing.assert_allclose(two["uns"][key], one_uns[key], rtol=RTOL, atol=ATOL, err_msg=key)
    for key in ("context_gain", "loss_real_context", "loss_shuffled_context"):
        np.testing.assert_allclose(float(two["uns"][key]), float(one_uns[key]), rtol=RTOL, atol=ATOL, err_msg=key)
    assert int(two["uns"]["best_epoch"]) == int(one_uns["best_epoch"])
    assert two["weights"].keys() == one_weights.keys()
    for name, value in one_weights.items():
        if name.endswith("attention.self.key.bias"):
            # a key bias adds the same score to every key of a query, which softmax ignores: its true gradient is 0,
            # and Adam scales the float rounding noise it gets instead to lr-sized steps that differ run to run
            continue
        torch.testing.assert_close(two["weights"][name], value, rtol=RTOL, atol=ATOL, msg=name)


@pytest.mark.filterwarnings("ignore:train_adapter. the model learned no gene-gene dependencies")
def test_train_adapter_two_gloo_processes_equal_one(tmp_path):
    """BioDTA.from_adata's model (backbone and adapter trained), gradient accumulation, best weights restored."""
    inputs = {"from_adata": True, "n_cells": 143, "epochs": 6, "lr": 2e-2}
    _spawn(train_worker, tmp_path, {"inputs": inputs})
    ranks = _load(tmp_path)
    adata, model, kwargs = train_inputs(**inputs)
    bio = dta.tl.train_adapter(adata, model, **kwargs)
    one = adata.uns["train_adapter"]
    assert one["loss"].size == 6 * 9  # 129 cells: 17 batches of 8 (the last of 1), 9 steps of 2 per epoch
    assert one["val_loss"].size == 6 and one["val_loss"][-1] < one["val_loss"][0]
    one_weights = {k: v.detach().clone() for k, v in bio.state_dict().items()}
    for r in ranks:
        _assert_same_run(r, one, one_weights)
    for name, value in ranks[0]["weights"].items():  # DDP: every process applies the same averaged gradient
        torch.testing.assert_close(ranks[1]["weights"][name], value, rtol=0, atol=0, msg=name)
    assert ranks[0]["uns"]["params"] == ranks[1]["uns"]["params"]
    assert ranks[0]["grad_flags"] == {k: p.requires_grad for k, p in bio.named_parameters()}
    assert (tmp_path / "run" / "model").is_dir() and (tmp_path / "run" / "checkpoint").is_dir()


@pytest.mark.filterwarnings("ignore:train_adapter. the model learned no gene-gene dependencies")
def test_train_adapter_two_processes_interrupted_and_resumed(tmp_path):
    """Rank 0 alone writes checkpoints; both processes resume from rank 0's and end where one uninterrupted process
    ends (frozen backbone: the adapter alone trains). Each process has its own output_dir, as on nodes without a
    shared file system: rank 1's stays empty, and it gets the checkpoint's state and weights from rank 0."""
    inputs = {"freeze_backbone": True, "lr": 2e-2}
    _spawn(train_worker, tmp_path, {"inputs": inputs, "stop_after_steps": 5, "own_dirs": True})
    ranks = _load(tmp_path)
    assert "checkpoint/trainer_state.pt" in ranks[0]["written_at_interrupt"]
    assert not any(p.startswith("checkpoint.tmp") for p in ranks[0]["written_at_interrupt"])
    assert ranks[1]["written_at_interrupt"] == [] and not (tmp_path / "run1").exists()
    assert (tmp_path / "run0" / "model").is_dir()
    adata, model, kwargs = train_inputs(**inputs)
    bio = dta.tl.train_adapter(adata, model, **kwargs)
    one_weights = {k: v.detach().clone() for k, v in bio.state_dict().items()}
    for r in ranks:
        _assert_same_run(r, adata.uns["train_adapter"], one_weights)
        assert [h.get("step") for h in r["loss_history"]] == [h.get("step") for h in bio.loss_history]
