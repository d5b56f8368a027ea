"""``tl.train_adapter``: masked-gene training of a BioDTA (adapter, and the backbone when it is not pretrained)."""

from __future__ import annotations

import copy
import logging
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from sc_dta._distributed import Distributed
from sc_dta._settings import settings
from sc_dta._utils import get_anndata, reproducible, resolve_device
from sc_dta.tl import _checkpoint as ckpt_io
from sc_dta.tl._trainer import (
    Masker,
    Progress,
    Trainer,
    context_gain,
    linear_warmup_decay,
    masked_batches,
    shuffled_context,
)

if TYPE_CHECKING:
    import torch
    from anndata import AnnData
    from mudata import MuData
    from transformers import BertForMaskedLM

    from sc_dta.models.biodta import BioDTA

logger = logging.getLogger(__name__)

# run settings a resumed run must share with the interrupted one
_RESUME_KEYS = (
    "seed",
    "epochs",
    "batch_size",
    "accumulation_steps",
    "lr",
    "mask_prob",
    "freeze_backbone",
    "weight_decay",
    "warmup_ratio",
    "early_stopping",
    "n_train_cells",
    "n_val_cells",
)
#: Default budget: about this many cell passes (epochs = passes / training cells), within the bounds below.
TARGET_CELL_PASSES = 100_000
#: Early stopping never ends a run before this fraction of its epochs (masked-gene training plateaus on the gene
#: frequencies before it learns gene-gene dependencies; stopping on that plateau learns nothing: measured).
MIN_EPOCH_FRACTION = 0.5
MIN_EPOCHS, MAX_EPOCHS = 5, 100
#: Context gain (nats per masked gene) under which train_adapter warns that no dependency was learned.
MIN_CONTEXT_GAIN = 0.02


def default_epochs(n_train_cells: int) -> int:
    """Epochs of the default budget: ``TARGET_CELL_PASSES / n_train_cells`` within [MIN_EPOCHS, MAX_EPOCHS]."""
    return int(np.clip(math.ceil(TARGET_CELL_PASSES / max(1, n_train_cells)), MIN_EPOCHS, MAX_EPOCHS))


def train_adapter(
    adata: AnnData | MuData,
    model: BioDTA | BertForMaskedLM,
    *,
    dna_key: str = "dna_emb",
    epochs: int | None = None,
    batch_size: int | None = None,
    lr: float = 1e-3,
    mask_prob: float = 0.15,
    freeze_backbone: bool | None = None,
    early_stopping: int | None = 3,
    val_fraction: float = 0.1,
    output_dir: str | Path | None = None,
    resume: bool = False,
    seed: int = 0,
    device: str | torch.device | None = None,
    accumulation_steps: int = 1,
    weight_decay: float = 0.01,
    warmup_ratio: float = 0.05,
    max_grad_norm: float | None = 1.0,
    layer: str | None = None,
    gene_id_key: str | None = None,
    max_length: int | None = None,
    mode: Literal["replace", "add"] | None = None,
    adapter_layers: int | None = None,
    adapter_hidden: int | None = None,
    adapter_dropout: float | None = None,
    key_added: str = "train_adapter",
    mod: str = "rna",
    _stop_after_steps: int | None = None,
) -> BioDTA:
    """Train a BioDTA with Geneformer's masked-gene objective and check that it learned gene–gene dependencies.

    Cells are tokenized for the model (:func:`sc_dta.pp.tokenize`), genes with a DNA embedding in
    ``adata.varm[dna_key]`` take their input embedding from the adapter, and the model learns to predict
    masked genes from the rest of each cell: ``mask_prob`` of the gene tokens (at least one per cell) are
    chosen, 80% of them replaced by ``<mask>``, 10% by a random gene and 10% left unchanged (BERT /
    Geneformer). AdamW with linear warm-up and decay, gradient accumulation, batches grouped by length.

    After every epoch the loss on held-out cells (``val_fraction``; every chosen gene replaced by ``<mask>``,
    so copying the input earns nothing) is measured; with ``early_stopping`` training stops when it has not
    improved for that many epochs and the best weights are restored. At the end the *context gain* is
    measured on the held-out cells: the masked-gene log-likelihood with the real context minus with a
    context whose visible genes are drawn at random from the gene frequencies. A gain near 0 means the model
    predicts genes from their frequency alone, so perturbations can only return noise: a warning says so.

    Distributed: under an initialised :mod:`torch.distributed` process group of more than one process (NCCL on
    GPUs, gloo on CPUs; e.g. ``torchrun``), every process must call :func:`train_adapter` with the same arguments on
    its own copy of the same data and model (a mismatch of data or settings is a ValueError on every process; the
    weights of the main process's model are copied to the others when training starts). The model is trained in
    :class:`~torch.nn.parallel.DistributedDataParallel` (``device_ids`` on CUDA): every process draws the same global
    batches and masks from ``seed`` and computes the loss of its own slice of each batch, so ``batch_size`` stays the
    *global* batch and the averaged gradient equals one process's gradient of that batch (the masked-gene losses are
    summed and divided by the global number of masked genes). The held-out loss and the context gain are evaluated on
    shares of the held-out batches and summed, so every process sees the same numbers and takes the same
    early-stopping and best-weights decisions. With dropout, each process draws its own dropout masks (seeded by
    ``seed``, its rank and the step), so the run equals one process in distribution, not in every digit; without
    dropout the loss curve equals one process's up to float summation order. Checkpoints and the final model in
    ``output_dir`` are written by the main process only (``resume`` reads them there and hands them to the others);
    every process returns the same trained model and writes the same ``adata.uns[key_added]``. Only the main process
    draws the progress bar. Pass each process its own ``device`` (e.g. ``f"cuda:{local_rank}"``, after
    ``torch.cuda.set_device(local_rank)``, which NCCL's object collectives need).

    Parameters
    ----------
    adata
        Raw counts (``X`` or ``layer``) with DNA embeddings in ``varm[dna_key]`` (e.g. from
        :func:`sc_dta.tl.embed_dna`; NaN rows = genes without a DNA embedding).
    model
        A :class:`~sc_dta.models.BioDTA` (trained further, in place; e.g. from
        :meth:`BioDTA.from_adata <sc_dta.models.BioDTA.from_adata>`), or a Geneformer ``BertForMaskedLM``
        (e.g. from :func:`~sc_dta.models.load_geneformer`) which is wrapped into a new BioDTA with an adapter
        sized from ``varm[dna_key]``.
    dna_key
        Key of the DNA embeddings in ``adata.varm``.
    epochs
        Passes over the training cells; default :func:`default_epochs` (about 100,000 cell passes, 5 to 100
        epochs), cut short by ``early_stopping``.
    batch_size
        Cells per micro-batch (of all processes together under :mod:`torch.distributed`); default
        ``dta.settings.batch_size_cells``.
    lr
        Peak learning rate.
    mask_prob
        Fraction of gene tokens to predict.
    freeze_backbone
        Train the adapter only. Default: frozen for a pretrained backbone (Geneformer), trained for one built
        from the cells (:meth:`~sc_dta.models.BioDTA.from_adata`, :meth:`~sc_dta.models.BioDTA.from_config`).
    early_stopping
        Patience in epochs on the held-out loss (None: train all epochs, keep the last weights). A run never stops
        before half of its epochs: masked-gene training first plateaus on the gene frequencies.
    val_fraction
        Fraction of cells held out for the held-out loss and the context gain (0 = none).
    output_dir
        Folder for checkpoints (``checkpoint/``, rewritten every epoch and on interruption) and the final
        model (``model/``, :meth:`BioDTA.save_pretrained <sc_dta.models.BioDTA.save_pretrained>`).
    resume
        Continue from the checkpoint in ``output_dir``: weights, optimiser, scheduler, random states, step and
        early-stopping state are restored, so the result equals an uninterrupted run with the same arguments.
    seed
        Seed of the adapter initialisation, the validation split, batch order, masking and dropout. The
        caller's global random states are left as they were.
    device
        Torch device; default ``dta.settings.device``. bf16 autocast on CUDA.
    accumulation_steps
        Micro-batches per optimiser step (gradients averaged over all masked genes of the step).
    weight_decay
        AdamW weight decay (not applied to biases and LayerNorm weights).
    warmup_ratio
        Fraction of the optimiser steps with a linear warm-up.
    max_grad_norm
        Gradient clipping norm (None = no clipping).
    layer, gene_id_key
        Passed to :func:`sc_dta.pp.tokenize`.
    max_length
        Tokens per cell (default the model vocabulary's ``max_length``); stored in the returned model's
        vocabulary, so perturbations tokenize the same way.
    mode, adapter_layers, adapter_hidden, adapter_dropout
        Adapter settings when ``model`` is a plain backbone (see :class:`~sc_dta.models.BioDTA`); an error with a
        BioDTA, whose adapter already exists.
    key_added
        Key in ``adata.uns`` for the parameters, loss history and diagnostics.
    mod
        Modality of a MuData.

    Returns
    -------
    The trained :class:`~sc_dta.models.BioDTA` in eval mode, its ``loss_history`` extended, and writes
    ``adata.uns[key_added]``: ``params``, ``step``, ``loss``, ``lr`` (per optimiser step), ``val_epoch``,
    ``val_loss``, ``best_epoch``, ``context_gain``, ``loss_real_context``, ``loss_shuffled_context``.
    """
    import torch
    from tqdm.auto import tqdm

    from sc_dta.models.biodta import BioDTA

    adata = get_anndata(adata, mod)
    _check_args(epochs, batch_size, lr, mask_prob, val_fraction, accumulation_steps, warmup_ratio, resume, output_dir)
    if early_stopping is not None and (
        isinstance(early_stopping, bool) or not isinstance(early_stopping, int | np.integer) or early_stopping < 1
    ):
        raise ValueError(f"early_stopping must be a positive integer (epochs) or None, got {early_stopping!r}.")
    batch_size = settings.batch_size_cells if batch_size is None else batch_size
    previous = adata.uns.get(key_added)
    if previous is not None and not (isinstance(previous, dict) and "val_loss" in previous and "params" in previous):
        raise ValueError(
            f"key_added={key_added!r}: adata.uns[{key_added!r}] already holds something that is not a train_adapter "
            "record; choose another key_added."
        )
    is_biodta = isinstance(model, BioDTA)
    if not is_biodta and not hasattr(model, "bert"):
        raise TypeError(f"model must be a BioDTA or a Geneformer BertForMaskedLM, got {type(model).__name__}.")
    adapter_args = {
        "mode": mode,
        "adapter_layers": adapter_layers,
        "adapter_hidden": adapter_hidden,
        "adapter_dropout": adapter_dropout,
    }
    if is_biodta:
        given = sorted(k for k, v in adapter_args.items() if v is not None)
        if given:
            raise ValueError(
                f"{', '.join(given)}: the BioDTA passed as model already has its adapter; set these when building it "
                "(BioDTA.from_adata(..., adapter_dropout=...), BioDTA(backbone, ...)) or pass a plain backbone."
            )
    if freeze_backbone is None:
        freeze_backbone = bool(model.pretrained_backbone) if is_biodta else True

    # ---- inputs: DNA embeddings, tokens, held-out split (all checked before the model or adata is touched)
    inputs = _training_inputs(adata, model, dna_key, layer, gene_id_key, max_length, val_fraction, seed)
    dna, vocab, seqs, lengths = inputs.dna, inputs.vocab, inputs.seqs, inputs.lengths
    dna_token_ids, dna_rows, special = inputs.dna_token_ids, inputs.dna_rows, inputs.special
    val_cells, train_cells, used_max_length = inputs.val_cells, inputs.train_cells, inputs.max_length
    if epochs is None:
        epochs = default_epochs(train_cells.size)

    dev = resolve_device(device)
    dist = Distributed()
    out = Path(output_dir).expanduser() if output_dir is not None else None
    ckpt = out / ckpt_io.CHECKPOINT_DIR if out is not None else None
    if dist.active:
        flat = np.concatenate(seqs) if seqs else np.empty(0, dtype=np.int64)
        dist.check_same(
            (flat.tobytes(), lengths.tobytes(), train_cells.tobytes(), val_cells.tobytes(), dna_rows.tobytes(),
             dna_token_ids.tobytes(), int(epochs), int(batch_size), int(accumulation_steps), float(lr), int(seed)),
            "cells, tokens, DNA embeddings or training settings",
        )  # fmt: skip
        logger.info(
            "train_adapter: process %d of %d, DistributedDataParallel (%s).", dist.rank, dist.size, dist.backend
        )
    # the main process reads the checkpoint (the others may not share its file system) and hands it to all
    state = dist.broadcast(ckpt_io.read_state(ckpt) if resume and dist.main else None)
    if resume and state is None:
        logger.warning("resume=True but %s holds no checkpoint: training from the start.", ckpt)

    n_batches = math.ceil(train_cells.size / batch_size)
    steps_per_epoch = math.ceil(n_batches / accumulation_steps)
    total_steps = epochs * steps_per_epoch
    warmup_steps = int(warmup_ratio * total_steps)
    run = {
        "seed": int(seed),
        "epochs": int(epochs),
        "batch_size": int(batch_size),
        "accumulation_steps": int(accumulation_steps),
        "lr": float(lr),
        "mask_prob": float(mask_prob),
        "freeze_backbone": bool(freeze_backbone),
        "weight_decay": float(weight_decay),
        "warmup_ratio": float(warmup_ratio),
        "early_stopping": 0 if early_stopping is None else int(early_stopping),
        "n_train_cells": int(train_cells.size),
        "n_val_cells": int(val_cells.size),
    }
    if state is not None:
        diff = {k: (state["run"].get(k), run[k]) for k in _RESUME_KEYS if state["run"].get(k) != run[k]}
        if diff:
            raise ValueError(
                f"resume=True: the checkpoint in {ckpt} was written by a run with other settings "
                f"(checkpoint, now): {diff}."
            )

    cuda_devices = [dev] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda_devices), reproducible(dev):
        torch.manual_seed(seed)
        if is_biodta:
            bio = model
        else:
            bio = BioDTA(
                model,
                vocab,
                d_dna=dna.shape[1],
                mode=mode or "replace",
                adapter_layers=2 if adapter_layers is None else adapter_layers,
                adapter_hidden=adapter_hidden,
                adapter_dropout=0.1 if adapter_dropout is None else adapter_dropout,
            )
        _record_encoder(bio, _encoder_info(adata, dna_key), dna_key)
        bio.set_dna_embeddings(dna_token_ids, dna_rows)
        bio.to(dev)
        grad_flags = [(p, p.requires_grad) for p in bio.parameters()]  # restored afterwards
        bio.freeze_backbone(freeze_backbone)
        if not freeze_backbone:
            bio.backbone_trained = True
        params = [p for p in bio.parameters() if p.requires_grad]
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=lr,
            betas=(0.9, 0.999),
            eps=1e-8,
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_warmup_decay(warmup_steps, total_steps))
        mask_gen = torch.Generator().manual_seed(seed)
        gene_ids = np.setdiff1d(np.arange(len(vocab)), special)
        masker = Masker(special, int(vocab.pad_id), int(vocab.mask_id), torch.as_tensor(gene_ids), mask_prob)
        held_out_masker = Masker(
            special, int(vocab.pad_id), int(vocab.mask_id), torch.as_tensor(gene_ids), mask_prob, replace_mask=1.0
        )
        val_batches = masked_batches(seqs, lengths, val_cells, batch_size, held_out_masker, seed)

        progress_state = Progress()
        if state is not None:
            if dist.main or (ckpt / ckpt_io.MODEL_DIR).is_dir():
                # without the folder, a process gets the main process's weights when DDP is built (in the Trainer)
                ckpt_io.load_checkpoint_weights(bio, ckpt / ckpt_io.MODEL_DIR)
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            ckpt_io.set_rng_state(state["rng"], mask_gen, cuda_devices)
            progress_state = Progress(
                step=int(state["step"]),
                epoch=int(state["epoch"]),
                group=int(state["group"]),
                history=list(state["history"]),
                best=dict(state.get("best", progress_state.best)),
                stopped=bool(state.get("stopped", False)),
            )
            logger.info("Resuming from %s at epoch %d, step %d.", ckpt, progress_state.epoch, progress_state.step)
        prior_history = list(bio.loss_history) if state is None else list(state.get("prior_history", []))

        def save_checkpoint(done: Progress, rng: dict) -> None:
            bio.loss_history = prior_history + done.history
            if not dist.main:  # every process holds the same state: the main process writes it
                return
            payload = {
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": rng,
                "step": done.step,
                "epoch": done.epoch,
                "group": done.group,
                "history": done.history,
                "prior_history": prior_history,
                "best": done.best,
                "stopped": done.stopped,
                "run": run,
            }
            ckpt_io.write_checkpoint(ckpt, bio, payload)

        trainer = Trainer(
            bio,
            optimizer,
            scheduler,
            masker,
            mask_gen,
            seqs=seqs,
            lengths=lengths,
            train_cells=train_cells,
            batch_size=batch_size,
            accumulation_steps=accumulation_steps,
            epochs=epochs,
            max_grad_norm=max_grad_norm,
            freeze_backbone=freeze_backbone,
            seed=seed,
            device=dev,
            val_batches=val_batches,
            early_stopping=early_stopping,
            min_epochs=math.ceil(MIN_EPOCH_FRACTION * epochs),
            checkpoint=save_checkpoint if ckpt is not None else None,
            stop_after_steps=_stop_after_steps,
            dist=dist,
        )
        show = settings.progress and dist.main
        bar = tqdm(total=total_steps, initial=progress_state.step, desc="train_adapter", unit="step", disable=not show)
        t0 = time.perf_counter()
        try:
            progress_state = trainer.fit(progress_state, bar)
        except KeyboardInterrupt:
            if ckpt is not None:
                logger.warning(
                    "Interrupted at step %d: resume with resume=True, output_dir=%r.", progress_state.step, str(out)
                )
            raise
        finally:
            bar.close()
            trainer.ddp = None  # releases DistributedDataParallel's hooks on the parameters
            bio.eval()
            for p, flag in grad_flags:
                p.requires_grad_(flag)
        history, best, n_tokens = progress_state.history, progress_state.best, trainer.n_tokens
        elapsed = time.perf_counter() - t0
        if n_tokens:
            logger.info("Trained on %d tokens in %.1f s (%.0f tokens/s).", n_tokens, elapsed, n_tokens / elapsed)
        if best["weights"] is not None:
            ckpt_io.restore_weights(bio, best["weights"])
        diagnostics = _diagnostics(bio, val_batches, seqs, train_cells, gene_ids, vocab, dev, seed, dist)

    if used_max_length != vocab.max_length:
        bio.vocab = copy.copy(bio.vocab)
        bio.vocab.max_length = int(used_max_length)
    bio.loss_history = prior_history + history
    if out is not None and dist.main:
        bio.save_pretrained(out / ckpt_io.MODEL_DIR)
    dist.barrier()  # the saved model exists when train_adapter returns, on every process
    train_records = [h for h in history if "loss" in h]
    val_records = [h for h in history if "val_loss" in h]
    params_out = {
        **run,
        "dna_key": dna_key,
        "val_fraction": float(val_fraction),
        "mode": bio.mode,
        "max_length": int(used_max_length),
        "position_free": bool(bio.position_free),
        "n_dna_tokens": int(dna_token_ids.size),
        "device": str(dev),
    }
    if out is not None:
        params_out["output_dir"] = str(out)
    adata.uns[key_added] = {
        "params": params_out,
        "step": np.array([h["step"] for h in train_records], dtype=np.int64),
        "loss": np.array([h["loss"] for h in train_records], dtype=np.float64),
        "lr": np.array([h["lr"] for h in train_records], dtype=np.float64),
        "val_epoch": np.array([h["epoch"] for h in val_records], dtype=np.int64),
        "val_loss": np.array([h["val_loss"] for h in val_records], dtype=np.float64),
        "best_epoch": int(best["epoch"]),
        **diagnostics,
    }
    return bio


@dataclass
class _Inputs:
    """What training reads from the AnnData, checked: DNA rows per token, token ids per cell, the split."""

    dna: np.ndarray
    vocab: Any
    seqs: list[np.ndarray]
    lengths: np.ndarray
    dna_token_ids: np.ndarray
    dna_rows: np.ndarray
    special: np.ndarray
    val_cells: np.ndarray
    train_cells: np.ndarray
    max_length: int


def _training_inputs(
    adata: AnnData,
    model: Any,
    dna_key: str,
    layer: str | None,
    gene_id_key: str | None,
    max_length: int | None,
    val_fraction: float,
    seed: int,
) -> _Inputs:
    """Check and collect the DNA embeddings and tokens of ``adata`` for ``model``; split held-out cells."""
    from sc_dta.models.biodta import BioDTA
    from sc_dta.models.cell import model_vocab
    from sc_dta.pp._tokenize import tokenize

    is_biodta = isinstance(model, BioDTA)
    backbone = model.backbone if is_biodta else model
    dna, dna_valid = _dna_embeddings(adata, dna_key, model.d_dna if is_biodta else None)
    vocab = model_vocab(model)
    max_pos = int(backbone.config.max_position_embeddings)
    used_max_length = min(max_length or vocab.max_length, max_pos)
    tokens = tokenize(adata, vocab=vocab, layer=layer, gene_id_key=gene_id_key, max_length=used_max_length)
    var_tokens = np.asarray(tokens.var_token_ids, dtype=np.int64)
    if not (var_tokens >= 0).any():
        raise ValueError(
            f"No gene of adata.var_names (e.g. {list(adata.var_names[:3])}) is in the model's {vocab.version} "
            "vocabulary: check gene_id_key= (Ensembl IDs or symbols are expected)."
        )
    with_dna = (var_tokens >= 0) & dna_valid
    if not with_dna.any():
        raise ValueError(
            f"None of the {int((var_tokens >= 0).sum())} genes in the vocabulary has a DNA embedding in "
            f"adata.varm[{dna_key!r}]."
        )
    dna_token_ids, first = np.unique(var_tokens[with_dna], return_index=True)
    dna_rows = dna[np.flatnonzero(with_dna)[first]]
    logger.info(
        "%d of %d genes in the vocabulary have a DNA embedding (%d tokens).",
        int(with_dna.sum()),
        int((var_tokens >= 0).sum()),
        dna_token_ids.size,
    )
    special = np.asarray(sorted(int(i) for i in vocab.special_ids), dtype=np.int64)
    seqs = [np.asarray(s, dtype=np.int64) for s in tokens.input_ids]
    lengths = np.array([s.size for s in seqs], dtype=np.int64)
    flat = np.concatenate(seqs) if seqs else np.empty(0, dtype=np.int64)
    is_gene = ~np.isin(flat, special)
    cum = np.concatenate([[0], np.cumsum(is_gene)])
    ends = np.cumsum(lengths)
    n_genes = cum[ends] - cum[ends - lengths]  # gene (non-special) tokens per cell
    usable = np.flatnonzero(n_genes > 0)
    if usable.size == 0:
        raise ValueError("No cell has counts for a gene in the vocabulary: nothing to train on.")
    if usable.size < len(seqs):
        logger.info("%d cells without genes in the vocabulary are skipped.", len(seqs) - usable.size)
    split_rng = np.random.default_rng([seed, 1])
    order = split_rng.permutation(usable)
    n_val = int(round(val_fraction * order.size)) if val_fraction > 0 else 0
    if val_fraction > 0 and order.size >= 2:
        n_val = min(max(n_val, 1), order.size - 1)
    val_cells, train_cells = np.sort(order[:n_val]), order[n_val:]
    return _Inputs(
        dna, vocab, seqs, lengths, dna_token_ids, dna_rows, special, val_cells, train_cells, int(used_max_length)
    )


def _diagnostics(bio, val_batches, seqs, train_cells, gene_ids, vocab, dev, seed, dist=None) -> dict[str, float]:
    """Context gain on the held-out cells (NaN without them); warns (on the main process) when it is near 0."""
    nan = float("nan")
    if not val_batches:
        logger.info("No held-out cells (val_fraction=0): the context gain is not measured.")
        return {"context_gain": nan, "loss_real_context": nan, "loss_shuffled_context": nan}
    train_tokens = np.concatenate([seqs[c] for c in train_cells])
    freq = np.bincount(train_tokens, minlength=len(vocab)).astype(np.float64)[gene_ids] + 1e-3
    shuffled = shuffled_context(val_batches, gene_ids, freq, seed)
    gain, real, fake = context_gain(bio, val_batches, shuffled, dev, dist)
    logger.info(
        "Context gain %.3f nats per masked gene (held-out loss %.3f with the real context, %.3f shuffled).",
        gain,
        real,
        fake,
    )
    if not gain > MIN_CONTEXT_GAIN and (dist is None or dist.main):
        warnings.warn(
            f"train_adapter: the model learned no gene-gene dependencies (context gain {gain:.3f} nats per masked gene "
            f"on held-out cells, below {MIN_CONTEXT_GAIN}): it predicts genes from their frequency alone, so "
            "perturbation results will be noise. Train longer (epochs=), with more cells, or a lower lr.",
            UserWarning,
            stacklevel=3,
        )
    return {"context_gain": float(gain), "loss_real_context": float(real), "loss_shuffled_context": float(fake)}


def _record_encoder(bio: BioDTA, info: dict[str, Any], dna_key: str) -> None:
    """Record the DNA encoder of ``adata.uns[dna_key]`` on the model; refuse a different one."""
    if not bio.dna_encoder_info:
        bio.dna_encoder_info = info
        return
    known = bio.dna_encoder_info
    for attr in ("name", "window", "weights_id"):
        if attr in info and attr in known and str(info[attr]) != str(known[attr]):
            raise ValueError(
                f"adata.uns[{dna_key!r}]: the DNA embeddings were made with encoder {attr} {info[attr]!r}, the model's "
                f"adapter with {known[attr]!r}; embed the DNA again with the model's encoder "
                f"({known.get('name')}, window {known.get('window')})."
            )


# ---------------------------------------------------------------------- checks and inputs
def _check_args(
    epochs: int | None,
    batch_size: int | None,
    lr: float,
    mask_prob: float,
    val_fraction: float,
    accumulation_steps: int,
    warmup_ratio: float,
    resume: bool,
    output_dir: str | Path | None,
) -> None:
    for name, value in (("epochs", epochs), ("accumulation_steps", accumulation_steps)):
        if name == "epochs" and value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    if batch_size is not None and (
        isinstance(batch_size, bool) or not isinstance(batch_size, int | np.integer) or batch_size < 1
    ):
        raise ValueError(f"batch_size must be a positive integer or None, got {batch_size!r}.")
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr!r}.")
    if not 0 < mask_prob < 1:
        raise ValueError(f"mask_prob must be in (0, 1), got {mask_prob!r}.")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}.")
    if not 0 <= warmup_ratio < 1:
        raise ValueError(f"warmup_ratio must be in [0, 1), got {warmup_ratio!r}.")
    if resume and output_dir is None:
        raise ValueError("resume=True needs output_dir= (the folder holding the checkpoint).")


def _dna_embeddings(adata: AnnData, dna_key: str, d_dna: int | None) -> tuple[np.ndarray, np.ndarray]:
    if dna_key not in adata.varm:
        raise KeyError(
            f"dna_key={dna_key!r} is not in adata.varm (keys: {list(adata.varm.keys())}); "
            "compute DNA embeddings with dta.tl.embed_dna first."
        )
    value = adata.varm[dna_key]
    arr = value.to_numpy() if hasattr(value, "to_numpy") else np.asarray(value)
    if arr.ndim != 2 or arr.shape[0] != adata.n_vars or arr.shape[1] < 1:
        raise ValueError(f"adata.varm[{dna_key!r}] must have shape (n_vars, d_dna), got {arr.shape}.")
    if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
        raise ValueError(f"adata.varm[{dna_key!r}] must be a real numeric array, got dtype {arr.dtype}.")
    arr = arr.astype(np.float32, copy=False)
    if np.isinf(arr).any():
        n_inf = int(np.isinf(arr).any(axis=1).sum())
        raise ValueError(f"adata.varm[{dna_key!r}] has infinite values in {n_inf} rows.")
    valid = ~np.isnan(arr).any(axis=1)
    if not valid.any():
        raise ValueError(f"adata.varm[{dna_key!r}] is NaN for every gene: no gene has a DNA embedding.")
    if d_dna is not None and arr.shape[1] != d_dna:
        raise ValueError(
            f"adata.varm[{dna_key!r}] has {arr.shape[1]} dimensions but the model's adapter expects d_dna={d_dna}."
        )
    return arr, valid


def _encoder_info(adata: AnnData, dna_key: str) -> dict[str, Any]:
    info = adata.uns.get(dna_key)
    if not isinstance(info, dict):
        return {}
    params = info.get("params", info)
    if not isinstance(params, dict):
        return {}
    out: dict[str, Any] = {}
    if "encoder" in params:
        out["name"] = str(params["encoder"])  # embed_dna's "encoder" is the encoder's name
    for k, v in params.items():
        if isinstance(v, np.generic):
            v = v.item()
        if isinstance(v, str | int | float | bool):
            out[str(k)] = v
    return out
