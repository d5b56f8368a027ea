"""Workers of the 2-process embed_dna and train_adapter tests (a module of its own so torch.multiprocessing.spawn can
import it), and the inputs they share with the one-process runs they are compared with."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np

N_TSS_GENES = 30


def embed_adata(lengths: dict[str, int], n_genes: int = N_TSS_GENES, seed: int = 0):
    """AnnData over ``n_genes`` genes with random TSSs on chromosomes of ``lengths``; some share a TSS, some have none."""
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    chroms = sorted(lengths)
    chrom = rng.choice(chroms, size=n_genes)
    pos = np.array([rng.integers(0, lengths[c]) for c in chrom], dtype=np.int64)
    strand = rng.choice(["+", "-"], size=n_genes)
    chrom[5], pos[5], strand[5] = chrom[2], pos[2], strand[2]  # same window: embedded once
    chrom[17], pos[17], strand[17] = chrom[11], pos[11], strand[11]
    adata = ad.AnnData(sp.csr_matrix(rng.poisson(1.0, size=(4, n_genes)).astype(np.float32)))
    adata.var_names = [f"G{i}" for i in range(n_genes)]
    adata.var["tss_chrom"] = pd.Series(chrom, dtype=object).values
    adata.var["tss_pos"] = pd.array(pos, dtype="Int64")
    adata.var["tss_strand"] = list(strand)
    for i in (8, 23):  # no TSS: NaN rows
        adata.var.iloc[i, adata.var.columns.get_loc("tss_chrom")] = None
        adata.var.iloc[i, adata.var.columns.get_loc("tss_pos")] = pd.NA
        adata.var.iloc[i, adata.var.columns.get_loc("tss_strand")] = None
    return adata


def train_inputs(n_cells: int = 54, from_adata: bool = False, **overrides):
    """AnnData, a small dropout-free BioDTA and train_adapter arguments (54 cells: 49 train, the last batch of 1).

    ``from_adata``: the model of :meth:`BioDTA.from_adata` (position-free, no special tokens but pad and mask)
    instead of :meth:`BioDTA.from_config` with Geneformer-style special tokens and positions.
    """
    import torch
    from test_train_adapter import sim_vocab, simulate, small_model

    from sc_dta.models import BioDTA

    torch.manual_seed(0)
    adata = simulate(n_cells)
    if from_adata:
        model = BioDTA.from_adata(adata, hidden_size=32, n_heads=2, dropout=0.0, adapter_dropout=0.0, seed=0)
    else:
        model = small_model(sim_vocab(adata.var_names), seed=0, dropout=0.0, adapter_dropout=0.0)
    kwargs = {
        "epochs": 4,
        "batch_size": 8,
        "accumulation_steps": 2,
        "lr": 5e-3,
        "val_fraction": 0.1,
        "seed": 0,
        "early_stopping": 2,
        "device": "cpu",
    } | overrides
    return adata, model, kwargs


def _init(rank: int, world_size: int, store: str) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)


def embed_worker(rank: int, world_size: int, store: str, out: str, kwargs: dict) -> None:
    """Run one rank of a gloo embed_dna; every rank writes its varm, uns and the windows its model computed."""
    _init(rank, world_size, store)
    import torch.distributed as dist

    try:
        from test_embed_dna import WINDOW, WindowCounter, small_enformer

        import sc_dta as dta
        from sc_dta.models.dna import EnformerEncoder
        from sc_dta.tl import _embed_dna

        dta.settings.cache_dir = kwargs["cache_dir"]
        dta.settings.progress = False
        _embed_dna._MIN_CHUNK = kwargs["chunk"]  # several chunks of windows, as for a genome-wide run
        fasta = kwargs["fasta"]
        adata = embed_adata(kwargs["lengths"])
        model = small_enformer()
        counter = WindowCounter(model)
        encoder = EnformerEncoder(model, window=WINDOW, n_bins=1)
        dta.tl.embed_dna(adata, genome=fasta, encoder=encoder, batch_size=kwargs["batch_size"], device="cpu")
        result = {
            "emb": np.asarray(adata.varm["dna_emb"]),
            "params": dict(adata.uns["dna_emb"]["params"]),
            "computed": counter.n,
        }
        # a process holding other genes is refused on every process, before anything is computed
        try:
            dta.tl.embed_dna(adata, genome=fasta, encoder=encoder, genes=list(adata.var_names[: 3 + rank]))
        except ValueError as e:
            result["mismatch"] = str(e)
        with open(Path(out) / f"embed{rank}.pkl", "wb") as fh:
            pickle.dump(result, fh)
    finally:
        dist.destroy_process_group()


def train_worker(rank: int, world_size: int, store: str, out: str, kwargs: dict) -> None:
    """Run one rank of a gloo train_adapter (optionally interrupted and resumed); every rank writes its results."""
    _init(rank, world_size, store)
    import torch
    import torch.distributed as dist

    try:
        import sc_dta as dta

        dta.settings.progress = False
        adata, model, train_kwargs = train_inputs(**kwargs.get("inputs", {}))
        # own_dirs: each process its own output_dir, as on nodes that share no file system
        output_dir = Path(out) / (f"run{rank}" if kwargs.get("own_dirs") else "run")
        stop = kwargs.get("stop_after_steps")
        if stop is not None:
            try:
                dta.tl.train_adapter(adata, model, output_dir=output_dir, _stop_after_steps=stop, **train_kwargs)
            except KeyboardInterrupt:
                pass
            else:
                raise AssertionError("the run was not interrupted")
            written = (
                sorted(str(p.relative_to(output_dir)) for p in output_dir.rglob("*")) if output_dir.exists() else []
            )
            adata, model, train_kwargs = train_inputs(**kwargs.get("inputs", {}))  # a new session
        bio = dta.tl.train_adapter(adata, model, output_dir=output_dir, resume=stop is not None, **train_kwargs)
        rec = adata.uns["train_adapter"]
        result = {
            "uns": {k: (np.asarray(v) if not isinstance(v, dict) else dict(v)) for k, v in rec.items()},
            "weights": {k: v.detach().cpu().clone() for k, v in bio.state_dict().items()},
            "grad_flags": {k: p.requires_grad for k, p in bio.named_parameters()},
            "loss_history": list(bio.loss_history),
        }
        if stop is not None:
            result["written_at_interrupt"] = written
        torch.save(result, Path(out) / f"train{rank}.pt")
    finally:
        dist.destroy_process_group()


def sgd_step(dist=None) -> tuple[float, list]:
    """One Trainer step with SGD (lr 1, no clipping) over a 3-cell and a 1-cell micro-batch: ``(loss, -gradients)``.

    With SGD the parameter change is the gradient itself, so comparing it checks the loss normalisation exactly
    (AdamW would hide a constant factor).
    """
    import torch

    from sc_dta.tl._train import _training_inputs
    from sc_dta.tl._trainer import Masker, Trainer

    adata, model, _ = train_inputs()
    inp = _training_inputs(adata, model, "dna_emb", None, None, None, 0.1, 0)
    model.set_dna_embeddings(inp.dna_token_ids, inp.dna_rows)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    optimizer = torch.optim.SGD(params, lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    gene_ids = torch.as_tensor(np.setdiff1d(np.arange(len(inp.vocab)), inp.special))
    masker = Masker(inp.special, int(inp.vocab.pad_id), int(inp.vocab.mask_id), gene_ids, 0.15)
    trainer = Trainer(
        model, optimizer, scheduler, masker, torch.Generator().manual_seed(0), seqs=inp.seqs, lengths=inp.lengths,
        train_cells=inp.train_cells, batch_size=3, accumulation_steps=2, epochs=1, max_grad_norm=None,
        freeze_backbone=False, seed=0, device=torch.device("cpu"), val_batches=[], early_stopping=None, dist=dist,
    )  # fmt: skip
    loss = trainer.step([inp.train_cells[:3], inp.train_cells[3:4]])  # 2 + 1 rows, then 1 + 0 rows
    return loss, [b - p.detach() for b, p in zip(before, params, strict=True)]


def step_worker(rank: int, world_size: int, store: str, out: str, kwargs: dict) -> None:
    """Run :func:`sgd_step` on one rank of a gloo group; every rank writes its loss and gradients."""
    _init(rank, world_size, store)
    import torch
    import torch.distributed as dist

    try:
        from sc_dta._distributed import Distributed

        torch.save(sgd_step(Distributed()), Path(out) / f"step{rank}.pt")
    finally:
        dist.destroy_process_group()
